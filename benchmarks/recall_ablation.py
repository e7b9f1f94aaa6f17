#!/usr/bin/env python
"""Why and when does V4 attention learn to recall beyond its window? Small in-process ablations on synthetic recall.

    python benchmarks/recall_ablation.py outputs/recall_ablation            # every ablation (~25 min on 2 cores)
    python benchmarks/recall_ablation.py outputs/recall_ablation --only csa1,csa1_all_tokens --jobs 1
    python benchmarks/recall_ablation.py outputs/recall_ablation --only csa2,window_csa --seeds 3  # seeds 0..2
    python benchmarks/recall_ablation.py outputs/toy --toy                   # a few steps each (smoke test)

Each ablation trains one small decoder (dsv4.build_model, hidden 128, 4 heads of 64, window 16) in this process with
plain AdamW (LR 3e-3 and warm-up 30 steps unless an ablation says otherwise, cosine to 10%, weight decay 0.1 on
matrices, clip 1.0: the trainer's recipe) on freshly drawn recall documents (data_pipelines/recall.py, the recall
tokenizer's symbols), one document per row, batch 32, and reports the greedy answer accuracy on 256 held-out
documents every --eval-every steps.
No DeepSpeed, no packing: the point is many cheap, controlled comparisons; benchmarks/recall.py is the study
through the real pipeline. CSA layers attend to every visible entry (the dense phase), so selection is not in
question here; `phase` in an ablation says otherwise.

The default task is MQAR with each of 8 pairs alone in its 4-token group, a 64-token gap, then every key queried:
answers 67-110 tokens from their pair, beyond the reach of four stacked 16-token windows (60). Options that are
not in V4's design are experiment options, named as such: `zero_window_out` (the window-only layer's attention
output set to zero and frozen) and `freeze_window` (that layer's attention frozen at its initialisation).

Writes <out>/<name>.json per ablation and seed (<name>-s<seed>.json for seeds above 0; resumable: a finished one
is skipped) and <out>/results.md (the table: the mean over the seeds run, and each seed's accuracy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MQAR = {"task": "mqar", "items": 8, "num_keys": 32, "num_values": 16, "gap": 64, "layout": "aligned"}
COPY = {"task": "copy", "items": 32, "num_values": 32, "gap": 31}


@dataclass(frozen=True)
class Ablation:
    name: str
    ratios: tuple[int, ...]
    what: str
    task: dict[str, Any] = field(default_factory=lambda: dict(MQAR))
    loss: str = "answers"
    steps: int = 600
    lr: float = 3e-3  # peak LR (after the warm-up, cosine to 10%)
    warmup: int = 30  # LR warm-up steps
    phase: str = "dense"
    zero_window_out: bool = False  # experiment option: layer 0's attention output zeroed and frozen
    freeze_window: bool = False  # experiment option: layer 0's attention frozen at initialisation


ABLATIONS = [
    Ablation("csa1", (4,), "one CSA layer, loss on the answers"),
    Ablation("csa1_all_tokens", (4,), "one CSA layer, loss on every token", loss="all", steps=2000),
    Ablation("window1", (0,), "one window layer (the check: chance)"),
    Ablation("dense1", (-1,), "one dense layer (induction needs two)"),
    Ablation("hca8_1", (8,), "one HCA layer of ratio 8 (two pairs per entry)"),
    Ablation("csa1_packed", (4,), "one CSA layer, pairs packed back to back (two per group)",
              task={**MQAR, "layout": "packed"}),
    Ablation("csa1_copy", (4,), "one CSA layer, copy a 32-token string 63 tokens back", task=dict(COPY)),
    Ablation("csa2", (4, 4), "two CSA layers"),
    Ablation("window_csa", (0, 4), "a window layer, then CSA"),
    Ablation("window_csa_zero_out", (0, 4), "as window_csa, the window layer's attention output zeroed "
             "(experiment option)", zero_window_out=True),
    Ablation("window_csa_frozen", (0, 4), "as window_csa, the window layer's attention frozen at init "
             "(experiment option)", freeze_window=True),
    Ablation("v4_preset", (0, 4, 32, 4), "the tiny preset's schedule: window, CSA, HCA 32, CSA"),
    Ablation("v4_preset_all_tokens", (0, 4, 32, 4), "the preset, loss on every token", loss="all"),
    Ablation("v4_preset_sparse", (0, 4, 32, 4), "the preset, CSA on the indexer's top-8 from step 0",
              phase="sparse"),
    Ablation("flash_like", (0, 0, 4, 32), "V4-Flash's order: two window layers first"),
    Ablation("pro_like", (32, 32, 4, 32), "V4-Pro's order: HCA layers first, no window-only layer"),
    Ablation("v4_preset_csa_first", (4, 0, 32, 4), "the preset with its first two layers swapped"),
    Ablation("dense4", (-1, -1, -1, -1), "four dense layers"),
    Ablation("dense2", (-1, -1), "two dense layers (enough for induction)"),
    Ablation("dense2_all_tokens", (-1, -1), "two dense layers, loss on every token", loss="all", steps=2000),
    Ablation("dense4_long", (-1, -1, -1, -1), "four dense layers, 2,000 steps", steps=2000),
    Ablation("window_csa_warmup120", (0, 4), "as window_csa, LR warm-up 120 steps instead of 30", warmup=120),
    Ablation("dense4_lr1e-3", (-1, -1, -1, -1), "four dense layers, peak LR 1e-3", lr=1e-3),
    Ablation("dense4_lr1e-2", (-1, -1, -1, -1), "four dense layers, peak LR 1e-2", lr=1e-2),
    Ablation("window_csa_long", (0, 4), "as window_csa, 2,000 steps", steps=2000),
    Ablation("v4_preset_long", (0, 4, 32, 4), "the preset, 2,000 steps", steps=2000),
]
MODEL = dict(vocab_size=160, hidden_size=128, intermediate_size=384, num_attention_heads=4, head_dim=64,
             qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=16, index_n_heads=4,
             index_head_dim=32, index_topk=8)
BATCH, EVAL_DOCS = 32, 256


# ---------------------------------------------------------------- one ablation

def batch_of(docs) -> tuple[Any, Any]:
    """Documents of one length -> input ids [B, S] and labels [B, S] (the next token, -100 where masked)."""
    import torch

    ids = torch.tensor([d.ids for d in docs])
    mask = torch.tensor([d.loss_mask for d in docs])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -100)
    return ids, labels


def answer_accuracy(model, ids, docs) -> float:
    import torch

    with torch.no_grad():
        predictions = model(ids).argmax(-1)
    hits = [int(predictions[row, a - 1]) == doc.ids[a] for row, doc in enumerate(docs) for a in doc.answers]
    return sum(hits) / len(hits)


def build(ablation: Ablation, seed: int):
    import torch

    from dsv4 import build_model
    from dsv4.training.optim import param_groups

    torch.manual_seed(seed)
    model = build_model({**MODEL, "num_hidden_layers": len(ablation.ratios),
                         "compress_ratios": list(ablation.ratios)}, backend="torch", phase=ablation.phase)
    window_attn = model.layers[0].attn
    if ablation.zero_window_out:
        torch.nn.init.zeros_(window_attn.wo_b.weight)
    if ablation.zero_window_out or ablation.freeze_window:
        for param in window_attn.parameters():
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=ablation.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < ablation.warmup:
            return (step + 1) / ablation.warmup
        progress = min(1.0, (step - ablation.warmup) / max(1, ablation.steps - ablation.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def run_ablation(ablation: Ablation, out: Path, eval_every: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import torch

    from data_pipelines.recall import RecallSpec, Symbols, make_document
    from data_pipelines.tokenizer import TokenizerSpec, load_tokenizer

    torch.set_num_threads(1)
    spec = RecallSpec(**ablation.task, loss=ablation.loss)
    symbols = Symbols(load_tokenizer(TokenizerSpec("recall", None)))
    train_rng, eval_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    eval_docs = [make_document(replace(spec, loss="answers"), symbols, eval_rng) for _ in range(EVAL_DOCS)]
    eval_ids, _ = batch_of(eval_docs)
    model, optimizer, scheduler = build(ablation, seed)
    curve, started = [], time.time()
    for step in range(1, ablation.steps + 1):
        ids, labels = batch_of([make_document(spec, symbols, train_rng) for _ in range(BATCH)])
        out_ = model(ids, labels=labels)
        loss = out_.lm_loss + (0.01 * out_.indexer_loss if out_.indexer_loss is not None else 0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % eval_every == 0 or step == ablation.steps:
            model.eval()
            curve.append({"step": step, "loss": out_.lm_loss.item(), "accuracy": answer_accuracy(model, eval_ids,
                                                                                                eval_docs)})
            model.train()
            print(f"  {ablation.name} step {step}: answer loss {curve[-1]['loss']:.3f}, held-out accuracy "
                  f"{curve[-1]['accuracy']:.3f}", flush=True)
    result = {"ablation": {**ablation.__dict__, "ratios": list(ablation.ratios)}, "chance": 1 / spec.num_values,
              "curve": curve, "final_accuracy": curve[-1]["accuracy"], "wall_time_s": time.time() - started,
              "tokens": ablation.steps * BATCH * len(eval_docs[0].ids)}
    result["seed"] = seed
    result_file(out, ablation.name, seed).write_text(json.dumps(result, indent=2))
    return result


def result_file(out: Path, name: str, seed: int) -> Path:
    return out / (f"{name}.json" if seed == 0 else f"{name}-s{seed}.json")


def _worker(args: tuple[Ablation, str, int, int]) -> None:
    ablation, out, eval_every, seed = args
    run_ablation(ablation, Path(out), eval_every, seed)


# ---------------------------------------------------------------- the report

def first_step_at(curve: list[dict[str, Any]], level: float) -> int | None:
    return next((p["step"] for p in curve if p["accuracy"] >= level), None)


def write_report(out: Path, results: list[list[dict[str, Any]]], command: str) -> str:
    """One row per ablation: the mean final accuracy over its seeds, each seed's, and the first step at which the
    seeds' mean curve reaches 50% / 90%."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [f"# Recall ablations ({datetime.date.today().isoformat()}, commit {commit})", "", f"`{command}`", "",
             "MQAR (8 pairs, each alone in its 4-token group, 64-token gap: answers 67-110 tokens back) unless "
             "said; held-out greedy answer accuracy (chance 6.2%, copy 3.1%); CSA in the dense phase unless said.", "",
             "| ablation | layers | what | steps | accuracy (mean) | per seed | first step >= 50% | >= 90% |",
             "|---|---|---|---|---|---|---|---|"]
    for seeds in results:
        a = seeds[0]["ablation"]
        mean = sum(r["final_accuracy"] for r in seeds) / len(seeds)
        curve = [{"step": p["step"], "accuracy": sum(r["curve"][i]["accuracy"] for r in seeds) / len(seeds)}
                 for i, p in enumerate(seeds[0]["curve"])]
        per_seed = ", ".join(f"{100 * r['final_accuracy']:.0f}" for r in seeds)
        lines.append(f"| {a['name']} | {a['ratios']} | {a['what']} | {a['steps']} | {100 * mean:.1f}% | {per_seed} | "
                     f"{first_step_at(curve, 0.5) or '-'} | {first_step_at(curve, 0.9) or '-'} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/recall_ablation.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("out", help="output directory (one JSON per ablation, results.md)")
    p.add_argument("--only", default=None, help="comma-separated ablation names (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="ablations run at once, one thread each")
    p.add_argument("--seeds", type=int, default=1, help="seeds per ablation (0..N-1)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--toy", action="store_true", help="3 steps each (a smoke test, not a result)")
    args = p.parse_args(argv)
    names = {a.name for a in ABLATIONS}
    if args.only is not None and not args.only.strip(","):
        p.error("--only: empty; give comma-separated ablation names, or leave --only out for all of them")
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else [a.name for a in ABLATIONS]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"--only: unknown ablation {unknown[0]} (choose from {', '.join(sorted(names))})")
    for flag in ("jobs", "eval_every", "seeds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")
    from dsv4.config import ConfigError
    from dsv4.export import check_out_dir

    try:
        check_out_dir(Path(args.out), "out")
    except ConfigError as e:
        p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [replace(a, steps=3) if args.toy else a for a in ABLATIONS if a.name in chosen]
    runs = [(a, seed) for a in todo for seed in range(args.seeds)]
    pending = [(a, seed) for a, seed in runs if not result_file(out, a.name, seed).is_file()]
    print(f"recall ablations in {out}: {len(runs)} chosen (ablation x seed), {len(runs) - len(pending)} already "
          "done", flush=True)
    work = [(a, str(out), 1 if args.toy else args.eval_every, seed) for a, seed in pending]
    if args.jobs == 1:
        for item in work:
            _worker(item)
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(_worker, work, chunksize=1)
    results = [[json.loads(result_file(out, a.name, seed).read_text()) for seed in range(args.seeds)] for a in todo]
    command = "python benchmarks/recall_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(out, results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
