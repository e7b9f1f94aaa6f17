#!/usr/bin/env python
"""Does V4 attention keep what lies beyond its window? Synthetic recall, where a window-only model must fail.

    python benchmarks/recall.py outputs/recall                  # the default study (see benchmarks/RESULTS.md)
    python benchmarks/recall.py outputs/recall --variants v4,dense,window --seeds 3
    python benchmarks/recall.py outputs/recall-long --scale 2    # twice the steps (schedule and phases alike)
    python benchmarks/recall.py outputs/recall --parallel 2      # two runs at once, a core each
    python benchmarks/recall.py outputs/toy --toy                # a few steps per variant (smoke test)

Every variant trains on the same mixture of recall tasks (conf/experiment/recall.yaml: copy, MQAR and passkey
documents from data_pipelines/recall.py, the loss on the answers only), at equal tokens and equal parameter
counts (each variant's MLP width is matched to the V4 variant's total, as in benchmarks/quality.py, whose driver
this reuses):
  v4      the model's V4 schedule (window, CSA, HCA, CSA)         csa   every layer CSA
  dense   dense causal attention in every layer                   hca   every layer HCA
  window  sliding-window attention only (the check: at chance beyond its reach)
Learning rate: the same procedure for every variant (quality.py's: each LR of --lrs tried in a short run, the
lowest final validation loss wins; one LR: no trials). Every checkpoint of every full run (train.save_interval) is
evaluated with `dsv4.evaluate --tasks recall` on held-out documents: accuracy by distance bucket (in windows) per
task, beyond the stacked windows' reach, and the CSA indexer's hit rate (in the sparse phase; earlier
checkpoints are also read in the sparse phase for the hit rate alone).

Writes to the directory given: results.md (the table, with date and commit), results.json, and the plots
recall_by_distance.png (final accuracy vs distance, one panel per task), recall_vs_tokens.png (accuracy beyond the
reach vs training tokens) and indexer_hits.png (hit rate over training, the CSA phases shaded); runs/<job>/ holds
each training run, logs/<job>.log its output, eval/ the evaluations. Rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import (  # noqa: E402  (a sibling script: benchmarks/ is on the path above)
    COLORS,
    check_out_dir,
    choose_lr,
    compose,
    count_params,
    final_jobs,
    git_commit,
    matched_mlp_width,
    mean_spread,
    parse_study_args,
    run_training,
    scaled,
    study_parser,
    trial_jobs,
)

from dsv4.layer_kinds import BY_NAME  # noqa: E402

EXPERIMENT = "recall"
TOY = ["train.steps=4", "train.micro_batch_size=2", "train.warmup_steps=1", "train.phases.dense_steps=1",
       "train.phases.indexer_warmup_steps=1", "train.eval_interval=2", "train.eval_batches=1", "train.save_interval=2",
       "logging.interval=1"]
TOY_EVAL_DOCS = 4


# ---------------------------------------------------------------- training and evaluating every checkpoint

def train_all(jobs: list, out: Path, parallel: int) -> list[dict[str, Any]]:
    """Every job's summary, training `parallel` runs at once (each run's torch on cores / parallel threads)."""
    if parallel == 1:
        return [run_training(job, out, EXPERIMENT) for job in jobs]
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))  # the runs inherit it
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: run_training(job, out, EXPERIMENT), jobs))



def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the run's published checkpoints, oldest first."""
    from dsv4.run_files import list_checkpoints

    return sorted((c.step, c.path) for c in list_checkpoints(run_dir / "checkpoints"))


def evaluate_checkpoint(job, out: Path, checkpoint: Path, step: int, phase: str, docs: int) -> dict[str, Any]:
    """`dsv4.evaluate --tasks recall` on one checkpoint in `phase` (cached in eval/<job>/<step>-<phase>.json)."""
    from dsv4.evaluate import evaluate

    cached = out / "eval" / job.name / f"{step:07d}-{phase}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = evaluate(checkpoint, ["recall"], phase=phase, recall_docs=docs)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    return result


def evaluate_run(job, out: Path, train, docs: int) -> list[dict[str, Any]]:
    """Every checkpoint of the run: its recall at the phase it was trained in, and for a CSA model whose
    checkpoint predates the sparse phase, the indexer hit rate read in the sparse phase."""
    from dsv4.run_config import phase_for_step

    points = []
    for step, checkpoint in checkpoints(out / "runs" / job.name):
        phase = phase_for_step(train, step - 1)
        result = evaluate_checkpoint(job, out, checkpoint, step, phase, docs)
        hits = result
        if phase != "sparse" and any(BY_NAME[kind].indexer for kind in result["layers"]):  # picks: sparse only
            hits = evaluate_checkpoint(job, out, checkpoint, step, "sparse", docs)
        points.append({"step": step, "phase": phase, "recall": result["recall"], "hits": _hit_rates(hits)})
    return points


def _hit_rates(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {"hit_rate", "chance"}} averaged over the CSA layers (empty without picks)."""
    rates = {}
    for name, task in result["recall"]["tasks"].items():
        layers = list(task["indexer_hit_rate"].values())
        if layers:
            rates[name] = {key: sum(h[key] for h in layers) / len(layers) for key in ("hit_rate", "chance")}
    return rates


# ---------------------------------------------------------------- the table

def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant and task: the final checkpoint's accuracy overall, beyond the reach, by bucket (mean ± half
    the range over seeds), and the final indexer hit rate."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        finals = [r["points"][-1] for r in mine]
        tasks = {}
        for name, first in finals[0]["recall"]["tasks"].items():
            per_seed = [f["recall"]["tasks"][name] for f in finals]
            bucket_names = [b["name"] for b in first["buckets"]]
            tasks[name] = {
                "chance": first["chance"], "reach": first["reach"],
                "accuracy": mean_spread([t["accuracy"] for t in per_seed]),
                "beyond_reach": mean_spread([t["beyond_reach"]["accuracy"] for t in per_seed]),
                "buckets": {b: mean_spread([_bucket(t, b) for t in per_seed]) for b in bucket_names},
                "first": mean_spread([t["first_answer"]["accuracy"] for t in per_seed if "first_answer" in t]),
                "first_guess": mean_spread([t["first_answer"]["set_guesser"] for t in per_seed
                                            if "first_answer" in t]),
                "hit_rate": mean_spread([f["hits"][name]["hit_rate"] for f in finals if name in f["hits"]]),
                "hit_chance": mean_spread([f["hits"][name]["chance"] for f in finals if name in f["hits"]]),
            }
        rows.append({"variant": variant, "seeds": len(mine), "params": mine[0]["params"], "lr": mine[0]["lr"],
                     "tokens": mine[0]["tokens"], "tasks": tasks,
                     "tokens_per_s": mean_spread([r["tokens_per_s"] for r in mine])})
    return rows


def _bucket(task: dict[str, Any], name: str) -> float | None:
    return next((b["accuracy"] for b in task["buckets"] if b["name"] == name), None)


def _pm(value: tuple[float, float]) -> str:
    mean, spread = value
    if mean != mean:
        return "-"
    return f"{100 * mean:.1f} ± {100 * spread:.1f}" if spread > 0 else f"{100 * mean:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    tasks = list(rows[0]["tasks"]) if rows else []
    lines = []
    for name in tasks:
        first = rows[0]["tasks"][name]
        buckets = list(first["buckets"])
        reach = next((r["tasks"][name]["reach"] for r in rows if r["tasks"][name]["reach"]), 0)  # dense has none
        guess = rows[0]["tasks"][name]["first_guess"][0]
        first_head = f"first answer (set guesser {100 * guess:.1f})" if guess == guess else "first answer"
        head = ["variant", "params", "LR", "all", *buckets, f"beyond reach (> {reach})", first_head,
                "indexer hits (random)"]
        lines += [f"**{name}** (accuracy %, chance {100 * first['chance']:.1f}%)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            t = r["tasks"][name]
            hits = f"{_pm(t['hit_rate'])} ({_pm(t['hit_chance'])})" if t["hit_rate"][0] == t["hit_rate"][0] else "-"
            beyond = _pm(t["beyond_reach"]) if t["reach"] else "n/a (dense)"
            cells = [r["variant"], f"{r['params'] / 1e6:.3f}M", f"{r['lr']:g}", _pm(t["accuracy"]),
                     *[_pm(t["buckets"][b]) for b in buckets], beyond, _pm(t["first"]), hits]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], runs: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    text = [f"# Recall: what V4 attention keeps beyond its window ({settings['date']}, commit {settings['commit']})",
            "", f"`{settings['command']}`", "",
            f"{settings['tokens']:,} training tokens per run (a mixture of {', '.join(settings['tasks'])}; loss on the "
            f"answers), W = {settings['window']}, {settings['seeds']} seed(s) per variant, LR by "
            f"{settings['lr_procedure']}; each run trained in {settings['run_time_s'][0]:.0f}-"
            f"{settings['run_time_s'][1]:.0f} s ({settings['parallel']} at a time). Accuracy of the greedy "
            f"answer on {settings['eval_docs']} held-out documents per task, by distance from the query to the token "
            "it recalls (in windows); 'beyond reach': farther than the stacked windows reach (layers x (W - 1)); "
            "first answer: each document's first answer only, where a model that knows the set of answers but "
            "binds none to its query (and leaves out those already given) scores the set guesser's rate; "
            "indexer hits: CSA top-k holding an entry that pooled the source (random top-k in brackets). "
            "Mean ± half the range over seeds.", "",
            markdown_table(rows), "",
            "![accuracy by distance](recall_by_distance.png) ![accuracy vs tokens](recall_vs_tokens.png)",
            "![indexer hit rate](indexer_hits.png)", ""]
    (out / "results.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps({"settings": settings, "variants": rows, "runs": runs}, indent=2))


# ---------------------------------------------------------------- the plots

def plot_by_distance(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    tasks = list(rows[0]["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for r in rows:
            t = r["tasks"][name]
            names = [b for b in t["buckets"] if t["buckets"][b][0] == t["buckets"][b][0]]
            ax.plot(names, [t["buckets"][b][0] for b in names], marker="o", color=COLORS.get(r["variant"]),
                    label=r["variant"])
        ax.axhline(rows[0]["tasks"][name]["chance"], color="grey", linestyle=":", label="chance")
        ax.set(title=name, xlabel="distance (windows)", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_tokens(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    tasks = list(runs[0]["points"][-1]["recall"]["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for r in runs:
            xs = [p["step"] * r["tokens"] / r["steps"] for p in r["points"]]
            ys = [_beyond_or_all(p["recall"]["tasks"][name]) for p in r["points"]]
            ax.plot(xs, ys, marker=".", color=COLORS.get(r["variant"]), linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
                    label=f"{r['variant']} s{r['seed']}")
        ax.axhline(runs[0]["points"][-1]["recall"]["tasks"][name]["chance"], color="grey", linestyle=":")
        ax.set(title=f"{name}: beyond the windows' reach", xlabel="training tokens", ylabel="accuracy",
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _beyond_or_all(task: dict[str, Any]) -> float:
    """Accuracy beyond the reach (the whole task for dense models, which have none)."""
    value = task["beyond_reach"]["accuracy"] if task["reach"] else None
    return task["accuracy"] if value is None else value


def plot_hits(runs: list[dict[str, Any]], train, path: Path) -> None:
    """One panel per task: each CSA variant's hit rate (mean over seeds and CSA layers) by checkpoint, the rate of
    random top-k picks, and the CSA phases shaded."""
    import matplotlib.pyplot as plt

    with_hits = [r for r in runs if any(p["hits"] for p in r["points"])]
    tasks = list(runs[0]["points"][-1]["recall"]["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    dense_end = train.phases.dense_steps
    warm_end = dense_end + train.phases.indexer_warmup_steps
    for ax, name in zip(axes[0], tasks):
        ax.axvspan(0, dense_end, color="tab:grey", alpha=0.15, label="dense phase")
        ax.axvspan(dense_end, warm_end, color="tab:olive", alpha=0.15, label="indexer warm-up")
        ax.axvspan(warm_end, train.steps, color="tab:cyan", alpha=0.10, label="sparse phase")
        for variant in dict.fromkeys(r["variant"] for r in with_hits):
            mine = [r for r in with_hits if r["variant"] == variant]
            steps = [p["step"] for p in mine[0]["points"] if p["hits"]]
            rates = [[p["hits"][name] for p in r["points"] if p["hits"]] for r in mine]
            ax.plot(steps, [sum(h[i]["hit_rate"] for h in rates) / len(rates) for i in range(len(steps))],
                    marker="o", color=COLORS.get(variant), label=variant)
            ax.plot(steps, [sum(h[i]["chance"] for h in rates) / len(rates) for i in range(len(steps))],
                    linestyle="--", color=COLORS.get(variant), alpha=0.5, label=f"{variant}: random top-k")
        ax.set(title=name, xlabel="step", ylabel="indexer hit rate", ylim=(0, 1.02), xlim=(0, train.steps))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("CSA indexer: top-k holds an entry that pooled the answer's source (mean over seeds and layers)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the command

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = study_parser("benchmarks/recall.py", __doc__, "output directory (runs, logs, eval, results.md, results.json, "
                     "plots)", "v4,dense,window,csa,hca", 3, "3e-3", 0.25)
    p.add_argument("--eval-docs", type=int, default=128, help="held-out documents per task and checkpoint")
    p.add_argument("--parallel", type=int, default=1, help="training runs at once (each with cores / N threads)")
    args, overrides = parse_study_args(p, argv, ("eval_docs", "parallel"))
    if args.toy:
        args.eval_docs = min(args.eval_docs, TOY_EVAL_DOCS)
    return args, ([*TOY] if args.toy else []) + overrides


def main(argv: list[str] | None = None) -> int:
    args, user = parse_args(argv)
    out = Path(args.out)
    started = time.time()
    try:
        base = compose(user, EXPERIMENT)
        if args.scale != 1:
            user = [*user, *scaled(base.train, args.scale)]
            base = compose(user, EXPERIMENT)
    except Exception as e:  # a bad override: Hydra's or our ConfigError, naming the key
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_out_dir(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    target = count_params(compose([*user, "attention=preset"], EXPERIMENT).model)
    widths, params = {}, {}
    for variant in args.variants:
        widths[variant], params[variant] = matched_mlp_width(variant, target, user, EXPERIMENT)
    train = base.train
    tokens = train.steps * train.seq_len * train.micro_batch_size * train.grad_accum_steps
    print(f"recall study in {out}: variants {', '.join(args.variants)}; parameters "
          + ", ".join(f"{v} {params[v] / 1e6:.3f}M (MLP {widths[v]})" for v in args.variants)
          + f"; {train.steps} steps, {tokens:,} tokens per run; LRs {', '.join(f'{lr:g}' for lr in args.lrs)}; "
          f"{args.seeds} seed(s)", flush=True)
    trials = trial_jobs(args.variants, args.lrs, widths, user, args.trial_fraction, train)
    chosen = {}
    for variant in args.variants:
        mine = [t for t in trials if t.variant == variant]
        results = [{"lr": t.lr, "val_loss": run_training(t, out, EXPERIMENT)["val_loss"]} for t in mine]
        chosen[variant] = choose_lr(results) if results else args.lrs[0]
        if results:
            print(f"{variant}: LR trials " + ", ".join(f"{r['lr']:g} -> {r['val_loss']:.4f}" for r in results)
                  + f"; chosen {chosen[variant]:g}", flush=True)
    # seed-major: an interrupted study has every variant at its first seeds
    jobs = [final_jobs(variant, chosen[variant], seed + 1, widths[variant], user)[seed]
            for seed in range(args.seeds) for variant in args.variants]
    summaries = train_all(jobs, out, args.parallel)
    runs = []
    for job, summary in zip(jobs, summaries):
        print(f"  evaluating {job.name}", flush=True)
        points = evaluate_run(job, out, train, args.eval_docs)
        runs.append({"job": job.name, "variant": job.variant, "seed": job.seed, "lr": job.lr,
                     "params": params[job.variant], "steps": train.steps, "tokens": tokens,
                     "tokens_per_s": summary["tokens_per_s"], "wall_time_s": summary["wall_time_s"],
                     "points": points})
    rows = summarise(runs, args.variants)
    first_run_tasks = runs[0]["points"][-1]["recall"]["tasks"]
    settings = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
                "command": "python benchmarks/recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "window": base.model.sliding_window, "seq_len": train.seq_len, "tokens": tokens, "seeds": args.seeds,
                "lrs": args.lrs, "tasks": list(first_run_tasks), "eval_docs": args.eval_docs,
                "task_specs": {n: t["spec"] for n, t in first_run_tasks.items()},
                "lr_procedure": (f"the lowest final validation loss of a {args.trial_fraction:g}-length trial run "
                                 "(seed 0) per LR" if len(args.lrs) > 1 else f"fixing it ({args.lrs[0]:g})"),
                "chosen_lr": chosen, "trials": [asdict(t) for t in trials], "wall_time_s": time.time() - started,
                "parallel": args.parallel,
                "run_time_s": [min(r["wall_time_s"] for r in runs), max(r["wall_time_s"] for r in runs)]}
    write_report(out, rows, runs, settings)
    plot_by_distance(rows, out / "recall_by_distance.png")
    plot_vs_tokens(runs, out / "recall_vs_tokens.png")
    plot_hits(runs, train, out / "indexer_hits.png")
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, results.json and 3 plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
