"""Triton building blocks shared by the ops' kernels (dsv4/ops/*/triton.py): interpreter switch, dot precision,
output allocation, row loads and gathers, and the deterministic per-entry sum of per-pick gradients.

Kernel naming follows the house style: b_ block values, p_ pointers, o_ offsets, m_ masks, i_ program ids.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# fp32 inputs keep full fp32 products on GPUs (no TF32); bf16/fp16 inputs run native tensor-core dots either way
DOT_PRECISION = tl.constexpr("ieee")
POISON_OUTPUTS = False  # tests set this: outputs start as NaN, so an unwritten element shows


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@triton.jit
def load_rows(p_base, o_rows, stride_row, o_d, m_rows, m_d, UPCAST: tl.constexpr):
    p = p_base + o_rows.to(tl.int64)[:, None] * stride_row + o_d[None, :]
    b = tl.load(p, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return b


@triton.jit
def range_block(P_ROWS, start, end, stride_row, o_d, m_d, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows start .. start+BN-1 of a contiguous key range ending before `end` -> (row ids, mask, rows [BN, BD])."""
    o_n = start + tl.arange(0, BLOCK_N)
    m_n = o_n < end
    return o_n, m_n, load_rows(P_ROWS, o_n, stride_row, o_d, m_n, m_d, UPCAST)


@triton.jit
def picked_block(P_IDX, start, K, P_ROWS, stride_row, o_d, m_d, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Picks start .. start+BN-1 of a top-k list (-1 = none) -> (entry ids, mask, gathered rows [BN, BD])."""
    o_k = start + tl.arange(0, BLOCK_N)
    b_idx = tl.load(P_IDX + o_k, mask=o_k < K, other=-1)
    m_n = b_idx >= 0
    o_n = tl.maximum(b_idx, 0)
    return o_n, m_n, load_rows(P_ROWS, o_n, stride_row, o_d, m_n, m_d, UPCAST)


@triton.jit
def _segment_sum_kernel(
    G, OFFSETS, SLOTS, DCKV, N, TK, ACCUMULATE,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Sparse dK=V, step 2: entry i of batch b sums the rows G[b, slot] for the slots listed in
    SLOTS[OFFSETS[b*N+i] : OFFSETS[b*N+i+1]] (the picks of entry i, in query order: the inverse index),
    in that fixed order, and stores (ACCUMULATE=0) or adds (1) the sum to DCKV[b, i]."""
    i_n = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    first = tl.load(OFFSETS + i_b * N + i_n)
    last = tl.load(OFFSETS + i_b * N + i_n + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(first, last, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < last
        b_slot = tl.load(SLOTS + o_r, mask=m_r, other=0).to(tl.int64)
        b_g = tl.load(G + (i_b * TK + b_slot[:, None]) * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :],
                      other=0.0)
        acc += tl.sum(b_g, axis=0)
    p_out = DCKV + (i_b * N + i_n) * D + o_d
    if ACCUMULATE:
        acc += tl.load(p_out, mask=m_d, other=0.0)
    tl.store(p_out, acc, mask=m_d)


def inverse_index(idx: torch.Tensor, num_entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (batch, entry): the pick slots (t * k + j, t counted within idx) that chose it, in query
    order -> CSR (offsets [B*N+1] int32, slots int32)."""
    batch, seq_len, k = idx.shape
    entry = idx.long() + torch.arange(batch, device=idx.device)[:, None, None] * num_entries
    slot = torch.arange(seq_len * k, device=idx.device).view(1, seq_len, k).expand(batch, -1, -1)
    valid = idx >= 0
    entry, slot = entry[valid], slot[valid]
    order = torch.sort(entry * (seq_len * k) + slot).indices  # entry-major, then query order
    counts = torch.bincount(entry, minlength=batch * num_entries)
    offsets = torch.zeros(batch * num_entries + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, slot[order].to(torch.int32).contiguous()


def sum_per_entry(per_pick: torch.Tensor, picks: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """Deterministic scatter-add: out[b, e] (=, or += when accumulate) the sum of per_pick[b, t, j] over the picks
    (t, j) with picks[b, t, j] = e, in query order. per_pick [B, T, k, W] fp32, picks [B, T, k], out [B, N, W] fp32."""
    batch, n_entries, width = out.shape
    if n_entries == 0:
        return
    offsets, slots = inverse_index(picks, n_entries)
    _segment_sum_kernel[(n_entries, batch)](per_pick, offsets, slots, out, n_entries, picks.shape[1] * picks.shape[2],
                                            int(accumulate), D=width, BLOCK_D=max(16, triton.next_power_of_2(width)),
                                            BLOCK_R=16)
