# Shared by the sbatch templates (sourced, not run). Sets the multi-node layout from Slurm's environment,
# or, with DRY_RUN=1 outside Slurm, from NNODES / GPUS_PER_NODE / HOSTS given by hand.
slurm_setup() {
  cd "$HERE/.."
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NNODES="${NNODES:-${SLURM_NNODES:-1}}"
    HOSTS=(${HOSTS:-$(for ((i = 0; i < NNODES; i++)); do printf 'node%d ' "$i"; done)})
  else
    : "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch, or set DRY_RUN=1 to print the per-node commands}"
    NNODES="$SLURM_NNODES"
    HOSTS=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
    local venv="${HARNESS_VENV:-.venv}"
    [[ -f "$venv/bin/activate" ]] && source "$venv/bin/activate"
  fi
  if (( ${#HOSTS[@]} < NNODES )); then
    echo "error: HOSTS: $NNODES nodes need $NNODES host names, got ${#HOSTS[@]}" >&2; exit 2
  fi
  GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
  GPUS_PER_NODE="${GPUS_PER_NODE##*:}"   # --gpus-per-node=a100:8 -> 8
  : "${GPUS_PER_NODE:?GPUS_PER_NODE: set it, or submit with --gpus-per-node}"
  MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
  MASTER_PORT="${MASTER_PORT:-$(( 29500 + ${SLURM_JOB_ID:-0} % 1000 ))}"
  export NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT
}
