"""Print the largest fitting micro batch of a model's single-GPU cell (ZeRO-0, bf16, no checkpointing, sdpa) from a
fit-probe store, or a default: how ``benchmarks/gpu_suite.sh`` profiles each model at its largest batch.

    python benchmarks/fit_batch.py FIT_DIR MODEL DEFAULT
"""
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    folder, model, default = (sys.argv[1:] if argv is None else argv)
    best = None
    path = Path(folder) / "cells.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            c = json.loads(line)
        except json.JSONDecodeError:
            continue  # a record cut by a kill
        if (c.get("model"), c.get("stage"), c.get("precision"), c.get("checkpointing"), c.get("attention"),
                c.get("world"), c.get("how")) == (model, "0", "bf16", 0, "sdpa", 1, "measured") and c.get("max_batch"):
            best = c["max_batch"]
    print(best or int(default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
