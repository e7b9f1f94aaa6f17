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

    def forward(self, x: torch.Tensor, rotary: Rotary, start_pos: int = 0, doc_positions: torch.Tensor | None = None,
                starts: torch.Tensor | None = None, prefix: bool = False, prefix_valid: bool = True) -> torch.Tensor:
        """x: [B, S, hidden] -> entries [B, N, dim] (x's dtype).

        Plain sequence: N = S // ratio, group i = tokens i*ratio .. i*ratio+ratio-1, RoPE'd at
        start_pos + i * ratio. Packed documents (doc_positions [B, S], 0 at each document start; starts from
        dsv4.ops.ranges.group_starts): groups count from each document's start, entry n starts at row
        starts[b, n] and is RoPE'd at its document position; padding entries (start = S) are zero.
        prefix=True (sequence parallelism): x starts with the previous rank's last group, which only lends its
        lookback series to the first real entry (its own entry is dropped); prefix_valid=False (the first
        rank) means there is no previous group: the first entry gets no lookback."""
        if doc_positions is not None:
            return self._forward_documents(x, rotary, doc_positions, starts)
        batch, seq_len, _ = x.shape
        r = self.ratio
        n_groups = seq_len // r
        if n_groups == 0:
            return x.new_zeros(batch, 0, self.dim)
        x = x[:, : n_groups * r]
        values = self.wkv(x).view(batch, n_groups, r, -1)  # fp32 [B, G, r, width]
        logits = self.wgate(x).view(batch, n_groups, r, -1) + self.ape.float()
        group = torch.arange(n_groups, device=x.device)
        has_lookback = group > (0 if (not prefix or prefix_valid) else 1)  # entry 0 has no previous group
        entries = self.pool_groups(values, logits, self._previous(values), self._previous(logits), has_lookback,
                                   rotary, start_pos + group * r).to(x.dtype)
        return entries[:, 1:] if prefix else entries

    def project(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's (values, logits) [B, S, width] fp32; slots [S] or [B, S]: the token's slot in its group
        (position % ratio), which picks its row of the slot bias `ape`."""
        return self.wkv(x), self.wgate(x) + self.ape.float()[slots]

    def pool_groups(self, values, logits, prev_values, prev_logits, has_lookback, rotary: Rotary,
                    entry_positions: torch.Tensor) -> torch.Tensor:
        """Complete groups -> their entries [B, G, dim] fp32. values / logits [B, G, r, width] (logits with the
        slot bias), prev_* the previous group's rows (only their lookback half is read; CSA), has_lookback
        broadcastable to [B, G] (False: no previous group), entry_positions: each group's first token."""
        pooled = self._pool(values, logits, prev_values, prev_logits, has_lookback)
        return rotary(self.norm(pooled), entry_positions)

    @staticmethod
    def _previous(t: torch.Tensor) -> torch.Tensor:
        """Group i-1's rows for every group i ([B, G, r, w]; group 0 gets a copy of itself, masked later)."""
        return torch.cat((t[:, :1], t[:, :-1]), dim=1)

    def _pool(self, values, logits, prev_values, prev_logits, has_lookback) -> torch.Tensor:
        """Softmax-pool the slots of each group per channel -> [B, G, c] fp32."""
        c = self.dim
        if self.overlap:
            # entry i = group i-1's lookback series (first c channels) + group i's current series (last c)
            lookback_logits = prev_logits[..., :c].masked_fill(~has_lookback[..., None, None], float("-inf"))
            values = torch.cat((prev_values[..., :c] * has_lookback[..., None, None], values[..., c:]), dim=-2)
            logits = torch.cat((lookback_logits, logits[..., c:]), dim=-2)  # [B, G, 2r, c]
        weights = torch.softmax(logits, dim=-2)  # per channel, over the slots of a group
        return (weights * values).sum(dim=-2)

    def _forward_documents(self, x, rotary, doc_positions, starts) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        r = self.ratio
        n_entries = starts.shape[1]
        if n_entries == 0:
            return x.new_zeros(batch, 0, self.dim)
        valid = starts < seq_len  # [B, N]
        rows = starts.clamp(max=seq_len - 1)[..., None] + torch.arange(r, device=x.device)  # [B, N, r]
        rows = rows.clamp(max=seq_len - 1)
        batch_ix = torch.arange(batch, device=x.device)[:, None, None]
        values_all = self.wkv(x)  # fp32 [B, S, width]
        logits_all = self.wgate(x)
        values = values_all[batch_ix, rows]  # [B, N, r, width]
        logits = logits_all[batch_ix, rows] + self.ape.float()
        entry_pos = doc_positions.gather(1, starts.clamp(max=seq_len - 1))  # [B, N] position in the document
        has_lookback = valid & (entry_pos >= r)  # the document's previous group is in this sequence
        prev_rows = (rows - r).clamp(min=0)
        prev_values = values_all[batch_ix, prev_rows]
        prev_logits = logits_all[batch_ix, prev_rows] + self.ape.float()
        entries = self.pool_groups(values, logits, prev_values, prev_logits, has_lookback, rotary, entry_pos)
        return (entries * valid[..., None]).to(x.dtype)


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
                start_pos: int, doc_positions: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                x_prefixed: torch.Tensor | None = None, prefix_valid: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> index_q [B, S, n_I, c_I], index_k [B, N, c_I], weights [B, S, n_I]. x_prefixed / prefix_valid:
        see Compressor.forward (sequence parallelism; index_k then holds this rank's entries only)."""
        x, q_latent = x.detach(), q_latent.detach()
        index_q = self.queries(q_latent, rotary, positions)
        if doc_positions is not None:  # packed documents (under sequence parallelism: x_prefixed, prefixed rows)
            source = x_prefixed.detach() if x_prefixed is not None else x
            index_k = self.compressor(source, rotary, start_pos, doc_positions, starts)
        elif x_prefixed is not None:
            index_k = self.compressor(x_prefixed.detach(), rotary, start_pos - self.ratio, prefix=True,
                                      prefix_valid=prefix_valid)
        else:
            index_k = self.compressor(x, rotary, start_pos, doc_positions, starts)
        return index_q, index_k, self.head_weights(x)

    def queries(self, q_latent: torch.Tensor, rotary: Rotary, positions: torch.Tensor) -> torch.Tensor:
        """The query latent [B, S, d_c] -> indexer queries [B, S, n_I, c_I], RoPE'd at each query's position."""
        batch, seq_len, _ = q_latent.shape
        return rotary(self.wq_b(q_latent).view(batch, seq_len, self.n_heads, self.head_dim), positions)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> per-head score weights [B, S, n_I] fp32, with the 1/sqrt(c_I n_I) scale folded in."""
        return self.weights_proj(x).float() * self.weight_scale
