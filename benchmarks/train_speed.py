"""Training speed end to end: `python train.py` with V4 attention against the same model with dense attention.

    python benchmarks/train_speed.py                                  # seq_len 512, 2048, 8192
    python benchmarks/train_speed.py --lengths 2048 --steps 12 --skip 4
    python benchmarks/train_speed.py --v4-phase dense model.index_topk=32   # extra args go to both runs

For every train.seq_len, two runs of train.py (subprocesses, one after the other) with equal settings: the same
model preset, tokens per step (--tokens; micro_batch_size = tokens / seq_len), steps, seed, data (with a small
shuffle pool, --shuffle-buffer) and backend;
the only difference is `attention=dense` (every layer plain causal GQA through SDPA, same model width). The V4
run trains its CSA layers in --v4-phase (default sparse, from step 0: the phase V4 trains in once its context is
long; `dense` measures the dense-CSA warm-up instead). Each run writes its own metrics.jsonl; the table gives the
median over the steps after the first --skip (warm-up) of:
  tok/s     tokens per step / step time, as the trainer logs it (data wait included)
  step ms   the step time;  wait ms: time the step waited for data
  peak GiB  the process's peak memory (CPU: max RSS; GPU: max allocated), at the end of the run
and "V4 / dense" = V4 tok/s / dense tok/s (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_train(seq_len: int, dense: bool, args, extra: list[str], out_dir: Path) -> list[dict]:
    """One train.py run -> its per-step metrics."""
    overrides = [
        f"model={args.model}", f"train.seq_len={seq_len}", f"train.micro_batch_size={args.tokens // seq_len}",
        f"train.steps={args.steps}", "train.warmup_steps=1", "train.eval_batches=1", "train.save_interval=0",
        "logging.wandb.mode=disabled", f"logging.interval={args.steps}", f"train.output_dir={out_dir}",
        f"data.shuffle_buffer={args.shuffle_buffer}",
    ]
    if dense:
        overrides.append("attention=dense")
    else:
        warmup = args.steps if args.v4_phase == "dense" else 0
        overrides += [f"train.phases.dense_steps={warmup}", "train.phases.indexer_warmup_steps=0"]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "train.py", *overrides, *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed (seq_len {seq_len}, {'dense' if dense else 'V4'}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def summarize(steps: list[dict], skip: int) -> dict:
    measured = steps[skip:] or steps[-1:]

    def median(key: str) -> float:
        return statistics.median(s[key] for s in measured)

    return {"tokens_per_s": median("tokens_per_s"), "step_ms": median("step_time_s") * 1e3,
            "wait_ms": median("data_wait_s") * 1e3, "peak_gib": steps[-1]["peak_mem_gb"], "steps": len(measured)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step, equal for every run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--v4-phase", choices=["sparse", "dense"], default="sparse")
    parser.add_argument("--shuffle-buffer", type=int, default=16,
                        help="data.shuffle_buffer of both runs: the default pool (256 packed sequences) fills for "
                             "longer than a short run lasts, and its fill time would land in the step times")
    # Hydra overrides (key=value) go to both runs; pulled out first so that --lengths 512 a.b=c parses
    extra = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in extra])
    for flag, value in (("--lengths", min(args.lengths)), ("--tokens", args.tokens), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag}={value}: must be >= 1")
    if not 0 <= args.skip < args.steps:
        parser.error(f"--skip={args.skip}: must be in [0, --steps {args.steps}) (the medians need a step after it)")
    for seq_len in args.lengths:
        if args.tokens % seq_len:
            parser.error(f"--tokens {args.tokens} is not a multiple of seq_len {seq_len}")

    print(f"# train.py end to end | model {args.model} | {args.tokens} tokens/step | {args.steps} steps, medians "
          f"after {args.skip} | V4 phase {args.v4_phase} | extra {' '.join(extra) or '-'}")
    print(f"{'seq_len':>7} {'model':<6} {'tok/s':>9} {'step ms':>9} {'wait ms':>8} {'peak GiB':>9} {'V4 / dense':>11}")
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        for seq_len in args.lengths:
            results = {}
            for name, dense in (("V4", False), ("dense", True)):
                out_dir = Path(tmp) / f"{name}_{seq_len}"
                results[name] = summarize(run_train(seq_len, dense, args, extra, out_dir), args.skip)
            ratio = results["V4"]["tokens_per_s"] / results["dense"]["tokens_per_s"]
            for name, r in results.items():
                tail = f"{ratio:>10.2f}x" if name == "V4" else f"{'':>11}"
                print(f"{seq_len:>7} {name:<6} {r['tokens_per_s']:>9,.0f} {r['step_ms']:>9.1f} {r['wait_ms']:>8.1f} "
                      f"{r['peak_gib']:>9.2f} {tail}", flush=True)


if __name__ == "__main__":
    main()
