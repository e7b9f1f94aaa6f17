"""Evaluate a trained model: validation loss / perplexity, loss by position bucket, passkey retrieval.

    python -m dsv4.evaluate outputs/exp1                                 # ppl, positions, passkey on the run's model
    python -m dsv4.evaluate outputs/exp1/checkpoints/step0000200 --tasks ppl --batches 16
    python -m dsv4.evaluate outputs/exp1/export/step0000300 --data bundled --out eval.json
    python -m dsv4.evaluate outputs/exp1 --tasks passkey --passkey-lengths 128,256,512 --wandb

PATH is a run directory (the checkpoint in `latest`), its checkpoints/ directory, one stepNNNNNNN/ checkpoint or a
`python -m dsv4.export` directory, loaded with dsv4.loading.load_model (as dsv4.export does). Nothing is written
into it: results go to the console, to `--out FILE.json`, and with `--wandb` to a new run (job type `eval`) of the
run's W&B project (offline unless WANDB_API_KEY is set; its files under --wandb-dir).

Tasks:
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data_pipelines import DataError
from dsv4.config import ConfigError
from dsv4.evaluation.data import run_settings
from dsv4.evaluation.tasks import DEFAULT_TASKS, TASKS, EvalContext
from dsv4.export import check_out_dir, check_out_file
from dsv4.inference.generate import check_device
from dsv4.loading import load_model
from dsv4.ops.v4_attention import BACKENDS
from dsv4.run_files import find_run_config


def task_list() -> str:
    """The tasks' entries of --help (and of this docstring), from the registry: each task's module documents it."""
    entries = []
    for name, task in TASKS.items():
        first, *more = task.summary.splitlines()
        entries += [f"  {name:<11}{first}", *(" " * 13 + line for line in more)]
    return "\n".join(entries) + "\n"


__doc__ += task_list()  # the docstring ends with "Tasks:"; the entries come from the registry

PHASES = ("auto", "dense", "indexer_warmup", "sparse")


# ---------------------------------------------------------------- arguments (checked before any work)

def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"--tasks={text!r}: choose from {', '.join(TASKS)} (comma-separated)")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    """The common flags around every registered task's own (a flag two tasks share is added once)."""
    p = argparse.ArgumentParser(prog="python -m dsv4.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("path", help="a run dir, its checkpoints/ dir, one stepNNNNNNN/ dir or an export dir")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated: {', '.join(DEFAULT_TASKS)}")
    added: set[str] = set()
    for task in TASKS.values():
        for task_flag in task.flags:
            if task_flag.name not in added:
                task_flag.add_to(p)
                added.add(task_flag.name)
    p.add_argument("--phase", default="auto", help="CSA phase: auto (the phase the run ended in; sparse for an "
                                                   "export) | dense | indexer_warmup | sparse")
    p.add_argument("--seed", type=int, default=0, help="passkey prompt and recall document seed")
    p.add_argument("--backend", default="auto", help="attention backend: auto | torch | triton | naive")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--wandb", action="store_true", help="log the results to the run's W&B project")
    p.add_argument("--wandb-dir", default=".", help="where W&B keeps its files (never inside the run directory)")
    return p


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before loading the model; ConfigError names the flag. -> tasks, device and
    the task options (evaluate()'s keywords). Every task's flags are checked, asked for or not."""
    checked: dict[str, Any] = {"tasks": parse_tasks(args.tasks), "options": {}}
    for check in dict.fromkeys(task.check for task in TASKS.values()):  # a check two tasks share runs once
        checked["options"].update(check(args))
    if args.phase not in PHASES:
        raise ConfigError(f"--phase={args.phase!r}: choose from {', '.join(PHASES)}")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out={args.out}: is a directory; give a file name such as eval.json")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out={args.out}: its directory does not exist")
    if args.out:
        check_out_file(Path(args.out), "--out")
    if args.wandb:
        check_out_dir(Path(args.wandb_dir), "--wandb-dir")  # else found only after the evaluation
    elif args.wandb_dir != ".":
        print("warning: --wandb-dir has no effect without --wandb", file=sys.stderr)
    _warn_unread_task_flags(args, checked["tasks"])
    checked["device"] = check_device(args.device)
    if args.backend not in BACKENDS:
        raise ConfigError(f"--backend={args.backend}: choose from {', '.join(BACKENDS)}")
    if args.backend == "triton" and checked["device"].type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"--backend=triton: the Triton kernels need a CUDA device (here --device "
                          f"{checked['device']}); use --backend auto or torch, or set TRITON_INTERPRET=1")
    return checked


def _warn_unread_task_flags(args: argparse.Namespace, tasks: list[str]) -> None:
    """A warning for each task flag given a value other than its default whose tasks are all left out of --tasks
    (e.g. --recall-docs with --tasks ppl): it is checked, but nothing reads it."""
    read = {task_flag.name for name in tasks for task_flag in TASKS[name].flags}
    for task in TASKS.values():
        for task_flag in task.flags:
            dest = task_flag.name.lstrip("-").replace("-", "_")
            if task_flag.name not in read and getattr(args, dest) != task_flag.options.get("default"):
                readers = [n for n, t in TASKS.items() if task_flag in t.flags]
                print(f"warning: {task_flag.name} has no effect: only the {' and '.join(readers)} task(s) read it, "
                      f"and --tasks is {','.join(tasks)}", file=sys.stderr)
                read.add(task_flag.name)


# ---------------------------------------------------------------- the tasks

def task_options() -> dict[str, Any]:
    """Every registered task's options (evaluate()'s keywords) with their defaults."""
    return {key: value for task in TASKS.values() for key, value in task.defaults.items()}


def evaluate(path: str | Path, tasks: list[str], *, phase: str = "auto", seed: int = 0, backend: str = "auto",
             device: str = "cpu", **options: Any) -> dict[str, Any]:
    """The results of `tasks` for the model at `path` (see the module docstring); writes nothing.

    options: the tasks' own (their modules' DEFAULTS): data, batches, seq_len, batch_size (ppl, positions);
    passkey_lengths, passkey_depths, passkey_per_cell, passkey_digits (passkey); recall_docs, recall (recall).
    """
    defaults = task_options()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"evaluate() got unexpected keyword argument(s) {', '.join(unknown)}; the tasks' options "
                        f"are {', '.join(defaults)}")
    loaded = load_model(path, device=device, backend=backend)
    settings = run_settings(loaded)
    chosen_phase = settings.final_phase if phase == "auto" else phase
    loaded.model.set_attention_options(phase=chosen_phase)
    results: dict[str, Any] = {"model": str(loaded.source.path), "source": loaded.source.kind,
                               "phase": chosen_phase, "params": sum(p.numel() for p in loaded.model.parameters()),
                               "layers": [loaded.config.layer_kind(i) for i in range(loaded.config.num_hidden_layers)],
                               "sliding_window": loaded.config.sliding_window}
    context = EvalContext(loaded, settings, seed, {**defaults, **options})
    t0 = time.perf_counter()
    for name, task in TASKS.items():  # the registry's order, whatever the order asked
        if name in tasks:
            results[name] = task.run(context)
    results["wall_time_s"] = time.perf_counter() - t0
    return results


# ---------------------------------------------------------------- output

def format_results(results: dict[str, Any]) -> str:
    lines = [f"model {results['model']} ({results['source']}) | {results['params'] / 1e6:.2f}M params | "
             f"layers {results['layers']} | CSA phase {results['phase']}"]
    for name, task in TASKS.items():
        if name in results:
            lines += task.format(results[name])
    return "\n".join(lines)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars for W&B: eval/ppl/loss, eval/positions/<start>-<end>, eval/passkey/exact@<length>, ..."""
    out: dict[str, float] = {}
    for name, task in TASKS.items():
        if name in results:
            out.update(task.metrics(results[name]))
    return out


def log_to_wandb(results: dict[str, Any], path: str, wandb_dir: str) -> str:
    """A new W&B run (job type eval) in the run's project; offline unless WANDB_API_KEY is set."""
    import wandb  # heavy and only needed with --wandb

    project, group = "dsv4-train", None
    config_file = find_run_config(Path(path))
    if config_file is not None:
        wb = OmegaConf.load(config_file).get("logging", {}).get("wandb", {})
        project, group = wb.get("project") or project, wb.get("group")
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type="eval", name=f"eval-{Path(path).name}",
                     dir=wandb_dir, mode=mode, config={"model": results["model"]},
                     settings=wandb.Settings(silent=True))
    run.log(flat_metrics(results))
    run.finish()
    return f"W&B: {mode} run in {Path(wandb_dir) / 'wandb'} (project {project})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checked = check_args(args)
        results = evaluate(args.path, checked["tasks"], phase=args.phase, seed=args.seed, backend=args.backend,
                           device=str(checked["device"]), **checked["options"])
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(results, indent=2))
        except OSError as e:  # checked before the work; this is a file that became unwritable meanwhile
            print(f"error: --out={args.out}: cannot write this file ({e.strerror}); the results are above",
                  file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    if args.wandb:
        print(log_to_wandb(results, args.path, args.wandb_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
