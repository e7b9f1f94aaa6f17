"""Chunked lightning indexer: never holds the [B, S, n_I, N] (or [B, S, N]) scores at full size.

The PyTorch path cuts the queries into chunks from a memory budget: top-k scores a chunk at a time into one
reused, cache-sized workspace (TOPK_ELEMENTS); since each chunk scores the widest entry range of its queries
(a rectangle over the causal triangle), a chunk also covers at most 1/MIN_CHUNKS of the sequence. Per chunk,
the scores (sum_h w_h relu(q_h . k)) are the oracle's, bit for bit; only the entries that some query of the
chunk may not see are masked, and top-k selects with torch.topk under the recent-first tie rule (topk.py).
The KL loss computes each chunk's teacher once without autograd and differentiates only the student: in the
sparse phase through a small autograd function that gathers the picked keys again in backward, in the dense
warm-up under activation checkpointing; its memory is bounded by one chunk as well. (The Triton path,
triton_op.py, runs the same chunk loops, common.py, with chunks of chunk_size queries and its kernels.)
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops.indexer.common import QueryChunk, kl_by_chunks, kl_terms, topk_by_chunks
from dsv4.ops.ranges import AttentionRanges, ranges_or_causal, visible_entries

CHUNK_ELEMENTS = 1 << 24  # elements of the largest per-chunk tensor (64 MiB in fp32); tests lower it
TOPK_ELEMENTS = 1 << 20  # top-k scoring: a workspace that stays in cache (measured 2-3x faster than 16M fresh)
MIN_CHUNKS = 8  # chunks that score entry rectangles cover at most 1/8 of the sequence each
PLAN_BLOCK = 64  # chunks are whole blocks of this many queries


def _head_weighted_scores(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor,
                          workspace: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, n_I, c], [B, n, c], [B, T, n_I] -> [B, T, n] fp32: sum_h w_h relu(q_h . k). The same two matmuls
    as the oracle's einsums (per-head dots, then the weighted sum over heads per query), so the scores equal
    the oracle's bit for bit and top-k never flips a near tie differently. workspace (no autograd): a flat fp32
    buffer of at least B * T * (n_I + 1) * n elements that the per-head dots and the scores are written into."""
    batch, n_q, n_heads, width = index_q.shape
    n = index_k.shape[1]
    q_rows = index_q.float().reshape(batch, n_q * n_heads, width)
    keys = index_k.float().transpose(1, 2)
    weights = weights.float().reshape(batch * n_q, 1, n_heads)
    if workspace is None:
        dots = torch.matmul(q_rows, keys).relu_().view(batch * n_q, n_heads, n)  # [B*T, n_I, n]
        return torch.bmm(weights, dots).view(batch, n_q, n)
    size = batch * n_q * n_heads * n
    dots = torch.matmul(q_rows, keys, out=workspace[:size].view(batch, n_q * n_heads, n)).relu_()
    scores = workspace[size:size + batch * n_q * n].view(batch * n_q, 1, n)
    return torch.bmm(weights, dots.view(batch * n_q, n_heads, n), out=scores).view(batch, n_q, n)


def budget_chunks(ranges: AttentionRanges, per_entry: int, per_query: int, rectangle: bool,
                  budget: int | None = None) -> list[QueryChunk]:
    """Chunks of whole PLAN_BLOCK-query blocks whose largest tensor, per_entry x (the chunk's entries) +
    per_query elements per query, stays within `budget` (default CHUNK_ELEMENTS); with rectangle=True (work per
    query grows with the chunk's entry range) a chunk covers at most 1/MIN_CHUNKS of the sequence."""
    budget = CHUNK_ELEMENTS if budget is None else min(budget, CHUNK_ELEMENTS)
    batch, seq_len = ranges.cmp_lo.shape
    n_blocks = -(-seq_len // PLAN_BLOCK)
    pad = n_blocks * PLAN_BLOCK - seq_len
    lo, hi = (torch.cat([x, x[:, -1:].expand(-1, pad)], 1).view(batch, n_blocks, PLAN_BLOCK)
              for x in (ranges.cmp_lo, ranges.cmp_hi))
    # non-decreasing in t: the first query of a block has the smallest bounds, the last the largest
    stats = torch.stack([lo[..., 0].amin(0), hi[..., -1].amax(0), lo[..., -1].amax(0), hi[..., 0].amin(0)])
    e0s, e1s, lo_max, hi_min = stats.tolist()
    max_blocks = max(1, -(-n_blocks // MIN_CHUNKS)) if rectangle else n_blocks
    chunks, g = [], 0
    while g < n_blocks:
        count = 1
        while (g + count < n_blocks and count < max_blocks and (count + 1) * PLAN_BLOCK * (
                per_entry * max(e1s[g + count] - e0s[g], 0) + per_query) <= budget):
            count += 1
        e0, e1 = e0s[g], max(e1s[g + count - 1], e0s[g])
        chunks.append(QueryChunk(g * PLAN_BLOCK, min((g + count) * PLAN_BLOCK, seq_len), e0, e1,
                                 max(lo_max[g:g + count]), min(hi_min[g:g + count])))
        g += count
    return chunks


def _mask_unseen(scores: torch.Tensor, r: AttentionRanges, chunk: QueryChunk) -> torch.Tensor:
    """-inf where a query may not see an entry; scores [B, T, e1 - e0]. The columns every query of the chunk sees
    (seen_lo .. seen_hi-1) are left alone."""
    if chunk.seen_lo < chunk.seen_hi:
        regions = [(chunk.e0, chunk.seen_lo), (chunk.seen_hi, chunk.e1)]
    else:
        regions = [(chunk.e0, chunk.e1)]
    for a, b in regions:
        if b > a:
            columns = scores[..., a - chunk.e0:b - chunk.e0]
            columns.masked_fill_(~visible_entries(r, a, b - a), float("-inf"))
    return scores


def indexer_topk_chunked(index_q, index_k, weights, ratio: int, topk: int,
                         ranges: AttentionRanges | None = None) -> torch.Tensor:
    """Same contract as `dsv4.ops.indexer.indexer_topk`; see there for shapes."""
    batch = index_q.shape[0]
    ranges = ranges_or_causal(ranges, index_q, ratio)
    k = min(topk, index_k.shape[1])
    # per chunk: the per-head dots [B, T, n_I, n] and the scores [B, T, n], in one reused workspace
    per_entry = batch * (index_q.shape[2] + 1)
    chunks = budget_chunks(ranges, per_entry=per_entry, per_query=0, rectangle=True, budget=TOPK_ELEMENTS)
    largest = max(((c.last - c.first) * (c.e1 - c.e0) for c in chunks), default=0)
    workspace = torch.empty(per_entry * largest, dtype=torch.float32, device=index_q.device)

    def score_chunk(index_q, index_k, weights, r: AttentionRanges, chunk: QueryChunk) -> torch.Tensor:
        return _mask_unseen(_head_weighted_scores(index_q, index_k, weights, workspace), r, chunk)

    return topk_by_chunks(index_q, index_k, weights, ranges, k, chunks, score_chunk)


def _gather_rows(x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], picks [B, T, k] (>= 0) -> fp32 [B*T, k, C]: row picks[b, t, j] of x[b] (index_select on the
    flattened rows: whole rows, far faster than advanced indexing)."""
    batch, n_rows, width = x.shape
    flat = picks + torch.arange(batch, device=x.device)[:, None, None] * n_rows
    return x.reshape(-1, width).index_select(0, flat.view(-1)).float().view(-1, picks.shape[-1], width)


class _PickScores(torch.autograd.Function):
    """Sparse-phase student: s[b, t, j] = sum_h w[b, t, h] relu(q[b, t, h] . k[b, picks[b, t, j]]) -> [B, T, k]
    fp32, with the oracle's two matmuls per query. Saves only its inputs: the backward gathers the picked keys
    again and adds their gradients back per entry with index_add_ (in order: deterministic on CPU)."""

    @staticmethod
    def forward(ctx, index_q, index_k, weights, picks):
        keys, dots = _PickScores._dots(index_q, index_k, picks)
        batch, n_q, n_heads = weights.shape
        scores = torch.bmm(weights.float().reshape(batch * n_q, 1, n_heads), dots)
        ctx.save_for_backward(index_q, index_k, weights, picks)
        return scores.view(batch, n_q, -1)

    @staticmethod
    def _dots(index_q, index_k, picks):
        """-> picked keys [B*T, k, c] and relu(q . k) [B*T, n_I, k]."""
        keys = _gather_rows(index_k, picks)
        batch, n_q, n_heads, width = index_q.shape
        q_rows = index_q.float().reshape(batch * n_q, n_heads, width)
        return keys, torch.bmm(q_rows, keys.transpose(1, 2)).relu_()

    @staticmethod
    def backward(ctx, d_scores):
        index_q, index_k, weights, picks = ctx.saved_tensors
        batch, n_q, n_heads, width = index_q.shape
        keys, dots = _PickScores._dots(index_q, index_k, picks)
        d_scores = d_scores.float().reshape(batch * n_q, 1, -1)
        w = weights.float().reshape(batch * n_q, 1, n_heads)
        d_weights = torch.bmm(d_scores, dots.transpose(1, 2)).view(weights.shape)
        d_dots = torch.bmm(w.transpose(1, 2), d_scores).mul_(dots > 0)  # [B*T, n_I, k] through the ReLU
        d_q = torch.bmm(d_dots, keys).view(index_q.shape)
        d_keys = torch.bmm(d_dots.transpose(1, 2), index_q.float().reshape(batch * n_q, n_heads, width))
        flat = picks + torch.arange(batch, device=picks.device)[:, None, None] * index_k.shape[1]
        d_index_k = torch.zeros(index_k.numel() // width, width, dtype=torch.float32, device=index_k.device)
        d_index_k.index_add_(0, flat.view(-1), d_keys.view(-1, width))
        return (d_q.to(index_q.dtype), d_index_k.view(index_k.shape).to(index_k.dtype), d_weights.to(weights.dtype),
                None)


def _kl_chunk_torch(q, cmp, lse, index_q, index_k, weights, picks, r: AttentionRanges, first_entry: int,
                    softmax_scale: float, recompute: bool):
    """One chunk's (sum of mass_t * KL_t, count of queries with candidates). The teacher is computed once,
    without autograd; only the student is differentiated (dense: under activation checkpointing, its per-head dots
    are [T, n_I, n])."""
    lse = lse.float()[..., None]
    with torch.no_grad():
        if picks is None:
            candidates = visible_entries(r, first_entry, cmp.shape[1])  # [B, T, n]
            z = torch.einsum("bthd,bnd->bthn", q.float(), cmp.float()) * softmax_scale
            target = (torch.exp(z - lse) * candidates[:, :, None, :]).mean(dim=2)
        else:
            candidates = picks >= 0  # [B, T, k]
            safe = picks.clamp(min=0)
            batch, n_q, n_heads, dim = q.shape
            picked = _gather_rows(cmp, safe)  # [B*T, k, D]
            z = torch.bmm(q.float().reshape(batch * n_q, n_heads, dim), picked.transpose(1, 2)) * softmax_scale
            target = (torch.exp(z.view(batch, n_q, n_heads, -1) - lse) * candidates[:, :, None, :]).mean(dim=2)
    if picks is not None:
        student = _PickScores.apply(index_q, index_k, weights, safe).masked_fill(~candidates, float("-inf"))
        return kl_terms(target, student, candidates)

    def dense_terms(index_q, index_k, weights):
        student = _head_weighted_scores(index_q, index_k, weights).masked_fill(~candidates, float("-inf"))
        return kl_terms(target, student, candidates)

    if recompute:
        return checkpoint(dense_terms, index_q, index_k, weights, use_reentrant=False)
    return dense_terms(index_q, index_k, weights)


def indexer_kl_chunked(q, compressed_kv, lse, index_q, index_k, weights, ratio: int, softmax_scale: float,
                       topk_idx: torch.Tensor | None = None, ranges: AttentionRanges | None = None,
                       count_reduce=None) -> torch.Tensor:
    """Same contract as `dsv4.ops.indexer.indexer_kl_loss`; see there for shapes."""
    ranges = ranges_or_causal(ranges, q, ratio)
    recompute = torch.is_grad_enabled()
    n_heads, dim = q.shape[2:]
    if topk_idx is None:  # the teacher's logits [B, T, H, n] and the student's per-head dots are the largest
        chunks = budget_chunks(ranges, per_entry=max(n_heads, index_q.shape[2]) + 2, per_query=0, rectangle=True)
    else:  # per query: the gathered picks of both q paths, and their per-head logits
        k = topk_idx.shape[-1]
        chunks = budget_chunks(ranges, per_entry=0, rectangle=False,
                               per_query=k * (dim + index_k.shape[-1] + n_heads + index_q.shape[2]))

    def chunk_loss(*args):
        return _kl_chunk_torch(*args, recompute)

    return kl_by_chunks(q, compressed_kv, lse, index_q, index_k, weights, topk_idx, ranges, softmax_scale, chunks,
                        chunk_loss, count_reduce)
