"""The seam between an attention layer and where its rows come from: a plan prepares each layer's inputs.

A V4 layer computes its queries and K=V rows from its own tokens, then asks a plan for what it attends over:

    rows = plan.prepare(layer, x, kv, positions, start_pos, documents)
    rows.kv            K=V rows the queries read [B, R, c] (own rows, plus a halo or a cache before them)
    rows.ranges        per-query ranges over those rows and the entries (dsv4.ops.ranges), None = plain causal
    rows.entries()     the compressed entries every query may read [B, N, c], in sequence order
    rows.index_keys()  CSA: the lightning indexer's keys [B, N, c_I] (no gradient to x)
    rows.narrow(compressed, topk_idx)    what attention reads of the picked entries (a cache may read fewer)
    rows.count_reduce  None, or a sum over the ranks sharing a sequence (the indexer loss normaliser)
    rows.keep_in_graph(loss, index_keys) the indexer loss, kept in every rank's graph where collectives need it

and a dense layer asks `plan.dense_attention(q, k, v, mask)` and `plan.sequence_positions(positions)`.

The single-device plan (here) does nothing beyond the plain or document-masked ranges. The sequence-parallel plan
(dsv4/parallel/sequence.py) exchanges halos and gathers entries; the KV cache (dsv4/inference/cache.py) is a third
source with the same interface. So the layer's forward is one path for all three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops.ranges import AttentionRanges, document_ranges, group_starts


class LocalRows:
    """One device: the layer's own rows; with documents, ranges and compressor groups that follow them."""

    count_reduce = None

    def __init__(self, layer, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, start_pos: int,
                 documents: bool) -> None:
        self.layer, self.x, self.kv, self.start_pos = layer, x, kv, start_pos
        self.doc_positions = positions if documents else None
        self.starts = group_starts(positions, layer.ratio) if documents and layer.ratio else None
        self.ranges: AttentionRanges | None = None
        if documents:
            self.ranges = document_ranges(positions, layer.cfg.sliding_window, layer.ratio, self.starts)

    def entries(self) -> torch.Tensor:
        return self.layer.compressor(self.x, self.layer.rotary, self.start_pos, self.doc_positions, self.starts)

    def index_keys(self) -> torch.Tensor:
        return self.layer.indexer.compressor(self.x.detach(), self.layer.rotary, self.start_pos, self.doc_positions,
                                             self.starts)

    @staticmethod
    def narrow(compressed: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compressed, topk_idx

    @staticmethod
    def keep_in_graph(loss: torch.Tensor, index_keys: torch.Tensor) -> torch.Tensor:
        return loss


class LocalPlan:
    """The single-device plan: every token of every sequence is here."""

    world = 1

    @staticmethod
    def shard_start(input_ids: torch.Tensor, start_pos: int) -> int:
        """The absolute position of the first token this process holds."""
        return start_pos

    @staticmethod
    def prepare(layer, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, start_pos: int,
                documents: bool) -> LocalRows:
        return LocalRows(layer, x, kv, positions, start_pos, documents)

    @staticmethod
    def sequence_positions(positions: torch.Tensor) -> torch.Tensor:
        """Document positions [B, S] of the whole sequence (here: all of it)."""
        return positions

    @staticmethod
    def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> torch.Tensor:
        """q [B, S, H, d], k and v [B, L, n_kv, d] -> [B, S, H, d]; mask [B, 1, S, L] or None (causal)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)


LOCAL = LocalPlan()


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Causal AND same document over a whole sequence: positions [B, S] (0 at each document start) -> [B, 1, S, S]."""
    doc = torch.cumsum(positions == 0, dim=1)
    total = positions.shape[1]
    causal = torch.ones(total, total, dtype=torch.bool, device=positions.device).tril()
    return (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]
