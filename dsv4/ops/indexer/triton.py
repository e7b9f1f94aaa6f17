"""Triton kernels for the lightning indexer and their launchers, used one query chunk at a time (never [B, S, N]
at full size). triton_op.py makes them differentiable custom ops and runs the chunks.

- index scores: I[t, s] = sum_h w[t, h] * relu(q_h[t] . k[s]) for a chunk of queries against the entries they
  may see, with the visibility mask (-inf) applied in the kernel. Heads are reduced inside the kernel, so the
  [T, n_I, N] per-head dots never reach memory. Backward: d index_q, d weights (one program per query block)
  and d index_k (one program per entry block, deterministic).
- dense teacher: mean_h exp(q_h . c_s * scale - lse_h) over every visible entry, again reduced over heads.
- Sparse phase (the KL over each query's own top-k picks): pick scores (the student: index scores of the picked
  entries, gathered in the kernel; backward gives d index_q and d weights per query, and d index_k
  deterministically: per-pick gradients, then each entry sums its picks in query order through the inverse
  index) and the sparse teacher (mean_h exp(q_h . c_pick * scale - lse_h)).
Top-k then runs on the chunk's scores (dsv4.ops.indexer.topk: fixed tie rule).
"""

import torch
import triton
import triton.language as tl

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
def _index_scores_kernel(
    IQ, IK, W, OUT, CLO, CHI, stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_wb, stride_wt,
    T, N, NH, ENTRY0,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    i_n, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_n, m_n, b_k = range_block(IK + i_b * stride_kb, i_n * BLOCK_N, N, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for h in range(NH):
        b_q = load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
        b_w = tl.load(W + i_b * stride_wb + o_t.to(tl.int64) * stride_wt + h, mask=m_t, other=0.0).to(tl.float32)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        acc += b_w[:, None] * tl.maximum(b_z, 0.0)
    b_lo = tl.load(CLO + i_b * T + o_t, mask=m_t, other=0)
    b_hi = tl.load(CHI + i_b * T + o_t, mask=m_t, other=0)
    entry = ENTRY0 + o_n[None, :]
    acc = tl.where((entry >= b_lo[:, None]) & (entry < b_hi[:, None]), acc, float("-inf"))
    p_out = OUT + (i_b * T + o_t.to(tl.int64)[:, None]) * N + o_n[None, :]
    tl.store(p_out, acc, mask=m_t[:, None] & m_n[None, :])


@triton.jit
def _index_scores_bwd_q_kernel(
    IQ, IK, W, DOUT, DQ, DW, stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_wb, stride_wt,
    T, N, NH,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    for h in range(NH):
        b_q = load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
        p_w = W + i_b * stride_wb + o_t.to(tl.int64) * stride_wt + h
        b_w = tl.load(p_w, mask=m_t, other=0.0).to(tl.float32)
        dq = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        dw = tl.zeros([BLOCK_T], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_k = load_rows(IK + i_b * stride_kb, o_n, stride_kn, o_c, m_n, m_c, UPCAST)
            p_g = DOUT + (i_b * T + o_t.to(tl.int64)[:, None]) * N + o_n[None, :]
            b_g = tl.load(p_g, mask=m_t[:, None] & m_n[None, :], other=0.0)
            b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
            dw += tl.sum(b_g * tl.maximum(b_z, 0.0), axis=1)
            b_gz = tl.where(b_z > 0, b_g * b_w[:, None], 0.0)
            dq += tl.dot(b_gz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
        p_dq = DQ + i_b * stride_qb + h * stride_qh + o_t.to(tl.int64)[:, None] * stride_qt + o_c[None, :]
        tl.store(p_dq, dq.to(DQ.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])
        tl.store(DW + i_b * stride_wb + o_t.to(tl.int64) * stride_wt + h, dw, mask=m_t)


@triton.jit
def _index_scores_bwd_k_kernel(
    IQ, IK, W, DOUT, DK, stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_wb, stride_wt,
    T, N, NH,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    i_n, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_n, m_n, b_k = range_block(IK + i_b * stride_kb, i_n * BLOCK_N, N, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        p_g = DOUT + (i_b * T + o_t.to(tl.int64)[:, None]) * N + o_n[None, :]
        b_g = tl.load(p_g, mask=m_t[:, None] & m_n[None, :], other=0.0)
        for h in range(NH):
            b_q = load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
            b_w = tl.load(W + i_b * stride_wb + o_t.to(tl.int64) * stride_wt + h, mask=m_t, other=0.0)
            b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
            b_gz = tl.where(b_z > 0, b_g * b_w.to(tl.float32)[:, None], 0.0)
            dk += tl.dot(tl.trans(b_gz.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION)
    p_dk = DK + i_b * N * C + o_n.to(tl.int64)[:, None] * C + o_c[None, :]
    tl.store(p_dk, dk, mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _teacher_dense_kernel(
    Q, CKV, LSE, OUT, CLO, CHI, stride_qb, stride_qt, stride_qh, stride_cb, stride_cn, stride_lb, stride_lt,
    T, N, H, ENTRY0, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    i_n, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n, m_n, b_k = range_block(CKV + i_b * stride_cb, i_n * BLOCK_N, N, stride_cn, o_d, m_d, UPCAST, BLOCK_N)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for h in range(H):
        b_q = load_rows(Q + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_d, m_t, m_d, UPCAST)
        b_lse = tl.load(LSE + i_b * stride_lb + o_t.to(tl.int64) * stride_lt + h, mask=m_t, other=0.0)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale
        acc += tl.exp(b_z - b_lse[:, None])
    b_lo = tl.load(CLO + i_b * T + o_t, mask=m_t, other=0)
    b_hi = tl.load(CHI + i_b * T + o_t, mask=m_t, other=0)
    entry = ENTRY0 + o_n[None, :]
    acc = tl.where((entry >= b_lo[:, None]) & (entry < b_hi[:, None]), acc / H, 0.0)
    p_out = OUT + (i_b * T + o_t.to(tl.int64)[:, None]) * N + o_n[None, :]
    tl.store(p_out, acc, mask=m_t[:, None] & m_n[None, :])


@triton.jit
def _pick_program(Q, STAT, IDX, stride_qb, stride_qt, stride_sb, stride_st, stride_ib, stride_it,
                  C: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (T, B) -> query t, batch b (int64), channel offsets + mask, and the query's rows of Q, of its per-head
    statistic STAT (indexer weights or the attention's lse) and of its picks IDX."""
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    row = i_t.to(tl.int64)
    return (i_t, i_b, o_c, o_c < C, Q + i_b * stride_qb + row * stride_qt, STAT + i_b * stride_sb + row * stride_st,
            IDX + i_b * stride_ib + row * stride_it)


@triton.jit
def _head_block_dots(row_q, row_stat, h0, NH, stride_qh, o_c, m_c, b_k, UPCAST: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Heads h0 .. h0+BH-1 of one query against gathered rows b_k [BN, BC] -> (q rows [BH, BC], the heads'
    statistic [BH] fp32 (0 past NH), dots [BH, BN], head mask)."""
    o_h = h0 + tl.arange(0, BLOCK_H)
    m_h = o_h < NH
    b_q = load_rows(row_q, o_h, stride_qh, o_c, m_h, m_c, UPCAST)
    b_stat = tl.load(row_stat + o_h, mask=m_h, other=0.0).to(tl.float32)
    return b_q, b_stat, tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION), m_h


@triton.jit
def _pick_reduce_kernel(
    Q, ROWS, STAT, IDX, OUT, stride_qb, stride_qt, stride_qh, stride_rb, stride_rn, stride_sb, stride_st,
    stride_ib, stride_it, T, NH, K, scale,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    TEACHER: tl.constexpr,
):
    """Per query t (one program) and pick j (row r = ROWS[IDX[t, j]]), a reduction over heads:
    student (TEACHER=0): OUT = sum_h w[t, h] * relu(q_h[t] . r), -inf where IDX = -1 (STAT = indexer weights);
    teacher (TEACHER=1): OUT = mean_h exp(q_h[t] . r * scale - lse[t, h]), 0 where IDX = -1 (STAT = lse)."""
    i_t, i_b, o_c, m_c, row_q, row_s, p_idx = _pick_program(Q, STAT, IDX, stride_qb, stride_qt, stride_sb, stride_st,
                                                            stride_ib, stride_it, C, BLOCK_C)
    for start in range(0, K, BLOCK_N):
        o_n, m_n, b_k = picked_block(p_idx, start, K, ROWS + i_b * stride_rb, stride_rn, o_c, m_c, UPCAST, BLOCK_N)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for h0 in range(0, NH, BLOCK_H):
            _, b_s, b_z, m_h = _head_block_dots(row_q, row_s, h0, NH, stride_qh, o_c, m_c, b_k, UPCAST, BLOCK_H)
            if TEACHER:
                acc += tl.sum(tl.where(m_h[:, None], tl.exp(b_z * scale - b_s[:, None]), 0.0), axis=0)
            else:
                acc += tl.sum(b_s[:, None] * tl.maximum(b_z, 0.0), axis=0)
        if TEACHER:
            b_out = tl.where(m_n, acc / NH, 0.0)
        else:
            b_out = tl.where(m_n, acc, float("-inf"))
        o_j = start + tl.arange(0, BLOCK_N)
        tl.store(OUT + (i_b * T + i_t) * K + o_j, b_out, mask=o_j < K)


@triton.jit
def _pick_scores_bwd_q_kernel(
    IQ, IK, W, IDX, DOUT, DQ, DW, stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_wb, stride_wt,
    stride_ib, stride_it, T, NH, K,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """d index_q[t, h] = sum_j g[t, j] w[t, h] [z > 0] k_j;  d w[t, h] = sum_j g[t, j] relu(z[t, h, j])."""
    i_t, i_b, o_c, m_c, row_q, row_w, p_idx = _pick_program(IQ, W, IDX, stride_qb, stride_qt, stride_wb, stride_wt,
                                                            stride_ib, stride_it, C, BLOCK_C)
    p_g = DOUT + (i_b * T + i_t) * K
    for h0 in range(0, NH, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        dq = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        dw = tl.zeros([BLOCK_H], tl.float32)
        for start in range(0, K, BLOCK_N):
            o_n, m_n, b_k = picked_block(p_idx, start, K, IK + i_b * stride_kb, stride_kn, o_c, m_c, UPCAST,
                                          BLOCK_N)
            b_g = tl.load(p_g + start + tl.arange(0, BLOCK_N), mask=m_n, other=0.0)
            _, b_w, b_z, _ = _head_block_dots(row_q, row_w, h0, NH, stride_qh, o_c, m_c, b_k, UPCAST, BLOCK_H)
            dw += tl.sum(b_g[None, :] * tl.maximum(b_z, 0.0), axis=1)
            b_gz = tl.where(b_z > 0, b_g[None, :] * b_w[:, None], 0.0)
            dq += tl.dot(b_gz.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
        m_h = o_h < NH  # DQ and DW are laid out as IQ and W
        p_dq = DQ + i_b * stride_qb + i_t.to(tl.int64) * stride_qt + o_h[:, None] * stride_qh + o_c[None, :]
        tl.store(p_dq, dq.to(DQ.dtype.element_ty), mask=m_h[:, None] & m_c[None, :])
        tl.store(DW + i_b * stride_wb + i_t.to(tl.int64) * stride_wt + o_h, dw, mask=m_h)


@triton.jit
def _pick_scores_bwd_k_kernel(
    IQ, IK, W, IDX, DOUT, GK, stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_wb, stride_wt,
    stride_ib, stride_it, T, NH, K,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """GK[b, t, j, :] = the gradient pick j of query t sends to its entry: sum_h g w_h [z > 0] q_h (fp32)."""
    i_t, i_b, o_c, m_c, row_q, row_w, p_idx = _pick_program(IQ, W, IDX, stride_qb, stride_qt, stride_wb, stride_wt,
                                                            stride_ib, stride_it, C, BLOCK_C)
    p_g = DOUT + (i_b * T + i_t) * K
    for start in range(0, K, BLOCK_N):
        o_n, m_n, b_k = picked_block(p_idx, start, K, IK + i_b * stride_kb, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
        b_g = tl.load(p_g + start + tl.arange(0, BLOCK_N), mask=m_n, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for h0 in range(0, NH, BLOCK_H):
            b_q, b_w, b_z, _ = _head_block_dots(row_q, row_w, h0, NH, stride_qh, o_c, m_c, b_k, UPCAST, BLOCK_H)
            b_gz = tl.where(b_z > 0, b_g[None, :] * b_w[:, None], 0.0)
            dk += tl.dot(tl.trans(b_gz.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION)
        o_j = start + tl.arange(0, BLOCK_N)
        p_gk = GK + ((i_b * T + i_t) * K + o_j.to(tl.int64))[:, None] * C + o_c[None, :]
        tl.store(p_gk, dk, mask=(o_j < K)[:, None] & m_c[None, :])


def _cfg(x: torch.Tensor, width: int) -> dict:
    return dict(BLOCK_T=16, BLOCK_N=32, UPCAST=INTERPRET or x.dtype == torch.float32,
                BLOCK_C=max(16, triton.next_power_of_2(width)), C=width)  # tl.dot: dims >= 16 on GPUs


def index_scores_fwd(index_q, index_k, weights, cmp_lo, cmp_hi, entry0: int) -> torch.Tensor:
    batch, n_q, n_heads, width = index_q.shape
    n_entries = index_k.shape[1]
    out = new_output((batch, n_q, n_entries), index_q, torch.float32)
    cfg = _cfg(index_q, width)
    grid = (triton.cdiv(n_entries, cfg["BLOCK_N"]), triton.cdiv(n_q, cfg["BLOCK_T"]), batch)
    _index_scores_kernel[grid](
        index_q, index_k, weights, out, cmp_lo, cmp_hi, index_q.stride(0), index_q.stride(1), index_q.stride(2),
        index_k.stride(0), index_k.stride(1), weights.stride(0), weights.stride(1),
        n_q, n_entries, n_heads, entry0, **cfg)
    return out




def index_scores_bwd(grad, index_q, index_k, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad must be 0 wherever the forward wrote -inf (masked entries)."""
    batch, n_q, n_heads, width = index_q.shape
    n_entries = index_k.shape[1]
    grad = grad.contiguous()
    cfg = _cfg(index_q, width)
    dq = new_output(index_q.shape, index_q)
    dw = new_output(weights.shape, weights, torch.float32)
    dk = new_output(index_k.shape, index_k, torch.float32)
    strides = (index_q.stride(0), index_q.stride(1), index_q.stride(2), index_k.stride(0), index_k.stride(1),
               weights.stride(0), weights.stride(1))
    _index_scores_bwd_q_kernel[(triton.cdiv(n_q, cfg["BLOCK_T"]), batch)](
        index_q, index_k, weights, grad, dq, dw, *strides, n_q, n_entries, n_heads, **cfg)
    _index_scores_bwd_k_kernel[(triton.cdiv(n_entries, cfg["BLOCK_N"]), batch)](
        index_q, index_k, weights, grad, dk, *strides, n_q, n_entries, n_heads, **cfg)
    return dq, dk.to(index_k.dtype), dw.to(weights.dtype)


def teacher_dense_fwd(q, ckv, lse, cmp_lo, cmp_hi, entry0: int, scale: float) -> torch.Tensor:
    batch, n_q, n_heads, dim = q.shape
    n_entries = ckv.shape[1]
    out = new_output((batch, n_q, n_entries), q, torch.float32)
    cfg = dict(BLOCK_T=16, BLOCK_N=16 if dim >= 256 else 32, UPCAST=INTERPRET or q.dtype == torch.float32,
               BLOCK_D=max(16, triton.next_power_of_2(dim)), D=dim)
    grid = (triton.cdiv(n_entries, cfg["BLOCK_N"]), triton.cdiv(n_q, cfg["BLOCK_T"]), batch)
    _teacher_dense_kernel[grid](
        q, ckv, lse, out, cmp_lo, cmp_hi, q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1),
        lse.stride(0), lse.stride(1), n_q, n_entries, n_heads, entry0, scale, **cfg)
    return out


# ------------------------------------------------------------------------------ sparse phase (top-k picks)

def _pick_cfg(x: torch.Tensor, width: int) -> dict:
    block = max(16, triton.next_power_of_2(width))
    return dict(C=width, BLOCK_C=block, BLOCK_H=16, BLOCK_N=16 if block >= 256 else 32,
                UPCAST=INTERPRET or x.dtype == torch.float32)


def _pick_args(index_q, index_k, weights, picks):
    return (index_q.stride(0), index_q.stride(1), index_q.stride(2), index_k.stride(0), index_k.stride(1),
            weights.stride(0), weights.stride(1), picks.stride(0), picks.stride(1), index_q.shape[1],
            index_q.shape[2], picks.shape[-1])


def pick_scores_fwd(index_q, index_k, weights, picks) -> torch.Tensor:
    batch, n_q, _, width = index_q.shape
    out = new_output((batch, n_q, picks.shape[-1]), index_q, torch.float32)
    args = _pick_args(index_q, index_k, weights, picks)
    _pick_reduce_kernel[(n_q, batch)](index_q, index_k, weights, picks, out, *args, 1.0, TEACHER=False,
                                      **_pick_cfg(index_q, width))
    return out


def pick_scores_bwd(grad, index_q, index_k, weights, picks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_q, _, width = index_q.shape
    n_entries, k = index_k.shape[1], picks.shape[-1]
    grad = grad.contiguous()
    cfg, args = _pick_cfg(index_q, width), _pick_args(index_q, index_k, weights, picks)
    dq = new_output(index_q.shape, index_q)
    dw = new_output(weights.shape, weights, torch.float32)
    _pick_scores_bwd_q_kernel[(n_q, batch)](index_q, index_k, weights, picks, grad, dq, dw, *args, **cfg)
    per_pick = new_output((batch, n_q, k, width), index_q, torch.float32)
    _pick_scores_bwd_k_kernel[(n_q, batch)](index_q, index_k, weights, picks, grad, per_pick, *args, **cfg)
    dk = new_output((batch, n_entries, width), index_k, torch.float32)
    sum_per_entry(per_pick, picks, dk, accumulate=False)  # each entry sums its picks in query order
    return dq, dk.to(index_k.dtype), dw.to(weights.dtype)


def teacher_sparse_fwd(q, ckv, lse, picks, scale: float) -> torch.Tensor:
    batch, n_q, _, dim = q.shape
    out = new_output((batch, n_q, picks.shape[-1]), q, torch.float32)
    _pick_reduce_kernel[(n_q, batch)](q, ckv, lse, picks, out, *_pick_args(q, ckv, lse, picks), float(scale),
                                      TEACHER=True, **_pick_cfg(q, dim))
    return out
