"""The layer kinds of the decoder, each defined once: window-only, CSA, HCA and the dense baseline.

A kind states which `compress_ratios` values select it, which parts its layer has (a compressor, overlapping or
not; the lightning indexer; the RoPE it uses), and the numbers the rest of the project reports for it:
  attention FLOPs   keys(t) each query t attends to and the entries the indexer scores (dsv4/training/flops.py: MFU)
  KV-cache          the state a layer keeps between decode steps and its bytes (dsv4/inference/cache.py, memory.py)
  SP traffic        what each rank's collectives send per layer in the forward pass (dsv4/parallel,
                    benchmarks/sp_comm.py)
Config checks, layer construction, the cache, MFU and the benchmarks read these definitions instead of testing
names or ratio values, so a new compression family is one class here.

Notation: S queries t = 0 .. S-1, W = sliding_window, m the layer's compression ratio, n(t) = (t + 1) // m the
compressed entries visible to query t, c = head_dim, d = hidden_size, c_I = index_head_dim, H = num_attention_heads.
This module imports nothing heavy: ModelConfig (dsv4/config.py) reads it to validate and name its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dsv4.config imports this module
    from dsv4.config import ModelConfig

WINDOW_RATIO = 0
CSA_RATIO = 4
DENSE_RATIO = -1

PHASES_WITH_INDEXER = ("indexer_warmup", "sparse")  # CSA phases in which the indexer scores entries
CACHE_TERMS = ("window", "entries", "index_keys", "open_state", "dense_kv")
FP32 = 4  # bytes: the compressors' open-group state is kept in fp32


# ---- sums over the queries t = 0 .. S-1, in closed form (exact integers; S may be a million) ----------------------
def window_keys(seq_len: int, window: int) -> int:
    """sum_t min(t + 1, W): the sliding-window rows every query sees."""
    if seq_len <= window:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def visible_entries(seq_len: int, ratio: int, topk: int | None = None) -> int:
    """sum_t n(t), n(t) = (t + 1) // ratio the compressed entries query t sees; with topk, sum_t min(n(t), topk)."""
    if topk is not None and seq_len // ratio > topk:  # queries from topk * ratio - 1 on pick topk each
        return visible_entries(topk * ratio - 1, ratio) + topk * (seq_len - topk * ratio + 1)
    groups, rest = divmod(seq_len, ratio)
    return ratio * groups * (groups - 1) // 2 + groups * (rest + 1)


# ---- cache row sizes ------------------------------------------------------------------------------------------------
def row_bytes(cfg: ModelConfig, cache_dtype: str, element_size: int) -> int:
    """One K=V row or compressed entry. fp8: (c - r) fp8 values, a scale per 64 of them, the RoPE dims r in bf16."""
    if cache_dtype == "fp8":
        nope = cfg.head_dim - cfg.qk_rope_head_dim
        return nope + math.ceil(nope / 64) + 2 * cfg.qk_rope_head_dim
    return cfg.head_dim * element_size


def index_key_bytes(cfg: ModelConfig, cache_dtype: str, element_size: int) -> int:
    """One indexer key. fp8: c_I fp8 values and an fp32 scale."""
    return cfg.index_head_dim + 4 if cache_dtype == "fp8" else cfg.index_head_dim * element_size


def open_state_bytes(dim: int, ratio: int, overlap: bool) -> int:
    """A compressor's open group in fp32."""
    if overlap:  # the open group's values + logits at 2 dim, the lookback half's values + logits at dim
        return ratio * (2 * 2 * dim + 2 * dim) * FP32
    return ratio * 2 * dim * FP32


@dataclass(frozen=True)
class AttentionCounts:
    """One layer, one sequence: keys summed over the queries, and the entries the indexer scores summed over them."""

    keys: int
    indexer_entries: int = 0


class LayerKind:
    """What every kind states. Subclasses fill in the class attributes and the formulas."""

    name: str  # what ModelConfig.layer_kind returns ("window", "csa", "hca", "dense")
    label: str  # how tables and warnings spell it
    ratio_rule: str  # the compress_ratios values that select it, as the validation message says them
    fixed_ratio: int | None = None  # the one compress_ratios value that selects it; None: a range (HCA)
    v4: bool = True  # V4 attention (window ring, one K=V head, sink); False: GQA through SDPA
    compressor: bool = False  # compresses groups of `ratio` tokens into entries
    overlap: bool = False  # the compressor's groups overlap (each entry also pools the previous group's half)
    indexer: bool = False  # the lightning indexer picks top-k entries per query
    cache_state: tuple[str, ...] = ()  # the CACHE_TERMS its cache holds

    def selects(self, ratio: int) -> bool:
        return ratio == self.fixed_ratio

    def compress_ratio(self, ratio: int) -> int:
        """The layer's compression ratio: its compress_ratios entry, or 0 without a compressor."""
        return ratio if self.compressor else 0

    def head_dim(self, cfg: ModelConfig) -> int:
        """The size of one query head's scores and outputs."""
        return cfg.head_dim

    def attention_counts(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> AttentionCounts:
        """Keys summed over S queries (and the indexer's scored entries), in a CSA phase (dense, indexer_warmup,
        sparse; other kinds ignore it)."""
        raise NotImplementedError

    def attention_flops(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> dict[str, int]:
        """Forward FLOPs of one sequence: `attention` = 4 H d per key (QK^T and PV, 2 FLOPs per MAC; every head
        scores the shared K=V row itself), `indexer` = 2 H_I c_I per scored entry."""
        counts = self.attention_counts(cfg, ratio, seq_len, phase)
        return {"attention": 4 * cfg.num_attention_heads * self.head_dim(cfg) * counts.keys,
                "indexer": 2 * cfg.index_n_heads * cfg.index_head_dim * counts.indexer_entries}

    def cache_bytes(self, cfg: ModelConfig, ratio: int, tokens: int, cache_dtype: str = "model",
                    element_size: int = 2) -> dict[str, int]:
        """Bytes of each of its cache_state terms for one sequence of `tokens` tokens."""
        raise NotImplementedError

    def sp_bytes(self, cfg: ModelConfig, ratio: int, shard_len: int, world: int, element_size: int = 2,
                 phase: str = "sparse") -> dict[str, float]:
        """Bytes one rank's collectives send for this layer in the forward pass (backward sends as much back),
        keyed like SequenceParallel.bytes_sent, for one sequence of world * shard_len tokens without document
        masking; `phase` as in attention_counts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<layer kind {self.name}>"

    def __reduce__(self) -> str:
        """Pickling and deepcopy give back the module's one instance (WINDOW, CSA, HCA, DENSE below)."""
        return self.name.upper()


class V4Kind(LayerKind):
    """The shared part of V4 layers: a ring of the last W K=V rows, and the halo that brings the previous rank's
    last W - 1 rows under sequence parallelism."""

    def window_cache(self, cfg: ModelConfig, cache_dtype: str, element_size: int) -> int:
        return cfg.sliding_window * row_bytes(cfg, cache_dtype, element_size)

    def halo_bytes(self, cfg: ModelConfig, element_size: int) -> int:
        return (cfg.sliding_window - 1) * cfg.head_dim * element_size


class WindowKind(V4Kind):
    """Window-only attention (SWA): keys(t) = min(t + 1, W)."""

    name, label, ratio_rule, fixed_ratio = "window", "window", "0 (window-only)", WINDOW_RATIO
    cache_state = ("window",)

    def attention_counts(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> AttentionCounts:
        return AttentionCounts(window_keys(seq_len, cfg.sliding_window))

    def cache_bytes(self, cfg: ModelConfig, ratio: int, tokens: int, cache_dtype: str = "model",
                    element_size: int = 2) -> dict[str, int]:
        return {"window": self.window_cache(cfg, cache_dtype, element_size)}

    def sp_bytes(self, cfg: ModelConfig, ratio: int, shard_len: int, world: int, element_size: int = 2,
                 phase: str = "sparse") -> dict[str, float]:
        return {"halo": self.halo_bytes(cfg, element_size)}


class CSAKind(V4Kind):
    """Compressed Sparse Attention: an overlapping 4-token compressor and the lightning indexer.
    keys(t) = min(t + 1, W) + n(t) in phases dense and indexer_warmup, min(t + 1, W) + min(index_topk, n(t)) in
    phase sparse; the indexer scores n(t) entries (phases indexer_warmup and sparse; idle in phase dense)."""

    name, label, ratio_rule, fixed_ratio = "csa", "CSA", "4 (CSA)", CSA_RATIO
    compressor = overlap = indexer = True
    cache_state = ("window", "entries", "index_keys", "open_state")

    def attention_counts(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> AttentionCounts:
        keys = window_keys(seq_len, cfg.sliding_window)
        keys += visible_entries(seq_len, ratio, cfg.index_topk if phase == "sparse" else None)
        scored = visible_entries(seq_len, ratio) if phase in PHASES_WITH_INDEXER else 0
        return AttentionCounts(keys, scored)

    def cache_bytes(self, cfg: ModelConfig, ratio: int, tokens: int, cache_dtype: str = "model",
                    element_size: int = 2) -> dict[str, int]:
        """Entries and indexer keys: floor(T / 4) each; the open state of the compressor and of the indexer's."""
        return {"window": self.window_cache(cfg, cache_dtype, element_size),
                "entries": tokens // ratio * row_bytes(cfg, cache_dtype, element_size),
                "index_keys": tokens // ratio * index_key_bytes(cfg, cache_dtype, element_size),
                "open_state": open_state_bytes(cfg.head_dim, ratio, True)
                + open_state_bytes(cfg.index_head_dim, ratio, True)}

    def sp_bytes(self, cfg: ModelConfig, ratio: int, shard_len: int, world: int, element_size: int = 2,
                 phase: str = "sparse") -> dict[str, float]:
        """halo: the K=V rows and the hidden states of the last group (the next rank's lookback), m d;
        all_gather: its L/m entries, and while the indexer runs its L/m indexer keys, to the P - 1 other ranks."""
        gathered = cfg.head_dim + (cfg.index_head_dim if phase in PHASES_WITH_INDEXER else 0)
        return {"halo": self.halo_bytes(cfg, element_size) + ratio * cfg.hidden_size * element_size,
                "all_gather": (world - 1) * (shard_len // ratio) * gathered * element_size}


class HCAKind(V4Kind):
    """Heavily Compressed Attention: non-overlapping groups of m > 4 tokens, every visible entry attended:
    keys(t) = min(t + 1, W) + n(t)."""

    name, label, ratio_rule = "hca", "HCA", "an HCA ratio > 4 (128 in DeepSeek V4)"
    compressor = True
    cache_state = ("window", "entries", "open_state")

    def selects(self, ratio: int) -> bool:
        return ratio > CSA_RATIO

    def attention_counts(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> AttentionCounts:
        return AttentionCounts(window_keys(seq_len, cfg.sliding_window) + visible_entries(seq_len, ratio))

    def cache_bytes(self, cfg: ModelConfig, ratio: int, tokens: int, cache_dtype: str = "model",
                    element_size: int = 2) -> dict[str, int]:
        return {"window": self.window_cache(cfg, cache_dtype, element_size),
                "entries": tokens // ratio * row_bytes(cfg, cache_dtype, element_size),
                "open_state": open_state_bytes(cfg.head_dim, ratio, False)}

    def sp_bytes(self, cfg: ModelConfig, ratio: int, shard_len: int, world: int, element_size: int = 2,
                 phase: str = "sparse") -> dict[str, float]:
        """halo: the K=V rows (groups never straddle ranks); all_gather: its L/m entries to the P - 1 others."""
        return {"halo": self.halo_bytes(cfg, element_size),
                "all_gather": (world - 1) * (shard_len // ratio) * cfg.head_dim * element_size}


class DenseKind(LayerKind):
    """The dense causal baseline (GQA through SDPA): keys(t) = t + 1 with H heads of the dense head size."""

    name, label, ratio_rule, fixed_ratio = "dense", "dense", "-1 (dense causal baseline)", DENSE_RATIO
    v4 = False
    cache_state = ("dense_kv",)

    def head_dim(self, cfg: ModelConfig) -> int:
        return cfg.resolved_dense_head_dim

    def attention_counts(self, cfg: ModelConfig, ratio: int, seq_len: int, phase: str) -> AttentionCounts:
        return AttentionCounts(seq_len * (seq_len + 1) // 2)

    def cache_bytes(self, cfg: ModelConfig, ratio: int, tokens: int, cache_dtype: str = "model",
                    element_size: int = 2) -> dict[str, int]:
        """K and V rows of every token, num_key_value_heads each, in the model dtype (never fp8)."""
        return {"dense_kv": tokens * 2 * cfg.num_key_value_heads * cfg.resolved_dense_head_dim * element_size}

    def sp_bytes(self, cfg: ModelConfig, ratio: int, shard_len: int, world: int, element_size: int = 2,
                 phase: str = "sparse") -> dict[str, float]:
        """Ulysses (dsv4/parallel/ulysses.py): all-to-alls of q, k, v and the output, K and V repeated to all H
        heads, each sending (P - 1) / P of its [L, H, d_h] tensor off the rank. (SequenceParallel.bytes_sent
        counts the whole tensors handed to the all-to-all: P / (P - 1) times this.)"""
        tensor = shard_len * cfg.num_attention_heads * cfg.resolved_dense_head_dim * element_size
        return {"ulysses_all_to_all": 4 * tensor * (world - 1) / world}


WINDOW = WindowKind()
CSA = CSAKind()
HCA = HCAKind()
DENSE = DenseKind()
KINDS: tuple[LayerKind, ...] = (WINDOW, CSA, HCA, DENSE)  # the order the validation message lists them in
BY_NAME: dict[str, LayerKind] = {kind.name: kind for kind in KINDS}  # command-line names -> kinds

UNSUPPORTED_RATIO = ("unsupported; use " + ", ".join(k.ratio_rule for k in KINDS[:-1]) + " or "
                     + KINDS[-1].ratio_rule)


def find_kind(ratio: int) -> LayerKind | None:
    """The kind a compress_ratios entry selects, or None when no kind takes it."""
    return next((kind for kind in KINDS if kind.selects(ratio)), None)
