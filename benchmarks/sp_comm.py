"""Bytes each rank sends per layer (forward) under sequence parallelism: our scheme vs Ulysses.

    python benchmarks/sp_comm.py                       # table for the presets (bf16), S = 64K and 1M, sp = 8
    python benchmarks/sp_comm.py --measure             # also run the tiny model on 4 CPU ranks and count
                                                       # the tensors our collectives actually send

Our scheme (dsv4/parallel; the formulas are the layer kinds' sp_bytes, dsv4/layer_kinds.py): per layer each rank
  - shifts its last (window - 1) K=V rows to the next rank                       (W-1) * c
  - CSA: shifts the hidden states of its last group (the next rank's lookback)   m * d
  - all-gathers its compressed entries: it sends its L/m entries to P-1 ranks    (P-1) * (L/m) * c
  - CSA: all-gathers its indexer keys                                            (P-1) * (L/4) * c_I
Ulysses applied to V4 attention (all-to-all of sequence shards <-> head shards): every rank sends
(P-1)/P of its queries and of its outputs (all H heads, c dims each), and because the single K=V head
cannot be split over heads it must reach every rank whole: an all-gather of K=V, (P-1) * L * c.
Backward moves the same volumes in reverse in both schemes, so the forward ratio is the total ratio.
L = S / P tokens per rank; sizes in bytes at 2 bytes per element (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from dsv4.config import ModelConfig  # noqa: E402
from dsv4.layer_kinds import BY_NAME, CSA, HCA, WINDOW, LayerKind  # noqa: E402

V4_KINDS = (CSA, HCA, WINDOW)  # the table's rows, in this order


def kind_ratio(cfg: ModelConfig, kind: LayerKind) -> int:
    """The compression ratio of this kind's layers in cfg (the largest, if they differ)."""
    return max(r for r, spec in zip(cfg.compress_ratios, cfg.layer_specs()) if spec is kind)


def ours_bytes(cfg: ModelConfig, kind: LayerKind, seq_len: int, world: int, elem: int = 2) -> dict[str, float]:
    """What one rank's collectives send for a layer of this kind (the kind's formula, dsv4/layer_kinds.py)."""
    return kind.sp_bytes(cfg, kind_ratio(cfg, kind), seq_len // world, world, elem)


def ulysses_bytes(cfg: ModelConfig, kind: LayerKind, seq_len: int, world: int, elem: int = 2) -> float:
    shard = seq_len // world
    if not kind.v4:  # a standard layer of the same width: q, k, v, o all-to-all
        dh = cfg.resolved_dense_head_dim
        heads = 2 * cfg.num_attention_heads + 2 * max(cfg.num_key_value_heads, 1)
        return heads * shard * dh * elem * (world - 1) / world
    q_and_o = 2 * shard * cfg.num_attention_heads * cfg.head_dim * elem * (world - 1) / world
    kv_everywhere = (world - 1) * shard * cfg.head_dim * elem
    return q_and_o + kv_everywhere


def fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:7.2f} {unit}"
    return f"{n:7.0f} B  "


def table(presets: list[str], lengths: list[int], world: int) -> None:
    print(f"# bytes sent per rank per layer (forward), bf16, sequence-parallel size {world}")
    print(f"{'preset':<7} {'layer':<7} {'S':>8} {'ours':>12} {'Ulysses':>12} {'Ulysses/ours':>13}")
    for preset in presets:
        cfg = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{preset}.yaml")))
        kinds = [k for k in V4_KINDS if k in cfg.layer_specs()]
        for seq_len in lengths:
            for kind in kinds:
                ours = sum(ours_bytes(cfg, kind, seq_len, world).values())
                uly = ulysses_bytes(cfg, kind, seq_len, world)
                print(f"{preset:<7} {kind.name:<7} {seq_len:>8} {fmt(ours):>12} {fmt(uly):>12} {uly / ours:>12.1f}x")


MEASURE_WORKER = r"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from dsv4 import build_model
from dsv4.parallel import SequenceParallel
rank, world = dist.get_rank(), dist.get_world_size()
cfg = dict(json.loads(sys.argv[2]))
seq_len = int(sys.argv[3])
results = {}
for kind, ratio in json.loads(sys.argv[4]):
    torch.manual_seed(0)
    model = build_model(dict(cfg, num_hidden_layers=1, compress_ratios=[ratio]), phase="sparse").bfloat16()
    sp = SequenceParallel(dist.group.WORLD, rank, world, seq_len // world)
    model.set_sequence_parallel(sp)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq_len))[:, rank * sp.shard_len:(rank + 1) * sp.shard_len]
    with torch.no_grad():
        model.eval()
        model(ids)
    results[kind] = dict(sp.bytes_sent)
if rank == 1:
    print(json.dumps(results))
dist.barrier(); dist.destroy_process_group(); sys.stdout.flush(); os._exit(0)
"""


def measure(world: int, seq_len: int) -> None:
    cfg = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MEASURE_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    res = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                          str(world), f.name, str(ROOT), json.dumps(cfg.to_dict()), str(seq_len),
                          json.dumps([[kind.name, kind_ratio(cfg, kind)] for kind in V4_KINDS])],
                         capture_output=True, text=True, env=env, timeout=600)
    os.unlink(f.name)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not line:
        raise SystemExit(f"measurement failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    measured = json.loads(line[0])
    print(f"\n# measured on {world} CPU ranks (tiny preset, S = {seq_len}, bf16): bytes rank 1 sent, one layer")
    print(f"{'layer':<7} {'measured':>12} {'formula':>12}")
    for kind, counts in measured.items():
        formula = sum(ours_bytes(cfg, BY_NAME[kind], seq_len, world).values())
        print(f"{kind:<7} {sum(counts.values()):>12,} {int(formula):>12,}   {counts}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["flash", "small"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--sp", type=int, default=8)
    parser.add_argument("--measure", action="store_true", help="count real collectives on 4 CPU ranks (tiny)")
    args = parser.parse_args(argv)
    for flag, value in (("--sp", args.sp), ("--lengths", min(args.lengths))):
        if value < 1:
            parser.error(f"{flag}={value}: must be >= 1")
    for length in args.lengths:
        if length % args.sp:
            parser.error(f"--lengths {length}: not a multiple of --sp {args.sp} (every rank holds an equal shard)")
    presets = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    for preset in args.presets:
        if preset not in presets:
            parser.error(f"--presets {preset}: no conf/model/{preset}.yaml (choose from {', '.join(presets)})")
    table(args.presets, args.lengths, args.sp)
    if args.measure:
        measure(4, 1024)


if __name__ == "__main__":
    main()
