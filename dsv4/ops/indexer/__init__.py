"""Lightning indexer ops: causal top-k selection and the auxiliary KL loss.

    indexer_topk(index_q, index_k, weights, ratio, topk, backend="torch", chunk_size=128, ranges=None)
        -> topk_idx [B, S, min(topk, N)] (-1 = no key)
    indexer_kl_loss(q, compressed_kv, lse, index_q, index_k, weights, ratio, softmax_scale, topk_idx=None,
                    backend="torch", chunk_size=128, ranges=None, count_reduce=None) -> scalar

Shapes: index_q [B, S, n_I, c_I] (RoPE applied), index_k [B, N, c_I], weights [B, S, n_I] (scale folded in),
q [B, S, H, D] and compressed_kv [B, N, D] are the main attention's (teacher), lse [B, S, H] its joint
log-sum-exp over window + compressed + sink.

Score: I[t, s] = sum_h weights[t, h] * relu(index_q[t, h] . index_k[s]); entries a query may not see
(s >= (t+1)//ratio for a plain sequence; `ranges` in general, see dsv4/ops/ranges.py) are masked to -inf
BEFORE top-k; picks that land on a masked entry become -1.

Loss (teacher = the conditional of the joint softmax, detached): for each query t with candidates C_t
(every visible entry when topk_idx is None: the dense warm-up; the query's picks otherwise: sparse),
    target_t(s) = mean_h exp(z_{t,h,s} - lse_{t,h}),  mass_t = sum_s target_t(s),  p_t = target_t / mass_t
    L = mean_t  mass_t * KL(p_t || softmax_{s in C_t} I[t, s])
over queries with at least one candidate. Only index_q / index_k / weights receive gradients.

Backends: "naive" (full [B, S, N] oracle), "torch" (query chunks sized from a memory budget; chunk_size is not
used), "triton" (chunks of chunk_size queries whose scores, teachers and sparse-phase student come from the
kernels in triton.py), "auto" (triton for CUDA tensors, torch otherwise). Anything else raises ValueError.
"""

from __future__ import annotations

import torch

from dsv4.ops.indexer.naive import indexer_kl_naive, indexer_topk_naive
from dsv4.ops.indexer.torch_chunked import indexer_kl_chunked, indexer_topk_chunked
from dsv4.ops.ranges import AttentionRanges

BACKENDS = ("auto", "naive", "torch", "triton")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"indexer backend={backend!r}: unknown backend (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def indexer_topk(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor, ratio: int, topk: int,
                 backend: str = "torch", chunk_size: int = 128, ranges: AttentionRanges | None = None
                 ) -> torch.Tensor:
    backend = _resolve_backend(backend, index_q)
    if backend == "naive":
        return indexer_topk_naive(index_q, index_k, weights, ratio, topk, ranges)
    if backend == "triton":
        from dsv4.ops.indexer.triton_op import indexer_topk_triton  # triton: loaded only when used

        return indexer_topk_triton(index_q, index_k, weights, ratio, topk, chunk_size, ranges)
    return indexer_topk_chunked(index_q, index_k, weights, ratio, topk, ranges)


def indexer_kl_loss(q: torch.Tensor, compressed_kv: torch.Tensor, lse: torch.Tensor, index_q: torch.Tensor,
                    index_k: torch.Tensor, weights: torch.Tensor, ratio: int, softmax_scale: float,
                    topk_idx: torch.Tensor | None = None, backend: str = "torch", chunk_size: int = 128,
                    ranges: AttentionRanges | None = None, count_reduce=None) -> torch.Tensor:
    """count_reduce(int) -> int: the number of queries with candidates over the whole sequence (sequence
    parallelism: each rank divides its local sum by the global count)."""
    backend = _resolve_backend(backend, q)
    if backend == "naive":
        return indexer_kl_naive(q.detach(), compressed_kv.detach(), lse.detach(), index_q, index_k, weights,
                                ratio, softmax_scale, topk_idx, ranges, count_reduce)
    if backend == "triton":
        from dsv4.ops.indexer.triton_op import indexer_kl_triton  # triton: loaded only when used

        return indexer_kl_triton(q, compressed_kv, lse, index_q, index_k, weights, ratio, softmax_scale, topk_idx,
                                 chunk_size, ranges, count_reduce)
    return indexer_kl_chunked(q, compressed_kv, lse, index_q, index_k, weights, ratio, softmax_scale, topk_idx,
                              ranges, count_reduce)
