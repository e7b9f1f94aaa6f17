"""The validation pass that the ppl and positions tasks share: their data flags, the checks of those flags, and
one forward per batch (dsv4/evaluation/losses.py), done once per evaluation however many of the two are asked for.
"""

from __future__ import annotations

import argparse
from typing import Any

from dsv4.evaluation.data import RunSettings, validation_batches
from dsv4.evaluation.losses import evaluate_batches
from dsv4.evaluation.tasks.base import EvalContext, check_positive, flag, progress
from dsv4.loading import LoadedModel

FLAGS = (
    flag("--data", default=None, help="ppl/positions data: bundled | bundled:FILE | a file glob "
                                      "(default: the run's validation split)"),
    flag("--batches", type=int, default=None, help="validation micro-batches (default: the run's "
                                                   "train.eval_batches, per data-parallel rank as there)"),
    flag("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's train.seq_len)"),
    flag("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)"),
)
DEFAULTS: dict[str, Any] = {"data": None, "batches": None, "seq_len": None, "batch_size": None}


def check(args: argparse.Namespace) -> dict[str, Any]:
    check_positive(args, "batches", "seq_len", "batch_size")
    return {key: getattr(args, key) for key in DEFAULTS}


def loss_tasks(loaded: LoadedModel, settings: RunSettings, data: str | None, batches: int | None,
               seq_len: int | None, batch_size: int | None) -> dict[str, Any]:
    """ppl and positions: one pass over the validation batches."""
    seq_len = seq_len or settings.seq_len
    asked, size = batches or settings.eval_batches, batch_size or settings.micro_batch
    wanted = asked * (settings.dp_world if data is None else 1)  # the trainer's split: every rank's share
    progress(f"ppl/positions: {wanted} batches of {size} x {seq_len} tokens from "
             f"{data or 'the validation split'}...")
    val, what = validation_batches(loaded, settings, data, asked, seq_len, size)
    if len(val) < wanted:
        flag_text = f"--batches {batches}" if batches else f"train.eval_batches={settings.eval_batches}"
        per_rank = f" ({asked} per rank x {settings.dp_world} data-parallel ranks)" if wanted != asked else ""
        progress(f"{flag_text}: asked for {wanted} batches{per_rank}, but {data or 'the held-out split'} holds only "
                 f"{len(val)} batch(es) of {size} x {seq_len} tokens; evaluating those")
    result = evaluate_batches(loaded.model, val, loaded.config.sliding_window, seq_len, settings.documents)
    return {"data": what, "seq_len": seq_len, **result}


def shared_losses(ctx: EvalContext) -> dict[str, Any]:
    """The pass's results, computed by whichever of ppl and positions runs first."""
    o = ctx.options
    return ctx.once("losses", lambda: loss_tasks(ctx.loaded, ctx.settings, o["data"], o["batches"], o["seq_len"],
                                                 o["batch_size"]))
