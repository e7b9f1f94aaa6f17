"""Time the V4 attention core alone (the Triton kernels) and compare it with its roofline.

    python benchmarks/attention_core.py                                  # GPU: V4-Flash core, S = 16K, 64K
    python benchmarks/attention_core.py --tune fwd:BLOCK_H=64,num_warps=8  # try another launch config
    TRITON_INTERPRET=1 python benchmarks/attention_core.py               # CPU: tiny sizes, keeps the script alive

Modes: window (raw rows only), hca (window + every visible entry, ratio --hca-ratio), csa (window + top-k of
ratio-4 entries; picks spread evenly over the visible entries at a random phase per query, distinct, like a
real indexer's). For each mode and dK=V path (deterministic / atomic): forward, and forward + backward, of
dsv4.ops.v4_attention(backend="triton") on random inputs, batch 1, median of --repeats after a warm-up.

Useful work, whatever the kernel does:
  FLOPs   forward 4*H*D per (query, key) pair attended (q.k, p.v); backward 10*H*D (recomputed q.k, dO.v, dq,
          dk, dv with v = k), so forward + backward = 3.5 x forward.
  bytes   forward: q and out, plus every attended K=V row once per query (all H heads share it) and the picks;
          backward adds dO, dq, the rows again and the fp32 dK=V once.
  roof    min(peak FLOP/s, bytes-bound FLOP/s) from --peak-tflops / --peak-tbs (defaults: the GPU's datasheet
          bf16 dense and HBM numbers when known). "% roof" = achieved / roof; the issue's goal is >= 50%.
  op GiB  peak memory allocated by the op beyond its inputs (CUDA only).
Absolute times only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dsv4.ops.v4_attention.triton as kernels  # noqa: E402
from dsv4.layer_kinds import BY_NAME, visible_entries, window_keys  # noqa: E402
from dsv4.ops.ranges import causal_ranges  # noqa: E402
from dsv4.ops.v4_attention import v4_attention  # noqa: E402

PRESETS = {
    "flash": dict(heads=64, dim=512, window=128, topk=512, hca_ratio=128),
    "tiny": dict(heads=4, dim=32, window=16, topk=8, hca_ratio=8),
}
PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.0)}  # bf16 dense TFLOP/s, TB/s


def spread_picks(seq_len: int, ratio: int, k: int, device, gen) -> torch.Tensor:
    """[1, S, k] distinct picks among each query's visible entries (t+1)//ratio, -1 where fewer exist."""
    visible = (torch.arange(seq_len, device=device) + 1) // ratio
    phase = torch.rand(seq_len, 1, generator=gen).to(device)
    j = torch.arange(k, device=device)[None].float()
    spread = ((j + phase) * visible[:, None] / k).long()
    picks = torch.where(visible[:, None] > k, spread, j.long().expand(seq_len, -1))
    return torch.where(picks < visible[:, None], picks, -1)[None].int()


def attended_pairs(mode: str, seq_len: int, window: int, ratio: int, k: int) -> float:
    """Keys summed over the queries: the window, plus for a compressed kind its visible entries (with an indexer,
    the top-k of them); the kinds' formulas in dsv4/layer_kinds.py."""
    spec = BY_NAME[mode]
    pairs = window_keys(seq_len, window)
    if spec.compressor:
        pairs += visible_entries(seq_len, ratio, k if spec.indexer else None)
    return float(pairs)


def timed(fn, repeats: int, cuda: bool) -> float:
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first call compiles and warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(inputs: dict, grad_out: torch.Tensor, deterministic: bool, repeats: int, cuda: bool):
    """-> (forward s, forward + backward s, peak GiB the op allocated beyond its inputs)."""
    leaves = [x for x in (inputs["q"], inputs["kv"], inputs["sink"], inputs["compressed_kv"]) if x is not None]

    def forward():
        return v4_attention(**inputs, backend="triton", deterministic=deterministic)[0]

    def step():
        for x in leaves:
            x.grad = None
        torch.autograd.backward(forward(), grad_out)

    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fwd_s = timed(forward, repeats, cuda)
    step_s = timed(step, repeats, cuda)
    op_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    for x in leaves:
        x.grad = None
    return fwd_s, step_s, op_gib


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flash" if cuda else "tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536] if cuda else [64])
    parser.add_argument("--modes", nargs="+", choices=["window", "hca", "csa"], default=["csa", "hca", "window"])
    parser.add_argument("--dkv", nargs="+", choices=["deterministic", "atomic"],
                        default=["deterministic", "atomic"])
    parser.add_argument("--hca-ratio", type=int, default=None, help="default: the preset's (128 for flash)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tune", nargs="*", default=[], help="launch overrides, e.g. fwd:BLOCK_H=64,num_warps=8")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--peak-tbs", type=float, default=None)
    args = parser.parse_args(argv)
    for flag, values in (("--lengths", args.lengths), ("--repeats", [args.repeats])):
        if min(values) < 1:
            parser.error(f"{flag}={min(values)}: must be >= 1")
    if args.hca_ratio is not None and not BY_NAME["hca"].selects(args.hca_ratio):
        parser.error(f"--hca-ratio={args.hca_ratio}: must be > 4, an HCA ratio (4 is CSA's, 0 window-only)")
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--peak-tbs", args.peak_tbs)):
        if value is not None and not 0 < value < float("inf"):
            parser.error(f"{flag}={value}: must be a number > 0")
    try:
        overrides = kernels.parse_launch_overrides(args.tune)
    except ValueError as e:
        parser.error(f"--tune: {e}")
    if not cuda and not kernels.INTERPRET:
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (tiny sizes) to exercise the script on CPU")
    kernels.LAUNCH_OVERRIDES.update(overrides)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    p = PRESETS[args.preset]
    heads, dim, window, topk = p["heads"], p["dim"], p["window"], p["topk"]
    args.hca_ratio = args.hca_ratio or p["hca_ratio"]
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    peak = next((v for key, v in PEAKS.items() if key in name), (None, None))
    peak_tflops, peak_tbs = args.peak_tflops or peak[0], args.peak_tbs or peak[1]
    print(f"# V4 attention core (Triton) | {args.preset}: H {heads}, D {dim}, window {window}, top-k {topk}, "
          f"HCA ratio {args.hca_ratio} | {str(dtype).removeprefix('torch.')} | {name} | peaks {peak_tflops} TFLOP/s, "
          f"{peak_tbs} TB/s | overrides {kernels.LAUNCH_OVERRIDES or 'none'}")
    print(f"{'mode':<7} {'dK=V':<13} {'S':>7} {'fwd ms':>9} {'TFLOP/s':>8} {'% roof':>7} {'f+b ms':>9} "
          f"{'TFLOP/s':>8} {'% roof':>7} {'op GiB':>7}")
    gen = torch.Generator().manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    for seq_len in args.lengths:
        for mode in args.modes:
            spec = BY_NAME[mode]
            ratio = args.hca_ratio if spec.fixed_ratio is None else spec.fixed_ratio
            n_entries = seq_len // ratio if ratio else 0
            q = torch.randn(1, seq_len, heads, dim, generator=gen).to(device, dtype).requires_grad_()
            kv = torch.randn(1, seq_len, dim, generator=gen).to(device, dtype).requires_grad_()
            sink = torch.zeros(heads, device=device, requires_grad=True)
            ckv = (torch.randn(1, n_entries, dim, generator=gen).to(device, dtype).requires_grad_()
                   if ratio else None)
            picks = spread_picks(seq_len, ratio, topk, device, gen) if spec.indexer else None
            ranges = causal_ranges(1, seq_len, window, ratio, device)
            grad_out = torch.randn(1, seq_len, heads, dim, generator=gen).to(device, dtype)
            pairs = attended_pairs(mode, seq_len, window, ratio, topk)
            fwd_flops = 4 * heads * dim * pairs
            qo = seq_len * heads * dim * elem
            fwd_bytes = 2 * qo + pairs * dim * elem + (picks.numel() * 4 if picks is not None else 0)
            bwd_bytes = fwd_bytes + 3 * qo + pairs * dim * elem + (seq_len + n_entries) * dim * 4
            inputs = dict(q=q, kv=kv, sink=sink, window=window, softmax_scale=dim ** -0.5, compressed_kv=ckv,
                          ratio=ratio, topk_idx=picks, ranges=ranges)
            for path in args.dkv:
                fwd_s, step_s, op_gib = measure(inputs, grad_out, path == "deterministic", args.repeats, cuda)
                cols = []
                for flops, nbytes, sec in ((fwd_flops, fwd_bytes, fwd_s), (3.5 * fwd_flops, bwd_bytes, step_s)):
                    achieved = flops / sec / 1e12
                    roof = min(peak_tflops, flops / nbytes * peak_tbs) if peak_tflops and peak_tbs else None
                    cols.append(f"{sec * 1e3:>9.2f} {achieved:>8.2f} "
                                + (f"{100 * achieved / roof:>6.1f}%" if roof else f"{'n/a':>7}"))
                print(f"{mode:<7} {path:<13} {seq_len:>7} {cols[0]} {cols[1]} {op_gib:>7.2f}", flush=True)
            del q, kv, ckv, picks, grad_out
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
