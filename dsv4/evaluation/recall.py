"""The recall task: does the model read back what a recall document put far back in its context?

Held-out documents of each recall task (data_pipelines/recall.py: copy, mqar, passkey) are run one per row, from
position 0, right-padded with EOS (padding after a token never changes its prediction). At every answer token
the model's greedy prediction (argmax of the logits one position before) is scored against it. Each answer has a
distance: from the query position (the one whose logits predict the answer) back to the token it recalls.
Accuracy is reported by distance bucket in windows W = sliding_window: inside the window (d < W), 1-2 W, 2-4 W,
4-8 W, ...; and beyond the reach of the stacked windows, L x (W - 1) for L V4 layers (a window-only model relays
through positions in between, so it can reach that far and no farther).

For CSA layers in the sparse phase, the indexer's hit rate: how often the query's top-k picks hold an entry that
pooled the answer's source token (CSA entry i pools groups i-1 and i, so entries s//4 and s//4 + 1 when visible),
beside the rate k random picks would have.

Documents come from their own seed stream (`seed`, default 0, with a salt no training stream uses), so they are
held out from every training run, and every model with the same tokenizer and settings gets the same documents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from data_pipelines.recall import RecallSpec, Symbols, TokenDocument, make_document
from dsv4.config import CSA_RATIO

EVAL_SALT = 29  # the training streams (RecallStream) use 13


def default_spec(window: int) -> RecallSpec:
    """For a run that trained on no recall source: MQAR answers 1 to 8 windows back."""
    return RecallSpec(task="mqar", gap=window, gap_max=8 * window)


def recall_documents(spec: RecallSpec, tokenizer: Any, count: int, seed: int = 0) -> list[TokenDocument]:
    rng = np.random.default_rng([seed, EVAL_SALT])
    symbols = Symbols(tokenizer)
    return [make_document(spec, symbols, rng) for _ in range(count)]


def bucket_edges(window: int, max_distance: int) -> list[int]:
    """0, W, 2W, 4W, ... past max_distance."""
    edges = [0, window]
    while edges[-1] <= max_distance:
        edges.append(edges[-1] * 2)
    return edges


def bucket_name(lo: int, hi: int, window: int) -> str:
    return "inside W" if lo == 0 else f"{lo // window}-{hi // window} W"


def no_pick_chance(visible: int, containing: int, k: int) -> float:
    """P(k picks drawn at random from `visible` entries miss all `containing` ones)."""
    k = min(k, visible)
    if containing <= 0:
        return 1.0
    if visible - containing < k:
        return 0.0
    return math.comb(visible - containing, k) / math.comb(visible, k)


@torch.no_grad()
def score_recall(model: torch.nn.Module, documents: list[TokenDocument], eos_id: int, batch_size: int = 32
                 ) -> dict[str, Any]:
    """Per-answer records: distance, correct, and for each CSA layer with picks whether they held the source."""
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    model.options.keep_picks = True
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(documents), batch_size):
            records += _score_batch(model, documents[first:first + batch_size], eos_id, device)
    finally:
        model.options.keep_picks = False
        model.train(was_training)
    return records


def _score_batch(model, docs: list[TokenDocument], eos_id: int, device) -> list[dict[str, Any]]:
    length = max(len(d.ids) for d in docs)
    ids = torch.full((len(docs), length), eos_id, dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, :len(doc.ids)] = torch.tensor(doc.ids)
    predictions = model(ids.to(device)).argmax(-1).cpu()  # [B, S]
    picks = {layer: p.cpu() for layer, p in model.indexer_picks().items()}
    ratio = CSA_RATIO  # CSA entry i pools groups i-1 and i
    out = []
    for row, doc in enumerate(docs):
        answers = [doc.ids[a] for a in doc.answers]
        for order, (answer, source) in enumerate(zip(doc.answers, doc.sources)):
            query = answer - 1
            record = {"distance": query - source, "correct": bool(predictions[row, query] == doc.ids[answer]),
                      "order": order, "set_guess": set_guess(answers, order)}
            visible = (query + 1) // ratio
            containing = [e for e in (source // ratio, source // ratio + 1) if e < visible]
            for layer, layer_picks in picks.items():
                chosen = set(layer_picks[row, query].tolist()) - {-1}
                record[f"hit{layer}"] = bool(chosen & set(containing))
                record[f"chance{layer}"] = 1.0 - no_pick_chance(visible, len(containing), layer_picks.shape[-1])
            out.append(record)
    return out


def set_guess(answers: list[int], order: int) -> float:
    """The chance that a guesser who knows the document's answers as a set, but not which query gets which, is
    right at answer `order`: it picks uniformly among the answers not yet given. A model that learned only the set
    (and to leave out what was asked) scores this; only one that binds each answer to its query scores more, and the
    first answer (nothing to leave out yet) shows it most plainly."""
    left = answers[order:]
    return left.count(answers[order]) / len(left)


def summarise(records: list[dict[str, Any]], window: int, reach: int, spec: RecallSpec) -> dict[str, Any]:
    """Accuracy overall, by distance bucket and beyond the stacked windows' reach; indexer hit rates."""
    vocab = spec.num_values  # every answer is one of the value symbols
    result: dict[str, Any] = {"spec": asdict(spec), "answers": len(records), "chance": 1.0 / vocab,
                              "accuracy": _mean(r["correct"] for r in records), "window": window, "reach": reach}
    edges = bucket_edges(window, max((r["distance"] for r in records), default=0))
    buckets = []
    for lo, hi in zip(edges, edges[1:]):
        inside = [r for r in records if lo <= r["distance"] < hi]
        if inside:
            buckets.append({"name": bucket_name(lo, hi, window), "lo": lo, "hi": hi, "answers": len(inside),
                            "accuracy": _mean(r["correct"] for r in inside)})
    result["buckets"] = buckets
    orders = sorted({r["order"] for r in records})
    result["by_order"] = [_mean(r["correct"] for r in records if r["order"] == o) for o in orders]
    first = [r for r in records if r["order"] == 0]
    result["first_answer"] = {"answers": len(first), "accuracy": _mean(r["correct"] for r in first),
                              "set_guesser": _mean(r["set_guess"] for r in first)}
    result["set_guesser"] = _mean(r["set_guess"] for r in records)
    beyond = [r for r in records if r["distance"] > reach]
    result["beyond_reach"] = {"answers": len(beyond), "accuracy": _mean(r["correct"] for r in beyond)}
    layers = sorted({int(k[3:]) for r in records for k in r if k.startswith("hit")})
    result["indexer_hit_rate"] = {
        str(layer): {"hit_rate": _mean(r[f"hit{layer}"] for r in records),
                     "chance": _mean(r[f"chance{layer}"] for r in records)} for layer in layers}
    return result


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def recall_task(loaded: Any, specs: dict[str, RecallSpec], count: int, seed: int, overrides: dict[str, Any]
                ) -> dict[str, Any]:
    """Every recall task of `specs` (name -> settings; overrides replace fields), scored on `count` documents."""
    cfg = loaded.config
    window = cfg.sliding_window
    v4_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) != "dense")
    reach = v4_layers * (window - 1) if v4_layers == cfg.num_hidden_layers else 0  # dense layers reach everything
    tasks = {}
    for name, spec in specs.items():
        spec = replace(spec, **overrides)
        spec.check(f"recall task {name}")
        records = score_recall(loaded.model, recall_documents(spec, loaded.tokenizer, count, seed), loaded.eos_id)
        tasks[name] = summarise(records, window, reach, spec)
    return {"documents": count, "seed": seed, "tasks": tasks}
