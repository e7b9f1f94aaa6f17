#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile (one line per node: "hostname slots=GPUS"), started over pdsh/ssh
# from the first node. Every node needs the same checkout and environment at the same path.
#   launch/multi_node.sh hostfile model=small deepspeed=zero3 train.output_dir=/shared/runs/exp1
# Give train.output_dir on a filesystem every node sees: checkpoints are written by all ranks.
# Environment variables listed in .deepspeed_env (WANDB_API_KEY=..., HF_HOME=...) reach every node.
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile=${1:?usage: launch/multi_node.sh HOSTFILE [hydra overrides...]}
shift
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" train.py "$@"
