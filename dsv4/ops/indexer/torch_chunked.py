"""Chunked lightning indexer: never holds the [B, S, n_I, N] (or [B, S, N]) scores at full size.

The PyTorch path cuts the queries into chunks from a memory budget (CHUNK_ELEMENTS elements of the largest
per-chunk tensor), so a short sequence is one chunk and a long one a few large ones; since each chunk scores
the widest entry range of its queries (a rectangle over the causal triangle), a chunk also covers at most
1/MIN_CHUNKS of the sequence. Per chunk, the scores accumulate head by head (sum_h w_h relu(q_h . k)), only
the entries that some query of the chunk may not see are masked, and top-k selects with torch.topk under the
recent-first tie rule (topk.py). The KL loss recomputes each chunk's student scores in backward (activation
checkpointing), so its memory is bounded by one chunk as well. With use_triton, the chunks have chunk_size
queries and the per-chunk scores, the teachers and the sparse phase's student come from the kernels in
triton.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops.indexer.naive import _ranges, visible_entries
from dsv4.ops.indexer.topk import topk_recent_first_fast
from dsv4.ops.ranges import AttentionRanges

CHUNK_ELEMENTS = 1 << 24  # elements of the largest per-chunk tensor (64 MiB in fp32); tests lower it
MIN_CHUNKS = 8  # chunks that score entry rectangles cover at most 1/8 of the sequence each
PLAN_BLOCK = 64  # chunks are whole blocks of this many queries


@dataclass
class QueryChunk:
    first: int  # queries first .. last-1
    last: int
    e0: int  # entries e0 .. e1-1: those any query of the chunk may see
    e1: int
    seen_lo: int  # entries seen_lo .. seen_hi-1 are visible to every query of the chunk (no mask needed)
    seen_hi: int


def _head_weighted_scores(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, T, n_I, c], [B, n, c], [B, T, n_I] -> [B, T, n] fp32: sum_h w_h relu(q_h . k), one head at a time
    (the per-head dots are read once, and the heads are summed in order as in the oracle)."""
    dots = torch.matmul(index_q.float().transpose(1, 2), index_k.float().transpose(1, 2)[:, None])  # [B, n_I, T, n]
    dots = dots.relu_()
    w = weights.float()
    scores = dots[:, 0] * w[:, :, 0, None]
    for h in range(1, dots.shape[1]):
        scores = scores.addcmul_(dots[:, h], w[:, :, h, None])
    return scores


def _chunk_entry_slices(ranges: AttentionRanges, chunk_size: int) -> list[QueryChunk]:
    """Chunks of chunk_size queries with the entries [e0, e1) any of them may see (the Triton path masks in its
    kernel). One device-to-host copy for all chunks (a GPU does not stall once per chunk)."""
    seq_len = ranges.cmp_lo.shape[1]
    n_chunks = -(-seq_len // chunk_size)
    pad = n_chunks * chunk_size - seq_len
    lo, hi = ranges.cmp_lo.amin(0), ranges.cmp_hi.amax(0)
    lo, hi = (torch.cat([x, x[-1:].expand(pad)]) for x in (lo, hi))  # repeat the last query: same min / max
    bounds = torch.stack([lo.view(n_chunks, chunk_size).amin(1), hi.view(n_chunks, chunk_size).amax(1)], 1)
    out = []
    for i, (e0, e1) in enumerate(bounds.tolist()):
        first = i * chunk_size
        out.append(QueryChunk(first, min(first + chunk_size, seq_len), e0, max(e1, e0), e0, e0))
    return out


def budget_chunks(ranges: AttentionRanges, per_entry: int, per_query: int, rectangle: bool) -> list[QueryChunk]:
    """Chunks of whole PLAN_BLOCK-query blocks whose largest tensor, per_entry x (the chunk's entries) +
    per_query elements per query, stays within CHUNK_ELEMENTS; with rectangle=True (work per query grows with
    the chunk's entry range) a chunk covers at most 1/MIN_CHUNKS of the sequence."""
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
                per_entry * max(e1s[g + count] - e0s[g], 0) + per_query) <= CHUNK_ELEMENTS):
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


def _masked_scores(index_q, index_k, weights, r: AttentionRanges, chunk: QueryChunk, use_triton: bool):
    if use_triton:  # heads reduced and the visibility mask applied inside the kernel
        from dsv4.ops.indexer.triton import index_scores

        return index_scores(index_q, index_k, weights, r, chunk.e0)
    return _mask_unseen(_head_weighted_scores(index_q, index_k, weights), r, chunk)


def indexer_topk_chunked(index_q, index_k, weights, ratio: int, topk: int, chunk_size: int = 128,
                         use_triton: bool = False, ranges: AttentionRanges | None = None) -> torch.Tensor:
    batch, seq_len = index_q.shape[:2]
    ranges = _ranges(ranges, index_q, ratio)
    k = min(topk, index_k.shape[1])
    out = torch.full((batch, seq_len, k), -1, dtype=torch.long, device=index_q.device)
    if use_triton:
        chunks = _chunk_entry_slices(ranges, chunk_size)
    else:  # the per-head dots [B, n_I, T, n] are the largest tensor
        chunks = budget_chunks(ranges, per_entry=index_q.shape[2] + 2, per_query=0, rectangle=True)
    with torch.no_grad():
        for chunk in chunks:
            first, last, e0, e1 = chunk.first, chunk.last, chunk.e0, chunk.e1
            if e1 == e0:
                continue
            r = ranges.slice(first, last)
            scores = _masked_scores(index_q[:, first:last], index_k[:, e0:e1], weights[:, first:last], r, chunk,
                                    use_triton)
            kk = min(k, e1 - e0)
            values, idx = topk_recent_first_fast(scores, kk)
            out[:, first:last, :kk] = torch.where(torch.isinf(values), -1, idx + e0)
    return out


def _kl_chunk(q, cmp, lse, index_q, index_k, weights, picks, r: AttentionRanges, first_entry: int,
              softmax_scale: float, use_triton: bool):
    """Sum over this chunk's queries of mass_t * KL_t, and the count of queries with candidates."""
    batch = q.shape[0]
    device = q.device
    if picks is None:  # dense: every visible entry of the slice cmp / index_k
        candidates = visible_entries(r, first_entry, cmp.shape[1])
        if use_triton:  # per-head work reduced inside the kernels
            from dsv4.ops.indexer.triton import index_scores, teacher_dense

            with torch.no_grad():
                target = teacher_dense(q, cmp, lse, r, first_entry, softmax_scale)
            student = index_scores(index_q, index_k, weights, r, first_entry)
            return _kl_terms(target, student.masked_fill(~candidates, float("-inf")), candidates)
        with torch.no_grad():
            z = torch.einsum("bthd,bnd->bthn", q.float(), cmp.float()) * softmax_scale
        student = _head_weighted_scores(index_q, index_k, weights).masked_fill(~candidates, float("-inf"))
    else:
        candidates = picks >= 0  # [B, T, k]
        if use_triton:  # picks gathered inside the kernels; d index_k summed per entry in a fixed order
            from dsv4.ops.indexer.triton import pick_scores, teacher_sparse

            target = teacher_sparse(q, cmp, lse, picks, softmax_scale)
            return _kl_terms(target, pick_scores(index_q, index_k, weights, picks), candidates)
        batch_ix = torch.arange(batch, device=device)[:, None, None]
        safe = picks.clamp(min=0)
        with torch.no_grad():
            z = torch.einsum("bthd,btkd->bthk", q.float(), cmp[batch_ix, safe].float()) * softmax_scale
        dots = torch.einsum("bthc,btkc->bthk", index_q.float(), index_k[batch_ix, safe].float())
        student = torch.einsum("bth,bthn->btn", weights.float(), dots.relu()).masked_fill(~candidates, float("-inf"))
    with torch.no_grad():
        target = (torch.exp(z - lse.float()[..., None]) * candidates[:, :, None, :]).mean(dim=2)
    return _kl_terms(target, student, candidates)


def _kl_terms(target: torch.Tensor, student: torch.Tensor, candidates: torch.Tensor):
    """target [B, T, n] (teacher mass per candidate), student [B, T, n] logits (-inf off candidates)."""
    with torch.no_grad():
        mass = target.sum(-1)
        p_hat = target / mass.clamp_min(1e-30)[..., None]
    log_s = torch.log_softmax(student, dim=-1).masked_fill(~candidates, 0.0)
    kl = (torch.xlogy(p_hat, p_hat) - p_hat * log_s).sum(-1)
    has = candidates.any(-1)
    return torch.where(has, mass * kl, 0.0).sum(), has.sum()


def indexer_kl_chunked(q, compressed_kv, lse, index_q, index_k, weights, ratio: int, softmax_scale: float,
                       topk_idx: torch.Tensor | None = None, chunk_size: int = 128, use_triton: bool = False,
                       ranges: AttentionRanges | None = None, count_reduce=None) -> torch.Tensor:
    seq_len = q.shape[1]
    ranges = _ranges(ranges, q, ratio)
    q, compressed_kv, lse = q.detach(), compressed_kv.detach(), lse.detach()  # the teacher is detached
    total = index_q.new_zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long, device=q.device)  # stays on the device until the end
    recompute = torch.is_grad_enabled()
    n_heads, dim = q.shape[2:]
    if use_triton and topk_idx is None:
        chunks = _chunk_entry_slices(ranges, chunk_size)
    elif use_triton:  # the picks name the entries: no slice needed
        chunks = [QueryChunk(first, min(first + chunk_size, seq_len), 0, 0, 0, 0)
                  for first in range(0, seq_len, chunk_size)]
    elif topk_idx is None:  # the teacher's logits [B, T, H, n] and the student's per-head dots are the largest
        chunks = budget_chunks(ranges, per_entry=max(n_heads, index_q.shape[2]) + 2, per_query=0, rectangle=True)
    else:  # per query: the gathered picks of both q paths, and their per-head logits
        k = topk_idx.shape[-1]
        chunks = budget_chunks(ranges, per_entry=0, rectangle=False,
                               per_query=k * (dim + index_k.shape[-1] + n_heads + index_q.shape[2]))
    for chunk in chunks:
        first, last, e0, e1 = chunk.first, chunk.last, chunk.e0, chunk.e1
        r = ranges.slice(first, last)
        if topk_idx is None:
            if e1 == e0:
                continue
            cmp, idx_k, picks = compressed_kv[:, e0:e1], index_k[:, e0:e1], None
        else:
            e0, cmp, idx_k, picks = 0, compressed_kv, index_k, topk_idx[:, first:last]
        args = (q[:, first:last], cmp, lse[:, first:last], index_q[:, first:last], idx_k, weights[:, first:last],
                picks, r, e0, softmax_scale, use_triton)
        if recompute:
            part, n = checkpoint(_kl_chunk, *args, use_reentrant=False)
        else:
            part, n = _kl_chunk(*args)
        total = total + part
        count = count + n
    count = int(count)  # the one host sync of the loss
    if count_reduce is not None:  # sequence parallelism: divide by the count over the whole sequence
        count = count_reduce(count)
    return total / max(count, 1)
