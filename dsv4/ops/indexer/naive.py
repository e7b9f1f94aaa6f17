"""Brute-force oracle for the lightning indexer: full [B, S, N] score matrix, dense masks.

Top-k uses the tie rule's definition (topk.topk_recent_first); only tests and backend="naive" use this module.
"""

from __future__ import annotations

import torch

from dsv4.ops.indexer.topk import topk_recent_first
from dsv4.ops.ranges import AttentionRanges, ranges_or_causal, visible_entries


def indexer_scores_naive(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_h weights[b, t, h] * relu(index_q[b, t, h] . index_k[b, s]) -> [B, S, N] fp32."""
    dots = torch.einsum("bthc,bsc->bths", index_q.float(), index_k.float())
    return torch.einsum("bth,bths->bts", weights.float(), dots.relu())


def indexer_topk_naive(index_q, index_k, weights, ratio: int, topk: int, ranges: AttentionRanges | None = None
                       ) -> torch.Tensor:
    num_entries = index_k.shape[1]
    scores = indexer_scores_naive(index_q, index_k, weights)
    visible = visible_entries(ranges_or_causal(ranges, index_q, ratio), 0, num_entries)
    scores = scores.masked_fill(~visible, float("-inf"))  # mask BEFORE top-k
    k = min(topk, num_entries)
    values, idx = topk_recent_first(scores, k)
    return torch.where(torch.isinf(values), -1, idx)


def indexer_kl_naive(q, compressed_kv, lse, index_q, index_k, weights, ratio: int, softmax_scale: float,
                     topk_idx: torch.Tensor | None = None, ranges: AttentionRanges | None = None,
                     count_reduce=None) -> torch.Tensor:
    """Mean over queries with >= 1 candidate of  mass_t * KL(p_hat_t || softmax(I_t)) ; see loss docs."""
    seq_len, num_entries = q.shape[1], compressed_kv.shape[1]
    if topk_idx is None:
        candidates = visible_entries(ranges_or_causal(ranges, q, ratio), 0, num_entries)
    else:
        candidates = torch.zeros(q.shape[0], seq_len, num_entries + 1, dtype=torch.bool, device=q.device)
        candidates.scatter_(2, torch.where(topk_idx < 0, num_entries, topk_idx).long(), True)
        candidates = candidates[..., :num_entries]
    with torch.no_grad():
        z = torch.einsum("bthd,bsd->bths", q.float(), compressed_kv.float()) * softmax_scale
        p = torch.exp(z - lse.float()[..., None]) * candidates[:, :, None, :]  # joint-softmax probs
        target = p.mean(dim=2)  # [B, S, N]
        mass = target.sum(-1)
        p_hat = target / mass.clamp_min(1e-30)[..., None]
    student = indexer_scores_naive(index_q, index_k, weights).masked_fill(~candidates, float("-inf"))
    log_s = torch.log_softmax(student, dim=-1).masked_fill(~candidates, 0.0)
    kl = (torch.xlogy(p_hat, p_hat) - p_hat * log_s).sum(-1)  # [B, S]
    has = candidates.any(-1)
    count = int(has.sum()) if count_reduce is None else count_reduce(int(has.sum()))
    return (mass * kl)[has].sum() / max(count, 1)
