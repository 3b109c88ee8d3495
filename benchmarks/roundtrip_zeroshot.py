"""Round-trip check: the zero-shot accuracy of an exported folder loaded by open_clip itself, next to what the
training run reported.

The folder is loaded with ``open_clip.create_model_and_transforms("local-dir:<folder>")`` and its tokenizer with
``open_clip.get_tokenizer("local-dir:<folder>")`` (no harness code builds the model); the zero-shot evaluation is
the harness's (:func:`harness.eval.zeroshot.zeroshot_eval`: the folder's ``classnames.txt``/``templates.txt``). With
``--summary`` the run's ``summary.json`` figures are printed beside it.

    python benchmarks/roundtrip_zeroshot.py exports/vit-digits data/digits/val --summary runs/vit-digits/summary.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exported", help="folder written by harness export (a ViT model)")
    p.add_argument("images", help="labelled ImageFolder for zero-shot classification")
    p.add_argument("--summary", help="the training run's summary.json, for its zero-shot figures")
    args = p.parse_args()

    import open_clip

    from harness.eval.zeroshot import zeroshot_eval

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.exported}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{args.exported}")
    result = {"exported": args.exported, "loaded_by": f"open_clip {open_clip.__version__} local-dir",
              **zeroshot_eval(model, tokenizer, args.images, preprocess)}
    if args.summary:
        summary = json.loads(Path(args.summary).read_text())
        result["run_zeroshot_top1"], result["run_zeroshot_top5"] = summary["zeroshot_top1"], summary["zeroshot_top5"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
