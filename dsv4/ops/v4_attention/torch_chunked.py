"""Blocked PyTorch path for V4 attention: batched matmuls over query blocks, recomputed in backward.

Queries are cut into blocks of `block` tokens. Every block reads one key matrix, gathered once per block:

    keys(block) = [ band: the raw rows the block's windows reach (band = block + window - 1 rows)
                  | tile: the compressed entries the block may see (dense HCA / dense CSA; empty otherwise)
                  | one zero row, whose logit column is overwritten with the sink (a key with no value) ]

so window, dense entries and sink come out of ONE batched matmul per chunk of blocks, already in one
softmax row (no concatenation). Sparse CSA adds each query's own top-k picks, gathered per query and
concatenated to its row. What a query may not see is masked to -inf from its ranges. K = V: the same
matrix serves as values.

The forward saves only its inputs and output; the backward recomputes each chunk's probabilities (the same
function as the forward) and writes dq, and the key gradients (dS^T q + P^T dO, K = V) back to their rows
with index_add_ (in index order: deterministic on CPU). Blocks are grouped into chunks whose logits hold at
most CHUNK_ELEMENTS elements: cache-sized, because fresh multi-MiB tensors page-fault on first touch (measured
on the 2-core CPU: 4 MiB chunks beat 16-64 MiB ones); peak memory stays linear in S. With dense entries a
chunk also covers at most 1/MIN_CHUNKS of the sequence, because every block of a chunk scores the chunk's
widest entry tile (the causal triangle costs at most 1/MIN_CHUNKS extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.ops.ranges import AttentionRanges

CHUNK_ELEMENTS = 1 << 20  # logits elements per chunk (4 MiB of fp32); tests lower it to force many chunks
MIN_CHUNKS = 8  # with dense entries: the extra work of scoring each chunk's widest tile is at most 1/8


@dataclass
class _Chunk:
    first_block: int
    n_blocks: int
    tile: int  # compressed entries scored per block (dense entries; 0 without)


@dataclass
class _Plan:
    block: int  # queries per block
    band: int  # raw rows per block's band
    band_start: torch.Tensor  # [B, G] first raw row of each block's band
    tile_start: torch.Tensor | None  # [B, G] first entry of each block's tile (dense entries)
    ranges: AttentionRanges  # padded to G * block queries (the padding repeats the last query's ranges)
    chunks: list[_Chunk]


def _block_size(window: int) -> int:
    """Half the window (at least 16): the band is then 1.5 windows, each query scores 1.5x the rows it needs,
    and the matmuls stay large enough to run at speed."""
    return max(16, -(-window // 2))


def _pad_queries(x: torch.Tensor, length: int) -> torch.Tensor:
    """Ranges [B, S] -> [B, length], repeating the last query's."""
    pad = length - x.shape[1]
    return x if pad == 0 else torch.cat((x, x[:, -1:].expand(-1, pad)), dim=1)


def _block_ends(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ranges [B, G * block] -> the values at each block's first and last query, [B, G] each."""
    blocks = x.view(x.shape[0], -1, block)
    return blocks[..., 0], blocks[..., -1]


def _make_plan(ranges: AttentionRanges, q_shape: torch.Size, dense_entries: bool, topk: int) -> _Plan:
    batch, seq_len, n_heads, dim = q_shape
    width = int((ranges.window_hi - ranges.window_lo).max()) + 1  # widest window of any query
    block = _block_size(width)
    n_blocks = -(-seq_len // block)
    padded = AttentionRanges(*(_pad_queries(x.long(), n_blocks * block) for x in (
        ranges.window_lo, ranges.window_hi, ranges.cmp_lo, ranges.cmp_hi)))
    # ranges are non-decreasing in t: a block's first query has the lowest bounds, its last the highest
    band_start, _ = _block_ends(padded.window_lo, block)
    stats = [(_block_ends(padded.window_hi, block)[1] - band_start).amax(0)]  # [G]
    tile_start = None
    if dense_entries:
        tile_start, _ = _block_ends(padded.cmp_lo, block)
        stats.append((_block_ends(padded.cmp_hi, block)[1] - tile_start).clamp(min=0).amax(0))
    stats = torch.stack(stats).tolist()  # the one device-to-host copy of the plan
    band = max(1, max(stats[0]) + 1)
    tiles = stats[1] if dense_entries else [0] * n_blocks

    max_blocks = max(1, -(-n_blocks // MIN_CHUNKS)) if dense_entries else n_blocks
    chunks, g = [], 0
    while g < n_blocks:
        count, tile = 0, 0
        while g + count < n_blocks and count < max_blocks:
            wider = max(tile, tiles[g + count])
            # per query: its logits row (band, tile, sink, picks) over the heads, and its gathered picks
            size = (count + 1) * block * (n_heads * (band + wider + 1 + topk) + topk * dim)
            if count and size > CHUNK_ELEMENTS:
                break
            count, tile = count + 1, wider
        chunks.append(_Chunk(g, count, tile))
        g += count
    return _Plan(block, band, band_start, tile_start, padded, chunks)


def _key_index(plan: _Plan, chunk: _Chunk, n_rows: int, n_entries: int) -> torch.Tensor:
    """Row of `rows` ([raw rows | entries | zero row]) behind every key column of the chunk's blocks -> [B, nb, K]."""
    g0, g1 = chunk.first_block, chunk.first_block + chunk.n_blocks
    device = plan.band_start.device
    zero_row = n_rows + n_entries
    parts = [(plan.band_start[:, g0:g1, None] + torch.arange(plan.band, device=device)).clamp(max=zero_row)]
    if chunk.tile:
        entry = plan.tile_start[:, g0:g1, None] + torch.arange(chunk.tile, device=device)
        parts.append((n_rows + entry).clamp(max=zero_row))
    parts.append(torch.full_like(parts[0][..., :1], zero_row))
    return torch.cat(parts, dim=-1)


def _key_mask(plan: _Plan, chunk: _Chunk) -> torch.Tensor:
    """[B, nb, T, K] True where a query of the chunk may NOT see the key column."""
    g0, nb, t = chunk.first_block, chunk.n_blocks, plan.block
    q0, q1 = g0 * t, (g0 + nb) * t
    device = plan.band_start.device
    r = plan.ranges
    shape = (-1, nb, t, 1)
    row = (plan.band_start[:, g0:g0 + nb, None] + torch.arange(plan.band, device=device))[:, :, None, :]
    hidden = [(row < r.window_lo[:, q0:q1].view(shape)) | (row > r.window_hi[:, q0:q1].view(shape))]
    if chunk.tile:
        entry = (plan.tile_start[:, g0:g0 + nb, None] + torch.arange(chunk.tile, device=device))[:, :, None, :]
        hidden.append((entry < r.cmp_lo[:, q0:q1].view(shape)) | (entry >= r.cmp_hi[:, q0:q1].view(shape)))
    hidden.append(torch.zeros_like(hidden[0][..., :1]))  # the sink is always there
    return torch.cat(hidden, dim=-1)


@dataclass
class _ChunkProbs:
    keys: torch.Tensor  # [B*nb, K, D] the blocks' key (= value) rows
    key_index: torch.Tensor  # [B, nb, K] their rows in `rows` viewed [B * (R + N + 1), D]
    picked: torch.Tensor | None  # [B*Q, k, D] sparse picks per query
    pick_index: torch.Tensor | None  # [B, Q, k] (rows of the same flat view)
    probs: torch.Tensor  # [B, Q, H, K (+ k)] the joint softmax (sink column at K-1)
    q_scaled: torch.Tensor  # [B, Q, H, D] fp32 q * softmax_scale (queries padded to whole blocks)
    logits: torch.Tensor  # [B, Q, H, K (+ k)] what the softmax was taken of


def _chunk_probs(plan: _Plan, chunk: _Chunk, q: torch.Tensor, rows: torch.Tensor, sink: torch.Tensor,
                 topk_idx: torch.Tensor | None, n_rows: int, n_entries: int, softmax_scale: float) -> _ChunkProbs:
    """Probabilities of one chunk's queries over their keys, from the inputs (forward and recompute alike)."""
    batch, seq_len, n_heads, dim = q.shape
    t, nb = plan.block, chunk.n_blocks
    q0 = chunk.first_block * t
    n_q = nb * t
    q_chunk = q[:, q0:q0 + n_q]
    q_scaled = _pad_to(q_chunk.float() * softmax_scale, n_q)  # [B, Q, H, D]
    flat_rows = rows.view(-1, dim)  # gathers by index_select: whole rows, far faster than advanced indexing
    batch_offset = torch.arange(batch, device=q.device)[:, None, None] * rows.shape[1]
    key_index = _key_index(plan, chunk, n_rows, n_entries) + batch_offset  # [B, nb, K] rows of flat_rows
    keys = flat_rows.index_select(0, key_index.view(-1)).view(batch * nb, -1, dim)  # [B*nb, K, D]
    n_keys = keys.shape[1]
    logits = torch.bmm(q_scaled.view(batch * nb, t * n_heads, dim), keys.transpose(1, 2))
    logits = logits.view(batch, nb, t, n_heads, n_keys)
    logits[..., -1] = sink.float()  # the zero row's column carries the sink logit
    logits.masked_fill_(_key_mask(plan, chunk)[:, :, :, None, :], float("-inf"))
    logits = logits.view(batch, n_q, n_heads, n_keys)
    picked = pick_index = None
    if topk_idx is not None:
        picks = _pad_to(topk_idx[:, q0:q0 + n_q], n_q, value=-1)  # [B, Q, k]
        pick_index = n_rows + picks.clamp(min=0) + batch_offset  # [B, Q, k] rows of flat_rows
        picked = flat_rows.index_select(0, pick_index.view(-1)).view(batch * n_q, -1, dim)  # [B*Q, k, D]
        pick_logits = torch.bmm(q_scaled.view(batch * n_q, n_heads, dim), picked.transpose(1, 2))
        pick_logits = pick_logits.view(batch, n_q, n_heads, -1).masked_fill_((picks < 0)[:, :, None, :],
                                                                             float("-inf"))
        logits = torch.cat((logits, pick_logits), dim=-1)
    return _ChunkProbs(keys, key_index, picked, pick_index, torch.softmax(logits, dim=-1), q_scaled, logits)


def _pad_to(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """x [B, T, ...] -> [B, length, ...], padded with `value` (queries beyond S in the last block)."""
    pad = length - x.shape[1]
    return x if pad == 0 else F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value)


def _log_sum_exp(c: _ChunkProbs, sink: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[B, Q, H] log-sum-exp of each softmax row, from the sink's probability p = exp(sink - lse): no pass over
    the row. Where p is too small to trust (sink more than ~69 below the largest logit), from the largest
    logit m and its probability exp(m - lse) >= 1 / row length instead."""
    p_sink = c.probs[..., n_keys - 1]
    lse = sink.float() - torch.log(p_sink)
    tiny = p_sink < 1e-30
    if tiny.any():
        p_top, column = c.probs[tiny].max(dim=-1)
        lse[tiny] = c.logits[tiny].gather(-1, column[:, None])[:, 0] - torch.log(p_top)
    return lse


def _rows(kv: torch.Tensor, compressed_kv: torch.Tensor | None) -> torch.Tensor:
    """[B, R + N + 1, D] fp32: raw rows, compressed entries, one zero row (the sink's key; out-of-range columns)."""
    parts = [kv.float()]
    if compressed_kv is not None:
        parts.append(compressed_kv.float())
    parts.append(kv.new_zeros(kv.shape[0], 1, kv.shape[2], dtype=torch.float32))
    return torch.cat(parts, dim=1)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sink, compressed_kv, topk_idx, plan: _Plan, softmax_scale: float):
        batch, seq_len, n_heads, dim = q.shape
        n_rows, n_entries = kv.shape[1], 0 if compressed_kv is None else compressed_kv.shape[1]
        rows = _rows(kv, compressed_kv)
        out = q.new_empty(batch, seq_len, n_heads, dim)
        lse = torch.empty(batch, seq_len, n_heads, dtype=torch.float32, device=q.device)
        t = plan.block
        for chunk in plan.chunks:
            c = _chunk_probs(plan, chunk, q, rows, sink, topk_idx, n_rows, n_entries, softmax_scale)
            n_keys, nb = c.keys.shape[1], chunk.n_blocks
            n_q = nb * t
            probs_blocks = c.probs[..., :n_keys].reshape(batch * nb, t * n_heads, n_keys)
            chunk_out = torch.bmm(probs_blocks, c.keys).view(batch, n_q, n_heads, dim)
            if c.picked is not None:
                probs_picks = c.probs[..., n_keys:].reshape(batch * n_q, n_heads, -1)
                chunk_out += torch.bmm(probs_picks, c.picked).view(batch, n_q, n_heads, dim)
            q0 = chunk.first_block * t
            keep = min(n_q, seq_len - q0)
            out[:, q0:q0 + keep] = chunk_out[:, :keep]
            lse[:, q0:q0 + keep] = _log_sum_exp(c, sink, n_keys)[:, :keep]
        ctx.save_for_backward(q, kv, sink, compressed_kv, topk_idx, out)
        ctx.plan, ctx.softmax_scale = plan, softmax_scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, kv, sink, compressed_kv, topk_idx, out = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.softmax_scale
        batch, seq_len, n_heads, dim = q.shape
        n_rows, n_entries = kv.shape[1], 0 if compressed_kv is None else compressed_kv.shape[1]
        rows = _rows(kv, compressed_kv)
        d_rows = torch.zeros_like(rows).view(-1, dim)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        d_sink = torch.zeros(n_heads, dtype=torch.float32, device=q.device)
        t = plan.block
        for chunk in plan.chunks:
            c = _chunk_probs(plan, chunk, q, rows, sink, topk_idx, n_rows, n_entries, scale)
            n_keys, nb = c.keys.shape[1], chunk.n_blocks
            n_q = nb * t
            q0 = chunk.first_block * t
            keep = min(n_q, seq_len - q0)
            d_o_chunk = d_out[:, q0:q0 + keep].float()
            d_o = _pad_to(d_o_chunk, n_q).contiguous()  # [B, Q, H, D]
            delta = _pad_to((d_o_chunk * out[:, q0:q0 + keep].float()).sum(-1), n_q)  # [B, Q, H]: rowsum(dO O)
            d_sink -= (c.probs[..., n_keys - 1] * delta).sum((0, 1))
            # block keys: dS = P (dP - delta); dq = dS k; d key = dS^T q + P^T dO (K = V)
            probs = c.probs[..., :n_keys].reshape(batch * nb, t * n_heads, n_keys)
            d_o_blocks = d_o.view(batch * nb, t * n_heads, dim)
            d_scores = torch.bmm(d_o_blocks, c.keys.transpose(1, 2))
            d_scores.sub_(delta.view(batch * nb, t * n_heads, 1)).mul_(probs)
            dq_chunk = torch.bmm(d_scores, c.keys).view(batch, n_q, n_heads, dim)
            d_keys = torch.bmm(d_scores.transpose(1, 2), c.q_scaled.view(batch * nb, t * n_heads, dim))
            d_keys.baddbmm_(probs.transpose(1, 2), d_o_blocks)
            d_rows.index_add_(0, c.key_index.view(-1), d_keys.view(-1, dim))
            if c.picked is not None:
                probs_p = c.probs[..., n_keys:].reshape(batch * n_q, n_heads, -1)
                d_o_q = d_o.view(batch * n_q, n_heads, dim)
                d_scores_p = torch.bmm(d_o_q, c.picked.transpose(1, 2))
                d_scores_p.sub_(delta.view(batch * n_q, n_heads, 1)).mul_(probs_p)
                dq_chunk += torch.bmm(d_scores_p, c.picked).view(batch, n_q, n_heads, dim)
                d_picked = torch.bmm(d_scores_p.transpose(1, 2), c.q_scaled.view(batch * n_q, n_heads, dim))
                d_picked.baddbmm_(probs_p.transpose(1, 2), d_o_q)
                d_rows.index_add_(0, c.pick_index.view(-1), d_picked.view(-1, dim))
            torch.mul(dq_chunk[:, :keep], scale, out=dq[:, q0:q0 + keep])
        d_rows = d_rows.view(batch, -1, dim)
        d_kv = d_rows[:, :n_rows].to(kv.dtype)
        d_cmp = None if compressed_kv is None else d_rows[:, n_rows:n_rows + n_entries].to(compressed_kv.dtype)
        return dq.to(q.dtype), d_kv, d_sink.to(sink.dtype), d_cmp, None, None, None


def v4_attention_chunked(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    ranges: AttentionRanges,
    compressed_kv: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `dsv4.ops.v4_attention.v4_attention`; see there for shapes. chunk_size is not used: the
    chunks come from the memory budget CHUNK_ELEMENTS (results do not depend on either)."""
    dense_entries = compressed_kv is not None and topk_idx is None
    topk = 0 if topk_idx is None or compressed_kv is None else topk_idx.shape[-1]
    if compressed_kv is None:
        topk_idx = None
    plan = _make_plan(ranges, q.shape, dense_entries, topk)
    return _BlockedAttention.apply(q, kv, sink, compressed_kv, topk_idx, plan, softmax_scale)

