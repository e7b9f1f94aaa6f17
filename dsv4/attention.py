"""DeepSeek V4 attention (window-only, CSA, HCA) and the dense causal baseline.

V4 layer, for input x [B, S, d] (dsv4-attention.md §3-§6):
  q path   c_q = q_norm(wq_a x); q = wq_b c_q -> [B, S, H, c]; per-head RMS norm (no gain); RoPE tail
  K=V      kv = kv_norm(wkv x) -> [B, S, c]; RoPE tail. One head shared by every query head, key = value
  entries  compressor(x) -> [B, N, c] (CSA: ratio 4, overlapping; HCA: ratio r, non-overlapping)
  picks    CSA only: lightning indexer -> top-k entries per query (causal mask before top-k)
  softmax  one softmax over window rows + compressed entries (all visible / top-k) + the sink
  output   de-rotate the RoPE tail at -t; grouped low-rank projection wo_a (g groups) then wo_b

Attention phases for CSA layers (set from the training schedule):
  "dense"           attend to every visible compressed entry; indexer idle
  "indexer_warmup"  attention as "dense"; the indexer learns from the dense KL loss
  "sparse"          attend to the indexer's top-k; the indexer learns from the sparse KL loss
This module knows nothing of DeepSpeed or process groups: where a layer's rows and compressed entries come from
(one device, a sequence-parallel shard, or the KV cache when decoding) is the plan's business (dsv4/parallel/plan.py),
so the forward below is one path for all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.attention_stats import indexer_recall
from dsv4.compressor import Compressor, Indexer
from dsv4.config import ModelConfig
from dsv4.layer_kinds import PHASES_WITH_INDEXER
from dsv4.layers import GroupedLinear, Linear, RMSNorm, rms_normalize
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.ops.v4_attention import v4_attention
from dsv4.parallel.plan import LOCAL, document_mask
from dsv4.rope import Rotary

PHASES = ("dense", "indexer_warmup", "sparse")


class AttentionOptions:
    """Runtime choices that do not change parameters: backend, chunking, CSA phase, the plan (sequence parallelism)."""

    def __init__(self, backend: str = "torch", chunk_size: int = 128, phase: str = "sparse",
                 deterministic: bool = True) -> None:
        self.backend, self.chunk_size, self.phase = backend, chunk_size, phase
        self.deterministic = deterministic  # Triton backward: fixed-order dK=V (else fp32 atomics)
        self.plan = LOCAL  # where a layer's rows come from (dsv4/parallel/plan.py); the trainer sets SP's plan
        self.collect_stats = False  # record sink mass / indexer recall on the next forward (logging steps)
        self.keep_picks = False  # keep each CSA layer's top-k picks of the next forward (evaluation: hit rates)


class V4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, options: AttentionOptions) -> None:
        super().__init__()
        self.cfg, self.options = cfg, options
        self.spec = cfg.layer_spec(layer_idx)  # what this kind of layer has (dsv4/layer_kinds.py)
        self.kind = self.spec.name
        self.ratio = self.spec.compress_ratio(cfg.compress_ratios[layer_idx])
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.softmax_scale = cfg.head_dim ** -0.5  # no YaRN temperature anywhere
        if self.spec.compressor:  # compressed layers reach far back: the longer-wave RoPE with YaRN
            self.rotary = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
        else:
            self.rotary = Rotary(cfg.qk_rope_head_dim, cfg.rope_theta, None)

        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.num_attention_heads * cfg.head_dim)
        self.wkv = Linear(cfg.hidden_size, cfg.head_dim)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        heads_per_group = cfg.num_attention_heads // cfg.o_groups
        self.wo_a = GroupedLinear(cfg.o_groups, heads_per_group * cfg.head_dim, cfg.o_lora_rank)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.num_attention_heads, dtype=torch.float32))
        if self.spec.compressor:
            self.compressor = Compressor(cfg.hidden_size, cfg.head_dim, self.ratio,
                                         overlap=self.spec.overlap, eps=cfg.rms_norm_eps)
        if self.spec.indexer:
            self.indexer = Indexer(cfg, self.ratio)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, start_pos: int = 0, documents: bool = False,
                cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, d]. positions: [S] absolute positions (start_pos + arange(S)); or, with documents=True,
        [B, S] positions inside each packed document (0 at each document start: attention, compressor groups
        and RoPE restart there); or, with a cache (decoding, dsv4.inference), [B, S] absolute positions continuing
        each cached sequence. Returns (output [B, S, d], indexer loss or None).

        The rows and entries come from the plan (options.plan: one device or sequence parallelism) or from the
        cache, both with the interface of dsv4/parallel/plan.py: the steps below are the same for all three."""
        cfg, opts = self.cfg, self.options
        q, q_latent = self.queries(x, positions)
        kv = self.kv_rows(x, positions)
        rows = (cache if cache is not None else opts.plan).prepare(self, x, kv, positions, start_pos, documents)
        compressed = rows.entries() if self.ratio else None  # [B, N, c]
        if compressed is not None and compressed.shape[1] == 0:
            compressed = None

        index = topk_idx = None
        if self.spec.indexer and compressed is not None and opts.phase in PHASES_WITH_INDEXER:
            index = (self.indexer.queries(q_latent.detach(), self.rotary, positions), rows.index_keys(),
                     self.indexer.head_weights(x.detach()))
            if opts.phase == "sparse":
                topk_idx = indexer_topk(*index, ratio=self.ratio, topk=cfg.index_topk, backend=opts.backend,
                                        chunk_size=opts.chunk_size, ranges=rows.ranges)

        attended, attended_idx = rows.narrow(compressed, topk_idx)  # a one-token decode reads only its picks
        out, lse = v4_attention(q, rows.kv, self.attn_sink, cfg.sliding_window, self.softmax_scale,
                                compressed_kv=attended, ratio=self.ratio, topk_idx=attended_idx,
                                backend=opts.backend, chunk_size=opts.chunk_size,
                                deterministic=opts.deterministic, ranges=rows.ranges)  # [B, S, H, c]

        indexer_loss = None
        if index is not None and self.training:
            indexer_loss = indexer_kl_loss(q, compressed, lse, *index, ratio=self.ratio,
                                           softmax_scale=self.softmax_scale, topk_idx=topk_idx,
                                           backend=opts.backend, chunk_size=opts.chunk_size, ranges=rows.ranges,
                                           count_reduce=rows.count_reduce)
            indexer_loss = rows.keep_in_graph(indexer_loss, index[1])

        if opts.collect_stats:
            self._record_stats(q, compressed, lse, topk_idx, rows.ranges)
        self.picks = topk_idx if opts.keep_picks else None

        return self.project_out(out, positions), indexer_loss

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> (q [B, S, H, c] normalised per head and RoPE'd, the query latent c_Q [B, S, d_c])."""
        batch, seq_len, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))  # [B, S, d_c]
        q = self.wq_b(q_latent).view(batch, seq_len, self.n_heads, self.head_dim)
        q = rms_normalize(q, self.cfg.rms_norm_eps)  # per head, no gain
        return self.rotary(q, positions), q_latent

    def kv_rows(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> the shared K=V rows [B, S, c] (kv_norm, then RoPE at each token's position)."""
        return self.rotary(self.kv_norm(self.wkv(x)), positions)

    def project_out(self, out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention output [B, S, H, c] -> [B, S, d]: de-rotate at the query position, grouped wo_a, wo_b."""
        batch, seq_len = out.shape[:2]
        out = self.rotary(out, positions, inverse=True)  # de-rotate at the query position
        out = out.reshape(batch, seq_len, self.cfg.o_groups, -1)  # consecutive heads per group
        return self.wo_b(self.wo_a(out))

    @torch.no_grad()
    def _record_stats(self, q, compressed, lse, topk_idx, ranges) -> None:
        """sink mass: the mean share of attention the sink takes, exp(sink_h - lse); indexer recall (CSA, sparse
        phase): see dsv4/attention_stats.py. Stored in self.stats for the trainer's logging step."""
        self.stats = {"sink_mass": torch.exp(self.attn_sink.float()[None, None, :] - lse).mean()}
        if topk_idx is not None and compressed is not None:
            self.stats["indexer_recall"] = indexer_recall(q, compressed, lse, topk_idx, self.ratio,
                                                          self.softmax_scale, ranges, self.options.chunk_size)


class DenseAttention(nn.Module):
    """Plain causal GQA attention through SDPA (compress_ratios entry -1), the comparison baseline."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: AttentionOptions) -> None:
        super().__init__()
        self.spec = cfg.layer_spec(layer_idx)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.resolved_dense_head_dim
        self.wq = Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.wk = Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.wv = Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.wo = Linear(self.n_heads * self.head_dim, cfg.hidden_size)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta, None)
        self.options = options

    def forward(self, x: torch.Tensor, positions: torch.Tensor, start_pos: int = 0, documents: bool = False,
                cache=None) -> tuple[torch.Tensor, None]:
        """As V4Attention.forward: the plan runs the attention (SDPA, or Ulysses under sequence parallelism);
        a cache (decoding) supplies every earlier key and value and which of them each query sees."""
        batch, seq_len, _ = x.shape
        q, k, v = self.projections(x, positions)
        mask = None
        if cache is not None:
            k, v, mask = cache.keys_values(k, v, positions)
        elif documents:  # causal AND same document: [B, 1, S, S] over the whole sequence
            mask = document_mask(self.options.plan.sequence_positions(positions))
        out = (self.options.plan if cache is None else LOCAL).dense_attention(q, k, v, mask)  # [B, S, H, d]
        return self.wo(out.reshape(batch, seq_len, -1)), None

    def projections(self, x: torch.Tensor, positions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> q [B, S, H, d_h], k and v [B, S, n_kv, d_h] (RoPE on q and k)."""
        batch, seq_len, _ = x.shape
        q = self.rotary(self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim), positions)
        k = self.rotary(self.wk(x).view(batch, seq_len, self.n_kv, self.head_dim), positions)
        return q, k, self.wv(x).view(batch, seq_len, self.n_kv, self.head_dim)
