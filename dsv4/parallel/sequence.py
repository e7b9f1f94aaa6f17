"""The sequence-parallel plan: a layer's rows and entries when each rank holds one shard of every sequence.

The layer code is the same as on one device (dsv4/parallel/plan.py has the interface); this plan adds the
exchanges. Plain sequences (`SequenceRows`): the window halo (the previous rank's last W-1 K=V rows), for CSA the
previous rank's last group of hidden states (our first entry's lookback series), then every rank's entries and
indexer keys all-gathered in rank order. Packed documents (`SequenceDocumentRows`): groups and windows follow the
documents, so groups may straddle ranks; see the class. Dense layers run DeepSpeed's Ulysses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops.ranges import AttentionRanges, entry_ranges, group_starts
from dsv4.parallel.collectives import (
    SequenceParallel,
    all_gather_sequence,
    all_gather_values,
    all_reduce_sum,
    shift_to_next_rank,
)
from dsv4.parallel.ulysses import ulysses_attention


class SequencePlan:
    """The plan of one rank of a sequence-parallel group (sp.world > 1)."""

    def __init__(self, sp: SequenceParallel) -> None:
        self.sp = sp
        self.world = sp.world

    def shard_start(self, input_ids: torch.Tensor, start_pos: int) -> int:
        """Check this rank got its shard; the absolute position of its first token."""
        sp = self.sp
        if input_ids.shape[1] != sp.shard_len:
            raise ValueError(f"sequence parallelism: rank {sp.rank} got {input_ids.shape[1]} tokens, expected "
                             f"its shard of {sp.shard_len}")
        return sp.start

    def prepare(self, layer, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, start_pos: int,
                documents: bool):
        if documents:
            return SequenceDocumentRows(layer, x, kv, positions, self.sp)
        return SequenceRows(layer, x, kv, start_pos, self.sp)

    def sequence_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's document positions [B, L] -> the whole sequence's [B, world * L]."""
        return all_gather_values(positions, self.sp).permute(1, 0, 2).reshape(positions.shape[0], -1)

    def dense_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> torch.Tensor:
        return ulysses_attention(q, k, v, self.sp, mask)


class SequenceShardRows:
    """What both sequence-parallel cases share: the indexer loss's count and graph over the group."""

    sp: SequenceParallel

    def count_reduce(self, n: int) -> int:
        return int(all_reduce_sum(torch.tensor(n, device=self.kv.device), self.sp))

    @staticmethod
    def narrow(compressed: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compressed, topk_idx

    @staticmethod
    def keep_in_graph(loss: torch.Tensor, index_keys: torch.Tensor) -> torch.Tensor:
        """Keep the gathered keys in the graph on every rank: every rank then issues the same backward collectives."""
        return loss + 0.0 * index_keys.sum()


class SequenceRows(SequenceShardRows):
    """Plain sequences: local queries; K=V rows = [previous rank's last window-1 rows | ours]; groups never
    straddle ranks (shard lengths are multiples of every ratio)."""

    def __init__(self, layer, x: torch.Tensor, kv: torch.Tensor, start_pos: int, sp: SequenceParallel) -> None:
        batch, seq_len, _ = x.shape
        window, halo, ratio = layer.cfg.sliding_window, layer.cfg.sliding_window - 1, layer.ratio
        if seq_len < max(halo, ratio):
            raise ValueError(f"sequence parallelism: shard length {seq_len} must be >= sliding_window - 1 "
                             f"({halo}) and >= the compression ratio ({ratio})")
        self.layer, self.x, self.start_pos, self.sp = layer, x, start_pos, sp
        self.kv, row, window_lo = halo_and_window(kv, sp, window)
        self.x_prefixed = None
        if layer.spec.overlap:  # the first entry's lookback series comes from the previous rank's last group
            self.x_prefixed = torch.cat((shift_to_next_rank(x[:, seq_len - ratio:], sp), x), dim=1)
        t = row - halo
        cmp_hi = (sp.start + t + 1) // ratio if ratio else torch.zeros_like(t)
        self.ranges = AttentionRanges(window_lo.int(), row.int(), torch.zeros_like(t).int(), cmp_hi.int())

    def entries(self) -> torch.Tensor:
        """Compress our own groups, then gather every rank's entries (in rank order)."""
        return all_gather_sequence(self._local(self.layer.compressor, self.x, self.x_prefixed), self.sp)

    def index_keys(self) -> torch.Tensor:
        return all_gather_sequence(self._local(self.layer.indexer.compressor, self.x.detach(),
                                               self.x_prefixed.detach()), self.sp)

    def _local(self, compressor, x: torch.Tensor, x_prefixed: torch.Tensor | None) -> torch.Tensor:
        rotary = self.layer.rotary
        if x_prefixed is None:  # HCA: no lookback
            return compressor(x, rotary, self.start_pos)
        return compressor(x_prefixed, rotary, self.start_pos - self.layer.ratio, prefix=True,
                          prefix_valid=self.sp.rank > 0)


def halo_and_window(kv: torch.Tensor, sp: SequenceParallel, window: int, doc_positions: torch.Tensor | None = None):
    """Sequence parallelism: K=V rows [previous rank's last window-1 rows | ours] -> (those rows, our queries' rows
    among them [B, L], the first row of each query's window [B, L]). The window stops at the document start when
    doc_positions are given; on rank 0 the halo holds the last rank's rows and is never visible."""
    batch, seq_len, _ = kv.shape
    halo = window - 1
    if halo:
        kv = torch.cat((shift_to_next_rank(kv[:, seq_len - halo:], sp), kv), dim=1)
    row = halo + torch.arange(seq_len, device=kv.device)[None].expand(batch, -1)
    window_lo = row - window + 1
    if doc_positions is not None:
        window_lo = torch.maximum(window_lo, row - doc_positions)
    if sp.rank == 0:
        window_lo = window_lo.clamp(min=halo)
    return kv, row, window_lo


class SequenceDocumentRows(SequenceShardRows):
    """Sequence parallelism with document masking, for one V4 layer on one rank (shard of L tokens).

    Groups start at document positions that are multiples of the ratio, so they may straddle two ranks: a group
    belongs to the rank holding its last token, which compresses it from its own rows plus a prefix of the
    previous rank's last rows (2*ratio-1 for CSA: a straddling group and its lookback; ratio-1 for HCA). Ranks
    own different numbers of entries: each pads to the largest count, the padded entries are all-gathered, and
    every rank compacts them into sequence order (the same entry list as one device). Windows stop at document
    starts; per-query ranges index the K=V rows [halo | ours] and the compacted entries."""

    def __init__(self, layer, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor,
                 sp: SequenceParallel) -> None:
        cfg, r = layer.cfg, layer.ratio
        batch, seq_len, _ = x.shape
        window, halo = cfg.sliding_window, cfg.sliding_window - 1
        prefix = (2 * r - 1 if layer.spec.overlap else r - 1) if r else 0
        if seq_len < max(halo, prefix, r):
            raise ValueError(f"sequence parallelism with document masking: shard length {seq_len} must be >= "
                             f"sliding_window - 1 ({halo}), the ratio ({r}) and the compressor prefix ({prefix})")
        self.layer, self.sp = layer, sp
        self.kv, row, window_lo = halo_and_window(kv, sp, window, positions)
        t = row - halo
        self.x_prefixed = self.positions_prefixed = self.local_starts = None
        cmp_lo = cmp_hi = torch.zeros_like(t)
        if r:
            self.x_prefixed = torch.cat((shift_to_next_rank(x[:, seq_len - prefix:], sp), x), dim=1)
            before = shift_to_next_rank(positions[:, seq_len - prefix:].float(), sp).long()
            if sp.rank == 0:  # the last rank's rows: no group may start there
                before = torch.full_like(before, -1)
            self.positions_prefixed = torch.cat((before, positions), dim=1)
            n_rows = prefix + seq_len
            starts = group_starts(self.positions_prefixed, r)  # rows of the prefixed shard, padded with n_rows
            mine = (starts >= prefix - r + 1) & (starts < n_rows)  # groups that end in our rows
            counts = mine.sum(1)
            all_counts = all_gather_values(counts, sp)  # [world, B]
            width = int(all_counts.max())
            order = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)
            ours = torch.arange(starts.shape[1], device=x.device)[None] < counts[:, None]
            local = torch.where(ours, starts.gather(1, order), n_rows)
            local = F.pad(local, (0, max(0, width - local.shape[1])), value=n_rows)[:, :width]
            self.local_starts = local
            total_rows = sp.world * seq_len
            self.index = torch.zeros(batch, 0, dtype=torch.long, device=x.device)
            if width == 0:  # no complete group on any rank (every rank knows: the counts are shared)
                self.ranges = AttentionRanges(window_lo.int(), row.int(), cmp_lo.int(), cmp_hi.int())
                return
            global_starts = all_gather_values(torch.where(local < n_rows, local - prefix + sp.start, total_rows), sp)
            # compaction: for each batch row, rank k's first counts[k] entries, in rank order
            j = torch.arange(width, device=x.device)
            valid = (j[None, None, :] < all_counts[:, :, None]).permute(1, 0, 2).reshape(batch, -1)
            flat = (torch.arange(sp.world, device=x.device)[:, None] * width + j[None, :]).reshape(-1)
            self.total = valid.sum(1)
            n_total = int(self.total.max()) if batch else 0
            keep = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n_total]
            self.index = flat[keep]  # [B, n_total] positions in the gathered [B, world * width] entries
            self.present = torch.arange(n_total, device=x.device)[None] < self.total[:, None]
            gathered_starts = global_starts.permute(1, 0, 2).reshape(batch, -1).gather(1, self.index)
            entry_starts = torch.where(self.present, gathered_starts, total_rows)
            t_global = sp.start + t
            cmp_lo, cmp_hi = entry_ranges(entry_starts, total_rows, r, t_global - positions, t_global)
        self.ranges = AttentionRanges(window_lo.int(), row.int(), cmp_lo.int(), cmp_hi.int())

    def entries(self) -> torch.Tensor:
        """This rank's groups, gathered from every rank in sequence order."""
        return self.gather(self.layer.compressor(self.x_prefixed, self.layer.rotary, 0, self.positions_prefixed,
                                                 self.local_starts))

    def index_keys(self) -> torch.Tensor:
        return self.gather(self.layer.indexer.compressor(self.x_prefixed.detach(), self.layer.rotary, 0,
                                                         self.positions_prefixed, self.local_starts))

    def gather(self, local_entries: torch.Tensor) -> torch.Tensor:
        """This rank's entries [B, width, c] -> every rank's, compacted in sequence order [B, N, c]
        (differentiable: the backward of the gather sends each rank its entries' gradients)."""
        if self.index.shape[1] == 0:
            return local_entries[:, :0]
        everyone = all_gather_sequence(local_entries, self.sp)  # [B, world * width, c]
        picked = everyone.gather(1, self.index[..., None].expand(-1, -1, everyone.shape[-1]))
        return picked * self.present[..., None].to(picked.dtype)
