"""One forward step of the decoder over new tokens, reading and extending the KV cache.

    logits = forward_step(model, cache, input_ids)     # input_ids [B, T] -> logits [B, T, vocab]

Every sequence continues at its own length (cache.lengths). A step of T > 1 tokens (prefill, or a prompt
appended after decoding) needs every sequence at the same length; a step of one token (decode) does not.
The layers run the model's own projections (V4Attention.queries / kv_rows / project_out, the compressor's
project / pool_groups, the indexer's queries / head_weights) and the same attention and top-k ops as training,
with per-query ranges over the rows the cache supplies, so the result equals the full forward's: tested at every
group and window boundary in tests/test_inference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.attention import DenseAttention, V4Attention
from dsv4.inference.cache import DenseLayerCache, ModelCache, V4LayerCache
from dsv4.ops.indexer import indexer_topk
from dsv4.ops.ranges import AttentionRanges
from dsv4.ops.v4_attention import v4_attention


def forward_step(model, cache: ModelCache, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] continuing each cached sequence -> logits [B, T, vocab]; the cache then holds them too."""
    batch, n_new = input_ids.shape
    if batch != cache.batch:
        raise ValueError(f"forward_step: {batch} sequences for a cache of {cache.batch}")
    if n_new > 1 and bool((cache.lengths != cache.lengths[0]).any()):
        raise ValueError("forward_step: several tokens at once need every sequence at the same length; "
                         "prefill sequences of different lengths one by one and stack their caches")
    start = cache.lengths
    positions = start[:, None] + torch.arange(n_new, device=input_ids.device)  # [B, T]
    x = model.embed(input_ids)
    for block, layer_cache in zip(model.layers, cache.layers):
        h = block.attn_norm(x)
        if isinstance(layer_cache, DenseLayerCache):
            x = x + dense_step(block.attn, layer_cache, h, positions)
        else:
            x = x + v4_step(block.attn, layer_cache, h, positions)
        x = x + block.ffn(block.ffn_norm(x))
    cache.lengths = start + n_new
    return model.head(model.norm(x))


def v4_step(attn: V4Attention, cache: V4LayerCache, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One V4 layer over new tokens x [B, T, d] at positions [B, T] -> its output [B, T, d]."""
    opts, cfg = attn.options, attn.cfg
    q, q_latent = attn.queries(x, positions)
    kv = cache.ring.layout.roundtrip(attn.kv_rows(x, positions))  # [B, T, c] as the ring will hold them
    rows, window_lo, window_hi = _window_rows(cache, kv, positions)
    start, cmp_hi = positions[:, 0], torch.zeros_like(positions)
    if cache.compressor is not None:
        cache.compressor.extend(attn.compressor, attn.rotary, x, start)
        cmp_hi = (positions + 1) // attn.ratio  # entry i is visible once its group has closed
    if cache.indexer is not None:
        cache.indexer.extend(attn.indexer.compressor, attn.rotary, x, start)
    ranges = AttentionRanges(window_lo.int(), window_hi.int(), torch.zeros_like(cmp_hi).int(), cmp_hi.int())
    compressed, topk_idx = _compressed_keys(attn, cache, x, q_latent, positions, ranges)
    out, _ = v4_attention(q, rows, attn.attn_sink, cfg.sliding_window, attn.softmax_scale,
                          compressed_kv=compressed, ratio=attn.ratio, topk_idx=topk_idx, backend=opts.backend,
                          chunk_size=opts.chunk_size, deterministic=opts.deterministic, ranges=ranges)
    return attn.project_out(out, positions)


def _compressed_keys(attn: V4Attention, cache: V4LayerCache, x, q_latent, positions, ranges):
    """The compressed entries the queries read [B, N, c] and, for sparse CSA, each query's picks [B, T, k]
    (None, None before the first entry). A one-token step reads only its k picked entries."""
    if cache.compressor is None or int(cache.compressor.count.max()) == 0:
        return None, None
    opts = attn.options
    if cache.indexer is None or opts.phase != "sparse":  # HCA, or CSA in its dense phases: every visible entry
        return cache.compressor.read_entries(), None
    index_q = attn.indexer.queries(q_latent, attn.rotary, positions)
    topk_idx = indexer_topk(index_q, cache.indexer.read_entries(), attn.indexer.head_weights(x), attn.ratio,
                            attn.cfg.index_topk, backend=opts.backend, chunk_size=opts.chunk_size, ranges=ranges)
    cache.last_topk = topk_idx  # the picks of this step (tests compare them with the full forward's)
    if x.shape[1] == 1:  # decode: read (and, in fp8, dequantize) only the k picked entries, not all N
        return _picked_entries(cache, topk_idx)
    return cache.compressor.read_entries(), topk_idx


def _picked_entries(cache: V4LayerCache, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence: its picked entries [B, k, c] and picks renumbered 0..k-1 (-1 stays "no key")."""
    picks = topk_idx[:, 0]  # [B, k]
    entries = cache.compressor.entries.read(index=picks.clamp(min=0))
    renumbered = torch.arange(picks.shape[1], device=picks.device).expand_as(picks)
    return entries, torch.where(picks >= 0, renumbered, -1)[:, None]


def _window_rows(cache: V4LayerCache, kv: torch.Tensor, positions: torch.Tensor):
    """K=V rows for the new queries: [the ring's W-1 rows before the first new token, in position order | the new
    rows] [B, W-1+T, c], and each query's window [lo, hi] among them. Then the new rows enter the ring."""
    window, n_new = cache.window, kv.shape[1]
    start = positions[:, 0]
    before = start[:, None] + torch.arange(1 - window, 0, device=kv.device)  # [B, W-1] positions
    rows = torch.cat((cache.ring.read(index=before % window), kv), dim=1)
    t = torch.arange(n_new, device=kv.device)[None]  # row of query t: W-1+t; its window starts at row t
    window_lo = torch.maximum(t, (window - 1 - start)[:, None])  # no row before position 0
    window_hi = (window - 1 + t).expand(kv.shape[0], -1)
    keep = min(n_new, window)  # the ring keeps the newest W rows
    cache.ring.write(kv[:, n_new - keep:], positions[:, n_new - keep:] % window)
    return rows, window_lo, window_hi


def dense_step(attn: DenseAttention, cache: DenseLayerCache, x: torch.Tensor, positions: torch.Tensor
               ) -> torch.Tensor:
    """One dense GQA layer over new tokens: append K and V, attend causally over everything cached."""
    batch, n_new, _ = x.shape
    q, k, v = attn.projections(x, positions)
    cache.keys.write(k.flatten(2), positions)
    cache.values.write(v.flatten(2), positions)
    n_keys = int(positions.max()) + 1
    keys = cache.keys.read(n_keys).view(batch, n_keys, attn.n_kv, attn.head_dim)
    values = cache.values.read(n_keys).view(batch, n_keys, attn.n_kv, attn.head_dim)
    visible = torch.arange(n_keys, device=x.device)[None, None, :] <= positions[..., None]  # [B, T, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visible[:, None], enable_gqa=attn.n_kv != attn.n_heads)
    return attn.wo(out.transpose(1, 2).reshape(batch, n_new, -1))
