"""The KV cache of a DeepSeek V4 decoder: exactly what each layer needs between steps, and no more.

Per V4 layer (../shared/docs/inference.md):
  window        a ring of the last `sliding_window` K=V rows (after kv_norm and RoPE); position p sits in
                slot p % window
  compressor    CSA and HCA: the entries so far (after the compressor's norm and RoPE), plus the open group's
                state in fp32: the projected rows (wkv x) and gate logits (wgate x + ape) of the tokens since the
                last closed group, and for CSA the lookback half of the last closed group (the next entry pools it)
  indexer       CSA: the lightning indexer's compressor, the same structure at index_head_dim (its entries are
                the indexer keys)
Dense baseline layers (compress_ratios -1) keep plain K and V rows of every token.

Sequences of one batch keep their own lengths: there is no padding inside the cache, every sequence's groups start
at its own position 0 (left padding would shift the groups). Rows of a growing buffer beyond a sequence's count
are zeros and are never visible to it.
"""

from __future__ import annotations

import torch

from dsv4.attention import DenseAttention, V4Attention
from dsv4.compressor import Compressor
from dsv4.inference.storage import RowBuffer, RowLayout, index_key_layout, kv_layout
from dsv4.ops.ranges import AttentionRanges
from dsv4.rope import Rotary


class CompressorState:
    """One compressor's entries so far and its open group (fp32), for a batch of sequences."""

    def __init__(self, compressor: Compressor, layout: RowLayout, batch: int, device: torch.device) -> None:
        r, c = compressor.ratio, compressor.dim
        width = 2 * c if compressor.overlap else c
        self.ratio, self.dim, self.overlap = r, c, compressor.overlap
        self.open_values = torch.zeros(batch, r, width, device=device)  # [B, r, width] slot = position % r
        self.open_logits = torch.zeros(batch, r, width, device=device)
        self.lookback_values = torch.zeros(batch, r, c, device=device) if self.overlap else None  # [B, r, c]
        self.lookback_logits = torch.zeros(batch, r, c, device=device) if self.overlap else None
        self.entries = RowBuffer(layout, batch, 0, device, growable=True)  # [B, N, c]
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # entries of each sequence

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.open_values, self.open_logits, self.lookback_values, self.lookback_logits)
                if t is not None]

    def extend(self, compressor: Compressor, rotary: Rotary, x: torch.Tensor, start: torch.Tensor) -> None:
        """Take tokens x [B, T, d] at positions start[b] + t; append every entry whose group closes among them.
        T == 1: any per-sequence positions (decode); T > 1: every sequence at the same position (prefill)."""
        positions = start[:, None] + torch.arange(x.shape[1], device=x.device)  # [B, T]
        values, logits = compressor.project(x, positions % self.ratio)  # fp32 [B, T, width]
        if x.shape[1] == 1:
            self._extend_one(compressor, rotary, values[:, 0], logits[:, 0], start)
        else:
            if bool((start != start[0]).any()):
                raise ValueError("CompressorState.extend: a chunk of several tokens needs every sequence of the "
                                 "batch at the same position (prefill sequences of other lengths one by one)")
            self._extend_run(compressor, rotary, values, logits, int(start[0]))

    def _extend_one(self, compressor, rotary, values, logits, start) -> None:
        """One token per sequence, each at its own position: write its slot; emit where its group closes."""
        r, batch_ix = self.ratio, torch.arange(values.shape[0], device=values.device)
        slot = start % r
        self.open_values[batch_ix, slot] = values
        self.open_logits[batch_ix, slot] = logits
        closing = (slot == r - 1).nonzero().flatten()
        if closing.numel() == 0:
            return
        group = start[closing] // r  # [Bc] index of the closing group
        prev_values, prev_logits = self._lookback(closing)
        entries = compressor.pool_groups(self.open_values[closing, None], self.open_logits[closing, None],
                                         prev_values, prev_logits, (group > 0)[:, None], rotary,
                                         (group * r)[:, None])  # [Bc, 1, c]
        self._append(entries, closing)
        if self.overlap:  # the closed group lends its lookback half to the next entry
            self.lookback_values[closing] = self.open_values[closing, :, : self.dim]
            self.lookback_logits[closing] = self.open_logits[closing, :, : self.dim]

    def _extend_run(self, compressor, rotary, values, logits, start: int) -> None:
        """T tokens per sequence, all sequences at `start`: complete the open group, emit every closed group."""
        r, c = self.ratio, self.dim
        fill = start % r  # tokens of the open group already held
        values = torch.cat((self.open_values[:, :fill], values), dim=1)  # [B, fill + T, width]
        logits = torch.cat((self.open_logits[:, :fill], logits), dim=1)
        n_closed = values.shape[1] // r
        if n_closed:
            batch, width = values.shape[0], values.shape[-1]
            group_values = values[:, : n_closed * r].view(batch, n_closed, r, width)
            group_logits = logits[:, : n_closed * r].view(batch, n_closed, r, width)
            group = start // r + torch.arange(n_closed, device=values.device)  # [G] global group index
            prev_values = prev_logits = None
            if self.overlap:  # group j borrows group j-1's lookback half; the first, the state's
                everyone = torch.arange(batch, device=values.device)
                held_values, held_logits = self._lookback(everyone)
                prev_values = torch.cat((held_values, group_values[:, :-1, :, :c]), dim=1)
                prev_logits = torch.cat((held_logits, group_logits[:, :-1, :, :c]), dim=1)
                self.lookback_values = group_values[:, -1, :, :c].clone()
                self.lookback_logits = group_logits[:, -1, :, :c].clone()
            entries = compressor.pool_groups(group_values, group_logits, prev_values, prev_logits, group > 0,
                                             rotary, group * r)  # [B, G, c]
            self._append(entries, torch.arange(batch, device=values.device))
        rest = values.shape[1] - n_closed * r
        self.open_values[:, :rest] = values[:, n_closed * r:]
        self.open_logits[:, :rest] = logits[:, n_closed * r:]

    def _lookback(self, rows: torch.Tensor):
        if not self.overlap:
            return None, None
        return self.lookback_values[rows, None], self.lookback_logits[rows, None]  # [Bc, 1, r, c]

    def _append(self, entries: torch.Tensor, rows: torch.Tensor) -> None:
        """entries [Bc, G, c] after the current entries of sequences `rows`."""
        index = self.count[rows, None] + torch.arange(entries.shape[1], device=entries.device)  # [Bc, G]
        self.entries.write(entries, index, sequences=rows)
        self.count[rows] += entries.shape[1]

    def read_entries(self) -> torch.Tensor | None:
        """Every sequence's entries [B, max count, c] (zeros past a sequence's count), or None when none exist."""
        n = int(self.count.max())
        return self.entries.read(n) if n else None


class V4LayerCache:
    """Window ring + (CSA/HCA) compressor state + (CSA) indexer state of one V4 layer."""

    def __init__(self, attn: V4Attention, batch: int, cache_dtype: str, dtype: torch.dtype,
                 device: torch.device) -> None:
        cfg = attn.cfg
        self.window = cfg.sliding_window
        self.ring = RowBuffer(kv_layout(cache_dtype, cfg.head_dim, cfg.qk_rope_head_dim, dtype), batch,
                              self.window, device, growable=False)  # [B, W, c]
        self.compressor = self.indexer = None
        if attn.spec.compressor:
            self.compressor = CompressorState(attn.compressor, kv_layout(cache_dtype, cfg.head_dim,
                                                                         cfg.qk_rope_head_dim, dtype), batch, device)
        if attn.spec.indexer:
            self.indexer = CompressorState(attn.indexer.compressor,
                                           index_key_layout(cache_dtype, cfg.index_head_dim, dtype), batch, device)
        self.last_topk: torch.Tensor | None = None  # the CSA picks of the latest step [B, T, k]

    def states(self) -> list[CompressorState]:
        return [s for s in (self.compressor, self.indexer) if s is not None]

    def prepare(self, attn: V4Attention, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, start_pos: int,
                documents: bool) -> CachedRows:
        """The layer's rows for new tokens x [B, T, d] at positions [B, T] (the plan interface of
        dsv4/parallel/plan.py): the cache takes the new tokens in, then serves the rows and entries they read."""
        return CachedRows(self, attn, x, kv, positions)


class CachedRows:
    """What the queries of one decoding step read from a V4 layer's cache. Building it adds the new tokens: their
    K=V rows enter the ring, and the compressor and indexer states take them in (emitting each entry whose group
    closes). Per-query ranges cover [the ring's W-1 rows before the first new token | the new rows] and the
    entries whose group has closed by each query."""

    count_reduce = None

    def __init__(self, cache: V4LayerCache, attn: V4Attention, x: torch.Tensor, kv: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.cache = cache
        kv = cache.ring.layout.roundtrip(kv)  # [B, T, c] as the ring will hold them
        self.kv, window_lo, window_hi = self._window_rows(kv, positions)
        start, cmp_hi = positions[:, 0], torch.zeros_like(positions)
        if cache.compressor is not None:
            cache.compressor.extend(attn.compressor, attn.rotary, x, start)
            cmp_hi = (positions + 1) // attn.ratio  # entry i is visible once its group has closed
        if cache.indexer is not None:
            cache.indexer.extend(attn.indexer.compressor, attn.rotary, x, start)
        self.ranges = AttentionRanges(window_lo.int(), window_hi.int(), torch.zeros_like(cmp_hi).int(),
                                      cmp_hi.int())

    def _window_rows(self, kv: torch.Tensor, positions: torch.Tensor):
        """K=V rows for the new queries: [the ring's W-1 rows before the first new token, in position order | the
        new rows] [B, W-1+T, c], and each query's window [lo, hi] among them. Then the new rows enter the ring."""
        ring, window, n_new = self.cache.ring, self.cache.window, kv.shape[1]
        start = positions[:, 0]
        before = start[:, None] + torch.arange(1 - window, 0, device=kv.device)  # [B, W-1] positions
        rows = torch.cat((ring.read(index=before % window), kv), dim=1)
        t = torch.arange(n_new, device=kv.device)[None]  # row of query t: W-1+t; its window starts at row t
        window_lo = torch.maximum(t, (window - 1 - start)[:, None])  # no row before position 0
        window_hi = (window - 1 + t).expand(kv.shape[0], -1)
        keep = min(n_new, window)  # the ring keeps the newest W rows
        ring.write(kv[:, n_new - keep:], positions[:, n_new - keep:] % window)
        return rows, window_lo, window_hi

    def entries(self) -> torch.Tensor | None:
        return self.cache.compressor.read_entries()

    def index_keys(self) -> torch.Tensor | None:
        return self.cache.indexer.read_entries()

    def narrow(self, compressed: torch.Tensor | None, topk_idx: torch.Tensor | None):
        """A one-token step reads (and, in fp8, dequantizes) only its k picked entries [B, k, c], picks renumbered
        0..k-1 (-1 stays "no key"); a longer step reads them all. Keeps the picks for the tests."""
        self.cache.last_topk = topk_idx
        if topk_idx is None or topk_idx.shape[1] != 1:
            return compressed, topk_idx
        picks = topk_idx[:, 0]  # [B, k]
        picked = self.cache.compressor.entries.read(index=picks.clamp(min=0))
        renumbered = torch.arange(picks.shape[1], device=picks.device).expand_as(picks)
        return picked, torch.where(picks >= 0, renumbered, -1)[:, None]

    @staticmethod
    def keep_in_graph(loss: torch.Tensor, index_keys: torch.Tensor) -> torch.Tensor:
        return loss


class DenseLayerCache:
    """Plain K and V rows [B, T, n_kv * d] of a dense baseline layer, in the model's dtype."""

    def __init__(self, attn: DenseAttention, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        layout = RowLayout(attn.n_kv * attn.head_dim, dtype)
        self.keys = RowBuffer(layout, batch, 0, device, growable=True)
        self.values = RowBuffer(layout, batch, 0, device, growable=True)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the new k, v [B, T, n_kv, d] at positions [B, T]; -> every cached key and value [B, L, n_kv, d]
        and which of them each new query sees [B, 1, T, L] (its own and earlier positions)."""
        batch, _, n_kv, head_dim = k.shape
        self.keys.write(k.flatten(2), positions)
        self.values.write(v.flatten(2), positions)
        n_keys = int(positions.max()) + 1
        keys = self.keys.read(n_keys).view(batch, n_keys, n_kv, head_dim)
        values = self.values.read(n_keys).view(batch, n_keys, n_kv, head_dim)
        visible = torch.arange(n_keys, device=k.device)[None, None, :] <= positions[..., None]  # [B, T, L]
        return keys, values, visible[:, None]


class ModelCache:
    """The cache of every layer for a batch of sequences, and how many tokens each sequence holds."""

    def __init__(self, model, batch: int, cache_dtype: str = "model") -> None:
        param = model.embed.weight
        self.cache_dtype, self.dtype, self.device = cache_dtype, param.dtype, param.device
        self.layers = [V4LayerCache(block.attn, batch, cache_dtype, self.dtype, self.device)
                       if block.attn.spec.v4 else DenseLayerCache(block.attn, batch, self.dtype, self.device)
                       for block in model.layers]  # each layer keeps its kind's cache_state (dsv4/layer_kinds.py)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # tokens held per sequence

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def nbytes(self) -> dict[str, int]:
        """Bytes the cache holds, read off its tensors, by term: window rings, compressed entries, indexer keys,
        open-group state (fp32), dense K/V; `total` their sum. Growing buffers count the rows in use (see
        reserved_bytes for their capacity)."""
        terms = dict.fromkeys(("window", "entries", "index_keys", "open_state", "dense_kv"), 0)
        lengths = self.lengths.tolist()
        for layer in self.layers:
            if isinstance(layer, DenseLayerCache):
                terms["dense_kv"] += layer.keys.held_bytes(lengths) + layer.values.held_bytes(lengths)
                continue
            terms["window"] += layer.ring.reserved_bytes()
            for name, state in (("entries", layer.compressor), ("index_keys", layer.indexer)):
                if state is not None:
                    terms[name] += state.entries.held_bytes(state.count.tolist())
                    terms["open_state"] += sum(t.numel() * t.element_size() for t in state.state_tensors())
        terms["total"] = sum(terms.values())
        return terms

    def reserved_bytes(self) -> int:
        """Bytes allocated, growing buffers at their capacity."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, DenseLayerCache):
                total += layer.keys.reserved_bytes() + layer.values.reserved_bytes()
                continue
            total += layer.ring.reserved_bytes()
            for state in layer.states():
                total += state.entries.reserved_bytes()
                total += sum(t.numel() * t.element_size() for t in state.state_tensors())
        return total

    @staticmethod
    def stack(caches: list[ModelCache]) -> ModelCache:
        """One batch from caches of one sequence each (each keeps its own length: no padding is introduced)."""
        out = ModelCache.__new__(ModelCache)
        first = caches[0]
        out.cache_dtype, out.dtype, out.device = first.cache_dtype, first.dtype, first.device
        out.lengths = torch.cat([c.lengths for c in caches])
        out.layers = []
        for layers in zip(*(c.layers for c in caches)):
            layer = layers[0].__class__.__new__(layers[0].__class__)
            if isinstance(layers[0], DenseLayerCache):
                layer.keys = RowBuffer.stack([lc.keys for lc in layers])
                layer.values = RowBuffer.stack([lc.values for lc in layers])
            else:
                layer.window = layers[0].window
                layer.ring = RowBuffer.stack([lc.ring for lc in layers])
                layer.compressor = _stack_states([lc.compressor for lc in layers])
                layer.indexer = _stack_states([lc.indexer for lc in layers])
                layer.last_topk = None
            out.layers.append(layer)
        return out


def _stack_states(states: list[CompressorState | None]) -> CompressorState | None:
    if states[0] is None:
        return None
    out = CompressorState.__new__(CompressorState)
    first = states[0]
    out.ratio, out.dim, out.overlap = first.ratio, first.dim, first.overlap
    for name in ("open_values", "open_logits", "lookback_values", "lookback_logits", "count"):
        parts = [getattr(s, name) for s in states]
        setattr(out, name, None if parts[0] is None else torch.cat(parts))
    out.entries = RowBuffer.stack([s.entries for s in states])
    return out
