"""The passkey task: greedy retrieval of a key hidden in filler text, accuracy by length and depth (the prompts and
the scoring: dsv4/evaluation/passkey.py; the decoding: dsv4/evaluation/decoding.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from dsv4.config import ConfigError
from dsv4.evaluation.data import RunSettings, held_out_documents
from dsv4.evaluation.decoding import greedy_continue
from dsv4.evaluation.passkey import DEFAULT_DEPTHS, DEFAULT_LENGTH_MULTIPLES, passkey_prompts, score_passkey
from dsv4.evaluation.tasks.base import EvalContext, Task, check_positive, flag, progress
from dsv4.loading import LoadedModel

PER_CELL = 4

FLAGS = (
    flag("--passkey-lengths", default=None, help="prompt lengths in tokens (default: 2,4,8,16 x W)"),
    flag("--passkey-depths", default=",".join(str(d) for d in DEFAULT_DEPTHS), help="needle depths"),
    flag("--passkey-per-cell", type=int, default=PER_CELL, help="prompts per (length, depth)"),
    flag("--passkey-digits", type=int, default=None, help="key length (default: the run's passkey source's, else 5)"),
)
DEFAULTS: dict[str, Any] = {"passkey_lengths": None, "passkey_depths": DEFAULT_DEPTHS, "passkey_per_cell": PER_CELL,
                            "passkey_digits": None}


def int_list(text: str, flag_name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag_name}={text!r}: give comma-separated integers, e.g. 128,256,512") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag_name}={text!r}: give positive integers")
    return values


def depth_list(text: str, flag_name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag_name}={text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"{flag_name}={text!r}: depths are in [0, 1] (0: the key opens the text, 1: just before "
                          "the question)")
    return values


def check(args: argparse.Namespace) -> dict[str, Any]:
    check_positive(args, "passkey_per_cell", "passkey_digits")
    return {"passkey_lengths": int_list(args.passkey_lengths, "--passkey-lengths") if args.passkey_lengths else None,
            "passkey_depths": depth_list(args.passkey_depths, "--passkey-depths"),
            "passkey_per_cell": args.passkey_per_cell, "passkey_digits": args.passkey_digits}


def passkey_task(loaded: LoadedModel, settings: RunSettings, lengths: list[int] | None, depths: list[float],
                 per_cell: int, digits: int | None, seed: int) -> dict[str, Any]:
    window = loaded.config.sliding_window
    lengths = lengths or [m * window for m in DEFAULT_LENGTH_MULTIPLES]
    digits = digits or settings.passkey_digits or 5
    progress(f"passkey: {per_cell} prompt(s) per (length, depth), lengths {', '.join(map(str, lengths))}, depths "
             f"{', '.join(f'{d:g}' for d in depths)}...")
    prompts = passkey_prompts(loaded.tokenizer, held_out_documents(settings), lengths, depths, per_cell, digits, seed)

    def decode(ids: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
        return greedy_continue(loaded.model, ids, n_new)

    result = score_passkey(loaded.tokenizer, prompts, decode)
    return {"lengths": lengths, "depths": depths, "per_cell": per_cell, "digits": digits, "seed": seed,
            "window": window, **result}


def run(ctx: EvalContext) -> dict[str, Any]:
    o = ctx.options
    return passkey_task(ctx.loaded, ctx.settings, o["passkey_lengths"], list(o["passkey_depths"]),
                        o["passkey_per_cell"], o["passkey_digits"], ctx.seed)


def format_result(r: dict[str, Any]) -> list[str]:
    lines = [f"passkey ({r['digits']} digits, {r['per_cell']} per cell, seed {r['seed']}; chance: exact "
             f"{r['chance']['exact']:.0e}, per digit {r['chance']['per_digit']:.2f}): exact {r['exact']:.3f}, "
             f"per digit {r['per_digit']:.3f}",
             "  | length | " + " | ".join(f"depth {d}" for d in r["depths"]) + " | all |"]
    for n in r["lengths"]:
        cells = [r["by_length_depth"][f"{n}@{float(d)}"]["exact"] for d in r["depths"]]
        lines.append(f"  | {n} ({n / r['window']:g}W) | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {r['by_length'][str(n)]['exact']:.2f} |")
    return lines


def metrics(r: dict[str, Any]) -> dict[str, float]:
    out = {"eval/passkey/exact": r["exact"]}
    for n, cell in r["by_length"].items():
        out[f"eval/passkey/exact@{n}"] = cell["exact"]
        out[f"eval/passkey/per_digit@{n}"] = cell["per_digit"]
    return out


TASK = Task(
    name="passkey",
    summary="""\
greedy retrieval of a random key hidden at a given depth of filler text, accuracy by length (default
2, 4, 8 and 16 x the window) and depth (dsv4/evaluation/passkey.py); seeded (--seed), so every model
with the same tokenizer gets the same prompts.""",
    run=run, format=format_result, metrics=metrics, flags=FLAGS, check=check, defaults=DEFAULTS,
)
