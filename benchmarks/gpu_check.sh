#!/usr/bin/env bash
# One prepared GPU session: the Triton kernels' correctness on CUDA (the same tests CI runs under the
# interpreter, now on the GPU), then the benchmark table. Writes both to $OUT (default benchmarks/gpu_out).
#   bash benchmarks/gpu_check.sh            # then copy the table into benchmarks/RESULTS.md with the date,
#                                           # the GPU and `git rev-parse --short HEAD`
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_out}
mkdir -p "$out"
unset TRITON_INTERPRET
git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
timeout 240 python -m pytest -q -x tests/test_triton_attention.py tests/test_triton_indexer.py \
  tests/test_attention.py 2>&1 | tail -30 | tee "$out/tests.txt"
timeout 300 python benchmarks/attention.py --lengths 4096 16384 65536 131072 --repeats 3 2>&1 \
  | tee "$out/bench.txt"
