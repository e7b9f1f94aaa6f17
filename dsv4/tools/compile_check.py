"""Compile every Triton kernel for a GPU target on a machine without one, at real launch shapes.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic on CPU, but it never lowers them:
a dot shape the GPU rejects, a block that overflows shared memory, or a register spill only shows on
a GPU. This runs the real launchers (dsv4.ops.v4_attention.triton, dsv4.ops.indexer.triton) on CPU
tensors, catches each kernel launch, and compiles it for the target with Triton's own compiler and
ptxas (both ship with the triton wheel) instead of launching it. Nothing runs; only the code is built.

    python -m dsv4.tools.compile_check                       # tiny + flash sizes, sm_90 (H100/H200)
    python -m dsv4.tools.compile_check --sizes flash --arch 80
    python -m dsv4.tools.compile_check --sizes flash --dtypes bf16 --tune fwd:BLOCK_H=64,num_warps=8

Per kernel variant it prints registers per thread, spilled bytes (local memory), shared memory and
compile time, and exits 1 when a kernel fails to compile or needs more shared memory than the target
has. Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import triton
import triton.runtime.jit as triton_jit
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.ops.indexer import triton as indexer_kernels
from dsv4.ops.ranges import causal_ranges
from dsv4.ops.v4_attention import triton as attention_kernels

# the GPU targets this checks for (sm_70 Volta to sm_120 consumer Blackwell); another number crashes LLVM (sm_0) or
# fails deep in Triton's passes (sm_130)
ARCHS = (70, 75, 80, 86, 87, 89, 90, 100, 120)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in max per block, bytes
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                  torch.int64: "i64"}

SIZES = {  # (batch, seq, heads, head_dim, entries, top-k, index heads, index dim)
    "tiny": dict(batch=1, seq_len=67, heads=3, dim=24, entries=16, topk=8, index_heads=3, index_dim=16),
    "flash": dict(batch=1, seq_len=512, heads=64, dim=512, entries=128, topk=512, index_heads=64, index_dim=128),
}


@dataclass
class Built:
    kernel: str
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    seconds: float


def _signature(fn, args, kwargs):
    """Triton signature, constexprs and divisibility hints for one launch (the JIT's own specialisation
    rules: tensors are 16-byte aligned pointers, ints divisible by 16 are hinted, an int equal to 1 is a
    constant)."""
    bound = fn.signature.bind(*args, **kwargs).arguments
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value == 1 and not param.do_not_specialize:
                signature[param.name], constants[param.name] = "constexpr", 1
            elif value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name!r} of type {type(value).__name__}")
    return signature, constants, attrs


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) from cuobjdump's resource usage."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    spill = max(int(local.group(1)) if local else 0, int(stack.group(1)) if stack else 0)
    return (int(registers.group(1)) if registers else -1), spill


@contextlib.contextmanager
def compile_instead_of_launch(target: GPUTarget, built: list[Built], variant: str = ""):
    """Inside, `kernel[grid](...)` compiles the kernel for `target` and records it instead of running."""
    original = triton_jit.JITFunction.run
    seen = {(b.kernel, b.variant) for b in built}

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        signature, constants, attrs = _signature(self, args, kwargs)
        declared = {p.name for p in self.params if p.is_constexpr and not p.name.startswith("BLOCK_")}
        name = f"{variant} " + ",".join(f"{k}={v}" for k, v in constants.items() if k in declared)
        if (self.fn.__name__, name) in seen:
            return None
        seen.add((self.fn.__name__, name))
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(self, signature, constants, attrs), target=target,
                                  options={"num_warps": 4, "num_stages": 3, **options})
        registers, spill = _resources(compiled.asm["cubin"])
        built.append(Built(self.fn.__name__, name.strip(), registers, spill, compiled.metadata.shared,
                           time.perf_counter() - start))
        return None

    triton_jit.JITFunction.run = run
    try:
        yield built
    finally:
        triton_jit.JITFunction.run = original


def launch_everything(sizes: dict, dtype: torch.dtype) -> None:
    """Call every Triton launcher once per mode on CPU tensors of these sizes (values do not matter)."""
    b, s, h, d, n, k = (sizes[key] for key in ("batch", "seq_len", "heads", "dim", "entries", "topk"))
    ratio = max(1, s // n)
    q = torch.randn(b, s, h, d, dtype=dtype)
    kv = torch.randn(b, s, d, dtype=dtype)
    ckv = torch.randn(b, n, d, dtype=dtype)
    sink = torch.zeros(h)
    idx = torch.randint(-1, n, (b, s, k), dtype=torch.int32)
    r = causal_ranges(b, s, 128, ratio, torch.device("cpu"))
    ranges = [x.to(torch.int32).contiguous() for x in (r.window_lo, r.window_hi, r.cmp_lo, r.cmp_hi)]
    for compressed, picks in ((None, None), (ckv, None), (ckv, idx)):
        out, lse = attention_kernels.attention_fwd(q, kv, compressed, picks, sink, ranges, 0.1)
        for deterministic in (True, False):
            attention_kernels.attention_bwd(out, q, kv, compressed, picks, sink, out, lse, ranges, 0.1,
                                            deterministic)
    ih, ic = sizes["index_heads"], sizes["index_dim"]
    index_q = torch.randn(b, s, ih, ic, dtype=dtype)
    index_k = torch.randn(b, n, ic, dtype=dtype)
    weights = torch.randn(b, s, ih)
    indexer_kernels.index_scores_fwd(index_q, index_k, weights, ranges[2], ranges[3], 0)
    indexer_kernels.index_scores_bwd(torch.randn(b, s, n), index_q, index_k, weights)
    indexer_kernels.teacher_dense_fwd(q, ckv, lse, ranges[2], ranges[3], 0, 0.1)
    index_picks = idx.clamp(max=n - 1)
    indexer_kernels.pick_scores_fwd(index_q, index_k, weights, index_picks)
    indexer_kernels.pick_scores_bwd(torch.randn(b, s, k), index_q, index_k, weights, index_picks)
    indexer_kernels.teacher_sparse_fwd(q, ckv, lse, index_picks, 0.1)


def build_all(arch: int, size_names: list[str], dtypes: list[torch.dtype]) -> list[Built]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check lowers kernels for a GPU: run it without TRITON_INTERPRET=1")
    built: list[Built] = []
    target = GPUTarget("cuda", arch, 32)
    for size in size_names:
        for dtype in dtypes:
            with compile_instead_of_launch(target, built, f"{size} {_POINTER_TYPES[dtype]}"):
                launch_everything(SIZES[size], dtype)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=ARCHS, metavar="ARCH",
                        help=f"compute capability x10 (80 A100, 90 H100/H200); one of {', '.join(map(str, ARCHS))}")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "flash"])
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--tune", nargs="*", default=[],
                        help="attention launch overrides to try, e.g. fwd:BLOCK_H=64,num_warps=8 (groups fwd, dq, dk)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1: compile_check lowers the kernels for a GPU; run it without TRITON_INTERPRET")
    try:
        overrides = attention_kernels.parse_launch_overrides(args.tune)
    except ValueError as e:
        parser.error(f"--tune: {e}")
    attention_kernels.LAUNCH_OVERRIDES.update(overrides)
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[x] for x in args.dtypes]
    built = build_all(args.arch, args.sizes, dtypes)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    print(f"# Triton kernels compiled for sm_{args.arch} (shared memory limit {limit // 1024} KiB), "
          f"triton {triton.__version__}, attention overrides {attention_kernels.LAUNCH_OVERRIDES or 'none'}")
    print(f"{'kernel':<32} {'variant':<44} {'regs':>5} {'spill B':>8} {'shared KiB':>10} {'s':>5}")
    over = []
    for b in built:
        print(f"{b.kernel:<32} {b.variant:<44} {b.registers:>5} {b.spill_bytes:>8} {b.shared_bytes / 1024:>10.1f} "
              f"{b.seconds:>5.1f}")
        if b.shared_bytes > limit:
            over.append(b)
    for b in over:
        print(f"error: {b.kernel} [{b.variant}] needs {b.shared_bytes} B of shared memory, more than the "
              f"{limit} B of sm_{args.arch}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
