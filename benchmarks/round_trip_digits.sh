#!/usr/bin/env bash
# The researcher's round trip on the digits (issue "A researcher's round trip"), one process on this machine:
#   1. train the demo's ViT-tiny-8 (400 steps of 64, the digits preset) -> a checkpoint;
#   2. DTP-ViT-tiny-8-4x trained for the same short schedule (STEPS steps of 64) from that ViT checkpoint and from
#      random init: zero-shot top-1 of both;
#   3. harness export of the ViT run -> open_clip loads the folder and zero-shot evaluates it;
#   4. harness classify of the ViT run: linear probe and finetune top-1 on the held-out digits.
# Writes OUT/{summaries.json,export_zeroshot.txt,classify.json,commands.txt}; runs go to WORK (not committed).
#
#   benchmarks/round_trip_digits.sh [DATA=data/digits] [OUT=results/round_trip_digits] [WORK=runs/round_trip]
set -euo pipefail
DATA=${DATA:-data/digits}
OUT=${OUT:-results/round_trip_digits}
WORK=${WORK:-runs/round_trip}
STEPS=${STEPS:-100}
PY=${PY:-.venv/bin/python}
HARNESS=${HARNESS:-.venv/bin/harness}
test -d "$DATA/train" || { echo "error: DATA: $DATA/train missing (harness data digits --out $DATA)" >&2; exit 2; }
test ! -e "$OUT" || { echo "error: OUT: $OUT exists; choose a new folder" >&2; exit 2; }
mkdir -p "$OUT" "$WORK"
: > "$OUT/commands.txt"
run() { echo "$*" >> "$OUT/commands.txt"; "$@"; }
common=(--train-data "$DATA/train" --zeroshot-data "$DATA/val" --output-dir "$WORK" train.progress_bar=false)

run $PY train.py --config digits "${common[@]}" --run-name vit
ckpt=$(ls -d "$WORK"/vit/checkpoints/step_* | sort | tail -1)
run $PY train.py --config digits "${common[@]}" --model DTP-ViT-tiny-8-4x --train-samples $((STEPS * 64)) \
    --run-name dtp-from-vit "model.pretrained=$ckpt/model.pt"
run $PY train.py --config digits "${common[@]}" --model DTP-ViT-tiny-8-4x --train-samples $((STEPS * 64)) \
    --run-name dtp-random
run $HARNESS export "$WORK/vit" "$WORK/vit-export"
run $PY benchmarks/roundtrip_zeroshot.py "$WORK/vit-export" "$DATA/val" --summary "$WORK/vit/summary.json" \
    | tee "$OUT/export_zeroshot.txt"
run $HARNESS classify "$WORK/vit" --data "$DATA/val" --val-fraction 0.5 --out "$OUT/classify.json"
$PY - "$WORK" "$OUT/summaries.json" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), sys.argv[2]
keys = ("model", "steps", "final_loss", "zeroshot_top1", "zeroshot_top5")
rows = {}
for name in ("vit", "dtp-from-vit", "dtp-random"):
    s = json.loads((work / name / "summary.json").read_text())
    rows[name] = {k: s.get(k) for k in keys}
    lines = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    sf = [r["shortening_factor"] for r in lines if "shortening_factor" in r]
    rows[name]["shortening_factor_last_logged"] = sf[-1] if sf else None
Path(out).write_text(json.dumps(rows, indent=1) + "\n")
print(json.dumps(rows, indent=1))
EOF
