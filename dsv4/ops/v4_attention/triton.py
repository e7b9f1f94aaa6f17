"""Triton kernels for V4 attention: window + (dense visible | top-k) compressed entries + sink, fwd and bwd.

One program owns one query t of one batch row and a block of heads: all H heads share every K=V row
they read (MQA), so heads sit on the matrix unit's M dimension and each gathered row is used H times.
The program walks three key sets in one online softmax:
  1. the window: raw rows max(0, t-window+1) .. t (contiguous, no index list),
  2. compressed entries: MODE 1 (HCA / dense CSA) rows 0 .. (t+1)//ratio - 1 of `ckv`,
                         MODE 2 (sparse CSA) rows idx[t, :k] of `ckv` (-1 = no key),
  3. the sink: one extra logit per head with a zero value.
Forward saves the log-sum-exp; backward recomputes P from it (flash-attention style).

dK=V has two paths: "atomic" (the dq program adds its rows' gradients with fp32 atomics: fast, order
not fixed) and "deterministic" (every sum in a fixed order; the default):
  - window rows: one program per K=V row block gathers the queries that read it (a contiguous range);
  - dense entries (HCA, dense CSA): the same, with the readers (every later query) split into segments
    of DK_SEGMENT_QUERIES, one program each, partial sums added in segment order;
  - top-k picks: per query chunk, one program per query writes the gradient each of its picks sends
    (heads summed: q and dO read once, rows gathered as in the forward), then one program per entry sums
    its picks in query order through the inverse index of the picks (CSR). Working memory of both
    splits is bounded by DK_BUFFER_BYTES.

Kernel naming follows the house style: b_ block values, p_ pointers, o_ offsets, m_ masks, i_ program ids.
Inputs are loaded and upcast to fp32 when UPCAST (always under TRITON_INTERPRET, whose bf16 is wrong),
otherwise dots run on the input dtype with fp32 accumulation. Configs are pinned (no autotune), so every
rank runs the same kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.ranges import reader_ranges
from dsv4.ops.triton_common import (
    DOT_PRECISION,
    INTERPRET,
    load_rows,
    new_output,
    picked_block,
    range_block,
    sum_per_entry,
)


@triton.jit
def _query_program(H, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (S * head blocks, B) -> query t, batch b (int64), head offsets + mask, channel offsets + mask.
    The head blocks of one query are consecutive programs, so they run together and the K=V rows the
    first one gathers are still in L2 for the others."""
    n_hb = tl.cdiv(H, BLOCK_H)
    i_th = tl.program_id(0)
    i_t = i_th // n_hb
    i_b = tl.program_id(1).to(tl.int64)
    o_h = (i_th % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    return i_t, i_b, o_h, o_h < H, o_d, o_d < D


@triton.jit
def _fwd_block(b_q, b_k, m_n, m_i, l_i, acc, scale):
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale  # [BH, BN]
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
    alpha = tl.exp(m_i - m_new)
    b_p = tl.exp(b_s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, KV, CKV, IDX, SINK, OUT, LSE, WLO, WHI, CLO, CHI,
    stride_qb, stride_qs, stride_qh, stride_kvb, stride_kvs, stride_cb, stride_cs, stride_ib, stride_is,
    S, H, N, K, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, UPCAST: tl.constexpr,
):
    i_t, i_b, o_h, m_h, o_d, m_d = _query_program(H, D, BLOCK_D, BLOCK_H)
    p_q = Q + i_b * stride_qb + i_t.to(tl.int64) * stride_qs
    b_q = load_rows(p_q, o_h, stride_qh, o_d, m_h, m_d, UPCAST)  # [BH, BD]

    p_range = i_b * S + i_t
    w_lo, w_hi = tl.load(WLO + p_range), tl.load(WHI + p_range)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # 1. window rows (the query's own row is always one: m_i is finite after this loop)
    for start in range(w_lo, w_hi + 1, BLOCK_N):
        _, m_n, b_k = range_block(KV + i_b * stride_kvb, start, w_hi + 1, stride_kvs, o_d, m_d, UPCAST, BLOCK_N)
        m_i, l_i, acc = _fwd_block(b_q, b_k, m_n, m_i, l_i, acc, scale)
    # 2. compressed entries
    if MODE == 1:
        c_lo, c_hi = tl.load(CLO + p_range), tl.load(CHI + p_range)
        for start in range(c_lo, c_hi, BLOCK_N):
            _, m_n, b_k = range_block(CKV + i_b * stride_cb, start, c_hi, stride_cs, o_d, m_d, UPCAST, BLOCK_N)
            m_i, l_i, acc = _fwd_block(b_q, b_k, m_n, m_i, l_i, acc, scale)
    if MODE == 2:
        p_idx = IDX + i_b * stride_ib + i_t.to(tl.int64) * stride_is
        for start in range(0, K, BLOCK_N):
            _, m_n, b_k = picked_block(p_idx, start, K, CKV + i_b * stride_cb, stride_cs, o_d, m_d, UPCAST, BLOCK_N)
            m_i, l_i, acc = _fwd_block(b_q, b_k, m_n, m_i, l_i, acc, scale)
    # 3. the sink: a logit per head, no value
    b_sink = tl.load(SINK + o_h, mask=m_h, other=0.0).to(tl.float32)
    m_new = tl.maximum(m_i, b_sink)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.exp(b_sink - m_new)
    acc = acc * alpha[:, None]
    b_o = acc / l_i[:, None]
    p_o = OUT + i_b * stride_qb + i_t.to(tl.int64) * stride_qs + o_h[:, None] * stride_qh + o_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_h[:, None] & m_d[None, :])
    p_lse = LSE + (i_b * S + i_t) * H + o_h
    tl.store(p_lse, m_new + tl.log(l_i), mask=m_h)


@triton.jit
def _bwd_block(b_q, b_do, b_lse, b_delta, b_k, m_n, o_n, dq, p_dk_base, stride_dk, o_d, m_d, scale,
               ATOMIC: tl.constexpr):
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale  # [BH, BN]
    b_p = tl.exp(b_s - b_lse[:, None])
    b_p = tl.where(m_n[None, :], b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BH, BN]   (V = K)
    b_ds = b_p * (b_dp - b_delta[:, None])
    dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION) * scale
    if ATOMIC:  # this K=V row is a key (ds) and a value (p)
        b_dk = tl.dot(tl.trans(b_p.to(b_q.dtype)), b_do, input_precision=DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION) * scale
        p_dk = p_dk_base + o_n.to(tl.int64)[:, None] * stride_dk + o_d[None, :]
        tl.atomic_add(p_dk, b_dk, mask=m_n[:, None] & m_d[None, :])
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, KV, CKV, IDX, DO, LSE, DELTA, DQ, DKV, DCKV, WLO, WHI, CLO, CHI,
    stride_qb, stride_qs, stride_qh, stride_kvb, stride_kvs, stride_cb, stride_cs, stride_ib, stride_is,
    S, SKV, H, N, K, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr,
):
    i_t, i_b, o_h, m_h, o_d, m_d = _query_program(H, D, BLOCK_D, BLOCK_H)
    row = i_b * stride_qb + i_t.to(tl.int64) * stride_qs
    b_q = load_rows(Q + row, o_h, stride_qh, o_d, m_h, m_d, UPCAST)
    b_do = load_rows(DO + row, o_h, stride_qh, o_d, m_h, m_d, UPCAST)
    p_stat = (i_b * S + i_t) * H + o_h
    b_lse = tl.load(LSE + p_stat, mask=m_h, other=0.0)
    b_delta = tl.load(DELTA + p_stat, mask=m_h, other=0.0)
    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # dK=V buffers are fp32 [B, SKV, D] and [B, N, D], contiguous
    p_dkv = DKV + i_b * SKV * D
    p_dckv = DCKV + i_b * N * D
    p_range = i_b * S + i_t
    w_lo, w_hi = tl.load(WLO + p_range), tl.load(WHI + p_range)
    for start in range(w_lo, w_hi + 1, BLOCK_N):
        o_n, m_n, b_k = range_block(KV + i_b * stride_kvb, start, w_hi + 1, stride_kvs, o_d, m_d, UPCAST, BLOCK_N)
        dq = _bwd_block(b_q, b_do, b_lse, b_delta, b_k, m_n, o_n, dq, p_dkv, D, o_d, m_d, scale, ATOMIC)
    if MODE == 1:
        c_lo, c_hi = tl.load(CLO + p_range), tl.load(CHI + p_range)
        for start in range(c_lo, c_hi, BLOCK_N):
            o_n, m_n, b_k = range_block(CKV + i_b * stride_cb, start, c_hi, stride_cs, o_d, m_d, UPCAST, BLOCK_N)
            dq = _bwd_block(b_q, b_do, b_lse, b_delta, b_k, m_n, o_n, dq, p_dckv, D, o_d, m_d, scale, ATOMIC)
    if MODE == 2:
        p_idx = IDX + i_b * stride_ib + i_t.to(tl.int64) * stride_is
        for start in range(0, K, BLOCK_N):
            o_n, m_n, b_k = picked_block(p_idx, start, K, CKV + i_b * stride_cb, stride_cs, o_d, m_d, UPCAST,
                                          BLOCK_N)
            dq = _bwd_block(b_q, b_do, b_lse, b_delta, b_k, m_n, o_n, dq, p_dckv, D, o_d, m_d, scale, ATOMIC)
    p_dq = DQ + row + o_h[:, None] * stride_qh + o_d[None, :]
    tl.store(p_dq, dq.to(DQ.dtype.element_ty), mask=m_h[:, None] & m_d[None, :])


@triton.jit
def _dk_from_query(b_k, m_n, visible, Q, DO, LSE, DELTA, i_b, t, stride_qb, stride_qs, stride_qh, S, H,
                   o_d, m_d, scale, dk, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):
    """Add query t's (all heads) gradient on the K=V rows b_k [BN, BD] (visible: [BN] mask)."""
    t = i_b * 0 + t  # int64 (i_b is), whether t is a loop counter or a loaded value
    row = i_b * stride_qb + t * stride_qs
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_q = load_rows(Q + row, o_h, stride_qh, o_d, m_h, m_d, UPCAST)
        b_do = load_rows(DO + row, o_h, stride_qh, o_d, m_h, m_d, UPCAST)
        p_stat = (i_b * S + t) * H + o_h
        b_lse = tl.load(LSE + p_stat, mask=m_h, other=0.0)
        b_delta = tl.load(DELTA + p_stat, mask=m_h, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale
        b_p = tl.where(visible[None, :] & m_h[:, None], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        dk += tl.dot(tl.trans(b_p.to(b_q.dtype)), b_do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION) * scale
    return dk


@triton.jit
def _attn_bwd_dk_ranged_kernel(
    Q, KEYS, DO, LSE, DELTA, DKEYS, LO, HI, RFIRST, RLAST,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
    S, NK, H, SEG_LEN, scale,
    HI_EXCLUSIVE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Deterministic d(rows) j0..j0+BN-1 of KEYS (raw rows: [LO, HI] per query; dense entries: [LO, HI)):
    the queries that read the block are RFIRST..RLAST of the block (ranges are monotone in t). Program
    (block, segment, batch) takes the readers in queries seg*SEG_LEN .. (seg+1)*SEG_LEN-1 and writes its
    partial sum to DKEYS[seg, b] (a reader span of a whole sequence would leave most of the GPU idle)."""
    i_n, i_seg = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n, m_n, b_k = range_block(KEYS + i_b * stride_kb, i_n * BLOCK_N, NK, stride_ks, o_d, m_d, UPCAST, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_blocks = tl.cdiv(NK, BLOCK_N)
    t_first = tl.maximum(tl.load(RFIRST + i_b * n_blocks + i_n), i_seg * SEG_LEN)
    t_last = tl.minimum(tl.load(RLAST + i_b * n_blocks + i_n), i_seg * SEG_LEN + SEG_LEN - 1)
    for t in range(t_first, t_last + 1):
        lo = tl.load(LO + i_b * S + t)
        hi = tl.load(HI + i_b * S + t)
        if HI_EXCLUSIVE:
            visible = m_n & (o_n >= lo) & (o_n < hi)
        else:
            visible = m_n & (o_n >= lo) & (o_n <= hi)
        dk = _dk_from_query(b_k, m_n, visible, Q, DO, LSE, DELTA, i_b, t, stride_qb, stride_qs, stride_qh, S, H,
                            o_d, m_d, scale, dk, BLOCK_H, UPCAST)
    p_dk = DKEYS + ((i_seg * tl.num_programs(2) + i_b) * NK + o_n.to(tl.int64)[:, None]) * D + o_d[None, :]
    tl.store(p_dk, dk, mask=m_n[:, None] & m_d[None, :])


@triton.jit
def _attn_bwd_pick_grad_kernel(
    Q, CKV, IDX, DO, LSE, DELTA, G,
    stride_qb, stride_qs, stride_qh, stride_cb, stride_cs, stride_ib, stride_is,
    S, H, K, T0, T, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Sparse dK=V, step 1: query T0 + program 0 writes, for each of its K picks, the gradient it sends to the
    picked entry (all heads summed) into G[b, t - T0, j, :] (fp32; zeros for -1 picks). The query's q and dO
    are read once per pick block and stay in cache; the picked rows are gathered as in the forward."""
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    t = T0 + i_t
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_idx = IDX + i_b * stride_ib + t.to(tl.int64) * stride_is
    p_g = G + ((i_b * T + i_t) * K).to(tl.int64) * D
    for start in range(0, K, BLOCK_N):
        o_n, m_n, b_k = picked_block(p_idx, start, K, CKV + i_b * stride_cb, stride_cs, o_d, m_d, UPCAST, BLOCK_N)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dk = _dk_from_query(b_k, m_n, m_n, Q, DO, LSE, DELTA, i_b, t, stride_qb, stride_qs, stride_qh, S, H,
                            o_d, m_d, scale, dk, BLOCK_H, UPCAST)
        o_j = start + tl.arange(0, BLOCK_N)
        tl.store(p_g + o_j.to(tl.int64)[:, None] * D + o_d[None, :], dk, mask=(o_j < K)[:, None] & m_d[None, :])


# ------------------------------------------------------------------------------------------ launchers

# Tuning hook for benchmarks/attention_core.py: kernel group ("fwd", "dq", "dk") -> entries that replace the
# pinned ones (BLOCK_H, BLOCK_N, num_warps, num_stages). Empty in training, so every rank runs the same kernels.
LAUNCH_OVERRIDES: dict[str, dict] = {}


# what --tune may set (BLOCK_D is not one: it follows the head dimension, and a smaller one would skip dimensions)
LAUNCH_KEYS = ("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "num_ctas", "maxnreg")


def parse_launch_overrides(items: list[str]) -> dict[str, dict]:
    """["fwd:BLOCK_H=64,num_warps=8", ...] -> {"fwd": {"BLOCK_H": 64, "num_warps": 8}} (for LAUNCH_OVERRIDES).
    ValueError naming the item for a malformed one, an unknown key or a value that is not an integer >= 1 (a power
    of 2 for the BLOCK_ sizes: tl.arange needs one)."""
    out: dict[str, dict] = {}
    for item in items:
        group, _, settings = item.partition(":")
        if group not in ("fwd", "dq", "dk") or not settings:
            raise ValueError(f"launch override {item!r}: expected fwd|dq|dk:KEY=VALUE[,KEY=VALUE]")
        out[group] = {}
        for setting in settings.split(","):
            key, sep, value = setting.partition("=")
            if not sep:
                raise ValueError(f"launch override {item!r}: {setting!r} is not KEY=VALUE")
            if key not in LAUNCH_KEYS:
                raise ValueError(f"launch override {item!r}: unknown key {key!r} (choose from "
                                 f"{', '.join(LAUNCH_KEYS)})")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"launch override {item!r}: {key}={value} is not an integer >= 1")
            if key.startswith("BLOCK_") and int(value) & (int(value) - 1):
                raise ValueError(f"launch override {item!r}: {key}={value} is not a power of 2")
            out[group][key] = int(value)
    return out


def _config(q: torch.Tensor, dim: int, group: str = "fwd") -> dict:
    """Pinned launch configuration (identical on every rank: no autotuning)."""
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16 on GPUs
    pinned = dict(D=dim, BLOCK_D=block_d, BLOCK_H=16, BLOCK_N=16 if block_d >= 256 else 32,
                  UPCAST=INTERPRET or q.dtype == torch.float32)
    return {**pinned, **LAUNCH_OVERRIDES.get(group, {})}


def _mode(ckv, idx) -> int:
    return 0 if ckv is None else (2 if idx is not None else 1)


def attention_fwd(q, kv, ckv, idx, sink, ranges: tuple, scale: float):
    """-> out [B, S, H, D] (q.dtype), lse [B, S, H] fp32. ranges = (window_lo, window_hi, cmp_lo, cmp_hi),
    each [B, S] int32 contiguous. See dsv4.ops.v4_attention for shapes."""
    batch, seq_len, n_heads, dim = q.shape
    mode = _mode(ckv, idx)
    ckv_ = ckv if ckv is not None else kv
    idx_ = idx if idx is not None else torch.empty(1, 1, 1, dtype=torch.int32, device=q.device)
    out = new_output(q.shape, q)
    lse = new_output((batch, seq_len, n_heads), q, torch.float32)
    cfg = _config(q, dim)
    grid = (seq_len * triton.cdiv(n_heads, cfg["BLOCK_H"]), batch)
    _attn_fwd_kernel[grid](
        q, kv, ckv_, idx_, sink, out, lse, *ranges,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), ckv_.stride(0), ckv_.stride(1),
        idx_.stride(0), idx_.stride(1),
        seq_len, n_heads, ckv_.shape[1], idx_.shape[-1], scale, MODE=mode, **cfg)
    return out, lse


# Deterministic dK=V working memory: the per-pick gradient buffer of the sparse path and the per-segment
# partial sums of the dense-entry path are each kept under this many bytes (the work is split to fit).
DK_BUFFER_BYTES = 1 << 30
# Readers of a dense compressed entry (every later query) are split into segments of this many queries,
# one program each, so a long sequence keeps the whole GPU busy; partial sums are added in segment order.
DK_SEGMENT_QUERIES = 1024


def _dk_ranged(q, keys, do, lse, delta, lo, hi, hi_exclusive: bool, cfg: dict, scale: float, n_segments: int):
    """Deterministic dK=V of raw rows (window) or dense entries: fp32 [B, NK, D]."""
    batch, seq_len, n_heads, dim = q.shape
    n_keys = keys.shape[1]
    block_n = cfg["BLOCK_N"]
    first, last = reader_ranges(lo, hi - 1 if hi_exclusive else hi, n_keys, block_n)
    seg_len = triton.cdiv(seq_len, n_segments)
    partial = new_output((n_segments, batch, n_keys, dim), q, torch.float32)
    _attn_bwd_dk_ranged_kernel[(triton.cdiv(n_keys, block_n), n_segments, batch)](
        q, keys, do, lse, delta, partial, lo, hi, first, last, q.stride(0), q.stride(1), q.stride(2),
        keys.stride(0), keys.stride(1), seq_len, n_keys, n_heads, seg_len, scale, HI_EXCLUSIVE=hi_exclusive, **cfg)
    return partial[0] if n_segments == 1 else partial.sum(0)  # a fixed-order reduction


def _dk_sparse(q, ckv, idx, do, lse, delta, cfg: dict, scale: float):
    """Deterministic dK=V of top-k picked entries: fp32 [B, N, D]. Query chunks sized to DK_BUFFER_BYTES:
    each writes its per-pick gradients, then every entry sums its picks in query order."""
    batch, seq_len, n_heads, dim = q.shape
    n_entries, k = ckv.shape[1], idx.shape[-1]
    dckv = new_output((batch, n_entries, dim), q, torch.float32)
    chunk = max(1, min(seq_len, DK_BUFFER_BYTES // max(1, batch * k * dim * 4)))
    for t0 in range(0, seq_len, chunk):
        n_q = min(chunk, seq_len - t0)
        grads = new_output((batch, n_q, k, dim), q, torch.float32)
        _attn_bwd_pick_grad_kernel[(n_q, batch)](
            q, ckv, idx, do, lse, delta, grads, q.stride(0), q.stride(1), q.stride(2), ckv.stride(0),
            ckv.stride(1), idx.stride(0), idx.stride(1), seq_len, n_heads, k, t0, n_q, scale, **cfg)
        sum_per_entry(grads, idx[:, t0:t0 + n_q], dckv, accumulate=t0 > 0)
    return dckv


def attention_bwd(do, q, kv, ckv, idx, sink, out, lse, ranges: tuple, scale: float, deterministic: bool = True):
    """-> dq, dkv, dckv (None without ckv), dsink."""
    batch, seq_len, n_heads, dim = q.shape
    n_rows = kv.shape[1]
    window_lo, window_hi, cmp_lo, cmp_hi = ranges
    mode = _mode(ckv, idx)
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, S, H]
    ckv_ = ckv if ckv is not None else kv
    n_entries = ckv_.shape[1]
    idx_ = idx if idx is not None else torch.empty(1, 1, 1, dtype=torch.int32, device=q.device)
    cfg = _config(q, dim, "dq")
    dq = new_output(q.shape, q)
    if deterministic:  # the dq kernel adds nothing; dK=V comes from the fixed-order kernels below
        dkv = dckv = torch.empty(1, dtype=torch.float32, device=q.device)
    else:  # fp32 atomics from the dq kernel
        dkv = torch.zeros((batch, n_rows, dim), dtype=torch.float32, device=q.device)
        dckv = torch.zeros((batch, n_entries, dim), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), ckv_.stride(0), ckv_.stride(1),
               idx_.stride(0), idx_.stride(1))
    grid = (seq_len * triton.cdiv(n_heads, cfg["BLOCK_H"]), batch)
    _attn_bwd_dq_kernel[grid](
        q, kv, ckv_, idx_, do, lse, delta, dq, dkv, dckv, *ranges, *strides,
        seq_len, n_rows, n_heads, n_entries, idx_.shape[-1], scale, MODE=mode, ATOMIC=not deterministic, **cfg)
    if deterministic:
        cfg = _config(q, dim, "dk")
        dkv = _dk_ranged(q, kv, do, lse, delta, window_lo, window_hi, False, cfg, scale, 1)  # window: short spans
        if mode == 1 and n_entries > 0:
            per_segment = batch * n_entries * dim * 4
            n_segments = max(1, min(triton.cdiv(seq_len, DK_SEGMENT_QUERIES), DK_BUFFER_BYTES // per_segment))
            dckv = _dk_ranged(q, ckv, do, lse, delta, cmp_lo, cmp_hi, True, cfg, scale, n_segments)
        if mode == 2 and n_entries > 0:
            dckv = _dk_sparse(q, ckv, idx, do, lse, delta, cfg, scale)
        if ckv is not None and n_entries == 0:
            dckv = torch.zeros_like(ckv, dtype=torch.float32)
    # the sink's logit: d lse_{t,h} / d sink_h = p_sink; dL/dsink_h = -sum_t p_sink(t, h) * delta(t, h)
    dsink = -(torch.exp(sink.float()[None, None, :] - lse) * delta).sum(dim=(0, 1))
    return dq, dkv.to(kv.dtype), (dckv.to(ckv.dtype) if ckv is not None else None), dsink.to(sink.dtype)
