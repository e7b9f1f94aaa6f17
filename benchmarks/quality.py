#!/usr/bin/env python
"""Does V4 attention learn as well as dense attention, and does it use what lies beyond its window?

    python benchmarks/quality.py outputs/quality                         # the default experiment (~1 h, 2 CPU cores)
    python benchmarks/quality.py outputs/quality --variants v4,dense,window,csa,hca --seeds 3
    python benchmarks/quality.py outputs/quality-gpu model=small train.steps=4000 train.seq_len=4096
    python benchmarks/quality.py outputs/toy --toy                       # a few steps per variant (smoke test)

Trains every variant at EQUAL TOKENS and equal parameter counts (each variant's MLP width is set so its total
equals the V4 variant's) with the settings of conf/experiment/quality.yaml plus any Hydra overrides given here:
  v4      the model's V4 schedule (window + CSA + HCA layers)      csa   every layer CSA
  dense   dense causal attention in every layer                   hca   every layer HCA
  window  sliding-window attention only
Learning rate: the same procedure for every variant. Each LR of --lrs is tried in a short run (--trial-fraction of
the steps, seed 0, schedule and phases scaled alike); the one with the lowest final validation loss is used for
the --seeds full runs. Each full run is then evaluated (dsv4.evaluate: loss on the bundled corpus' held-out
documents, loss by position bucket, passkey retrieval by length and depth, indexer recall).

Writes to the directory given: results.md (the table, with date and commit), results.json, and the plots
val_loss.png, loss_by_position.png, passkey.png, indexer_recall.png; runs/<job>/ holds each training run and
logs/<job>.log its output. Rerunning the same command continues: finished runs and evaluations are kept, an
interrupted run resumes from its last checkpoint (train.resume=auto), and changed settings for an existing run
stop with a message naming it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"v4": "preset", "dense": "dense", "window": "window", "csa": "csa", "hca": "hca"}  # -> attention=
RESERVED = ("attention", "train.lr", "train.seed", "model.intermediate_size", "train.output_dir", "train.resume",
            "+experiment")
TOY = ["train.steps=3", "train.seq_len=128", "train.micro_batch_size=2", "train.warmup_steps=1",
       "train.phases.dense_steps=1", "train.phases.indexer_warmup_steps=1", "train.eval_interval=2",
       "train.eval_batches=1", "train.save_interval=0", "data.num_workers=0", "logging.interval=1",
       "data.sources.1.passkey.min_tokens=40", "data.sources.1.passkey.max_tokens=128",
       "data.sources.1.passkey.val_documents=4"]
PASSKEY_MULTIPLES = (2, 4, 8, 16)


@dataclass
class Job:
    name: str
    variant: str
    lr: float
    seed: int
    trial: bool
    overrides: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- configs and parameter counts

def compose(overrides: list[str], experiment: str = "quality"):
    """The composed, validated run config of train.py with conf/experiment/<experiment>.yaml and these overrides
    (dsv4.run_config.RunConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dsv4.run_config import resolve_config

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return resolve_config(hydra_compose("config", overrides=[f"+experiment={experiment}", *overrides]))


def count_params(model_cfg) -> int:
    import torch

    from dsv4.model import DSV4Model

    with torch.device("meta"):
        return sum(p.numel() for p in DSV4Model(model_cfg).parameters())


def matched_mlp_width(variant: str, target: int, user: list[str], experiment: str = "quality") -> tuple[int, int]:
    """(intermediate_size, total parameters) of `variant` with its total closest to `target`: the SwiGLU MLP has
    3 * hidden * width parameters per layer, so the width absorbs what the attention layers add or lack."""
    cfg = compose([*user, f"attention={VARIANTS[variant]}"], experiment).model
    base = count_params(cfg)
    per_unit = 3 * cfg.hidden_size * cfg.num_hidden_layers
    width = max(8, cfg.intermediate_size + round((target - base) / per_unit))
    return width, base + (width - cfg.intermediate_size) * per_unit


# ---------------------------------------------------------------- the plan

def scaled(train, fraction: float) -> list[str]:
    """Overrides that scale a run to `fraction` of its steps with its schedule, phases and intervals alike."""
    steps = max(1, round(train.steps * fraction))

    def part(n: int) -> int:
        return round(n * steps / train.steps)

    return [f"train.steps={steps}", f"train.warmup_steps={part(train.warmup_steps)}",
            f"train.phases.dense_steps={part(train.phases.dense_steps)}",
            f"train.phases.indexer_warmup_steps={part(train.phases.indexer_warmup_steps)}",
            f"train.eval_interval={max(1, part(train.eval_interval)) if train.eval_interval else 0}",
            f"train.save_interval={max(1, part(train.save_interval)) if train.save_interval else 0}"]


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def trial_jobs(variants: list[str], lrs: list[float], widths: dict[str, int], user: list[str],
               trial_fraction: float, train) -> list[Job]:
    """The LR trials: every LR for every variant, seed 0, a shortened run (none when only one LR is given)."""
    if len(lrs) < 2:
        return []
    return [Job(f"{variant}-lr{lr_tag(lr)}-trial", variant, lr, 0, True,
                variant_overrides(variant, widths[variant], lr, 0, user) + scaled(train, trial_fraction))
            for variant in variants for lr in lrs]


def variant_overrides(variant: str, width: int, lr: float, seed: int, user: list[str]) -> list[str]:
    return [*user, f"attention={VARIANTS[variant]}", f"model.intermediate_size={width}", f"train.lr={lr}",
            f"train.seed={seed}"]


def final_jobs(variant: str, lr: float, seeds: int, width: int, user: list[str]) -> list[Job]:
    return [Job(f"{variant}-lr{lr_tag(lr)}-seed{seed}", variant, lr, seed, False,
                variant_overrides(variant, width, lr, seed, user)) for seed in range(seeds)]


def choose_lr(trials: list[dict[str, Any]]) -> float:
    """The LR of the trial with the lowest final validation loss (a diverged trial, NaN, never wins)."""
    finite = [t for t in trials if t.get("val_loss") is not None and math.isfinite(t["val_loss"])]
    if not finite:
        raise RuntimeError("every learning-rate trial diverged or failed: " + ", ".join(
            f"lr {t['lr']:g}: {t.get('val_loss')}" for t in trials))
    return min(finite, key=lambda t: t["val_loss"])["lr"]


# ---------------------------------------------------------------- running (restartable)

def run_training(job: Job, out: Path, experiment: str = "quality") -> dict[str, Any]:
    """Train `job` (train.py +experiment=<experiment>) unless its run finished already; returns its summary.json.
    An interrupted run resumes."""
    from dsv4.training.sweep import hydra_quoted, job_command

    run_dir = out / "runs" / job.name
    record = run_dir / "job.json"
    if record.is_file() and json.loads(record.read_text())["overrides"] != job.overrides:
        raise SystemExit(f"{run_dir}: this run was started with other settings ({record}); use another output "
                         "directory, or delete this run directory to retrain it")
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("stopped_by") is None and summary.get("steps") == summary.get("start_step", 0) + summary.get(
                "steps_this_run", 0):
            return summary
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(job), indent=2))
    extra = [f"train.output_dir={hydra_quoted(str(run_dir))}", "train.resume=auto",
             f"logging.wandb.group={hydra_quoted(experiment + '-' + out.resolve().name)}",
             f"logging.wandb.name={hydra_quoted(job.name)}"]
    cmd, env_extra = job_command("python", 1, [f"+experiment={experiment}", *job.overrides, *extra])
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{job.name}.log"
    print(f"  training {job.name} (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(env_extra))
    if code != 0 or not summary_file.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{job.name}: train.py exited with {code}; the end of {log}:\n{tail}")
    print(f"  {job.name}: done in {time.time() - t0:.0f} s", flush=True)
    return json.loads(summary_file.read_text())


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


def run_evaluation(job: Job, out: Path, passkey_per_cell: int, batches: int) -> dict[str, Any]:
    """dsv4.evaluate on the job's final checkpoint (cached in eval/<job>.json, redone if the run is newer)."""
    from dsv4.evaluate import evaluate

    run_dir = out / "runs" / job.name
    cached = out / "eval" / f"{job.name}.json"
    if cached.is_file() and cached.stat().st_mtime >= (run_dir / "summary.json").stat().st_mtime:
        return json.loads(cached.read_text())
    cfg = compose(job.overrides)
    window, seq_len = cfg.model.sliding_window, cfg.train.seq_len
    lengths = [m * window for m in PASSKEY_MULTIPLES if m * window <= seq_len]
    print(f"  evaluating {job.name}", flush=True)
    result = evaluate(run_dir, ["ppl", "positions", "passkey"], data="bundled", batches=batches,
                      passkey_lengths=lengths, passkey_per_cell=passkey_per_cell)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- what a run recorded

VAL_LINE = re.compile(r"^step\s+(\d+) \| val loss ([-+.\w]+)")


def val_curve(log: Path, summary: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation loss) from the trainer's console lines, plus the final one from summary.json; a resumed
    run's repeated steps keep their last value."""
    points: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            match = VAL_LINE.match(line.strip())
            if match:
                points[int(match.group(1))] = float(match.group(2))
    points[int(summary["steps"])] = float(summary["val_loss"])
    return sorted(points.items())


def recall_curve(run_dir: Path) -> list[tuple[int, float, str]]:
    """(step, indexer recall, phase) from metrics.jsonl (logged in the sparse phase, on logging steps)."""
    rows = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "indexer_recall" in row:
                rows[row["step"]] = (row["step"], row["indexer_recall"], row.get("phase", ""))
    return [rows[k] for k in sorted(rows)]


def collect(job: Job, out: Path, summary: dict[str, Any], evaluation: dict[str, Any], params: int) -> dict[str, Any]:
    run_dir = out / "runs" / job.name
    return {"job": job.name, "variant": job.variant, "seed": job.seed, "lr": job.lr, "params": params,
            "train_val_loss": summary["val_loss"], "tokens": summary["steps"] * _tokens_per_step(job),
            "tokens_per_s": summary["tokens_per_s"], "wall_time_s": summary["wall_time_s"],
            "val_curve": val_curve(out / "logs" / f"{job.name}.log", summary),
            "recall_curve": recall_curve(run_dir), "eval": evaluation}


def _tokens_per_step(job: Job) -> int:
    cfg = compose(job.overrides).train
    return cfg.seq_len * cfg.micro_batch_size * cfg.grad_accum_steps


# ---------------------------------------------------------------- the table

def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with 2 seeds the spread is each seed's distance from the mean."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return sum(values) / len(values), (max(values) - min(values)) / 2


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant: means (and spreads) over its seeds."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        ev = [r["eval"] for r in mine]
        lengths = [str(n) for n in ev[0]["passkey"]["lengths"]]
        recall = [e["ppl"].get("indexer_recall") for e in ev]
        rows.append({
            "variant": variant, "seeds": len(mine), "params": mine[0]["params"], "lr": mine[0]["lr"],
            "tokens": mine[0]["tokens"], "layers": ev[0]["layers"],
            "val_loss": mean_spread([e["ppl"]["loss"] for e in ev]),
            "train_val_loss": mean_spread([r["train_val_loss"] for r in mine]),
            "loss_within_window": mean_spread([e["positions"]["loss_within_window"] for e in ev]),
            "loss_beyond_window": mean_spread([e["positions"]["loss_beyond_window"] for e in ev]),
            "passkey": {n: mean_spread([e["passkey"]["by_length"][n]["exact"] for e in ev]) for n in lengths},
            "passkey_per_digit": {n: mean_spread([e["passkey"]["by_length"][n]["per_digit"] for e in ev])
                                  for n in lengths},
            "indexer_recall": mean_spread(recall) if any(v is not None for v in recall) else None,
            "tokens_per_s": mean_spread([r["tokens_per_s"] for r in mine]),
            "buckets": _mean_buckets(ev),
        })
    return rows


def _mean_buckets(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    buckets = evaluations[0]["positions"]["buckets"]
    return [{"start": b["start"], "end": b["end"],
             "loss": mean_spread([e["positions"]["buckets"][i]["loss"] for e in evaluations])[0]}
            for i, b in enumerate(buckets)]


def _pm(value: tuple[float, float], digits: int = 3) -> str:
    mean, spread = value
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if spread == spread and spread > 0 else f"{mean:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], window: int) -> str:
    lengths = list(rows[0]["passkey"]) if rows else []
    head = (["variant", "params", "LR", "val loss (bundled)", f"loss ≤ W={window}", "loss > W"]
            + [f"passkey @{int(n) // window}W" for n in lengths]
            + ["per digit @8W" if str(8 * window) in lengths else "per digit", "indexer recall", "tokens/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        digit_key = str(8 * window) if str(8 * window) in r["passkey_per_digit"] else lengths[-1]
        cells = [r["variant"], f"{r['params'] / 1e6:.3f}M", f"{r['lr']:g}", _pm(r["val_loss"]),
                 _pm(r["loss_within_window"]), _pm(r["loss_beyond_window"])]
        cells += [_pm(r["passkey"][n], 2) for n in lengths]
        cells += [_pm(r["passkey_per_digit"][digit_key], 2),
                  _pm(r["indexer_recall"], 3) if r["indexer_recall"] else "-", f"{r['tokens_per_s'][0]:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(out: Path, rows: list[dict[str, Any]], runs: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    window = settings["window"]
    text = [f"# Quality: V4 attention against dense and window-only at equal tokens ({settings['date']}, commit "
            f"{settings['commit']})", "",
            f"`{settings['command']}`", "",
            f"{settings['tokens']:,} training tokens per run, context {settings['seq_len']} = "
            f"{settings['seq_len'] // window} x the window (W = {window}), {settings['seeds']} seed(s) per variant, "
            f"LR chosen per variant from {settings['lrs']} by {settings['lr_procedure']}. Values: mean ± half the "
            "range over seeds. val loss: the bundled corpus' held-out documents; loss ≤ W / > W: the same tokens "
            "by their position in their document; passkey: exact greedy retrieval of a "
            f"{settings['digits']}-digit key (chance {10.0 ** -settings['digits']:.0e}; per digit: chance 0.10) "
            "over depths 0..1; indexer recall: CSA layers at the end, sparse phase; tokens/s: training.", "",
            markdown_table(rows, window), "",
            "![validation loss](val_loss.png) ![loss by position](loss_by_position.png)",
            "![passkey accuracy](passkey.png) ![indexer recall](indexer_recall.png)", ""]
    (out / "results.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps({"settings": settings, "variants": rows, "runs": runs}, indent=2))


# ---------------------------------------------------------------- the plots

COLORS = {"v4": "tab:blue", "dense": "tab:orange", "window": "tab:green", "csa": "tab:purple", "hca": "tab:brown"}


def new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2))


def save_figure(fig, ax, path: Path, legend_size: int = 8) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_loss(runs: list[dict[str, Any]], path: Path) -> None:
    fig, ax = new_figure()
    for r in runs:
        steps, losses = zip(*r["val_curve"])
        ax.plot(steps, losses, color=COLORS.get(r["variant"]), linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
                marker=".", label=f"{r['variant']} seed {r['seed']}")
    ax.set(xlabel="step", ylabel="validation loss (run's mixture)", title="Validation loss")
    save_figure(fig, ax, path)


def plot_positions(rows: list[dict[str, Any]], window: int, path: Path) -> None:
    fig, ax = new_figure()
    for r in rows:
        centers = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
        ax.plot(centers, [b["loss"] for b in r["buckets"]], marker="o", color=COLORS.get(r["variant"]),
                label=r["variant"])
    ax.axvline(window, color="grey", linestyle="--", label=f"W = {window}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position in document (bucket centre)", ylabel="mean loss", title="Loss by position")
    save_figure(fig, ax, path)


def plot_passkey(rows: list[dict[str, Any]], window: int, path: Path) -> None:
    fig, ax = new_figure()
    for r in rows:
        lengths = [int(n) for n in r["passkey"]]
        ax.plot(lengths, [r["passkey"][str(n)][0] for n in lengths], marker="o", color=COLORS.get(r["variant"]),
                label=f"{r['variant']} exact")
        ax.plot(lengths, [r["passkey_per_digit"][str(n)][0] for n in lengths], marker=".", linestyle=":",
                color=COLORS.get(r["variant"]), label=f"{r['variant']} per digit")
    ax.axhline(0.1, color="grey", linestyle=":", label="chance per digit")
    ax.axvline(window, color="grey", linestyle="--", label=f"W = {window}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="prompt length (tokens)", ylabel="accuracy", ylim=(-0.02, 1.02), title="Passkey retrieval")
    save_figure(fig, ax, path, 7)


def plot_recall(runs: list[dict[str, Any]], train, path: Path) -> None:
    fig, ax = new_figure()
    dense_end = train.phases.dense_steps
    warm_end = dense_end + train.phases.indexer_warmup_steps
    ax.axvspan(0, dense_end, color="tab:grey", alpha=0.15, label="dense phase")
    ax.axvspan(dense_end, warm_end, color="tab:olive", alpha=0.15, label="indexer warm-up")
    ax.axvspan(warm_end, train.steps, color="tab:cyan", alpha=0.10, label="sparse phase")
    for r in runs:
        if r["recall_curve"]:
            steps, recall, _ = zip(*r["recall_curve"])
            ax.plot(steps, recall, color=COLORS.get(r["variant"]), linestyle=("-", "--", ":", "-.")[r["seed"] % 4],
                    label=f"{r['variant']} seed {r['seed']}")
        end = r["eval"]["ppl"].get("indexer_recall")
        if end is not None:
            ax.plot([train.steps], [end], marker="*", markersize=10, color=COLORS.get(r["variant"]))
    ax.set(xlabel="step", ylabel="indexer recall (CSA, sparse)", ylim=(0, 1.02), xlim=(0, train.steps),
           title="Indexer recall (training; * = held-out text at the end)")
    save_figure(fig, ax, path, 7)


# ---------------------------------------------------------------- the command

def study_parser(prog: str, doc: str, out_help: str, variants: str, seeds: int, lrs: str,
                 trial_fraction: float) -> argparse.ArgumentParser:
    """The options every study driver shares (quality.py, recall.py), with its own defaults."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[1:]))
    p.add_argument("out", help=out_help)
    p.add_argument("--variants", default=variants, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=seeds, help="full runs per variant (seeds 0..N-1)")
    p.add_argument("--lrs", default=lrs, help="learning rates tried per variant (one: no trials)")
    p.add_argument("--scale", type=float, default=1.0, help="every run's steps (schedule, phases, intervals alike) "
                                                              "x this: 0.25 for a pilot, 10 for a longer run")
    p.add_argument("--trial-fraction", type=float, default=trial_fraction,
                   help="length of an LR trial, share of the steps")
    p.add_argument("--toy", action="store_true", help="a few steps at tiny sizes (a smoke test, not a result)")
    return p


def parse_study_args(p: argparse.ArgumentParser, argv: list[str] | None, counts: tuple[str, ...]
                     ) -> tuple[argparse.Namespace, list[str]]:
    """Parse and check the shared options (and the integer options named in `counts`, each >= 1); the rest of argv
    are Hydra overrides, none of the keys the driver sets itself. p.error (exit 2) names the first mistake."""
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        p.error(f"unknown option {bad[0]}")
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in (r.lstrip("+") for r in RESERVED):
            p.error(f"{o}: the driver sets {key} itself (variants, LR choice, seeds, output)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants={args.variants}: choose from {', '.join(VARIANTS)}")
    if "v4" not in variants:
        p.error("--variants: include v4 (the parameter counts are matched to it)")
    args.variants = variants
    try:
        args.lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lrs={args.lrs}: give comma-separated numbers")
    if not args.lrs or not all(0 < lr < math.inf for lr in args.lrs):
        p.error(f"--lrs={','.join(f'{lr:g}' for lr in args.lrs)}: give positive, finite learning rates")
    repeated = [lr for i, lr in enumerate(args.lrs) if lr in args.lrs[:i]]
    if repeated:
        p.error(f"--lrs: {repeated[0]:g} is given twice (each LR is a separate trial run)")
    for name in ("seeds", *counts):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.scale < math.inf:
        p.error(f"--scale={args.scale}: must be a finite number > 0")
    if not 0 < args.trial_fraction <= 1:
        p.error("--trial-fraction must be in (0, 1]")
    return args, overrides


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = study_parser("benchmarks/quality.py", __doc__, "output directory (runs, logs, results.md, results.json, plots)",
                     "v4,dense,window", 2, "1.5e-3,3e-3,6e-3", 0.2)
    p.add_argument("--passkey-per-cell", type=int, default=4, help="passkey prompts per (length, depth)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the evaluation's losses")
    args, overrides = parse_study_args(p, argv, ("passkey_per_cell", "eval_batches"))
    return args, ([*TOY] if args.toy else []) + overrides


def check_out_dir(path: str | Path) -> str | None:
    """None if the output directory can be created and written (a probe file is written and removed: as root,
    os.access says yes to everything), else one line naming the directory and the reason."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"{out}: cannot create or write the output directory ({e.strerror or e}); give another directory"
    return None


def main(argv: list[str] | None = None) -> int:
    args, user = parse_args(argv)
    out = Path(args.out)
    try:
        base = compose(user)
        if args.scale != 1:
            user = [*user, *scaled(base.train, args.scale)]
            base = compose(user)
    except Exception as e:  # a bad override: Hydra's or our ConfigError, naming the key
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_out_dir(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    target = count_params(compose([*user, "attention=preset"]).model)
    widths, params = {}, {}
    for variant in args.variants:
        widths[variant], params[variant] = matched_mlp_width(variant, target, user)
    print(f"quality experiment in {out}: variants {', '.join(args.variants)}; parameters "
          + ", ".join(f"{v} {params[v] / 1e6:.3f}M (MLP {widths[v]})" for v in args.variants)
          + f"; {base.train.steps} steps x {base.train.seq_len * base.train.micro_batch_size:,} tokens; "
          f"LRs {', '.join(f'{lr:g}' for lr in args.lrs)}; {args.seeds} seed(s)", flush=True)
    trials = trial_jobs(args.variants, args.lrs, widths, user, args.trial_fraction, base.train)
    chosen = {}
    for variant in args.variants:
        mine = [t for t in trials if t.variant == variant]
        results = [{"lr": t.lr, "val_loss": run_training(t, out)["val_loss"]} for t in mine]
        chosen[variant] = choose_lr(results) if results else args.lrs[0]
        if results:
            print(f"{variant}: LR trials " + ", ".join(f"{r['lr']:g} -> {r['val_loss']:.4f}" for r in results)
                  + f"; chosen {chosen[variant]:g}", flush=True)
    runs = []
    for variant in args.variants:
        for job in final_jobs(variant, chosen[variant], args.seeds, widths[variant], user):
            summary = run_training(job, out)
            evaluation = run_evaluation(job, out, args.passkey_per_cell, args.eval_batches)
            runs.append(collect(job, out, summary, evaluation, params[variant]))
    rows = summarise(runs, args.variants)
    window = base.model.sliding_window
    settings = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
                "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "window": window, "seq_len": base.train.seq_len, "tokens": runs[0]["tokens"], "seeds": args.seeds,
                "lrs": args.lrs, "digits": runs[0]["eval"]["passkey"]["digits"],
                "lr_procedure": (f"the lowest final validation loss of a {args.trial_fraction:g}-length trial run "
                                 "(seed 0) per LR" if len(args.lrs) > 1 else "fixing it (one LR given)"),
                "chosen_lr": chosen, "trials": [asdict(t) for t in trials]}
    write_report(out, rows, runs, settings)
    plot_val_loss(runs, out / "val_loss.png")
    plot_positions(rows, window, out / "loss_by_position.png")
    plot_passkey(rows, window, out / "passkey.png")
    plot_recall(runs, base.train, out / "indexer_recall.png")
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, results.json and 4 plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
