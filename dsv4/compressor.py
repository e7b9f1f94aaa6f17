"""The token-level KV compressor and the lightning indexer of DeepSeek V4 attention.

Compressor (dsv4-attention.md §4): groups of `ratio` tokens become one entry by a per-channel
softmax over the group's slots (logits = data-dependent gate + learned per-slot bias `ape`),
computed in fp32, then RMSNorm and RoPE at the position of the group's FIRST token.
- HCA (non-overlapping): entry i pools the `ratio` tokens of group i.
- CSA (overlapping, ratio 4): every token emits a "lookback" and a "current" (value, logit) pair;
  entry i pools group i-1's lookback rows and group i's current rows (2*ratio tokens). Channel
  layout as in the released weights: the first `dim` output channels of `wkv`/`wgate`/`ape` are the
  lookback series, the last `dim` the current series. Entry 0 has no lookback (weight exactly 0).
Only complete groups produce entries: the trailing S mod ratio tokens produce none.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.layers import Fp32Linear, Linear, RMSNorm
from dsv4.rope import Rotary


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim
        self.wkv = Fp32Linear(hidden_size, width)
        self.wgate = Fp32Linear(hidden_size, width)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rotary: Rotary, start_pos: int = 0) -> torch.Tensor:
        """x: [B, S, hidden] -> entries [B, S // ratio, dim] (x's dtype), RoPE'd at start_pos + i * ratio."""
        batch, seq_len, _ = x.shape
        r, c = self.ratio, self.dim
        n_groups = seq_len // r
        if n_groups == 0:
            return x.new_zeros(batch, 0, c)
        x = x[:, : n_groups * r]
        values = self.wkv(x).view(batch, n_groups, r, -1)  # fp32 [B, G, r, width]
        logits = self.wgate(x).view(batch, n_groups, r, -1) + self.ape.float()
        if self.overlap:
            look_values, cur_values = values[..., :c], values[..., c:]
            look_logits, cur_logits = logits[..., :c], logits[..., c:]
            # entry i reads group i-1 through its lookback series; entry 0 has none (-inf, value 0)
            prev_values = torch.cat((look_values.new_zeros(batch, 1, r, c), look_values[:, :-1]), dim=1)
            prev_logits = torch.cat((look_logits.new_full((batch, 1, r, c), float("-inf")), look_logits[:, :-1]),
                                    dim=1)
            values = torch.cat((prev_values, cur_values), dim=2)  # [B, G, 2r, c]
            logits = torch.cat((prev_logits, cur_logits), dim=2)
        weights = torch.softmax(logits, dim=2)  # per channel, over the slots of a group
        pooled = (weights * values).sum(dim=2)  # [B, G, c] fp32
        entries = self.norm(pooled)
        positions = start_pos + torch.arange(n_groups, device=x.device) * r
        return rotary(entries, positions).to(x.dtype)


class Indexer(nn.Module):
    """Lightning indexer (CSA layers): its own 4-token overlapping compressor for keys, queries from the
    shared query latent, per-head weights from x. Trains only through its auxiliary loss: its inputs are
    detached here, and top-k is not differentiable."""

    def __init__(self, cfg: ModelConfig, ratio: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.ratio = cfg.index_n_heads, cfg.index_head_dim, ratio
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim)
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads)
        self.compressor = Compressor(cfg.hidden_size, cfg.index_head_dim, ratio, overlap=True, eps=cfg.rms_norm_eps)
        self.weight_scale = (cfg.index_head_dim * cfg.index_n_heads) ** -0.5

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, rotary: Rotary, positions: torch.Tensor,
                start_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> index_q [B, S, n_I, c_I], index_k [B, N, c_I], weights [B, S, n_I]."""
        x, q_latent = x.detach(), q_latent.detach()
        batch, seq_len, _ = x.shape
        index_q = self.wq_b(q_latent).view(batch, seq_len, self.n_heads, self.head_dim)
        index_q = rotary(index_q, positions)
        index_k = self.compressor(x, rotary, start_pos)
        weights = self.weights_proj(x).float() * self.weight_scale
        return index_q, index_k, weights
