"""Brute-force oracle for V4 attention: builds the full [S, S + N] mask and expands K=V over heads.

O(S^2) memory by design. Used by tests and as `backend="naive"`; never on long sequences.
"""

from __future__ import annotations

import torch

from dsv4.ops.ranges import AttentionRanges


def v4_attention_mask(ranges: AttentionRanges, seq_len: int, num_compressed: int,
                      topk_idx: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask [B, T, S + N] (T queries, S = seq_len K=V rows): True where query t may attend key j.

    Keys 0..S-1 are raw rows (window_lo[t] .. window_hi[t]); keys S..S+N-1 are compressed entries: every
    entry in [cmp_lo[t], cmp_hi[t]) when topk_idx is None, else exactly the entries listed in topk_idx[b, t]
    (entries < 0 mean "no key")."""
    device = ranges.window_lo.device
    j = torch.arange(seq_len, device=device)
    window_mask = (j[None, None, :] >= ranges.window_lo[..., None]) & (j[None, None, :] <= ranges.window_hi[..., None])
    if num_compressed == 0:
        return window_mask
    if topk_idx is None:
        i = torch.arange(num_compressed, device=device)
        cmp_mask = (i[None, None, :] >= ranges.cmp_lo[..., None]) & (i[None, None, :] < ranges.cmp_hi[..., None])
    else:
        # scatter each query's OWN picks into its row (never a shared key axis: see pitfalls.md 1)
        batch, n_queries = topk_idx.shape[:2]  # queries: as many as ranges (K=V rows may be more: halos, caches)
        cmp_mask = torch.zeros(batch, n_queries, num_compressed + 1, dtype=torch.bool, device=device)
        idx = torch.where(topk_idx < 0, num_compressed, topk_idx).long()
        cmp_mask.scatter_(2, idx, True)
        cmp_mask = cmp_mask[..., :num_compressed]
    return torch.cat((window_mask, cmp_mask), dim=2)


def v4_attention_naive(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    ranges: AttentionRanges,
    compressed_kv: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `dsv4.ops.v4_attention.v4_attention`; see there for shapes."""
    batch, seq_len, n_heads, dim = q.shape
    num_compressed = 0 if compressed_kv is None else compressed_kv.shape[1]
    keys = kv if compressed_kv is None else torch.cat((kv, compressed_kv), dim=1)  # [B, S+N, D]
    keys = keys.float()
    keys_per_head = keys[:, None].expand(batch, n_heads, keys.shape[1], dim)  # K=V expanded over heads
    mask = v4_attention_mask(ranges, kv.shape[1], num_compressed, topk_idx)  # [B, S, S+N]
    scores = torch.einsum("bshd,bhjd->bhsj", q.float(), keys_per_head) * softmax_scale  # [B, H, S, S+N]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    sink_logit = sink.float()[None, :, None, None].expand(batch, n_heads, seq_len, 1)
    logits = torch.cat((scores, sink_logit), dim=-1)  # the sink: one extra slot with a zero value
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, S]
    probs = torch.exp(logits - lse[..., None])[..., :-1]
    out = torch.einsum("bhsj,bhjd->bshd", probs, keys_per_head)
    return out.to(q.dtype), lse.transpose(1, 2).detach()
