"""KV cache sizes by formula, from a model config alone (../shared/docs/inference.md, "How big").

The terms, per sequence of T tokens, b = bytes per element of the model dtype, d = head_dim, r = the RoPE dims,
d_I = index_head_dim, W = sliding_window; a "row" is a K=V row or a compressed entry:
  row bytes        model: d b                         fp8: (d - r) + ceil((d - r) / 64) + 2 r
  index key bytes  model: d_I b                       fp8: d_I + 4
  window           every V4 layer: W rows (a fixed ring)
  entries          CSA: floor(T / 4) rows; HCA (ratio m): floor(T / m) rows
  index keys       CSA: floor(T / 4) keys
  open state       fp32, fixed: CSA 4 x (2 x 2d values + logits of the open group, 2 x d of the lookback) and the
                   same at d_I for its indexer; HCA m x 2d (values + logits of the open group)
  dense K/V        dense baseline layers: T x 2 x num_key_value_heads x dense head dim x b
The formulas are the layer kinds' (LayerKind.cache_bytes in dsv4/layer_kinds.py); this module sums them over the
layers. Nothing here looks at a cache object: benchmarks/kv_cache.py and the tests compare these numbers with the
bytes read off a real ModelCache.

Baselines of the same depth L: GQA (2 n_kv d_kv per token per layer; the report's is 8 x 128 in bf16), V3.2's MLA
(a 512 + 64 latent per token per layer, plus its 128-dim indexer key; release layout 656 + 132 bytes) and MHA
(num_attention_heads x 128, K and V).
"""

from __future__ import annotations

from dsv4.config import ModelConfig
from dsv4.layer_kinds import CACHE_TERMS

TERMS = CACHE_TERMS


def v4_cache_terms(cfg: ModelConfig, tokens: int, cache_dtype: str = "model", element_size: int = 2
                   ) -> dict[str, int]:
    """Bytes of each term for one sequence of `tokens` tokens, and their `total`."""
    terms = dict.fromkeys(TERMS, 0)
    for layer, spec in enumerate(cfg.layer_specs()):
        for term, size in spec.cache_bytes(cfg, cfg.compress_ratios[layer], tokens, cache_dtype,
                                           element_size).items():
            terms[term] += size
    terms["total"] = sum(terms.values())
    return terms


def gqa_bytes(layers: int, tokens: int, kv_heads: int = 8, head_dim: int = 128, element_size: int = 2) -> int:
    return layers * tokens * 2 * kv_heads * head_dim * element_size


def mla_bytes(layers: int, tokens: int, layout: str = "fp8") -> int:
    """V3.2's cache: the MLA latent (512 + 64 RoPE) and the indexer key (128) per token per layer. fp8: the
    release's 656 B latent (512 fp8 + 16 B scales + 64 bf16) and 132 B key (128 fp8 + an fp32 scale); bf16: 1152
    + 256."""
    per_token = 656 + 132 if layout == "fp8" else (512 + 64) * 2 + 128 * 2
    return layers * tokens * per_token


def mha_bytes(layers: int, tokens: int, heads: int, head_dim: int = 128, element_size: int = 2) -> int:
    return layers * tokens * 2 * heads * head_dim * element_size
