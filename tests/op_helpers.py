"""What the op test files share: per-query ranges of every kind (plain, packed documents, a sequence-parallel
halo) and the relative closeness check."""

import torch

from dsv4.ops.ranges import AttentionRanges, causal_ranges, document_ranges, group_starts

DOC_LENGTHS = ([37, 1, 50, 4, 41], [5, 60, 2, 66])  # per batch row, 133 tokens; a 1-token document


def make_ranges(kind: str, batch: int, seq_len: int, window: int, ratio: int):
    """-> (ranges, number of raw K=V rows, number of compressed entries)."""
    if kind == "plain":
        return causal_ranges(batch, seq_len, window, ratio, "cpu"), seq_len, seq_len // ratio if ratio else 0
    if kind == "documents":
        rows = DOC_LENGTHS if seq_len == 133 else ([seq_len], [seq_len // 2, seq_len - seq_len // 2])
        positions = torch.stack([torch.cat([torch.arange(n) for n in rows[b % 2]]) for b in range(batch)])
        starts = group_starts(positions, ratio) if ratio else None
        n_entries = 0 if starts is None else starts.shape[1]
        return document_ranges(positions, window, ratio, starts), seq_len, n_entries
    # halo'd: the K=V rows start with window - 1 rows of a previous shard, as under sequence parallelism
    halo = window - 1
    t = torch.arange(seq_len)[None].expand(batch, -1) + halo
    plain = causal_ranges(batch, seq_len, window, ratio, "cpu")
    ranges = AttentionRanges((t - window + 1).int(), t.int(), plain.cmp_lo, plain.cmp_hi)
    return ranges, seq_len + halo, seq_len // ratio if ratio else 0


def assert_close(a, b, what, tol=3e-5):
    scale = b.abs().max().clamp_min(1.0)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} (scale {scale:.3e})"
