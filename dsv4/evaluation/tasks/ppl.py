"""The ppl task: mean loss per token and perplexity on validation data, with the indexer recall and sink mass of the
same forwards (the pass it shares with positions: dsv4/evaluation/tasks/validation.py)."""

from __future__ import annotations

from typing import Any

from dsv4.evaluation.tasks import validation
from dsv4.evaluation.tasks.base import EvalContext, Task

STATS = ("indexer_recall", "sink_mass")


def run(ctx: EvalContext) -> dict[str, Any]:
    return {k: v for k, v in validation.shared_losses(ctx).items() if k != "positions"}


def format_result(r: dict[str, Any]) -> list[str]:
    extra = "".join(f" | {k.replace('_', ' ')} {r[k]:.3f}" for k in STATS if k in r)
    return [f"ppl: loss {r['loss']:.4f} | perplexity {r['ppl']:.2f} | {r['tokens']:,} tokens in "
            f"{r['batches']} batches of {r['data']}{extra}"]


def metrics(r: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{key}": r[key] for key in ("loss", "ppl", *STATS) if key in r}


TASK = Task(
    name="ppl",
    summary="""\
mean loss per token and perplexity on the run's validation split, built exactly as the trainer builds
it (so the numbers equal summary.json's val_loss for the same checkpoint and --batches), or on --data:
`bundled` (the bundled corpus' held-out documents), `bundled:FILE` (a <|doc|>-separated .txt[.gz]), or
a glob of json-lines / parquet / text files (every document); also the indexer recall (CSA layers,
sparse phase) and the sink mass on the same batches.""",
    run=run, format=format_result, metrics=metrics,
    flags=validation.FLAGS, check=validation.check, defaults=validation.DEFAULTS,
)
