"""Memory-sane PyTorch path for V4 attention: chunk over queries, recompute each chunk in backward.

Per query chunk of T tokens it touches only the raw rows that chunk's windows reach (T + window - 1
rows), the compressed entries it may see (dense HCA / dense-CSA) or gathers its own top-k picks
(sparse CSA). Each chunk runs under activation checkpointing, so the autograd graph keeps only the
chunk inputs and outputs: peak memory is O(T * (T + window + N) * H), never O(S^2 * H).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _attend_chunk(
    q_chunk: torch.Tensor,  # [B, T, H, D]
    kv_rows: torch.Tensor,  # [B, L, D]  raw rows first_row .. first_row+L-1
    sink: torch.Tensor,  # [H]
    compressed: torch.Tensor | None,  # dense: [B, N_vis, D]; sparse: [B, N, D]
    topk_chunk: torch.Tensor | None,  # [B, T, k] or None
    first_query: int,
    first_row: int,
    window: int,
    ratio: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n_q, n_heads, _ = q_chunk.shape
    device = q_chunk.device
    qf = q_chunk.float()
    rows = kv_rows.float()
    t = first_query + torch.arange(n_q, device=device)  # query positions
    j = first_row + torch.arange(rows.shape[1], device=device)  # raw key positions
    band = (j[None, :] <= t[:, None]) & (j[None, :] > t[:, None] - window)  # [T, L]
    window_scores = torch.einsum("bthd,bjd->bthj", qf, rows) * softmax_scale
    window_scores = window_scores.masked_fill(~band[None, :, None, :], float("-inf"))
    parts = [window_scores]
    gathered = None
    if compressed is not None:
        cmp = compressed.float()
        if topk_chunk is None:  # dense over the visible entries
            i = torch.arange(cmp.shape[1], device=device)
            visible = i[None, :] < ((t[:, None] + 1) // ratio)  # [T, N_vis]
            cmp_scores = torch.einsum("bthd,bnd->bthn", qf, cmp) * softmax_scale
            cmp_scores = cmp_scores.masked_fill(~visible[None, :, None, :], float("-inf"))
        else:  # each query's own picks, gathered per query
            picks = topk_chunk.clamp(min=0).long()  # [B, T, k]
            batch_ix = torch.arange(batch, device=device)[:, None, None]
            gathered = cmp[batch_ix, picks]  # [B, T, k, D]
            cmp_scores = torch.einsum("bthd,btkd->bthk", qf, gathered) * softmax_scale
            cmp_scores = cmp_scores.masked_fill((topk_chunk < 0)[:, :, None, :], float("-inf"))
        parts.append(cmp_scores)
    parts.append(sink.float()[None, None, :, None].expand(batch, n_q, n_heads, 1))
    logits = torch.cat(parts, dim=-1)  # [B, T, H, L (+ N) + 1]
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
    window: int,
    softmax_scale: float,
    compressed_kv: torch.Tensor | None = None,
    ratio: int = 0,
    topk_idx: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `dsv4.ops.v4_attention.v4_attention`; see there for shapes."""
    seq_len = q.shape[1]
    recompute = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, kv, sink, compressed_kv))
    outs, lses = [], []
    for first_query in range(0, seq_len, chunk_size):
        last_query = min(first_query + chunk_size, seq_len)  # exclusive
        first_row = max(0, first_query - window + 1)
        kv_rows = kv[:, first_row:last_query]
        compressed = None
        topk_chunk = None
        if compressed_kv is not None:
            if topk_idx is None:
                compressed = compressed_kv[:, : last_query // ratio]  # the most any query here can see
            else:
                compressed = compressed_kv
                topk_chunk = topk_idx[:, first_query:last_query]
        args = (q[:, first_query:last_query], kv_rows, sink, compressed, topk_chunk, first_query, first_row,
                window, ratio, softmax_scale)
        if recompute:
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out)
        lses.append(lse.detach())
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
