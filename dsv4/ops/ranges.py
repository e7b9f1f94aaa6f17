"""What each query may see, as per-query index ranges: the one description every attention backend obeys.

For query t (row t of q) in batch row b:
  raw K=V rows   window_lo[b, t] .. window_hi[b, t]   (inclusive)
  compressed     entries cmp_lo[b, t] .. cmp_hi[b, t] - 1 (dense: all of them; sparse: the indexer picks
                 among them, and attention reads only the picks)
All four are non-decreasing in t, so the queries that read a given row or entry form one contiguous range
(the Triton backward uses that to gather a row's readers deterministically).

Plain causal sequences: window_lo = max(0, t - window + 1), window_hi = t, cmp_lo = 0,
cmp_hi = (t + 1) // ratio (entry i is complete once its last token t = (i + 1) * ratio - 1 has been seen).

Packed documents (document masking): `positions[b, t]` is the position of token t inside its document,
0 at each document start. The window stops at the document start, compressor groups are counted from the
document start (a group never mixes documents; incomplete groups produce no entry), and a query sees only
its own document's complete entries. Running each document alone gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionRanges:
    window_lo: torch.Tensor  # [B, S] int32
    window_hi: torch.Tensor  # [B, S] int32
    cmp_lo: torch.Tensor  # [B, S] int32
    cmp_hi: torch.Tensor  # [B, S] int32

    def slice(self, first: int, last: int) -> AttentionRanges:
        """The ranges of queries first .. last-1."""
        return AttentionRanges(self.window_lo[:, first:last], self.window_hi[:, first:last],
                               self.cmp_lo[:, first:last], self.cmp_hi[:, first:last])


def causal_ranges(batch: int, seq_len: int, window: int, ratio: int, device: torch.device) -> AttentionRanges:
    t = torch.arange(seq_len, device=device, dtype=torch.int32)[None].expand(batch, -1)
    zero = torch.zeros_like(t)
    return AttentionRanges(
        window_lo=(t - window + 1).clamp(min=0),
        window_hi=t,
        cmp_lo=zero,
        cmp_hi=(t + 1) // ratio if ratio > 0 else zero,
    )


def ranges_or_causal(ranges: AttentionRanges | None, x: torch.Tensor, ratio: int) -> AttentionRanges:
    """`ranges` when given, else those of a plain causal sequence shaped like x [B, S, ...] (entries
    i < (t+1)//ratio; window 1, since the callers, the indexer and its statistics, read entries only)."""
    return ranges if ranges is not None else causal_ranges(x.shape[0], x.shape[1], 1, ratio, x.device)


def visible_entries(ranges: AttentionRanges, first_entry: int, num_entries: int) -> torch.Tensor:
    """[B, T, n] bool: entry first_entry + s is visible to each query of `ranges` (cmp_lo <= . < cmp_hi)."""
    s = first_entry + torch.arange(num_entries, device=ranges.cmp_lo.device)
    return (s[None, None, :] >= ranges.cmp_lo[..., None]) & (s[None, None, :] < ranges.cmp_hi[..., None])


def group_starts(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Start rows of the complete compressor groups of each batch row -> [B, N] long, padded with S.

    A group is `ratio` consecutive tokens of one document whose first token sits at a document position
    that is a multiple of `ratio`; it is complete when all of them are in the sequence."""
    batch, seq_len = positions.shape
    if seq_len < ratio:
        return torch.full((batch, 0), seq_len, dtype=torch.long, device=positions.device)
    head = positions[:, : seq_len - ratio + 1]
    tail = positions[:, ratio - 1:]
    is_start = (head % ratio == 0) & (tail == head + ratio - 1)  # no document restart inside the group
    counts = is_start.sum(1)
    n_max = int(counts.max()) if batch else 0
    order = torch.argsort((~is_start).to(torch.int8), dim=1, stable=True)[:, :n_max]  # starts first, in order
    valid = torch.arange(n_max, device=positions.device)[None, :] < counts[:, None]
    return torch.where(valid, order, seq_len)


def document_ranges(positions: torch.Tensor, window: int, ratio: int, starts: torch.Tensor | None
                    ) -> AttentionRanges:
    """Ranges for packed documents; `starts` from group_starts (None for window-only layers)."""
    batch, seq_len = positions.shape
    t = torch.arange(seq_len, device=positions.device)[None].expand(batch, -1)
    doc_start = t - positions  # row of the first token of each query's document
    window_lo = torch.maximum(t - window + 1, doc_start)
    cmp_lo, cmp_hi = entry_ranges(starts, seq_len, ratio, doc_start, t)
    return AttentionRanges(window_lo.int(), t.int(), cmp_lo.int(), cmp_hi.int())


def entry_ranges(starts: torch.Tensor | None, pad: int, ratio: int, doc_start: torch.Tensor, t: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible compressed entries [lo, hi) of queries at rows t (documents starting at rows doc_start): the
    entries of the query's document whose group is complete by t. starts [B, N]: group start rows in entry order,
    `pad` for padding entries. All rows in one frame (the sequence's, or global under sequence parallelism)."""
    if starts is None or starts.shape[1] == 0:
        zero = torch.zeros_like(t)
        return zero, zero
    ends = torch.where(starts < pad, starts + ratio - 1, torch.iinfo(torch.long).max)
    cmp_lo = torch.searchsorted(starts.contiguous(), doc_start.contiguous(), right=False)
    cmp_hi = torch.searchsorted(ends.contiguous(), t.contiguous(), right=True)
    return cmp_lo, cmp_hi


def reader_ranges(lo: torch.Tensor, hi: torch.Tensor, num_items: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For items (rows or entries) in blocks of `block`: the first and last query whose [lo, hi] range
    (inclusive) touches the block -> two [B, n_blocks] int32 tensors (last < first: no reader)."""
    first_item = torch.arange(0, num_items, block, device=lo.device)
    last_item = (first_item + block - 1).clamp(max=max(num_items - 1, 0))
    batch = lo.shape[0]
    first_item = first_item[None].expand(batch, -1).contiguous()
    last_item = last_item[None].expand(batch, -1).contiguous()
    # first query whose hi reaches the block start; last query whose lo is not past the block end
    first = torch.searchsorted(hi.contiguous(), first_item.to(hi.dtype), right=False)
    last = torch.searchsorted(lo.contiguous(), last_item.to(lo.dtype), right=True) - 1
    return first.int(), last.int()
