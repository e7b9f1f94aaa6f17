"""Memory-sane PyTorch path for V4 attention: chunk over queries, recompute each chunk in backward.

Per query chunk of T tokens it touches only the raw rows that chunk's windows reach (about T + window
rows), the compressed entries it may see (dense HCA / dense-CSA) or gathers its own top-k picks
(sparse CSA). Each chunk runs under activation checkpointing, so the autograd graph keeps only the
chunk inputs and outputs: peak memory is O(T * (T + window + N) * H), never O(S^2 * H).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv4.ops.ranges import AttentionRanges


def _attend_chunk(
    q_chunk: torch.Tensor,  # [B, T, H, D]
    kv_rows: torch.Tensor,  # [B, L, D]  raw rows first_row .. first_row+L-1
    sink: torch.Tensor,  # [H]
    compressed: torch.Tensor | None,  # dense: [B, n, D] entries first_entry..; sparse: [B, N, D]
    topk_chunk: torch.Tensor | None,  # [B, T, k] or None
    window_lo: torch.Tensor,  # [B, T]
    window_hi: torch.Tensor,
    cmp_lo: torch.Tensor,
    cmp_hi: torch.Tensor,
    first_row: int,
    first_entry: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n_q, n_heads, _ = q_chunk.shape
    device = q_chunk.device
    qf = q_chunk.float()
    rows = kv_rows.float()
    j = first_row + torch.arange(rows.shape[1], device=device)  # raw row index
    band = (j[None, None, :] >= window_lo[..., None]) & (j[None, None, :] <= window_hi[..., None])  # [B, T, L]
    window_scores = torch.einsum("bthd,bjd->bthj", qf, rows) * softmax_scale
    window_scores = window_scores.masked_fill(~band[:, :, None, :], float("-inf"))
    parts = [window_scores]
    gathered = None
    if compressed is not None:
        cmp = compressed.float()
        if topk_chunk is None:  # dense over the visible entries
            i = first_entry + torch.arange(cmp.shape[1], device=device)
            visible = (i[None, None, :] >= cmp_lo[..., None]) & (i[None, None, :] < cmp_hi[..., None])  # [B, T, n]
            cmp_scores = torch.einsum("bthd,bnd->bthn", qf, cmp) * softmax_scale
            cmp_scores = cmp_scores.masked_fill(~visible[:, :, None, :], float("-inf"))
        else:  # each query's own picks, gathered per query
            picks = topk_chunk.clamp(min=0).long()  # [B, T, k]
            batch_ix = torch.arange(batch, device=device)[:, None, None]
            gathered = cmp[batch_ix, picks]  # [B, T, k, D]
            cmp_scores = torch.einsum("bthd,btkd->bthk", qf, gathered) * softmax_scale
            cmp_scores = cmp_scores.masked_fill((topk_chunk < 0)[:, :, None, :], float("-inf"))
        parts.append(cmp_scores)
    parts.append(sink.float()[None, None, :, None].expand(batch, n_q, n_heads, 1))
    logits = torch.cat(parts, dim=-1)  # [B, T, H, L (+ n) + 1]
    lse = torch.logsumexp(logits, dim=-1)  # [B, T, H]
    probs = torch.exp(logits - lse[..., None])
    n_rows = rows.shape[1]
    out = torch.einsum("bthj,bjd->bthd", probs[..., :n_rows], rows)
    if compressed is not None:
        cmp_probs = probs[..., n_rows:-1]
        if gathered is None:
            out = out + torch.einsum("bthn,bnd->bthd", cmp_probs, cmp)
        else:
            out = out + torch.einsum("bthk,btkd->bthd", cmp_probs, gathered)
    return out.to(q_chunk.dtype), lse


def v4_attention_chunked(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    ranges: AttentionRanges,
    compressed_kv: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `dsv4.ops.v4_attention.v4_attention`; see there for shapes."""
    seq_len = q.shape[1]
    recompute = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, kv, sink, compressed_kv))
    outs, lses = [], []
    for first in range(0, seq_len, chunk_size):
        last = min(first + chunk_size, seq_len)  # exclusive
        r = ranges.slice(first, last)
        first_row = int(r.window_lo.min())  # ranges are non-decreasing in t: the chunk's extent
        last_row = int(r.window_hi.max()) + 1
        compressed, topk_chunk, first_entry = None, None, 0
        if compressed_kv is not None:
            if topk_idx is None:
                first_entry = int(r.cmp_lo.min())
                compressed = compressed_kv[:, first_entry: max(int(r.cmp_hi.max()), first_entry)]
            else:
                compressed = compressed_kv
                topk_chunk = topk_idx[:, first:last]
        args = (q[:, first:last], kv[:, first_row:last_row], sink, compressed, topk_chunk, r.window_lo, r.window_hi,
                r.cmp_lo, r.cmp_hi, first_row, first_entry, softmax_scale)
        if recompute:
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out)
        lses.append(lse.detach())
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
