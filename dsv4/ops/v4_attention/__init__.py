"""V4 attention core: one softmax over a sliding window of raw K=V rows, compressed entries and a sink.

    v4_attention(q, kv, sink, window, softmax_scale, compressed_kv=None, ratio=0, topk_idx=None,
                 backend="torch", chunk_size=128, deterministic=True, ranges=None) -> (out, lse)

Shapes (one shared K=V head; every query head reads the same rows):
    q             [B, S, H, D]    queries (RoPE already applied)
    kv            [B, S, D]       raw K=V rows
    sink          [H]             per-head sink logit: adds exp(sink) to the denominator, no value
    compressed_kv [B, N, D]       compressed entries (entry i summarises group i of `ratio` tokens)
    topk_idx      [B, S, k] int   CSA picks per query (-1 = no key); None = every visible entry (HCA)
    ranges        AttentionRanges what each query may see (dsv4/ops/ranges.py); None = a plain causal
                  sequence: rows t-window+1 .. t and entries i < (t+1)//ratio
    out           [B, S, H, D]    in q's dtype (not yet de-rotated)
    lse           [B, S, H]       fp32 log-sum-exp of the joint softmax (sink included), detached

Backends: "naive" (full-mask oracle, O(S^2)), "torch" (query-chunked, recomputed in backward),
"triton" (kernels in triton.py; on CPU only under TRITON_INTERPRET=1), "auto" (triton for CUDA tensors,
torch otherwise). `deterministic` picks the Triton backward's dK=V path (fixed order vs fp32 atomics).
"""

from __future__ import annotations

import os

import torch

from dsv4.ops.ranges import AttentionRanges, causal_ranges
from dsv4.ops.v4_attention.naive import v4_attention_naive
from dsv4.ops.v4_attention.torch_chunked import v4_attention_chunked

BACKENDS = ("auto", "naive", "torch", "triton")


def v4_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    window: int,
    softmax_scale: float,
    compressed_kv: torch.Tensor | None = None,
    ratio: int = 0,
    topk_idx: torch.Tensor | None = None,
    backend: str = "torch",
    chunk_size: int = 128,
    deterministic: bool = True,
    ranges: AttentionRanges | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if ranges is None:
        if compressed_kv is not None and topk_idx is None and ratio < 1:
            raise ValueError("v4_attention: dense compressed attention needs ratio >= 1 (or explicit ranges)")
        ranges = causal_ranges(q.shape[0], q.shape[1], window, ratio, q.device)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("attention.backend=triton: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                               "set before dsv4 is imported to run them (slowly) on the CPU")
        from dsv4.ops.v4_attention.triton_op import v4_attention_triton  # triton: loaded only when used

        return v4_attention_triton(q, kv, sink, softmax_scale, ranges, compressed_kv, topk_idx, deterministic)
    if backend == "naive":
        return v4_attention_naive(q, kv, sink, softmax_scale, ranges, compressed_kv, topk_idx)
    if backend == "torch":
        return v4_attention_chunked(q, kv, sink, softmax_scale, ranges, compressed_kv, topk_idx, chunk_size)
    raise ValueError(f"attention.backend={backend!r}: unknown backend (choose from {', '.join(BACKENDS)})")
