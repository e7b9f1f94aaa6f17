"""The recall task: synthetic recall documents (copy, mqar, passkey) on held-out seeds, answer accuracy by distance
and the indexer's hit rate (the documents and the scoring: dsv4/evaluation/recall.py)."""

from __future__ import annotations

import argparse
from typing import Any

from dsv4.config import ConfigError
from dsv4.evaluation.recall import default_spec, recall_task
from dsv4.evaluation.tasks.base import EvalContext, Task, check_positive, flag, progress

DOCUMENTS = 256

FLAGS = (
    flag("--recall-docs", type=int, default=DOCUMENTS, help="recall: held-out documents per task"),
    flag("--recall-gap", type=int, default=None, help="recall: filler tokens between context and queries"),
    flag("--recall-gap-max", type=int, default=None, help="recall: the gap drawn from [gap, gap-max]"),
    flag("--recall-items", type=int, default=None, help="recall: pairs / string length / digits"),
)
# recall: the RecallSpec fields the flags replace in every recall task (gap, gap_max, items)
DEFAULTS: dict[str, Any] = {"recall_docs": DOCUMENTS, "recall": None}


def check(args: argparse.Namespace) -> dict[str, Any]:
    check_positive(args, "recall_docs", "recall_items")
    if args.recall_gap is not None and args.recall_gap < 0:
        raise ConfigError(f"--recall-gap={args.recall_gap}: must be >= 0")
    if args.recall_gap_max is not None and args.recall_gap_max < (args.recall_gap or 0):
        raise ConfigError(f"--recall-gap-max={args.recall_gap_max}: must be >= --recall-gap")
    overrides = {k: v for k, v in (("gap", args.recall_gap), ("gap_max", args.recall_gap_max),
                                   ("items", args.recall_items)) if v is not None}
    return {"recall_docs": args.recall_docs, "recall": overrides}


def run(ctx: EvalContext) -> dict[str, Any]:
    count = ctx.options["recall_docs"]
    specs = ctx.settings.recall or {"mqar": default_spec(ctx.loaded.config.sliding_window)}
    progress(f"recall: {', '.join(specs)} on {count} held-out documents each...")
    return recall_task(ctx.loaded, specs, count, ctx.seed, ctx.options["recall"] or {})


def format_result(r: dict[str, Any]) -> list[str]:
    lines = []
    for name, t in r["tasks"].items():
        s = t["spec"]
        reach = (f"beyond the windows' reach ({t['reach']}) {percent(t['beyond_reach']['accuracy'])} "
                 f"of {t['beyond_reach']['answers']}" if t["reach"] else "dense layers: no reach limit")
        lines.append(f"recall {name} ({s['task']}, {s['items']} items, gap {s['gap']}"
                     f"{'-' + str(s['gap_max']) if s['gap_max'] else ''}; chance {t['chance']:.3f}): accuracy "
                     f"{percent(t['accuracy'])} | {reach}")
        lines.append("  | distance | answers | accuracy |")
        lines += [f"  | {b['name']} | {b['answers']} | {percent(b['accuracy'])} |" for b in t["buckets"]]
        if "first_answer" in t and len(t["by_order"]) > 1:
            f = t["first_answer"]
            lines.append(f"  first answer of a document: {percent(f['accuracy'])} of {f['answers']} (a guesser that "
                         f"knows only the set of answers: {percent(f['set_guesser'])}; over all answers "
                         f"{percent(t['set_guesser'])}); by answer order: "
                         + " ".join(percent(a) for a in t["by_order"]))
        for layer, h in t["indexer_hit_rate"].items():
            lines.append(f"  indexer hit rate, layer {layer}: {percent(h['hit_rate'])} "
                         f"(random picks: {percent(h['chance'])})")
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def metrics(r: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, t in r["tasks"].items():
        out[f"eval/recall/{name}/accuracy"] = t["accuracy"]
        for b in t["buckets"]:
            out[f"eval/recall/{name}/{b['lo']}-{b['hi']}"] = b["accuracy"]
    return out


TASK = Task(
    name="recall",
    summary="""\
synthetic recall (data_pipelines/recall.py: copy, mqar, passkey) on held-out seeds: answer accuracy by
distance bucket (inside the window, 1-2, 2-4, 4-8 ... windows) and beyond the stacked windows' reach,
and for CSA layers the indexer's hit rate (dsv4/evaluation/recall.py). Every recall source the run
trained on, else MQAR with answers 1-8 windows back; --recall-gap / --recall-gap-max /
--recall-items change the distances and sizes. Not in the default --tasks.""",
    run=run, format=format_result, metrics=metrics, flags=FLAGS, check=check, defaults=DEFAULTS, default=False,
)
