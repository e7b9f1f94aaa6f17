"""Time forward+backward of one V4 attention layer (CSA, HCA, window-only) against dense causal attention.

    python benchmarks/attention.py                       # GPU: V4-Flash layer sizes, S = 4K .. 128K
    python benchmarks/attention.py --preset tiny         # CPU: tiny sizes, so the script never rots
    python benchmarks/attention.py --lengths 4096 16384 --paths triton triton-atomic torch

Each row: one layer module (projections, compressor, indexer, attention core, output projection),
forward + backward of a random input, batch 1, after warm-up; the median of --repeats runs. All rows, of every
length, are timed in interleaved rounds (every layer at every length once per round, in a rotating order), so a
machine shared with other work slows every row alike: the "vs dense" ratios and the growth from one length to
the next stay meaningful.

Columns:
  ms        wall time of forward + backward (CUDA events on GPU, perf_counter on CPU)
  TFLOP/s   useful FLOPs / time. Useful FLOPs = 3 x forward FLOPs (backward ~ 2 x forward), where the
            forward counts the layer's linear maps (2 x params x tokens) and the attention core at
            4 * H * D per (query, key) pair actually attended: window min(t+1, W), plus every visible entry
            (HCA) or min(k, visible) picks (CSA), plus CSA's indexer scoring 2 * n_I * c_I per visible
            entry. Dense: 4 * H * d_h per causal pair (t+1 keys).
  GB/s      the attention core's unavoidable traffic / time: q, o, do, dq once, plus the K=V rows each query
            reads (window + compressed), bf16 -- rows shared by heads are counted once per query.
  peak GiB  GPU: torch.cuda.max_memory_allocated during a step. CPU: the most memory the step held at once
            beyond what was allocated before it (from the profiler's allocation events, one extra step).

--profile N prints, for every row, torch.profiler's table of the N ops with the most self CPU time in one
forward + backward (run it at one length: `--lengths 16384 --repeats 1 --profile 20`).

The dense baseline: head_dim 512 is out of reach of FlashAttention (<= 256) and SDPA has no sink, so it
is compared at the SAME MODEL WIDTH as a standard layer: n_h heads of hidden/n_h dims (64 for V4-Flash),
full Q/K/V/O projections, causal SDPA (FlashAttention on GPU). That is what a user would otherwise train.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.attention import AttentionOptions, DenseAttention, V4Attention  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.layer_kinds import BY_NAME, DENSE_RATIO  # noqa: E402

PRESETS = {
    "flash": dict(vocab_size=4096, hidden_size=4096, num_hidden_layers=1, intermediate_size=2048,
                  num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8,
                  o_lora_rank=1024, sliding_window=128, compress_ratios=[4], index_n_heads=64, index_head_dim=128,
                  index_topk=512, num_key_value_heads=64),
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=1, intermediate_size=384, num_attention_heads=4,
                 head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=64,
                 compress_ratios=[4], index_n_heads=4, index_head_dim=32, index_topk=16, num_key_value_heads=4),
}


def layer_for(kind: str, base: dict, ratio_hca: int, path: str, chunk: int) -> torch.nn.Module:
    spec = BY_NAME[kind]
    ratio = ratio_hca if spec.fixed_ratio is None else spec.fixed_ratio
    cfg = ModelConfig(**{**base, "compress_ratios": [ratio]})
    backend = {"dense": "torch", "triton-atomic": "triton"}.get(path, path)
    options = AttentionOptions(backend=backend, chunk_size=chunk, phase="sparse", deterministic=path != "triton-atomic")
    return (V4Attention if spec.v4 else DenseAttention)(cfg, 0, options)


def useful_flops(cfg: ModelConfig, seq_len: int, layer: torch.nn.Module) -> float:
    """The layer's linear maps, plus its kind's attention and indexer FLOPs (dsv4/layer_kinds.py) in phase sparse;
    indexer scoring forward only (its top-k has no backward)."""
    linear = 2 * seq_len * sum(p.numel() for n, p in layer.named_parameters()
                               if p.dim() == 2 and not n.endswith("ape"))
    core = cfg.layer_spec(0).attention_flops(cfg, cfg.compress_ratios[0], seq_len, "sparse")
    return 3 * (linear + core["attention"]) + core["indexer"]


def core_bytes(cfg: ModelConfig, seq_len: int) -> float:
    spec = cfg.layer_spec(0)
    if not spec.v4:
        d_h = cfg.resolved_dense_head_dim
        return 2 * (4 * seq_len * cfg.num_attention_heads * d_h + 4 * seq_len * cfg.num_key_value_heads * d_h)
    rows = spec.attention_counts(cfg, cfg.compress_ratios[0], seq_len, "sparse").keys  # window + compressed
    qo = 4 * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 2 * (qo + cfg.head_dim * rows * 2)  # rows read in forward and in backward


def train_step(layer, x, positions) -> None:
    layer.zero_grad(set_to_none=True)
    out, aux = layer(x.detach().requires_grad_(True), positions)
    loss = out.float().square().mean() + (aux if aux is not None else 0.0)
    loss.backward()


def timed_step(layer, x, positions) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(layer, x, positions)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_interleaved(runs: dict, repeats: int) -> dict:
    """runs: name -> (layer, x, positions). Median seconds per run over `repeats` rounds; each round does every
    run once, the order rotating by one per round. Runs that run out of memory get None."""
    times = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up (compiles kernels, allocates)
        try:
            timed_step(*run)
        except torch.OutOfMemoryError:
            times[name] = None
            torch.cuda.empty_cache()
    live = [name for name in runs if times[name] is not None]
    for round_ in range(repeats):
        for i in range(len(live)):
            name = live[(i + round_) % len(live)]
            times[name].append(timed_step(*runs[name]))
    return {name: None if t is None else statistics.median(t) for name, t in times.items()}


def peak_memory_gib(layer, x, positions) -> float:
    """GPU: max allocated during one step. CPU: peak of the bytes allocated minus freed during one step."""
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        train_step(layer, x, positions)
        return torch.cuda.max_memory_allocated() / 2**30
    layer.zero_grad(set_to_none=True)  # frees the last step's gradients outside the profiled step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(layer, x, positions)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**30


def print_profile(layer, x, positions, rows: int) -> None:
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if x.is_cuda else [])]) as prof:
        train_step(layer, x, positions)
    sort = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flash" if cuda else "tiny")
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[4096, 8192, 16384, 32768, 65536, 131072] if cuda else [512, 1024, 2048])
    parser.add_argument("--kinds", nargs="+", choices=sorted(BY_NAME), default=["csa", "hca", "window", "dense"])
    parser.add_argument("--paths", nargs="+", choices=["triton", "triton-atomic", "torch"],
                        default=["triton", "triton-atomic", "torch"] if cuda else ["torch"],
                        help="V4 paths to time: triton (fixed-order dK=V, the default), triton-atomic (fp32 atomic "
                             "dK=V), torch (query-chunked PyTorch); triton needs CUDA or TRITON_INTERPRET=1")
    parser.add_argument("--hca-ratio", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256,
                        help="queries per chunk of the Triton indexer (the torch path sizes its own chunks)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N ops with the most self time of one step, per row")
    args = parser.parse_args(argv)
    for flag, value in (("--lengths", min(args.lengths)), ("--repeats", args.repeats), ("--chunk", args.chunk)):
        if value < 1:
            parser.error(f"{flag}={value}: must be >= 1")
    if args.profile < 0:
        parser.error(f"--profile={args.profile}: must be >= 0 (0: no profile)")
    if "hca" in args.kinds and not BY_NAME["hca"].selects(args.hca_ratio):
        parser.error(f"--hca-ratio={args.hca_ratio}: must be > 4, an HCA ratio (4 is CSA's, 0 window-only)")
    triton_paths = [path for path in args.paths if path.startswith("triton")]
    v4_kinds = [kind for kind in args.kinds if BY_NAME[kind].v4]
    if triton_paths and v4_kinds and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error(f"--paths {triton_paths[0]}: the Triton kernels need CUDA; use --paths torch, or set "
                     "TRITON_INTERPRET=1 (slow)")

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = PRESETS[args.preset]
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"# V4 attention layer fwd+bwd | preset {args.preset} | {args.dtype} | batch 1 | {name} | torch "
          f"{torch.__version__}")
    print(f"{'kind':<7} {'path':<13} {'S':>7} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} {'peak GiB':>9} {'vs dense':>9}")
    layers = {}
    for kind in args.kinds:
        for path in (args.paths if BY_NAME[kind].v4 else ["dense"]):
            torch.manual_seed(0)
            layer = layer_for(kind, base, args.hca_ratio, path, args.chunk).to(device=device, dtype=dtype)
            if hasattr(layer, "attn_sink"):
                layer.attn_sink.data = layer.attn_sink.data.float()
            layers[(kind, path)] = layer
    inputs = {seq_len: (torch.randn(1, seq_len, base["hidden_size"], device=device, dtype=dtype),
                        torch.arange(seq_len, device=device)) for seq_len in args.lengths}
    runs = {(name, seq_len): (layer, *inputs[seq_len]) for seq_len in args.lengths for name, layer in layers.items()}
    seconds = time_interleaved(runs, args.repeats)
    for seq_len in args.lengths:
        x, positions = inputs[seq_len]
        dense_sec = seconds.get((("dense", "dense"), seq_len))
        for (kind, path), layer in layers.items():
            sec = seconds[((kind, path), seq_len)]
            if sec is None:
                print(f"{kind:<7} {path:<13} {seq_len:>7} {'OOM':>10}")
                continue
            cfg = layer.cfg if hasattr(layer, "cfg") else ModelConfig(**{**base, "compress_ratios": [DENSE_RATIO]})
            tflops = useful_flops(cfg, seq_len, layer) / sec / 1e12
            gbs = core_bytes(cfg, seq_len) / sec / 1e9
            peak = peak_memory_gib(layer, x, positions)
            ratio = f"{dense_sec / sec:>8.2f}x" if dense_sec else f"{'':>9}"
            print(f"{kind:<7} {path:<13} {seq_len:>7} {sec * 1e3:>10.2f} {tflops:>8.3f} {gbs:>8.1f} {peak:>9.3f} "
                  f"{ratio}", flush=True)
            if args.profile:
                print_profile(layer, x, positions, args.profile)


if __name__ == "__main__":
    main()
