#!/usr/bin/env bash
# One node's share of a multi-node job: ONE `accelerate launch` that starts this node's GPU processes.
# Run by srun (one task per node) from slurm/train.sbatch or slurm/fit_probe.sbatch; usable by hand for checks.
#
# Environment (set by the sbatch templates from Slurm's own variables):
#   NNODES         nodes in the job                      (default: SLURM_NNODES, else 1)
#   NODE_RANK      this node's index 0..NNODES-1         (default: SLURM_NODEID, else 0) -> --machine_rank
#   GPUS_PER_NODE  processes on this node                (required)
#   MASTER_ADDR    rendezvous host: the job's first node (required when NNODES > 1)
#   MASTER_PORT    rendezvous port                       (default 29500)
#   LAUNCH_CONFIG  Accelerate launch YAML                (default ds_configs/zero2.yaml)
#   DRY_RUN=1      print the command instead of running it
# Arguments: the script and its arguments (e.g. train.py --config clip ...).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCH_CONFIG="${LAUNCH_CONFIG:-ds_configs/zero2.yaml}"
: "${GPUS_PER_NODE:?GPUS_PER_NODE: set the number of processes (GPUs) per node}"
if ! [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: GPUS_PER_NODE: must be a positive integer, got '$GPUS_PER_NODE'" >&2; exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "error: NODE_RANK/NNODES: need 0 <= NODE_RANK < NNODES, got $NODE_RANK / $NNODES" >&2; exit 2
fi
if (( NNODES > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
  echo "error: MASTER_ADDR: set the first node's host name for a multi-node job" >&2; exit 2
fi
ACCELERATE="${ACCELERATE:-accelerate}"
cmd=("$ACCELERATE" launch --config_file "$LAUNCH_CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$(( NNODES * GPUS_PER_NODE ))"
     --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "$MASTER_PORT"
     "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf 'node %s:' "$NODE_RANK"; printf ' %q' "${cmd[@]}"; printf '\n'
else
  exec "${cmd[@]}"
fi
