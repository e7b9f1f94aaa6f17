"""Triton kernels for the lightning indexer, used one query chunk at a time (never [B, S, N] at full size).

- `index_scores`: I[t, s] = sum_h w[t, h] * relu(q_h[t] . k[s]) for a chunk of queries against the entries
  they may see, with the causal mask (-inf for s >= (t+1)//ratio) applied in the kernel. Heads are
  reduced inside the kernel, so the [T, n_I, N] per-head dots never reach memory. Differentiable
  (custom op + autograd): backward gives d index_q, d weights (one program per query block) and
  d index_k (one program per entry block, deterministic).
- `teacher_dense`: the KL teacher over every visible entry, mean_h exp(q_h . c_s * scale - lse_h),
  again reduced over heads in the kernel.
- Sparse phase (the KL over each query's own top-k picks): `pick_scores` (the student: index scores of
  the picked entries, gathered in the kernel; backward gives d index_q and d weights per query, and
  d index_k deterministically: per-pick gradients, then each entry sums its picks in query order through
  the inverse index) and `teacher_sparse` (mean_h exp(q_h . c_pick * scale - lse_h)).
Top-k then runs on the chunk's scores (dsv4.ops.indexer.naive.topk_recent_first: fixed tie rule).
"""

import torch
import triton
import triton.language as tl

from dsv4.ops.v4_attention.triton import (
    DOT_PRECISION,
    INTERPRET,
    _load_rows,
    _new,
    _picked_block,
    _range_block,
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
    o_n, m_n, b_k = _range_block(IK + i_b * stride_kb, i_n * BLOCK_N, N, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for h in range(NH):
        b_q = _load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
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
        b_q = _load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
        p_w = W + i_b * stride_wb + o_t.to(tl.int64) * stride_wt + h
        b_w = tl.load(p_w, mask=m_t, other=0.0).to(tl.float32)
        dq = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        dw = tl.zeros([BLOCK_T], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_k = _load_rows(IK + i_b * stride_kb, o_n, stride_kn, o_c, m_n, m_c, UPCAST)
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
    o_n, m_n, b_k = _range_block(IK + i_b * stride_kb, i_n * BLOCK_N, N, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        p_g = DOUT + (i_b * T + o_t.to(tl.int64)[:, None]) * N + o_n[None, :]
        b_g = tl.load(p_g, mask=m_t[:, None] & m_n[None, :], other=0.0)
        for h in range(NH):
            b_q = _load_rows(IQ + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_c, m_t, m_c, UPCAST)
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
    o_n, m_n, b_k = _range_block(CKV + i_b * stride_cb, i_n * BLOCK_N, N, stride_cn, o_d, m_d, UPCAST, BLOCK_N)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for h in range(H):
        b_q = _load_rows(Q + i_b * stride_qb + h * stride_qh, o_t, stride_qt, o_d, m_t, m_d, UPCAST)
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
    b_q = _load_rows(row_q, o_h, stride_qh, o_c, m_h, m_c, UPCAST)
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
        o_n, m_n, b_k = _picked_block(p_idx, start, K, ROWS + i_b * stride_rb, stride_rn, o_c, m_c, UPCAST, BLOCK_N)
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
            o_n, m_n, b_k = _picked_block(p_idx, start, K, IK + i_b * stride_kb, stride_kn, o_c, m_c, UPCAST,
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
        o_n, m_n, b_k = _picked_block(p_idx, start, K, IK + i_b * stride_kb, stride_kn, o_c, m_c, UPCAST, BLOCK_N)
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


def _scores_launch(index_q, index_k, weights, cmp_lo, cmp_hi, entry0: int) -> torch.Tensor:
    batch, n_q, n_heads, width = index_q.shape
    n_entries = index_k.shape[1]
    out = _new((batch, n_q, n_entries), index_q, torch.float32)
    cfg = _cfg(index_q, width)
    grid = (triton.cdiv(n_entries, cfg["BLOCK_N"]), triton.cdiv(n_q, cfg["BLOCK_T"]), batch)
    _index_scores_kernel[grid](
        index_q, index_k, weights, out, cmp_lo, cmp_hi, index_q.stride(0), index_q.stride(1), index_q.stride(2),
        index_k.stride(0), index_k.stride(1), weights.stride(0), weights.stride(1),
        n_q, n_entries, n_heads, entry0, **cfg)
    return out


@torch.library.custom_op("dsv4::index_scores", mutates_args=())
def index_scores_op(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor, cmp_lo: torch.Tensor,
                    cmp_hi: torch.Tensor, entry0: int) -> torch.Tensor:
    return _scores_launch(index_q, index_k, weights, cmp_lo, cmp_hi, entry0)


@index_scores_op.register_fake
def _scores_fake(index_q, index_k, weights, cmp_lo, cmp_hi, entry0):
    return index_q.new_empty((index_q.shape[0], index_q.shape[1], index_k.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dsv4::index_scores_bwd", mutates_args=())
def index_scores_bwd_op(grad: torch.Tensor, index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad must be 0 wherever the forward wrote -inf (masked entries)."""
    batch, n_q, n_heads, width = index_q.shape
    n_entries = index_k.shape[1]
    grad = grad.contiguous()
    cfg = _cfg(index_q, width)
    dq = _new(index_q.shape, index_q)
    dw = _new(weights.shape, weights, torch.float32)
    dk = _new(index_k.shape, index_k, torch.float32)
    strides = (index_q.stride(0), index_q.stride(1), index_q.stride(2), index_k.stride(0), index_k.stride(1),
               weights.stride(0), weights.stride(1))
    _index_scores_bwd_q_kernel[(triton.cdiv(n_q, cfg["BLOCK_T"]), batch)](
        index_q, index_k, weights, grad, dq, dw, *strides, n_q, n_entries, n_heads, **cfg)
    _index_scores_bwd_k_kernel[(triton.cdiv(n_entries, cfg["BLOCK_N"]), batch)](
        index_q, index_k, weights, grad, dk, *strides, n_q, n_entries, n_heads, **cfg)
    return dq, dk.to(index_k.dtype), dw.to(weights.dtype)


@index_scores_bwd_op.register_fake
def _scores_bwd_fake(grad, index_q, index_k, weights):
    return torch.empty_like(index_q), torch.empty_like(index_k), torch.empty_like(weights)


def _scores_setup(ctx, inputs, output):
    index_q, index_k, weights, _, _, _ = inputs  # (ranges and offset need no gradient)
    ctx.save_for_backward(index_q, index_k, weights)


def _scores_backward(ctx, grad):
    index_q, index_k, weights = ctx.saved_tensors
    grad = torch.where(torch.isfinite(grad), grad, 0.0)
    dq, dk, dw = index_scores_bwd_op(grad, index_q, index_k, weights)
    return dq, dk, dw, None, None, None


index_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)


def index_scores(index_q, index_k, weights, ranges, entry0: int = 0) -> torch.Tensor:
    """Scores of a query chunk [B, T, n_I, c_I] against entries entry0 .. entry0+N-1 ([B, N, c_I]) -> [B, T, N]
    fp32, -inf where the chunk's `ranges` (AttentionRanges of these T queries) hide the entry."""
    return index_scores_op(index_q.contiguous(), index_k.contiguous(), weights.float().contiguous(),
                           ranges.cmp_lo.int().contiguous(), ranges.cmp_hi.int().contiguous(), int(entry0))


@torch.library.custom_op("dsv4::teacher_dense", mutates_args=())
def teacher_dense_op(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, cmp_lo: torch.Tensor,
                     cmp_hi: torch.Tensor, entry0: int, scale: float) -> torch.Tensor:
    batch, n_q, n_heads, dim = q.shape
    n_entries = ckv.shape[1]
    out = _new((batch, n_q, n_entries), q, torch.float32)
    cfg = dict(BLOCK_T=16, BLOCK_N=16 if dim >= 256 else 32, UPCAST=INTERPRET or q.dtype == torch.float32,
               BLOCK_D=max(16, triton.next_power_of_2(dim)), D=dim)
    grid = (triton.cdiv(n_entries, cfg["BLOCK_N"]), triton.cdiv(n_q, cfg["BLOCK_T"]), batch)
    _teacher_dense_kernel[grid](
        q, ckv, lse, out, cmp_lo, cmp_hi, q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1),
        lse.stride(0), lse.stride(1), n_q, n_entries, n_heads, entry0, scale, **cfg)
    return out


@teacher_dense_op.register_fake
def _teacher_fake(q, ckv, lse, cmp_lo, cmp_hi, entry0, scale):
    return q.new_empty((q.shape[0], q.shape[1], ckv.shape[1]), dtype=torch.float32)


def teacher_dense(q, ckv, lse, ranges, entry0: int, scale: float) -> torch.Tensor:
    """mean_h exp(q_h . c_s * scale - lse_h) for visible entries (0 elsewhere): [B, T, N] fp32, no grad."""
    return teacher_dense_op(q.detach().contiguous(), ckv.detach().contiguous(), lse.detach().float().contiguous(),
                            ranges.cmp_lo.int().contiguous(), ranges.cmp_hi.int().contiguous(), int(entry0),
                            float(scale))


# ------------------------------------------------------------------------------ sparse phase (top-k picks)

def _pick_cfg(x: torch.Tensor, width: int) -> dict:
    block = max(16, triton.next_power_of_2(width))
    return dict(C=width, BLOCK_C=block, BLOCK_H=16, BLOCK_N=16 if block >= 256 else 32,
                UPCAST=INTERPRET or x.dtype == torch.float32)


def _pick_args(index_q, index_k, weights, picks):
    return (index_q.stride(0), index_q.stride(1), index_q.stride(2), index_k.stride(0), index_k.stride(1),
            weights.stride(0), weights.stride(1), picks.stride(0), picks.stride(1), index_q.shape[1],
            index_q.shape[2], picks.shape[-1])


@torch.library.custom_op("dsv4::pick_scores", mutates_args=())
def pick_scores_op(index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor, picks: torch.Tensor
                   ) -> torch.Tensor:
    batch, n_q, _, width = index_q.shape
    out = _new((batch, n_q, picks.shape[-1]), index_q, torch.float32)
    args = _pick_args(index_q, index_k, weights, picks)
    _pick_reduce_kernel[(n_q, batch)](index_q, index_k, weights, picks, out, *args, 1.0, TEACHER=False,
                                      **_pick_cfg(index_q, width))
    return out


@pick_scores_op.register_fake
def _pick_scores_fake(index_q, index_k, weights, picks):
    return index_q.new_empty((index_q.shape[0], index_q.shape[1], picks.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("dsv4::pick_scores_bwd", mutates_args=())
def pick_scores_bwd_op(grad: torch.Tensor, index_q: torch.Tensor, index_k: torch.Tensor, weights: torch.Tensor,
                       picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_q, _, width = index_q.shape
    n_entries, k = index_k.shape[1], picks.shape[-1]
    grad = grad.contiguous()
    cfg, args = _pick_cfg(index_q, width), _pick_args(index_q, index_k, weights, picks)
    dq = _new(index_q.shape, index_q)
    dw = _new(weights.shape, weights, torch.float32)
    _pick_scores_bwd_q_kernel[(n_q, batch)](index_q, index_k, weights, picks, grad, dq, dw, *args, **cfg)
    per_pick = _new((batch, n_q, k, width), index_q, torch.float32)
    _pick_scores_bwd_k_kernel[(n_q, batch)](index_q, index_k, weights, picks, grad, per_pick, *args, **cfg)
    dk = _new((batch, n_entries, width), index_k, torch.float32)
    sum_per_entry(per_pick, picks, dk, accumulate=False)  # each entry sums its picks in query order
    return dq, dk.to(index_k.dtype), dw.to(weights.dtype)


@pick_scores_bwd_op.register_fake
def _pick_scores_bwd_fake(grad, index_q, index_k, weights, picks):
    return torch.empty_like(index_q), torch.empty_like(index_k), torch.empty_like(weights)


def _pick_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pick_backward(ctx, grad):
    index_q, index_k, weights, picks = ctx.saved_tensors
    dq, dk, dw = pick_scores_bwd_op(grad, index_q, index_k, weights, picks)
    return dq, dk, dw, None


pick_scores_op.register_autograd(_pick_backward, setup_context=_pick_setup)


def pick_scores(index_q, index_k, weights, picks) -> torch.Tensor:
    """Student scores of each query's picks: index_q [B, T, n_I, c_I], index_k [B, N, c_I], weights [B, T, n_I],
    picks [B, T, k] (-1 = none) -> [B, T, k] fp32, -inf at -1 picks. Differentiable in index_q/index_k/weights."""
    return pick_scores_op(index_q.contiguous(), index_k.contiguous(), weights.float().contiguous(),
                          picks.to(torch.int32).contiguous())


@torch.library.custom_op("dsv4::teacher_sparse", mutates_args=())
def teacher_sparse_op(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, picks: torch.Tensor, scale: float
                      ) -> torch.Tensor:
    batch, n_q, _, dim = q.shape
    out = _new((batch, n_q, picks.shape[-1]), q, torch.float32)
    _pick_reduce_kernel[(n_q, batch)](q, ckv, lse, picks, out, *_pick_args(q, ckv, lse, picks), float(scale),
                                      TEACHER=True, **_pick_cfg(q, dim))
    return out


@teacher_sparse_op.register_fake
def _teacher_sparse_fake(q, ckv, lse, picks, scale):
    return q.new_empty((q.shape[0], q.shape[1], picks.shape[-1]), dtype=torch.float32)


def teacher_sparse(q, ckv, lse, picks, scale: float) -> torch.Tensor:
    """mean_h exp(q_h . c_pick * scale - lse_h) per pick: [B, T, k] fp32, 0 at -1 picks, no grad."""
    return teacher_sparse_op(q.detach().contiguous(), ckv.detach().contiguous(), lse.detach().float().contiguous(),
                             picks.to(torch.int32).contiguous(), float(scale))
