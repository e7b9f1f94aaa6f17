"""Query-chunked lightning indexer: never holds the [B, S, n_I, N] (or [B, S, N]) scores at full size.

Top-k runs chunk by chunk without autograd. The KL loss recomputes each chunk's student scores
in backward (activation checkpointing), so its memory is bounded by one chunk as well. With
use_triton, the per-chunk scores, the teachers and the sparse phase's student come from the kernels in triton.py.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops.indexer.naive import _ranges, topk_recent_first, visible_entries
from dsv4.ops.ranges import AttentionRanges


def _chunk_scores(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    dots = torch.einsum("bthc,bsc->bths", index_q.float(), index_k.float())  # [B, T, n_I, N]
    return torch.einsum("bth,bths->bts", weights.float(), dots.relu())


def _chunk_entry_slices(ranges: AttentionRanges, chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Per query chunk: (first query, last query, first entry, last entry) - the entries [e0, e1) any query of
    the chunk may see. One device-to-host copy for all chunks (a GPU does not stall once per chunk)."""
    seq_len = ranges.cmp_lo.shape[1]
    n_chunks = -(-seq_len // chunk_size)
    pad = n_chunks * chunk_size - seq_len
    lo, hi = ranges.cmp_lo.amin(0), ranges.cmp_hi.amax(0)
    lo, hi = (torch.cat([x, x[-1:].expand(pad)]) for x in (lo, hi))  # repeat the last query: same min / max
    bounds = torch.stack([lo.view(n_chunks, chunk_size).amin(1), hi.view(n_chunks, chunk_size).amax(1)], 1)
    out = []
    for i, (e0, e1) in enumerate(bounds.tolist()):
        first = i * chunk_size
        out.append((first, min(first + chunk_size, seq_len), e0, max(e1, e0)))
    return out


def _masked_scores(index_q, index_k, weights, r: AttentionRanges, first_entry: int, use_triton: bool):
    if use_triton:  # heads reduced and the visibility mask applied inside the kernel
        from dsv4.ops.indexer.triton import index_scores

        return index_scores(index_q, index_k, weights, r, first_entry)
    scores = _chunk_scores(index_q, index_k, weights)
    return scores.masked_fill(~visible_entries(r, first_entry, index_k.shape[1]), float("-inf"))


def indexer_topk_chunked(index_q, index_k, weights, ratio: int, topk: int, chunk_size: int = 128,
                         use_triton: bool = False, ranges: AttentionRanges | None = None) -> torch.Tensor:
    batch, seq_len = index_q.shape[:2]
    ranges = _ranges(ranges, index_q, ratio)
    k = min(topk, index_k.shape[1])
    out = torch.full((batch, seq_len, k), -1, dtype=torch.long, device=index_q.device)
    with torch.no_grad():
        for first, last, e0, e1 in _chunk_entry_slices(ranges, chunk_size):
            if e1 == e0:
                continue
            r = ranges.slice(first, last)
            scores = _masked_scores(index_q[:, first:last], index_k[:, e0:e1], weights[:, first:last], r, e0,
                                    use_triton)
            kk = min(k, e1 - e0)
            values, idx = topk_recent_first(scores, kk)
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
        dots = torch.einsum("bthc,bnc->bthn", index_q.float(), index_k.float())
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
    with torch.no_grad():
        target = (torch.exp(z - lse.float()[..., None]) * candidates[:, :, None, :]).mean(dim=2)
    student = torch.einsum("bth,bthn->btn", weights.float(), dots.relu()).masked_fill(~candidates, float("-inf"))
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
    if topk_idx is None:
        chunks = _chunk_entry_slices(ranges, chunk_size)
    else:  # the picks name the entries: no slice needed
        chunks = [(first, min(first + chunk_size, seq_len), 0, 0) for first in range(0, seq_len, chunk_size)]
    for first, last, e0, e1 in chunks:
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
