"""The dense baseline under sequence parallelism: DeepSpeed's Ulysses (all-to-all: sequence shards <-> head
shards), so users compare V4 attention with what DeepSpeed offers for dense attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.parallel.collectives import SequenceParallel


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, attn_mask=None, **kwargs) -> torch.Tensor:
    """[B, S, h, d] (full sequence, a slice of heads) -> [B, S, h, d]; attn_mask [B, 1, S, S] (documents) or
    None (causal)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=attn_mask is None)
    return out.transpose(1, 2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this rank's sequence shard q [B, L, H, d], k/v [B, L, H_kv, d] -> [B, L, H, d].
    attn_mask: [B, 1, S, S] over the whole sequence (document masking), or None."""
    from deepspeed.sequence.layer import DistributedAttention

    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads % sp.world:
        raise ValueError(f"Ulysses: num_attention_heads ({n_heads}) must be divisible by "
                         f"parallel.sequence_parallel_size ({sp.world})")
    if n_kv % sp.world or n_kv != n_heads:  # give every rank whole K/V heads matching its query heads
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
    for t in (q, k, v):
        sp.count("ulysses_all_to_all", t, 1)
    sp.count("ulysses_all_to_all", q, 1)  # the output's all-to-all back
    attention = DistributedAttention(_causal_sdpa, sp.group, scatter_idx=2, gather_idx=1)
    return attention(q.contiguous(), k.contiguous(), v.contiguous(), batch_dim_idx=0, attn_mask=attn_mask)
