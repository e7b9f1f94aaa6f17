"""The decoder: embeddings, pre-norm blocks (V4 attention or dense baseline + SwiGLU MLP), LM head.

Parallelism-free: it knows nothing of DeepSpeed, process groups or shards (the plan in dsv4/parallel/ does).
The MLP is dense (no MoE), and the residual is a single stream (no mHC): the attention is what this project is about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.attention import PHASES, AttentionOptions, DenseAttention, V4Attention
from dsv4.compressor import Compressor
from dsv4.config import ModelConfig
from dsv4.layers import GroupedLinear, RMSNorm, SwiGLU
from dsv4.ops.v4_attention import BACKENDS
from dsv4.parallel import plan_for

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    lm_loss: torch.Tensor  # mean over non-ignored labels
    lm_loss_sum: torch.Tensor  # sum over non-ignored labels (for sequence-parallel weighting)
    num_tokens: torch.Tensor  # count of non-ignored labels
    indexer_loss: torch.Tensor | None  # mean over CSA layers that computed one, else None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, options: AttentionOptions) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn_cls = V4Attention if cfg.layer_spec(layer_idx).v4 else DenseAttention
        self.attn = attn_cls(cfg, layer_idx, options)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, start_pos: int, documents: bool, cache=None):
        attn_out, indexer_loss = self.attn(self.attn_norm(x), positions, start_pos, documents, cache)
        x = x + attn_out
        return x + self.ffn(self.ffn_norm(x)), indexer_loss


class DSV4Model(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "auto", chunk_size: int = 128, phase: str = "sparse",
                 deterministic: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.options = AttentionOptions()
        self.set_attention_options(backend=backend, chunk_size=chunk_size, phase=phase, deterministic=deterministic)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, self.options) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Compressor):
                nn.init.zeros_(module.ape)  # uniform pooling at the start
            elif isinstance(module, V4Attention):
                nn.init.zeros_(module.attn_sink)

    def set_attention_options(self, backend: str | None = None, chunk_size: int | None = None,
                              phase: str | None = None, deterministic: bool | None = None) -> None:
        """Change the attention backend, query chunk size, CSA phase or dK=V determinism (all layers)."""
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"attention.backend={backend!r}: choose from {', '.join(BACKENDS)}")
            self.options.backend = backend
        if chunk_size is not None:
            if chunk_size < 1:
                raise ValueError(f"attention.query_chunk_size={chunk_size}: must be >= 1")
            self.options.chunk_size = chunk_size
        if phase is not None:
            if phase not in PHASES:
                raise ValueError(f"attention phase {phase!r}: choose from {', '.join(PHASES)}")
            self.options.phase = phase
        if deterministic is not None:
            self.options.deterministic = deterministic

    def attention_stats(self) -> dict[str, float]:
        """After a forward with options.collect_stats: sink mass (mean over V4 layers) and indexer recall (mean
        over CSA layers in the sparse phase). Clears what it read."""
        values: dict[str, list[float]] = {}
        for layer in self.layers:
            for key, value in getattr(layer.attn, "stats", {}).items():
                values.setdefault(key, []).append(float(value))
            layer.attn.stats = {}
        return {key: sum(v) / len(v) for key, v in values.items()}

    def indexer_picks(self) -> dict[int, torch.Tensor]:
        """After a forward with options.keep_picks: each CSA layer's top-k picks {layer index: [B, S, k]} (-1 = no
        entry; only layers in the sparse phase have picks)."""
        return {i: layer.attn.picks for i, layer in enumerate(self.layers)
                if getattr(layer.attn, "picks", None) is not None}

    def set_sequence_parallel(self, sp) -> None:
        """Inject a dsv4.parallel.SequenceParallel (None: one device). Each rank then feeds its own shard of
        every sequence; positions, masks and compression groups use global positions."""
        self.options.plan = plan_for(sp)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, start_pos: int = 0,
                positions: torch.Tensor | None = None, cache=None):
        """input_ids [B, S] -> logits [B, S, vocab]; with labels [B, S] (already shifted, -100 = ignore)
        -> ModelOutput. start_pos: absolute position of the first token.

        positions [B, S] (optional): packed documents with document masking. Each token's position inside
        its document, 0 at every document start; attention never crosses a document boundary, compressor
        groups and RoPE restart at each document, so each document is processed as if it were alone.

        cache (decoding; a dsv4.inference.ModelCache): input_ids continue each cached sequence; every layer reads
        its earlier rows from the cache and adds the new ones (the caller advances cache.lengths)."""
        documents = positions is not None
        start_pos = self.options.plan.shard_start(input_ids, start_pos)
        if cache is not None:  # each sequence continues at its own cached length
            positions = cache.lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        elif documents:
            if positions.shape != input_ids.shape:
                raise ValueError(f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}")
            positions = positions.to(input_ids.device).long()
        else:
            positions = start_pos + torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        indexer_losses = []
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, layer_caches):
            x, indexer_loss = layer(x, positions, start_pos, documents, layer_cache)
            if indexer_loss is not None:
                indexer_losses.append(indexer_loss)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        flat_logits = logits.float().view(-1, logits.shape[-1])
        lm_loss_sum = F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        num_tokens = (labels != IGNORE_INDEX).sum()
        return ModelOutput(
            logits=logits,
            lm_loss=lm_loss_sum / num_tokens.clamp_min(1),
            lm_loss_sum=lm_loss_sum,
            num_tokens=num_tokens,
            indexer_loss=torch.stack(indexer_losses).mean() if indexer_losses else None,
        )


def build_model(cfg, backend: str = "auto", chunk_size: int = 128, phase: str = "sparse",
                deterministic: bool = True) -> DSV4Model:
    """Build the decoder from a ModelConfig, a dict, or an OmegaConf node with model keys."""
    if not isinstance(cfg, ModelConfig):
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
        cfg = ModelConfig.from_dict(dict(cfg))
    return DSV4Model(cfg, backend=backend, chunk_size=chunk_size, phase=phase, deterministic=deterministic)
