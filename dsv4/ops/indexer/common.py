"""What the indexer's two fast paths share: the query-chunk loops of top-k and of the KL loss, and the KL terms.

Both paths (torch_chunked.py, PyTorch; triton_op.py, the Triton kernels) cut the queries into chunks their own
way and score a chunk their own way; the loops around that, and what they make of the scores, live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv4.ops.indexer.topk import topk_recent_first_fast
from dsv4.ops.ranges import AttentionRanges


@dataclass
class QueryChunk:
    first: int  # queries first .. last-1
    last: int
    e0: int  # entries e0 .. e1-1: those any query of the chunk may see
    e1: int
    seen_lo: int  # entries seen_lo .. seen_hi-1 are visible to every query of the chunk (no mask needed)
    seen_hi: int


# (index_q, index_k, weights) of one chunk, its ranges, the chunk -> scores [B, T, e1 - e0] fp32, -inf where hidden
ChunkScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionRanges, QueryChunk], torch.Tensor]
# (q, cmp, lse, index_q, index_k, weights, picks, ranges, first_entry, softmax_scale) of one chunk
#   -> (sum of mass_t * KL_t over its queries, count of queries with candidates)
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def topk_by_chunks(index_q, index_k, weights, ranges: AttentionRanges, k: int, chunks: list[QueryChunk],
                   score_chunk: ChunkScorer) -> torch.Tensor:
    """Top-k picks [B, S, k] (-1 = no key) chunk by chunk, with the recent-first tie rule (topk.py)."""
    batch, seq_len = index_q.shape[:2]
    out = torch.full((batch, seq_len, k), -1, dtype=torch.long, device=index_q.device)
    with torch.no_grad():
        for chunk in chunks:
            first, last, e0, e1 = chunk.first, chunk.last, chunk.e0, chunk.e1
            if e1 == e0:
                continue
            r = ranges.slice(first, last)
            scores = score_chunk(index_q[:, first:last], index_k[:, e0:e1], weights[:, first:last], r, chunk)
            kk = min(k, e1 - e0)
            values, idx = topk_recent_first_fast(scores, kk)
            out[:, first:last, :kk] = torch.where(torch.isinf(values), -1, idx + e0)
    return out


def kl_by_chunks(q, compressed_kv, lse, index_q, index_k, weights, topk_idx: torch.Tensor | None,
                 ranges: AttentionRanges, softmax_scale: float, chunks: list[QueryChunk], chunk_loss: ChunkLoss,
                 count_reduce=None) -> torch.Tensor:
    """The indexer's KL loss (see dsv4.ops.indexer) summed chunk by chunk: dense (topk_idx None) over each chunk's
    entries e0 .. e1-1, sparse over each query's picks."""
    q, compressed_kv, lse = q.detach(), compressed_kv.detach(), lse.detach()  # the teacher is detached
    total = index_q.new_zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long, device=q.device)  # stays on the device until the end
    for chunk in chunks:
        first, last, e0, e1 = chunk.first, chunk.last, chunk.e0, chunk.e1
        r = ranges.slice(first, last)
        if topk_idx is None:
            if e1 == e0:
                continue
            cmp, idx_k, picks = compressed_kv[:, e0:e1], index_k[:, e0:e1], None
        else:
            e0, cmp, idx_k, picks = 0, compressed_kv, index_k, topk_idx[:, first:last]
        part, n = chunk_loss(q[:, first:last], cmp, lse[:, first:last], index_q[:, first:last], idx_k,
                             weights[:, first:last], picks, r, e0, softmax_scale)
        total = total + part
        count = count + n
    count = int(count)  # the one host sync of the loss
    if count_reduce is not None:  # sequence parallelism: divide by the count over the whole sequence
        count = count_reduce(count)
    return total / max(count, 1)


def kl_terms(target: torch.Tensor, student: torch.Tensor, candidates: torch.Tensor):
    """target [B, T, n] (teacher mass per candidate), student [B, T, n] logits (-inf off candidates)
    -> (sum over queries of mass_t * KL_t, count of queries with candidates)."""
    with torch.no_grad():
        mass = target.sum(-1)
        p_hat = target / mass.clamp_min(1e-30)[..., None]
    log_s = torch.log_softmax(student, dim=-1).masked_fill(~candidates, 0.0)
    kl = (torch.xlogy(p_hat, p_hat) - p_hat * log_s).sum(-1)
    has = candidates.any(-1)
    return torch.where(has, mass * kl, 0.0).sum(), has.sum()
