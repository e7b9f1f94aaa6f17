"""The Triton lightning indexer: its kernels (triton.py) as `torch.library.custom_op`s with autograd, so they work
under torch.compile, and the query-chunk loops of the Triton path (backend "triton").

- `index_scores`: I[t, s] = sum_h w[t, h] * relu(q_h[t] . k[s]) for a chunk of queries against the entries
  they may see, with the visibility mask (-inf) applied in the kernel. Differentiable: backward gives
  d index_q, d weights and d index_k (deterministic).
- `teacher_dense`: the KL teacher over every visible entry, mean_h exp(q_h . c_s * scale - lse_h) (no grad).
- Sparse phase (the KL over each query's own top-k picks): `pick_scores` (the student: index scores of the
  picked entries, gathered in the kernel; differentiable) and `teacher_sparse` (mean_h exp(q_h . c_pick * scale -
  lse_h), no grad).
- `indexer_topk_triton`, `indexer_kl_triton`: the same contracts as `dsv4.ops.indexer.indexer_topk` /
  `indexer_kl_loss`, one chunk of chunk_size queries at a time (never [B, S, N] at full size).

(No `from __future__ import annotations` here: custom_op reads the real type hints.)
"""

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops.indexer.common import QueryChunk, kl_by_chunks, kl_terms, topk_by_chunks
from dsv4.ops.indexer.triton import (
    index_scores_bwd,
    index_scores_fwd,
    pick_scores_bwd,
    pick_scores_fwd,
    teacher_dense_fwd,
    teacher_sparse_fwd,
)
from dsv4.ops.ranges import AttentionRanges, ranges_or_causal, visible_entries


@torch.library.custom_op("dsv4::index_scores", mutates_args=())
def index_scores_op(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor, cmp_lo: torch.Tensor,
                    cmp_hi: torch.Tensor, entry0: int) -> torch.Tensor:
    return index_scores_fwd(index_q, index_k, weights, cmp_lo, cmp_hi, entry0)


@index_scores_op.register_fake
def _scores_fake(index_q, index_k, weights, cmp_lo, cmp_hi, entry0):
    return index_q.new_empty((index_q.shape[0], index_q.shape[1], index_k.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dsv4::index_scores_bwd", mutates_args=())
def index_scores_bwd_op(grad: torch.Tensor, index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad must be 0 wherever the forward wrote -inf (masked entries)."""
    return index_scores_bwd(grad, index_q, index_k, weights)


@index_scores_bwd_op.register_fake
def _scores_bwd_fake(grad, index_q, index_k, weights):
    return torch.empty_like(index_q), torch.empty_like(index_k), torch.empty_like(weights)


def _scores_setup(ctx, inputs, output):
    index_q, index_k, weights, _, _, _ = inputs  # (ranges and offset need no gradient)
    ctx.save_for_backward(index_q, index_k, weights)


def _scores_backward(ctx, grad):
    index_q, index_k, weights = ctx.saved_tensors
    grad = torch.where(torch.isfinite(grad), grad, 0.0)
    dq, dk, dw = index_scores_bwd_op(grad, index_q, index_k, weights)
    return dq, dk, dw, None, None, None


index_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


def index_scores(index_q, index_k, weights, ranges, entry0: int = 0) -> torch.Tensor:
    """Scores of a query chunk [B, T, n_I, c_I] against entries entry0 .. entry0+N-1 ([B, N, c_I]) -> [B, T, N]
    fp32, -inf where the chunk's `ranges` (AttentionRanges of these T queries) hide the entry."""
    return index_scores_op(index_q.contiguous(), index_k.contiguous(), weights.float().contiguous(),
                           ranges.cmp_lo.int().contiguous(), ranges.cmp_hi.int().contiguous(), int(entry0))


@torch.library.custom_op("dsv4::teacher_dense", mutates_args=())
def teacher_dense_op(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, cmp_lo: torch.Tensor,
                     cmp_hi: torch.Tensor, entry0: int, scale: float) -> torch.Tensor:
    return teacher_dense_fwd(q, ckv, lse, cmp_lo, cmp_hi, entry0, scale)


@teacher_dense_op.register_fake
def _teacher_fake(q, ckv, lse, cmp_lo, cmp_hi, entry0, scale):
    return q.new_empty((q.shape[0], q.shape[1], ckv.shape[1]), dtype=torch.float32)


def teacher_dense(q, ckv, lse, ranges, entry0: int, scale: float) -> torch.Tensor:
    """mean_h exp(q_h . c_s * scale - lse_h) for visible entries (0 elsewhere): [B, T, N] fp32, no grad."""
    return teacher_dense_op(q.detach().contiguous(), ckv.detach().contiguous(), lse.detach().float().contiguous(),
                            ranges.cmp_lo.int().contiguous(), ranges.cmp_hi.int().contiguous(), int(entry0),
                            float(scale))


# ------------------------------------------------------------------------------ sparse phase (top-k picks)

@torch.library.custom_op("dsv4::pick_scores", mutates_args=())
def pick_scores_op(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor, picks: torch.Tensor
                   ) -> torch.Tensor:
    return pick_scores_fwd(index_q, index_k, weights, picks)


@pick_scores_op.register_fake
def _pick_scores_fake(index_q, index_k, weights, picks):
    return index_q.new_empty((index_q.shape[0], index_q.shape[1], picks.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("dsv4::pick_scores_bwd", mutates_args=())
def pick_scores_bwd_op(grad: torch.Tensor, index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor,
                       picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pick_scores_bwd(grad, index_q, index_k, weights, picks)


@pick_scores_bwd_op.register_fake
def _pick_scores_bwd_fake(grad, index_q, index_k, weights, picks):
    return torch.empty_like(index_q), torch.empty_like(index_k), torch.empty_like(weights)


def _pick_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pick_backward(ctx, grad):
    index_q, index_k, weights, picks = ctx.saved_tensors
    dq, dk, dw = pick_scores_bwd_op(grad, index_q, index_k, weights, picks)
    return dq, dk, dw, None


pick_scores_op.register_autograd(_pick_backward, setup_context=_pick_setup)


def pick_scores(index_q, index_k, weights, picks) -> torch.Tensor:
    """Student scores of each query's picks: index_q [B, T, n_I, c_I], index_k [B, N, c_I], weights [B, T, n_I],
    picks [B, T, k] (-1 = none) -> [B, T, k] fp32, -inf at -1 picks. Differentiable in index_q/index_k/weights."""
    return pick_scores_op(index_q.contiguous(), index_k.contiguous(), weights.float().contiguous(),
                          picks.to(torch.int32).contiguous())


@torch.library.custom_op("dsv4::teacher_sparse", mutates_args=())
def teacher_sparse_op(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, picks: torch.Tensor, scale: float
                      ) -> torch.Tensor:
    return teacher_sparse_fwd(q, ckv, lse, picks, scale)


@teacher_sparse_op.register_fake
def _teacher_sparse_fake(q, ckv, lse, picks, scale):
    return q.new_empty((q.shape[0], q.shape[1], picks.shape[-1]), dtype=torch.float32)


def teacher_sparse(q, ckv, lse, picks, scale: float) -> torch.Tensor:
    """mean_h exp(q_h . c_pick * scale - lse_h) per pick: [B, T, k] fp32, 0 at -1 picks, no grad."""
    return teacher_sparse_op(q.detach().contiguous(), ckv.detach().contiguous(), lse.detach().float().contiguous(),
                             picks.to(torch.int32).contiguous(), float(scale))


# ------------------------------------------------------------------------------ the Triton path, chunk by chunk


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


def _kl_chunk(q, cmp, lse, index_q, index_k, weights, picks, r: AttentionRanges, first_entry: int,
              softmax_scale: float):
    """Sum over this chunk's queries of mass_t * KL_t, and the count of queries with candidates."""
    if picks is None:  # dense: every visible entry of the slice cmp / index_k; per-head work reduced in-kernel
        candidates = visible_entries(r, first_entry, cmp.shape[1])
        with torch.no_grad():
            target = teacher_dense(q, cmp, lse, r, first_entry, softmax_scale)
        student = index_scores(index_q, index_k, weights, r, first_entry)
        return kl_terms(target, student.masked_fill(~candidates, float("-inf")), candidates)
    # picks gathered inside the kernels; d index_k summed per entry in a fixed order
    target = teacher_sparse(q, cmp, lse, picks, softmax_scale)
    return kl_terms(target, pick_scores(index_q, index_k, weights, picks), picks >= 0)


def indexer_topk_triton(index_q, index_k, weights, ratio: int, topk: int, chunk_size: int = 128,
                        ranges: AttentionRanges | None = None) -> torch.Tensor:
    """Same contract as `dsv4.ops.indexer.indexer_topk`; see there for shapes."""
    ranges = ranges_or_causal(ranges, index_q, ratio)
    k = min(topk, index_k.shape[1])
    chunks = _chunk_entry_slices(ranges, chunk_size)

    def score_chunk(index_q, index_k, weights, r: AttentionRanges, chunk: QueryChunk) -> torch.Tensor:
        return index_scores(index_q, index_k, weights, r, chunk.e0)  # heads reduced and masked in the kernel

    return topk_by_chunks(index_q, index_k, weights, ranges, k, chunks, score_chunk)


def indexer_kl_triton(q, compressed_kv, lse, index_q, index_k, weights, ratio: int, softmax_scale: float,
                      topk_idx: torch.Tensor | None = None, chunk_size: int = 128,
                      ranges: AttentionRanges | None = None, count_reduce=None) -> torch.Tensor:
    """Same contract as `dsv4.ops.indexer.indexer_kl_loss`; see there for shapes."""
    seq_len = q.shape[1]
    ranges = ranges_or_causal(ranges, q, ratio)
    recompute = torch.is_grad_enabled()
    if topk_idx is None:
        chunks = _chunk_entry_slices(ranges, chunk_size)
    else:  # the picks name the entries: no slice needed
        chunks = [QueryChunk(first, min(first + chunk_size, seq_len), 0, 0, 0, 0)
                  for first in range(0, seq_len, chunk_size)]

    def chunk_loss(*args):
        if recompute:
            return checkpoint(_kl_chunk, *args, use_reentrant=False)
        return _kl_chunk(*args)

    return kl_by_chunks(q, compressed_kv, lse, index_q, index_k, weights, topk_idx, ranges, softmax_scale, chunks,
                        chunk_loss, count_reduce)
