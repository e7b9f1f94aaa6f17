"""The positions task: mean loss by position bucket (dsv4/evaluation/losses.py) from the validation pass it shares
with ppl (dsv4/evaluation/tasks/validation.py)."""

from __future__ import annotations

from typing import Any

from dsv4.evaluation.tasks import validation
from dsv4.evaluation.tasks.base import EvalContext, Task


def run(ctx: EvalContext) -> dict[str, Any]:
    losses = validation.shared_losses(ctx)
    return {"data": losses["data"], **losses["positions"]}


def format_result(r: dict[str, Any]) -> list[str]:
    return [f"positions (W = {r['window']}): loss within the window {r['loss_within_window']:.4f}, "
            f"beyond it {r['loss_beyond_window']:.4f}",
            "  | position | loss | tokens |",
            *(f"  | {b['start']}..{b['end']} | {b['loss']:.4f} | {b['tokens']:,} |" for b in r["buckets"])]


def metrics(r: dict[str, Any]) -> dict[str, float]:
    return {f"eval/positions/{b['start']}-{b['end']}": b["loss"] for b in r["buckets"]}


TASK = Task(
    name="positions",
    summary="""\
mean loss by position bucket 0..W, W..2W, 2W..4W, ... (W = sliding_window), and the loss within and
beyond the window; the same forwards as ppl.""",
    run=run, format=format_result, metrics=metrics,
    flags=validation.FLAGS, check=validation.check, defaults=validation.DEFAULTS,
)
