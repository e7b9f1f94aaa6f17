#!/usr/bin/env bash
# One prepared GPU session (fits one 10-minute device call): the Triton kernels' correctness on CUDA (the
# tests CI runs under the interpreter), the attention core against its roofline (both dK=V paths, plus one
# launch-config candidate), the layer table against dense attention, then decode time per token with the KV cache
# (V4 vs dense, bf16) as the context grows. Each stage has its own time limit,
# and every output lands in $OUT (default benchmarks/gpu_out) as it is produced.
#   bash benchmarks/gpu_check.sh     # then copy the tables into benchmarks/RESULTS.md with the date, the GPU
#                                    # and the commit (commit.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$out/stages.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   rc=$? in $((SECONDS - start))s" | tee -a "$out/stages.txt"
  tail -25 "$out/$name.txt"
}
stage tests 150 python -m pytest -q -x tests/test_op_v4_attention.py tests/test_op_indexer.py \
  tests/test_model_triton_backend.py tests/test_attention.py
stage core 150 python benchmarks/attention_core.py --lengths 16384 65536 131072 --repeats 3
stage core_tuned 45 python benchmarks/attention_core.py --lengths 65536 --modes csa --dkv deterministic \
  --repeats 3 --tune fwd:BLOCK_H=64,num_warps=8
stage layer 200 python benchmarks/attention.py --lengths 4096 16384 65536 131072 --repeats 3
stage decode 45 python benchmarks/kv_cache.py --tables decode --device cuda --dtype bf16 --decode-layers 12 \
  --decode-contexts 4096 16384 65536 --decode-steps 16 --plot none
