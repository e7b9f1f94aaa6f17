#!/usr/bin/env bash
# Write .deepspeed_env (repository root) from this shell's WANDB_*, HF_*, HUGGINGFACE_*, NCCL_*, TOKENIZERS_* and
# DS_* variables. The deepspeed launcher exports every line of it on every node it starts (pdsh/ssh mode), and
# launch/multi_node_no_ssh.sh and launch/slurm.sbatch source it on each node. The file may hold secrets
# (WANDB_API_KEY): it is created mode 600 and is git-ignored.
#   WANDB_API_KEY=... WANDB_PROJECT=dsv4 HF_HOME=/shared/hf launch/write_deepspeed_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077
env | grep -E '^(WANDB_|HF_|HUGGINGFACE_|NCCL_|TOKENIZERS_|DS_)[A-Za-z0-9_]*=' | sort > .deepspeed_env || true
echo "wrote .deepspeed_env with $(wc -l < .deepspeed_env) variable(s): $(cut -d= -f1 .deepspeed_env | tr '\n' ' ')"
