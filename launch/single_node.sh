#!/usr/bin/env bash
# One node, N ranks: N GPUs, or N CPU ranks over gloo when there is no GPU.
#   launch/single_node.sh 8 deepspeed=zero3 model=small train.seq_len=8192
# Hydra overrides follow the rank count. A distinct MASTER_PORT lets several runs share a node.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc=${1:?usage: launch/single_node.sh NUM_RANKS [hydra overrides...]}
shift
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# Ctrl-C reaches every process of the job: the ranks checkpoint at the next step boundary and exit 0, and DeepSpeed's
# per-node launcher waits for them. Its outer runner would only print a KeyboardInterrupt traceback: it ignores SIGINT.
trap '' INT
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" train.py "$@"
