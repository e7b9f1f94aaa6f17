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
  ppl        mean loss per token and perplexity on the run's validation split, built exactly as the trainer builds
             it (so the numbers equal summary.json's val_loss for the same checkpoint and --batches), or on --data:
             `bundled` (the bundled corpus' held-out documents), `bundled:FILE` (a <|doc|>-separated .txt[.gz]), or
             a glob of json-lines / parquet / text files (every document); also the indexer recall (CSA layers,
             sparse phase) and the sink mass on the same batches.
  positions  mean loss by position bucket 0..W, W..2W, 2W..4W, ... (W = sliding_window), and the loss within and
             beyond the window; the same forwards as ppl.
  passkey    greedy retrieval of a random key hidden at a given depth of filler text, accuracy by length (default
             2, 4, 8 and 16 x the window) and depth (dsv4/evaluation/passkey.py); seeded (--seed), so every model
             with the same tokenizer gets the same prompts.
  recall     synthetic recall (data_pipelines/recall.py: copy, mqar, passkey) on held-out seeds: answer accuracy by
             distance bucket (inside the window, 1-2, 2-4, 4-8 ... windows) and beyond the stacked windows' reach,
             and for CSA layers the indexer's hit rate (dsv4/evaluation/recall.py). Every recall source the run
             trained on, else MQAR with answers 1-8 windows back; --recall-gap / --recall-gap-max /
             --recall-items change the distances and sizes. Not in the default --tasks.
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

from dsv4.config import ConfigError
from dsv4.evaluation.data import RunSettings, held_out_documents, run_settings, validation_batches
from dsv4.evaluation.decoding import greedy_continue
from dsv4.evaluation.losses import evaluate_batches
from dsv4.evaluation.passkey import DEFAULT_DEPTHS, DEFAULT_LENGTH_MULTIPLES, passkey_prompts, score_passkey
from dsv4.evaluation.recall import default_spec, format_recall, recall_task
from dsv4.inference.generate import check_device
from dsv4.loading import LoadedModel, load_model
from dsv4.ops.v4_attention import BACKENDS

TASKS = ("ppl", "positions", "passkey", "recall")
PHASES = ("auto", "dense", "indexer_warmup", "sparse")


# ---------------------------------------------------------------- arguments (checked before any work)

def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: give comma-separated integers, e.g. 128,256,512") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}={text!r}: give positive integers")
    return values


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"{flag}={text!r}: depths are in [0, 1] (0: the key opens the text, 1: just before the "
                          "question)")
    return values


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"--tasks={text!r}: choose from {', '.join(TASKS)} (comma-separated)")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv4.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("path", help="a run dir, its checkpoints/ dir, one stepNNNNNNN/ dir or an export dir")
    p.add_argument("--tasks", default="ppl,positions,passkey", help="comma-separated: ppl, positions, passkey")
    p.add_argument("--data", default=None, help="ppl/positions data: bundled | bundled:FILE | a file glob "
                                                "(default: the run's validation split)")
    p.add_argument("--batches", type=int, default=None, help="validation micro-batches (default: the run's "
                                                             "train.eval_batches, per data-parallel rank as there)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    p.add_argument("--phase", default="auto", help="CSA phase: auto (the phase the run ended in; sparse for an "
                                                   "export) | dense | indexer_warmup | sparse")
    p.add_argument("--passkey-lengths", default=None, help="prompt lengths in tokens (default: 2,4,8,16 x W)")
    p.add_argument("--passkey-depths", default=",".join(str(d) for d in DEFAULT_DEPTHS), help="needle depths")
    p.add_argument("--passkey-per-cell", type=int, default=4, help="prompts per (length, depth)")
    p.add_argument("--passkey-digits", type=int, default=None, help="key length (default: the run's passkey "
                                                                    "source's, else 5)")
    p.add_argument("--recall-docs", type=int, default=256, help="recall: held-out documents per task")
    p.add_argument("--recall-gap", type=int, default=None, help="recall: filler tokens between context and queries")
    p.add_argument("--recall-gap-max", type=int, default=None, help="recall: the gap drawn from [gap, gap-max]")
    p.add_argument("--recall-items", type=int, default=None, help="recall: pairs / string length / digits")
    p.add_argument("--seed", type=int, default=0, help="passkey prompt and recall document seed")
    p.add_argument("--backend", default="auto", help="attention backend: auto | torch | triton | naive")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--wandb", action="store_true", help="log the results to the run's W&B project")
    p.add_argument("--wandb-dir", default=".", help="where W&B keeps its files (never inside the run directory)")
    return p


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before loading the model; ConfigError names the flag."""
    checked: dict[str, Any] = {"tasks": parse_tasks(args.tasks)}
    for flag in ("batches", "seq_len", "batch_size", "passkey_per_cell", "passkey_digits", "recall_docs",
                 "recall_items"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={value}: must be >= 1")
    if args.recall_gap is not None and args.recall_gap < 0:
        raise ConfigError(f"--recall-gap={args.recall_gap}: must be >= 0")
    if args.recall_gap_max is not None and args.recall_gap_max < (args.recall_gap or 0):
        raise ConfigError(f"--recall-gap-max={args.recall_gap_max}: must be >= --recall-gap")
    checked["recall"] = {k: v for k, v in (("gap", args.recall_gap), ("gap_max", args.recall_gap_max),
                                           ("items", args.recall_items)) if v is not None}
    if args.phase not in PHASES:
        raise ConfigError(f"--phase={args.phase!r}: choose from {', '.join(PHASES)}")
    checked["lengths"] = _int_list(args.passkey_lengths, "--passkey-lengths") if args.passkey_lengths else None
    checked["depths"] = _float_list(args.passkey_depths, "--passkey-depths")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out={args.out}: is a directory; give a file name such as eval.json")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out={args.out}: its directory does not exist")
    if args.out:
        _check_writable(Path(args.out), "--out")
    checked["device"] = check_device(args.device)
    if args.backend not in BACKENDS:
        raise ConfigError(f"--backend={args.backend}: choose from {', '.join(BACKENDS)}")
    if args.backend == "triton" and checked["device"].type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"--backend=triton: the Triton kernels need a CUDA device (here --device "
                          f"{checked['device']}); use --backend auto or torch, or set TRITON_INTERPRET=1")
    return checked


def _check_writable(path: Path, flag: str) -> None:
    """Open `path` for append (an existing file is left as it is; a new one is removed again), so that a file that
    cannot be written is named before the evaluation rather than after it."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}={path}: cannot write this file ({e.strerror}); give a writable path") from None
    if not existed:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the tasks

def _progress(line: str) -> None:
    """A progress line on stderr (stdout's tables and --out's JSON stay as they are)."""
    print(line, file=sys.stderr, flush=True)


def loss_tasks(loaded: LoadedModel, settings: RunSettings, data: str | None, batches: int | None,
               seq_len: int | None, batch_size: int | None) -> dict[str, Any]:
    """ppl and positions: one pass over the validation batches."""
    seq_len = seq_len or settings.seq_len
    asked, size = batches or settings.eval_batches, batch_size or settings.micro_batch
    wanted = asked * (settings.dp_world if data is None else 1)  # the trainer's split: every rank's share
    _progress(f"ppl/positions: {wanted} batches of {size} x {seq_len} tokens from "
              f"{data or 'the validation split'}...")
    val, what = validation_batches(loaded, settings, data, asked, seq_len, size)
    if len(val) < wanted:
        flag = f"--batches {batches}" if batches else f"train.eval_batches={settings.eval_batches}"
        per_rank = f" ({asked} per rank x {settings.dp_world} data-parallel ranks)" if wanted != asked else ""
        _progress(f"{flag}: asked for {wanted} batches{per_rank}, but {data or 'the held-out split'} holds only "
                  f"{len(val)} batch(es) of {size} x {seq_len} tokens; evaluating those")
    result = evaluate_batches(loaded.model, val, loaded.config.sliding_window, seq_len, settings.documents)
    return {"data": what, "seq_len": seq_len, **result}


def passkey_task(loaded: LoadedModel, settings: RunSettings, lengths: list[int] | None, depths: list[float],
                 per_cell: int, digits: int | None, seed: int) -> dict[str, Any]:
    window = loaded.config.sliding_window
    lengths = lengths or [m * window for m in DEFAULT_LENGTH_MULTIPLES]
    digits = digits or settings.passkey_digits or 5
    _progress(f"passkey: {per_cell} prompt(s) per (length, depth), lengths {', '.join(map(str, lengths))}, depths "
              f"{', '.join(f'{d:g}' for d in depths)}...")
    prompts = passkey_prompts(loaded.tokenizer, held_out_documents(settings), lengths, depths, per_cell, digits, seed)

    def decode(ids, n_new):
        return greedy_continue(loaded.model, ids, n_new)

    result = score_passkey(loaded.tokenizer, prompts, decode)
    return {"lengths": lengths, "depths": depths, "per_cell": per_cell, "digits": digits, "seed": seed,
            "window": window, **result}


def evaluate(path: str | Path, tasks: list[str], *, data: str | None = None, batches: int | None = None,
             seq_len: int | None = None, batch_size: int | None = None, phase: str = "auto",
             passkey_lengths: list[int] | None = None, passkey_depths: list[float] = DEFAULT_DEPTHS,
             passkey_per_cell: int = 4, passkey_digits: int | None = None, seed: int = 0, backend: str = "auto",
             device: str = "cpu", recall_docs: int = 256, recall: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results of `tasks` for the model at `path` (see the module docstring); writes nothing."""
    loaded = load_model(path, device=device, backend=backend)
    settings = run_settings(loaded)
    chosen_phase = settings.final_phase if phase == "auto" else phase
    loaded.model.set_attention_options(phase=chosen_phase)
    results: dict[str, Any] = {"model": str(loaded.source.path), "source": loaded.source.kind,
                               "phase": chosen_phase, "params": sum(p.numel() for p in loaded.model.parameters()),
                               "layers": [loaded.config.layer_kind(i) for i in range(loaded.config.num_hidden_layers)],
                               "sliding_window": loaded.config.sliding_window}
    t0 = time.perf_counter()
    if "ppl" in tasks or "positions" in tasks:
        losses = loss_tasks(loaded, settings, data, batches, seq_len, batch_size)
        if "ppl" in tasks:
            results["ppl"] = {k: v for k, v in losses.items() if k != "positions"}
        if "positions" in tasks:
            results["positions"] = {"data": losses["data"], **losses["positions"]}
    if "passkey" in tasks:
        results["passkey"] = passkey_task(loaded, settings, passkey_lengths, list(passkey_depths), passkey_per_cell,
                                          passkey_digits, seed)
    if "recall" in tasks:
        specs = settings.recall or {"mqar": default_spec(loaded.config.sliding_window)}
        _progress(f"recall: {', '.join(specs)} on {recall_docs} held-out documents each...")
        results["recall"] = recall_task(loaded, specs, recall_docs, seed, recall or {})
    results["wall_time_s"] = time.perf_counter() - t0
    return results


# ---------------------------------------------------------------- output

def format_results(results: dict[str, Any]) -> str:
    lines = [f"model {results['model']} ({results['source']}) | {results['params'] / 1e6:.2f}M params | "
             f"layers {results['layers']} | CSA phase {results['phase']}"]
    if "ppl" in results:
        r = results["ppl"]
        extra = "".join(f" | {k.replace('_', ' ')} {r[k]:.3f}" for k in ("indexer_recall", "sink_mass") if k in r)
        lines.append(f"ppl: loss {r['loss']:.4f} | perplexity {r['ppl']:.2f} | {r['tokens']:,} tokens in "
                     f"{r['batches']} batches of {r['data']}{extra}")
    if "positions" in results:
        r = results["positions"]
        lines.append(f"positions (W = {r['window']}): loss within the window {r['loss_within_window']:.4f}, "
                     f"beyond it {r['loss_beyond_window']:.4f}")
        lines.append("  | position | loss | tokens |")
        lines += [f"  | {b['start']}..{b['end']} | {b['loss']:.4f} | {b['tokens']:,} |" for b in r["buckets"]]
    if "passkey" in results:
        r = results["passkey"]
        lines.append(f"passkey ({r['digits']} digits, {r['per_cell']} per cell, seed {r['seed']}; chance: exact "
                     f"{r['chance']['exact']:.0e}, per digit {r['chance']['per_digit']:.2f}): exact {r['exact']:.3f}, "
                     f"per digit {r['per_digit']:.3f}")
        lines.append("  | length | " + " | ".join(f"depth {d}" for d in r["depths"]) + " | all |")
        for n in r["lengths"]:
            cells = [r["by_length_depth"][f"{n}@{float(d)}"]["exact"] for d in r["depths"]]
            lines.append(f"  | {n} ({n / r['window']:g}W) | " + " | ".join(f"{c:.2f}" for c in cells)
                         + f" | {r['by_length'][str(n)]['exact']:.2f} |")
    if "recall" in results:
        lines += format_recall(results["recall"])
    return "\n".join(lines)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars for W&B: eval/ppl/loss, eval/positions/<start>-<end>, eval/passkey/exact@<length>, ..."""
    out: dict[str, float] = {}
    for key in ("loss", "ppl", "indexer_recall", "sink_mass"):
        if key in results.get("ppl", {}):
            out[f"eval/{key}"] = results["ppl"][key]
    for b in results.get("positions", {}).get("buckets", []):
        out[f"eval/positions/{b['start']}-{b['end']}"] = b["loss"]
    if "passkey" in results:
        out["eval/passkey/exact"] = results["passkey"]["exact"]
        for n, r in results["passkey"]["by_length"].items():
            out[f"eval/passkey/exact@{n}"] = r["exact"]
            out[f"eval/passkey/per_digit@{n}"] = r["per_digit"]
    for name, r in results.get("recall", {}).get("tasks", {}).items():
        out[f"eval/recall/{name}/accuracy"] = r["accuracy"]
        for b in r["buckets"]:
            out[f"eval/recall/{name}/{b['lo']}-{b['hi']}"] = b["accuracy"]
    return out


def log_to_wandb(results: dict[str, Any], path: str, wandb_dir: str) -> str:
    """A new W&B run (job type eval) in the run's project; offline unless WANDB_API_KEY is set."""
    import os

    import wandb

    loaded_run = Path(path)
    project, group = "dsv4-train", None
    config_file = next((p / "config.yaml" for p in (loaded_run, *loaded_run.parents) if (p / "config.yaml").is_file()),
                       None)
    if config_file is not None:
        from omegaconf import OmegaConf

        wb = OmegaConf.load(config_file).get("logging", {}).get("wandb", {})
        project, group = wb.get("project") or project, wb.get("group")
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type="eval", name=f"eval-{loaded_run.name}",
                     dir=wandb_dir, mode=mode, config={"model": results["model"]},
                     settings=wandb.Settings(silent=True))
    run.log(flat_metrics(results))
    run.finish()
    return f"W&B: {mode} run in {Path(wandb_dir) / 'wandb'} (project {project})"


def main(argv: list[str] | None = None) -> int:
    from data_pipelines import DataError

    args = build_parser().parse_args(argv)
    try:
        checked = check_args(args)
        results = evaluate(args.path, checked["tasks"], data=args.data, batches=args.batches, seq_len=args.seq_len,
                           batch_size=args.batch_size, phase=args.phase, passkey_lengths=checked["lengths"],
                           passkey_depths=checked["depths"], passkey_per_cell=args.passkey_per_cell,
                           passkey_digits=args.passkey_digits, seed=args.seed, backend=args.backend,
                           device=str(checked["device"]), recall_docs=args.recall_docs, recall=checked["recall"])
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
