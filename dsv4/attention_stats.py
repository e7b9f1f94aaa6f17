"""Attention statistics for logging (not ops): indexer recall, the share of the teacher's top-k entries that the
indexer picked (a training metric).

The teacher ranks every visible compressed entry of a query by its attention mass in the main attention's
joint softmax, averaged over heads: mean_h exp(q_h . c_s * scale - lse_h). With k' = min(k, visible entries),
recall_t = |picks_t ∩ teacher top-k'_t| / k', averaged over queries that see at least one entry. Computed in
query chunks without autograd; meant for logging steps only (it scores every visible entry).
"""

from __future__ import annotations

import torch

from dsv4.ops.ranges import ranges_or_causal, visible_entries


@torch.no_grad()
def indexer_recall(q: torch.Tensor, compressed_kv: torch.Tensor, lse: torch.Tensor, topk_idx: torch.Tensor,
                   ratio: int, softmax_scale: float, ranges=None, chunk_size: int = 128) -> torch.Tensor:
    """q [B, S, H, D], compressed_kv [B, N, D], lse [B, S, H], topk_idx [B, S, k] (-1 = none) -> scalar."""
    seq_len = q.shape[1]
    ranges = ranges_or_causal(ranges, q, ratio)
    total = torch.zeros((), dtype=torch.float64, device=q.device)
    count = 0
    for first in range(0, seq_len, chunk_size):
        last = min(first + chunk_size, seq_len)
        r = ranges.slice(first, last)
        e0, e1 = int(r.cmp_lo.min()), int(r.cmp_hi.max())
        if e1 <= e0:
            continue
        visible = visible_entries(r, e0, e1 - e0)  # [B, T, n]
        z = torch.einsum("bthd,bnd->bthn", q[:, first:last].float(), compressed_kv[:, e0:e1].float()) * softmax_scale
        mass = torch.exp(z - lse[:, first:last].float()[..., None]).mean(dim=2).masked_fill(~visible, -1.0)
        n_visible = visible.sum(-1)  # [B, T]
        k = min(topk_idx.shape[-1], e1 - e0)
        if k == 0:
            continue
        teacher = mass.topk(k, dim=-1).indices + e0  # [B, T, k]
        picks = topk_idx[:, first:last]
        k_eff = n_visible.clamp(max=topk_idx.shape[-1])
        rank_ok = torch.arange(k, device=q.device)[None, None, :] < k_eff[..., None]  # teacher's real top-k'
        hit = (teacher[..., :, None] == picks[..., None, :]).any(-1) & rank_ok  # [B, T, k]
        has = n_visible > 0
        total += (hit.sum(-1).double() / k_eff.clamp(min=1).double())[has].sum()
        count += int(has.sum())
    return (total / max(count, 1)).float()
