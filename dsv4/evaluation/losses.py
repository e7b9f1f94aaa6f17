"""Validation loss, perplexity and loss by position bucket, from one forward per batch; indexer recall and sink
mass from the same forwards.

Position buckets are 0..W, W..2W, 2W..4W, ... up to the sequence length (W = sliding_window). A token's position is
its position in its document within the context (the `positions` the packer emits: 0 at each document start and
at the start of each packed sequence), i.e. how many tokens of its own document the model can attend to before
it. A window-only model's loss stops improving past W; a model that uses its compressed entries keeps improving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from dsv4.model import IGNORE_INDEX


def bucket_edges(window: int, seq_len: int) -> list[int]:
    """[0, W, 2W, 4W, ..., seq_len]: the last bucket ends at the sequence length."""
    edges, edge = [0], window
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


def _mean(total: float, count: float) -> float:
    return total / count if count > 0 else float("nan")


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], window: int,
                     seq_len: int, documents: bool = False) -> dict[str, Any]:
    """Loss (the model's own sum over labels, as the trainer computes it), perplexity, loss per position bucket,
    and the attention statistics (indexer recall: CSA layers in the sparse phase; sink mass: V4 layers).
    documents: pass the per-document positions to the model (runs trained with data.cross_document_attention=false).
    """
    device = next(model.parameters()).device
    edges = bucket_edges(window, seq_len)
    inner_edges = torch.tensor(edges[1:-1], dtype=torch.long, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
    bucket_loss = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    bucket_tokens = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    stats: dict[str, list[float]] = {}
    batches_seen = 0
    for batch in batches:
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        positions = batch["positions"].to(device)  # [B, S]
        model.options.collect_stats = True
        out = model(input_ids, labels=labels, positions=positions if documents else None)
        model.options.collect_stats = False
        for key, value in model.attention_stats().items():
            stats.setdefault(key, []).append(value)
        totals += torch.stack((out.lm_loss_sum.double(), out.num_tokens.double()))
        token_loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none").view_as(labels)  # [B, S]
        valid = labels != IGNORE_INDEX
        bucket = torch.bucketize(positions, inner_edges, right=True)  # [B, S] index of each token's bucket
        bucket_loss.index_add_(0, bucket[valid], token_loss[valid].double())
        bucket_tokens.index_add_(0, bucket[valid], torch.ones_like(token_loss[valid], dtype=torch.float64))
        batches_seen += 1
    loss = _mean(totals[0].item(), totals[1].item())
    beyond = bucket_loss[1:].sum().item(), bucket_tokens[1:].sum().item()
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)) if loss == loss else float("nan"),
        "tokens": int(totals[1].item()),
        "batches": batches_seen,
        "positions": {
            "window": window,
            "buckets": [{"start": lo, "end": hi, "loss": _mean(bucket_loss[i].item(), bucket_tokens[i].item()),
                         "tokens": int(bucket_tokens[i].item())} for i, (lo, hi) in enumerate(zip(edges, edges[1:]))],
            "loss_within_window": _mean(bucket_loss[0].item(), bucket_tokens[0].item()),
            "loss_beyond_window": _mean(*beyond),
        },
        **{key: sum(values) / len(values) for key, values in stats.items()},
    }
