#!/usr/bin/env bash
# The GPU suite in one call, for a machine with torch + CUDA but without deepspeed, open_clip_torch, webdataset,
# fvcore and their small dependencies, and without a package registry (docs/benchmarks.md). Prepare the
# wheel folder here first (benchmarks/gpu_wheels.sh -> .whl), carry it, then on the GPU machine:
#
#   benchmarks/gpu_suite.sh                       # everything, ~25 minutes on one H100
#   benchmarks/gpu_suite.sh --only smoke,tests    # some steps (names below)
#   benchmarks/gpu_suite.sh --dry-run             # print the commands, run nothing (works without a GPU)
#
# Every step runs under `timeout` (STEP_LIMIT seconds, default 540: a step that hangs costs little) with its
# output in OUT/logs/<step>.log and its status in OUT/steps.tsv; a failed step does not stop the others. OUT
# (default results/gpu_<device>) gets env.json (device, driver, torch, CUDA, versions) and commands.txt.
# Steps: smoke (3 steps per engine + DTP-ViT), tests (pytest -m gpu), fit_b32, fit_l14 (memory-fit tables, resumable:
# run again to finish a sweep cut by the limit), profile (MFU table + a trace of one step), peer (open_clip_train on
# the same GPU), dtp (DTP-ViT vs ViT image tower).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0; ONLY=""; OUT="${OUT:-}"; WHEELS="${WHEELS:-.whl}"; LIMIT="${STEP_LIMIT:-540}"
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    *) echo "error: $1: unknown argument; allowed: --dry-run, --only STEP[,STEP], --out DIR, --wheels DIR" >&2; exit 2 ;;
  esac
  shift
done
STEPS="smoke tests fit_b32 fit_l14 profile peer dtp"
for s in ${ONLY//,/ }; do
  [[ " $STEPS " == *" $s "* ]] || { echo "error: --only: $s is not one of: $STEPS" >&2; exit 2; }
done
PY="${PYTHON:-python3}"

if [[ $DRY_RUN == 1 ]]; then
  DEVICE="DEVICE"
else
  if [[ -d "$WHEELS" ]]; then  # the registry is out of reach: install what the machine lacks from the wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || {
    echo "error: no CUDA device visible to torch" >&2; exit 1; }
fi
OUT="${OUT:-results/gpu_$DEVICE}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
HARNESS=("$PY" -m harness.cli)
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1)
SYN=(--config synthetic --model ViT-B-32 --precision bf16 --micro-batch-size 128 --train-samples 384
     train.progress_bar=false train.log_every_steps=1)

run_step() {  # run_step NAME CMD...: one bounded step, logged
  local name=$1; shift
  [[ -z "$ONLY" || ",$ONLY," == *",$name,"* ]] || return 0
  if [[ $DRY_RUN == 1 ]]; then printf '%s:' "$name"; printf ' %q' "$@"; printf '\n'; return 0; fi
  mkdir -p "$OUT/logs"
  printf '%s:' "$name" >> "$OUT/commands.txt"; printf ' %q' "$@" >> "$OUT/commands.txt"; echo >> "$OUT/commands.txt"
  local start=$SECONDS
  timeout --kill-after=20 "$LIMIT" "$@" > >(tee -a "$OUT/logs/$name.log") 2>&1
  local rc=$?
  printf '%s\t%s\t%s s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
}

if [[ $DRY_RUN == 0 ]]; then
  mkdir -p "$OUT"
  "$PY" - "$OUT/env.json" <<'PYEOF'
import importlib.metadata, json, subprocess, sys, torch
versions = {}
for pkg in ("torch", "deepspeed", "accelerate", "open_clip_torch", "timm", "webdataset", "fvcore", "triton", "flash-attn"):
    try:
        versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        versions[pkg] = None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
json.dump({"device": torch.cuda.get_device_name(0), "nvidia_smi": smi, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
           "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "versions": versions}, open(sys.argv[1], "w"), indent=2)
PYEOF
fi

# (smoke) 3 steps under every engine, and DTP-ViT: what fails here is a bug to fix before the long steps
run_step smoke bash -c "set -e
  $PY train.py ${SYN[*]} --output-dir $OUT/smoke --run-name plain
  for cfg in zero2 zero3 fsdp; do ${LAUNCH[*]} --config_file ds_configs/\$cfg.yaml train.py ${SYN[*]} \
    --output-dir $OUT/smoke --run-name \$cfg; done
  ${LAUNCH[*]} --config_file ds_configs/zero2.yaml train.py ${SYN[*]} --model DTP-ViT-B-32-4x \
    --output-dir $OUT/smoke --run-name dtp4-zero2"
# (tests) every engine x precision x attention backend, fp16 overflow, checkpointing, host syncs, OOM forms
run_step tests "$PY" -m pytest -q -m gpu tests/test_gpu.py
# (fit) memory-fit tables: 1 GPU measured; 8 and 64 GPUs emulated for ZeRO-3 / FSDP2 (a killed sweep resumes)
for model in ViT-B-32 ViT-L-14; do
  name=fit_$(echo "${model#ViT-}" | tr 'A-Z-' 'a-z_' | tr -d '_')
  run_step "$name" bash -c "set -e
    ${HARNESS[*]} fit-probe --models $model --stages 0,2 --precisions bf16 --checkpointing 0,1 \
      --attention sdpa,math --gpus-per-node 1 --timeout 240 --out $OUT/fit
    ${HARNESS[*]} fit-probe --models $model --stages 3,fsdp --precisions bf16 --checkpointing 0,1 \
      --attention sdpa,math --gpus-per-node 1,8 --nodes 1,8 --timeout 240 --out $OUT/fit"
done
# (profile) MFU of each model at its largest fitting micro batch (from the fit table, else 128), a trace of step 4
run_step profile bash -c "set -e
  for spec in ViT-B-32:512 ViT-B-16:256 ViT-L-14:128 DTP-ViT-B-32-2x:512 DTP-ViT-B-32-4x:512 DTP-ViT-B-32-10x:512; do
    model=\${spec%%:*}; batch=\$($PY benchmarks/fit_batch.py $OUT/fit \$model \${spec##*:})
    ${HARNESS[*]} profile --models \$model --micro-batch-size \$batch --precision bf16 --steps 10 \
      --warmup-steps 3 --trace-step 6 --out $OUT/profile/\$model
  done"
# (peer) open_clip_train against this harness, same GPU, model, batch and precision
run_step peer bash -c "set -e
  $PY benchmarks/peer_open_clip.py --model ViT-B-32 --batch 256 --precision bf16 --steps 30 --warmup 10 \
    --workers 8 --repeats 2 --out $OUT/peer_open_clip_vit_b32.json
  $PY benchmarks/peer_open_clip.py --model ViT-L-14 --batch 64 --precision bf16 --steps 20 --warmup 5 \
    --workers 8 --out $OUT/peer_open_clip_vit_l14.json"
# (dtp) DTP-ViT-B-32-10x against ViT-B-32, image tower, equal batch
run_step dtp "$PY" benchmarks/dtp_vs_vit.py --batch 256 --precision bf16 --warmup 5 --steps 20 \
  --out "$OUT/dtp_vs_vit.json"

[[ $DRY_RUN == 1 ]] || { echo "steps (name, exit status, seconds):"; cat "$OUT/steps.tsv"; }
