#!/usr/bin/env bash
# Prepare the wheel folder the GPU machine installs from (it has torch, accelerate, timm, triton, transformers,
# tensorboard, safetensors, scikit-learn, matplotlib, pyyaml ... but not these, and reaches no registry; see
# docs/benchmarks.md). Run here, with the project's venv; carry `.whl` to the GPU machine, where
# `benchmarks/gpu_suite.sh` installs it with `pip install --no-index --no-deps --target`.
#
#   benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored), pinned to constraints.txt where listed
#   DRY_RUN=1 benchmarks/gpu_wheels.sh  # print the commands
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${WHEELS:-.whl}"
# the version constraints.txt pins, else the one installed in this venv (checked together here), else the latest
pin() {
  local v; v=$(grep -i "^$1==" constraints.txt | head -1)
  [[ -n "$v" ]] || v=$("$PY" -m pip show "$1" 2>/dev/null | awk -v n="$1" '/^Version:/ {print n "==" $2}')
  echo "${v:-$1}"
}
# binary wheels for the GPU machine's Python 3.12 / x86-64
BINARY=()
for name in open_clip_torch webdataset braceexpand iopath yacs portalocker ftfy wcwidth hjson pydantic pydantic-core \
            annotated-types typing-inspection termcolor; do BINARY+=("$(pin "$name")"); done
# source-only packages, built here as pure-Python wheels (no ops compiled: DS_BUILD_OPS=0)
SOURCE=("$(pin deepspeed)" "$(pin fvcore)")
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all:)
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
run mkdir -p "$OUT"
for pkg in "${BINARY[@]}"; do  # one name per call: pip resolves each on its own platform tags
  # a release published as source only (iopath 0.1.10) is built here as a pure-Python wheel instead
  run "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT" "$pkg" 2>/dev/null \
    || run "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pkg"
done
for pkg in "${SOURCE[@]}"; do
  run env DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pkg"
done
[[ "${DRY_RUN:-0}" == 1 ]] || ls -1 "$OUT"
