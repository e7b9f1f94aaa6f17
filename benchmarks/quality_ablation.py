#!/usr/bin/env python
"""How much does each trained model of the quality experiment gain from what lies beyond its sliding window?

    python benchmarks/quality_ablation.py outputs/quality          # every finished full run of the experiment
    python benchmarks/quality_ablation.py outputs/quality --batches 8 --out ablation.json

For each run, the loss on the bundled corpus' held-out documents (the same batches as the experiment's
evaluation), by position bucket, twice: as trained, and restricted to its window. Restricted means:
  V4 layers   the compressed entries are dropped (the compressor's output is emptied, so CSA and HCA layers attend
              to their window rows and the sink only; the indexer then has nothing to pick from). `--drop csa` or
              `--drop hca` drops one kind only.
  dense       the causal mask becomes a band of the window's width (each query sees its last W tokens).
The difference (restricted - trained) on tokens beyond the window is what the model needs beyond it: zero for a
window-only model by construction. A model trained with its compressed entries can also lean on them for what is
near (a summary of recent groups), so a second measure asks for far information only:
  far swap    each sequence's first `--swap` tokens are replaced by another sequence's; the loss is read on tokens at
              least the model's reach of windows past the swap (num_layers x (W - 1) + 1 tokens: a window-only
              model's loss there cannot change, the check). What rises is what the model took from that far back.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsv4.attention import V4Attention  # noqa: E402
from dsv4.config import ConfigError  # noqa: E402
from dsv4.export import check_out_file  # noqa: E402
from dsv4.layer_kinds import KINDS  # noqa: E402
from dsv4.ops.ranges import causal_ranges  # noqa: E402
from dsv4.ops.v4_attention.naive import v4_attention_mask  # noqa: E402
from dsv4.parallel.plan import LocalPlan  # noqa: E402

COMPRESSED_KINDS = tuple(kind.name for kind in KINDS if kind.compressor)  # ("csa", "hca"): layers with entries


@contextlib.contextmanager
def without_compressed_entries(model: torch.nn.Module, kinds: tuple[str, ...] = COMPRESSED_KINDS):
    """V4 layers of `kinds` attend without their compressed entries (window rows and sink only) inside the block."""
    hooks = [m.compressor.register_forward_hook(lambda _m, _args, out: out[:, :0])
             for m in model.modules() if isinstance(m, V4Attention) and m.kind in kinds]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class WindowedDensePlan(LocalPlan):
    """The single-device plan, with the dense layers' attention restricted to the V4 window's rows (the oracle's mask
    of a window-only layer)."""

    def __init__(self, window: int) -> None:
        self.window = window

    def dense_attention(self, q, k, v, mask):
        seq_len = q.shape[1]  # a full forward: as many keys as queries
        band = v4_attention_mask(causal_ranges(1, seq_len, self.window, 0, q.device), seq_len, 0, None)[:, None]
        return LocalPlan.dense_attention(q, k, v, band if mask is None else mask & band)


@contextlib.contextmanager
def dense_within_window(model: torch.nn.Module, window: int):
    """Dense layers of `model` see only their last `window` keys inside the block."""
    saved = model.options.plan
    model.options.plan = WindowedDensePlan(window)
    try:
        yield
    finally:
        model.options.plan = saved


def restricted(model: torch.nn.Module, window: int, drop: tuple[str, ...]):
    """The context in which `model` sees no further back than its window (or drops only the `drop` kinds)."""
    stack = contextlib.ExitStack()
    stack.enter_context(without_compressed_entries(model, drop))
    stack.enter_context(dense_within_window(model, window))
    return stack


def far_swap(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], swap: int, start: int,
             documents: bool = False) -> dict[str, float]:
    """Mean loss on sequence positions >= start with each sequence's first `swap` tokens as they are and with them
    taken from the next sequence of the batch (all batches together). documents: as in evaluate_batches."""
    from dsv4.model import IGNORE_INDEX

    sums = {"kept": 0.0, "swapped": 0.0}
    count = 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        swapped = ids.clone()
        swapped[:, :swap] = ids.roll(1, dims=0)[:, :swap]
        tail = labels[:, start:]
        valid = tail != IGNORE_INDEX
        for name, inputs in (("kept", ids), ("swapped", swapped)):
            logits = model(inputs, positions=batch["positions"] if documents else None)[:, start:].float()
            loss = F.cross_entropy(logits.flatten(0, 1), tail.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            sums[name] += loss.item()
        count += int(valid.sum())
    return {"swap": swap, "start": start, "tokens": count, "kept": sums["kept"] / count,
            "swapped": sums["swapped"] / count, "rise": (sums["swapped"] - sums["kept"]) / count}


def ablate(run_dir: Path, batches: int, drop: tuple[str, ...], swap: int) -> dict[str, Any]:
    from dsv4.evaluation.data import run_settings, validation_batches
    from dsv4.evaluation.losses import evaluate_batches
    from dsv4.loading import load_model

    loaded = load_model(run_dir, backend="torch")
    settings, model = run_settings(loaded), loaded.model
    window, seq_len = loaded.config.sliding_window, settings.seq_len
    start = swap + loaded.config.num_hidden_layers * (window - 1) + 1  # past a window-only model's reach
    if swap < 1 or start >= seq_len:
        raise SystemExit(f"--swap={swap}: with {loaded.config.num_hidden_layers} layers of a {window}-token window "
                         f"the loss is read from position {start} on, past the context of {seq_len}; give less")
    val, _ = validation_batches(loaded, settings, "bundled", batches, seq_len, settings.micro_batch)
    with torch.no_grad():
        full = evaluate_batches(model, val, window, seq_len, settings.documents)
        with restricted(model, window, drop):
            cut = evaluate_batches(model, val, window, seq_len, settings.documents)
        far = far_swap(model, val, swap, start, settings.documents)
    layers = [loaded.config.layer_kind(i) for i in range(loaded.config.num_hidden_layers)]
    return {"run": run_dir.name, "layers": layers, "window": window, "drop": list(drop),
            "trained": full["positions"], "restricted": cut["positions"],
            "loss": full["loss"], "loss_restricted": cut["loss"], "far_swap": far}


def table(results: list[dict[str, Any]]) -> str:
    edges = [(b["start"], b["end"]) for b in results[0]["trained"]["buckets"]]
    head = ["run", "loss > W trained", "restricted to W", "gain from beyond W"] + [
        f"gain {lo}..{hi}" for lo, hi in edges[1:]] + ["far swap: rise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t, c = r["trained"], r["restricted"]
        gains = [cb["loss"] - tb["loss"] for tb, cb in zip(t["buckets"][1:], c["buckets"][1:])]
        cells = [r["run"], f"{t['loss_beyond_window']:.4f}", f"{c['loss_beyond_window']:.4f}",
                 f"{c['loss_beyond_window'] - t['loss_beyond_window']:+.4f}"] + [f"{g:+.4f}" for g in gains]
        cells.append(f"{r['far_swap']['rise']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finished_runs(out: Path) -> list[Path]:
    """The full (not trial) runs of the quality experiment in `out` that finished; [] if none."""
    return sorted(p.parent for p in (out / "runs").glob("*/summary.json") if not p.parent.name.endswith("-trial"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/quality_ablation.py", description=__doc__.splitlines()[0])
    p.add_argument("out", help="the quality experiment's output directory")
    p.add_argument("--batches", type=int, default=8, help="held-out batches (the experiment evaluates on 8)")
    p.add_argument("--drop", default=",".join(COMPRESSED_KINDS),
                   help="V4 layer kinds whose compressed entries are dropped")
    p.add_argument("--swap", type=int, default=192, help="far swap: tokens replaced at each sequence's start")
    p.add_argument("--out", dest="json_out", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    drop = tuple(k.strip() for k in args.drop.split(",") if k.strip())
    if not drop or set(drop) - set(COMPRESSED_KINDS):
        p.error(f"--drop={args.drop}: choose from {', '.join(COMPRESSED_KINDS)}")
    for flag in ("batches", "swap"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if args.json_out:
        try:
            check_out_file(Path(args.json_out), "--out")
        except ConfigError as e:
            p.error(str(e))
    runs = finished_runs(Path(args.out))
    if not runs:
        p.error(f"{args.out}: no finished full run of the quality experiment (runs/*/summary.json); give the "
                "quality experiment's output directory")
    results = [ablate(run, args.batches, drop, args.swap) for run in runs]
    print(table(results))
    far = results[0]["far_swap"]
    print(f"far swap: the first {far['swap']} tokens of each sequence from another sequence; loss read on positions "
          f">= {far['start']} ({far['tokens']:,} tokens)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
