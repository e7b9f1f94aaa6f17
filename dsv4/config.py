"""Model configuration: DeepSeek V4 `config.json` key names, validated with errors that name the key.

`compress_ratios` holds one entry per layer; the entry selects the layer's kind (dsv4/layer_kinds.py):
  0   window-only attention (SWA),
  4   Compressed Sparse Attention (overlapping 4-token compressor + lightning indexer + top-k),
  r>4 Heavily Compressed Attention with non-overlapping groups of r tokens (128 in DeepSeek V4),
  -1  plain dense causal attention (GQA through SDPA), the baseline users compare against.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from dsv4.layer_kinds import CSA_RATIO as CSA_RATIO
from dsv4.layer_kinds import DENSE_RATIO, UNSUPPORTED_RATIO, WINDOW_RATIO, LayerKind, find_kind

# compress_ratios values (the kinds' ratio rules live in dsv4/layer_kinds.py)
WINDOW = WINDOW_RATIO
DENSE = DENSE_RATIO


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what to do."""


def as_int(value: Any, key: str) -> int:
    """An integer config value: an int, or a float with no fractional part (8.0 -> 8); else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            not isinstance(value, numbers.Integral) and not float(value).is_integer()):
        raise ConfigError(f"{key}={value!r}: must be an integer")
    return int(value)


def ratio_list(values: Any, key: str) -> list[int]:
    """compress_ratios as a list of ints, or a ConfigError naming the entry."""
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{key}={values!r}: must be a list with one integer per layer, e.g. [0, 4, 128, 4]")
    return [as_int(r, f"{key}[{i}]") for i, r in enumerate(values)]


def _check_types(obj: Any, prefix: str = "") -> None:
    """Int, float and bool fields hold what they say (integral floats become ints); else a ConfigError."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if f.type in ("int", "int | None") and value is not None:
            setattr(obj, f.name, as_int(value, key))
        elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ConfigError(f"{key}={value!r}: must be a number")
        elif f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be true or false")


@dataclass
class RopeScaling:
    """YaRN as DeepSeek V4 applies it on compressed (CSA/HCA) layers; no attention temperature."""

    type: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 384
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 1048576
    # V4 attention
    num_attention_heads: int = 4
    head_dim: int = 64
    qk_rope_head_dim: int = 16
    q_lora_rank: int = 64
    o_groups: int = 2
    o_lora_rank: int = 64
    sliding_window: int = 64
    compress_ratios: list[int] = field(default_factory=lambda: [0, 4, 32, 4])
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 16
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    # dense baseline layers (compress_ratios entry -1): GQA with SDPA
    num_key_value_heads: int = 1
    dense_head_dim: int | None = None  # default: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        _check_types(self)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling={self.rope_scaling!r}: use a mapping of YaRN settings or null")
        if self.rope_scaling is not None:
            _check_types(self.rope_scaling, "rope_scaling.")
        self.compress_ratios = ratio_list(self.compress_ratios, "compress_ratios")
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "model") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}: unknown model key (known keys: {', '.join(sorted(known))})")
        values = dict(values)
        rs = values.get("rope_scaling")
        if isinstance(rs, dict):
            rs_known = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rs) - rs_known)
            if bad:
                raise ConfigError(f"{prefix}.rope_scaling.{bad[0]}: unknown key (known: {', '.join(sorted(rs_known))})")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------------------------------
    def layer_kind(self, layer: int) -> str:
        """The layer's kind by name: "window", "csa", "hca" or "dense"."""
        return self.layer_spec(layer).name

    def layer_spec(self, layer: int) -> LayerKind:
        """The layer's kind (dsv4/layer_kinds.py): its parts, FLOPs, cache and sequence-parallel traffic."""
        ratio = self.compress_ratios[layer]
        kind = find_kind(ratio)
        if kind is None:
            raise ConfigError(f"compress_ratios[{layer}]={ratio}: {UNSUPPORTED_RATIO}")
        return kind

    def layer_specs(self) -> list[LayerKind]:
        """Every layer's kind, in order."""
        return [self.layer_spec(i) for i in range(len(self.compress_ratios))]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def resolved_dense_head_dim(self) -> int:
        return self.dense_head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}={getattr(self, key.split('[')[0], None)!r}: {msg}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                    "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                    "index_head_dim", "num_key_value_heads"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "must be a positive integer")
        need(self.index_topk >= 1, "index_topk", "must be >= 1 (the number of compressed entries each query picks)")
        need(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be even and >= 2 (RoPE rotates interleaved pairs)")
        need(self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim", f"must be <= head_dim ({self.head_dim})")
        need(self.qk_rope_head_dim <= self.index_head_dim, "qk_rope_head_dim",
             f"must be <= index_head_dim ({self.index_head_dim}): the indexer rotates the same tail")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"must divide num_attention_heads ({self.num_attention_heads})")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.compress_rope_theta > 0, "compress_rope_theta", "must be > 0")
        need(len(self.compress_ratios) == self.num_hidden_layers, "compress_ratios",
             f"needs one entry per layer: got {len(self.compress_ratios)} for "
             f"num_hidden_layers={self.num_hidden_layers}")
        specs = self.layer_specs()  # a ConfigError naming compress_ratios[i] for an entry no kind takes
        if any(not spec.v4 for spec in specs):
            dh = self.resolved_dense_head_dim
            need(self.hidden_size % self.num_attention_heads == 0 or self.dense_head_dim is not None,
                 "hidden_size", "must be divisible by num_attention_heads for dense layers (or set dense_head_dim)")
            need(dh % 2 == 0, "dense_head_dim", "must be even (RoPE)")
            need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must divide num_attention_heads ({self.num_attention_heads}) for GQA")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.type != "yarn":
                raise ConfigError(f"rope_scaling.type={rs.type!r}: only 'yarn' (or rope_scaling: null) is supported")
            if rs.factor < 1:
                raise ConfigError(f"rope_scaling.factor={rs.factor}: must be >= 1")
            if not rs.beta_fast > rs.beta_slow > 0:
                raise ConfigError("rope_scaling.beta_fast/beta_slow: need beta_fast > beta_slow > 0")
