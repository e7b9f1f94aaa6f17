#!/usr/bin/env bash
# One launcher per node, no ssh/pdsh: run this on EVERY node (e.g. from a scheduler), with that node's rank.
#   launch/multi_node_no_ssh.sh HOSTFILE NODE_RANK MASTER_ADDR [hydra overrides...]
#   node 0: launch/multi_node_no_ssh.sh hostfile 0 node0.cluster train.output_dir=/shared/runs/exp1
#   node 1: launch/multi_node_no_ssh.sh hostfile 1 node0.cluster train.output_dir=/shared/runs/exp1
# HOSTFILE lists every node ("hostname slots=GPUS", the same file on every node); NODE_RANK is this node's line
# (0-based); MASTER_ADDR is node 0's address (reachable from all nodes); MASTER_PORT (default 29500) a free port.
# Global ranks are NODE_RANK * slots + local rank; global rank 0 picks the run directory and logs to W&B.
# Give train.output_dir on a filesystem every node sees (checkpoints are published by global rank 0).
# The launcher exports nothing by itself here: put WANDB_*/HF_* in the environment of each node's command, or
# source .deepspeed_env first (launch/write_deepspeed_env.sh writes one).
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile=${1:?usage: launch/multi_node_no_ssh.sh HOSTFILE NODE_RANK MASTER_ADDR [hydra overrides...]}
node_rank=${2:?NODE_RANK missing}
master_addr=${3:?MASTER_ADDR missing}
shift 3
if [[ -f .deepspeed_env ]]; then  # KEY=VALUE lines, values unquoted (the deepspeed launcher's format)
  while IFS='=' read -r key value; do [[ -n "$key" ]] && export "$key=$value"; done < .deepspeed_env
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr" \
  --master_port "${MASTER_PORT:-29500}" train.py "$@"
