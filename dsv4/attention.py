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
This module knows nothing of DeepSpeed or process groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.compressor import Compressor, Indexer
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.layers import GroupedLinear, Linear, RMSNorm, rms_normalize
from dsv4.ops.indexer import indexer_kl_loss, indexer_topk
from dsv4.ops.indexer.recall import indexer_recall
from dsv4.ops.ranges import AttentionRanges, document_ranges, entry_ranges, group_starts
from dsv4.ops.v4_attention import v4_attention
from dsv4.parallel.collectives import all_gather_sequence, all_gather_values, all_reduce_sum, shift_to_next_rank
from dsv4.rope import Rotary

PHASES = ("dense", "indexer_warmup", "sparse")


class AttentionOptions:
    """Runtime choices that do not change parameters: backend, chunking, CSA phase, sequence parallelism."""

    def __init__(self, backend: str = "torch", chunk_size: int = 128, phase: str = "sparse",
                 deterministic: bool = True) -> None:
        self.backend, self.chunk_size, self.phase = backend, chunk_size, phase
        self.deterministic = deterministic  # Triton backward: fixed-order dK=V (else fp32 atomics)
        self.sp = None  # dsv4.parallel.SequenceParallel, injected by the trainer (None: one device)
        self.collect_stats = False  # record sink mass / indexer recall on the next forward (logging steps)
        self.keep_picks = False  # keep each CSA layer's top-k picks of the next forward (evaluation: hit rates)

    @property
    def sequence_parallel(self):
        return self.sp if self.sp is not None and self.sp.world > 1 else None


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, start_pos: int = 0, documents: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, d]. positions: [S] absolute positions (start_pos + arange(S)); or, with documents=True,
        [B, S] positions inside each packed document (0 at each document start: attention, compressor groups
        and RoPE restart there). Returns (output [B, S, d], indexer loss or None)."""
        cfg, opts = self.cfg, self.options
        batch, seq_len, _ = x.shape
        ranges, starts = None, None
        sp = opts.sequence_parallel
        sp_docs = None
        if documents and sp is None:
            starts = group_starts(positions, self.ratio) if self.ratio else None
            ranges = document_ranges(positions, cfg.sliding_window, self.ratio, starts)
        doc_positions = positions if documents else None
        q, q_latent = self.queries(x, positions)
        kv = self.kv_rows(x, positions)

        compressed = None
        topk_idx = None
        index = None
        x_prefixed = None
        if sp is not None and documents:  # as below, with groups and windows that follow the documents
            sp_docs = _SPDocuments(self, x, kv, positions, sp)
            kv, x_prefixed, ranges = sp_docs.kv, sp_docs.x_prefixed, sp_docs.ranges
            doc_positions, starts = sp_docs.positions_prefixed, sp_docs.local_starts
        elif sp is not None:  # local queries; K=V rows = [previous rank's last window-1 rows | ours]
            kv, x_prefixed, ranges = self._sequence_parallel_inputs(x, kv, sp)
        if self.ratio:
            if sp_docs is not None:  # this rank's groups, gathered from every rank in sequence order
                compressed = sp_docs.gather(self.compressor(x_prefixed, self.rotary, start_pos, doc_positions, starts))
            elif sp is not None:  # compress our own groups, then gather every rank's entries (in rank order)
                compressed = all_gather_sequence(self._local_entries(x, x_prefixed, start_pos, sp), sp)
            else:
                compressed = self.compressor(x, self.rotary, start_pos, doc_positions, starts)  # [B, N, c]
            if compressed.shape[1] == 0:
                compressed = None
        if self.kind == "csa" and compressed is not None and opts.phase in ("indexer_warmup", "sparse"):
            index = self.indexer(x, q_latent, self.rotary, positions, start_pos, doc_positions, starts, x_prefixed,
                                 sp is None or sp.rank > 0)
            if sp_docs is not None:
                index = (index[0], sp_docs.gather(index[1]), index[2])
            elif sp is not None:
                index = (index[0], all_gather_sequence(index[1], sp), index[2])
            if opts.phase == "sparse":
                topk_idx = indexer_topk(*index, ratio=self.ratio, topk=cfg.index_topk, backend=opts.backend,
                                        chunk_size=opts.chunk_size, ranges=ranges)

        out, lse = v4_attention(q, kv, self.attn_sink, cfg.sliding_window, self.softmax_scale,
                                compressed_kv=compressed, ratio=self.ratio, topk_idx=topk_idx,
                                backend=opts.backend, chunk_size=opts.chunk_size,
                                deterministic=opts.deterministic, ranges=ranges)  # [B, S, H, c]

        indexer_loss = None
        if index is not None and self.training:
            count_reduce = None
            if sp is not None:
                def count_reduce(n: int) -> int:
                    return int(all_reduce_sum(torch.tensor(n, device=x.device), sp))
            indexer_loss = indexer_kl_loss(q, compressed, lse, *index, ratio=self.ratio,
                                           softmax_scale=self.softmax_scale, topk_idx=topk_idx,
                                           backend=opts.backend, chunk_size=opts.chunk_size, ranges=ranges,
                                           count_reduce=count_reduce)
            if sp is not None:  # keep the gathered keys in the graph on every rank: same backward collectives
                indexer_loss = indexer_loss + 0.0 * index[1].sum()

        if opts.collect_stats:
            self._record_stats(q, compressed, lse, topk_idx, ranges)
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
        phase): see dsv4/ops/indexer/recall.py. Stored in self.stats for the trainer's logging step."""
        self.stats = {"sink_mass": torch.exp(self.attn_sink.float()[None, None, :] - lse).mean()}
        if topk_idx is not None and compressed is not None:
            self.stats["indexer_recall"] = indexer_recall(q, compressed, lse, topk_idx, self.ratio,
                                                          self.softmax_scale, ranges, self.options.chunk_size)

    def _sequence_parallel_inputs(self, x: torch.Tensor, kv: torch.Tensor, sp):
        """Halo exchange and per-query ranges for this rank's shard (see dsv4/parallel)."""
        batch, seq_len, _ = x.shape
        window, halo = self.cfg.sliding_window, self.cfg.sliding_window - 1
        if seq_len < max(halo, self.ratio):
            raise ValueError(f"sequence parallelism: shard length {seq_len} must be >= sliding_window - 1 "
                             f"({halo}) and >= the compression ratio ({self.ratio})")
        kv, row, window_lo = _halo_and_window(kv, sp, window)
        x_prefixed = None
        if self.ratio == CSA_RATIO:  # the first entry's lookback series comes from the previous rank's last group
            x_prefixed = torch.cat((shift_to_next_rank(x[:, seq_len - self.ratio:], sp), x), dim=1)
        t = row - halo
        cmp_hi = (sp.start + t + 1) // self.ratio if self.ratio else torch.zeros_like(t)
        ranges = AttentionRanges(window_lo.int(), row.int(), torch.zeros_like(t).int(), cmp_hi.int())
        return kv, x_prefixed, ranges

    def _local_entries(self, x, x_prefixed, start_pos: int, sp) -> torch.Tensor:
        if x_prefixed is None:  # HCA: groups never straddle ranks, no lookback
            return self.compressor(x, self.rotary, start_pos)
        return self.compressor(x_prefixed, self.rotary, start_pos - self.ratio, prefix=True,
                               prefix_valid=sp.rank > 0)


def _halo_and_window(kv: torch.Tensor, sp, window: int, doc_positions: torch.Tensor | None = None):
    """Sequence parallelism: K=V rows [previous rank's last window-1 rows | ours] -> (those rows, our queries' rows
    among them [B, L], the first row of each query's window [B, L]). The window stops at the document start when
    doc_positions are given; on rank 0 the halo holds the last rank's rows and is never visible."""
    batch, seq_len, _ = kv.shape
    halo = window - 1
    if halo:
        kv = torch.cat((shift_to_next_rank(kv[:, seq_len - halo:], sp), kv), dim=1)
    row = halo + torch.arange(seq_len, device=kv.device)[None].expand(batch, -1)
    window_lo = row - window + 1
    if doc_positions is not None:
        window_lo = torch.maximum(window_lo, row - doc_positions)
    if sp.rank == 0:
        window_lo = window_lo.clamp(min=halo)
    return kv, row, window_lo


class _SPDocuments:
    """Sequence parallelism with document masking, for one V4 layer on one rank (shard of L tokens).

    Groups start at document positions that are multiples of the ratio, so they may straddle two ranks: a group
    belongs to the rank holding its last token, which compresses it from its own rows plus a prefix of the
    previous rank's last rows (2*ratio-1 for CSA: a straddling group and its lookback; ratio-1 for HCA). Ranks
    own different numbers of entries: each pads to the largest count, the padded entries are all-gathered, and
    every rank compacts them into sequence order (the same entry list as one device). Windows stop at document
    starts; per-query ranges index the K=V rows [halo | ours] and the compacted entries."""

    def __init__(self, layer: V4Attention, x: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, sp) -> None:
        cfg, r = layer.cfg, layer.ratio
        batch, seq_len, _ = x.shape
        window, halo = cfg.sliding_window, cfg.sliding_window - 1
        prefix = (2 * r - 1 if r == CSA_RATIO else r - 1) if r else 0
        if seq_len < max(halo, prefix, r):
            raise ValueError(f"sequence parallelism with document masking: shard length {seq_len} must be >= "
                             f"sliding_window - 1 ({halo}), the ratio ({r}) and the compressor prefix ({prefix})")
        self.sp = sp
        self.kv, row, window_lo = _halo_and_window(kv, sp, window, positions)
        t = row - halo
        self.x_prefixed = self.positions_prefixed = self.local_starts = None
        cmp_lo = cmp_hi = torch.zeros_like(t)
        if r:
            self.x_prefixed = torch.cat((shift_to_next_rank(x[:, seq_len - prefix:], sp), x), dim=1)
            before = shift_to_next_rank(positions[:, seq_len - prefix:].float(), sp).long()
            if sp.rank == 0:  # the last rank's rows: no group may start there
                before = torch.full_like(before, -1)
            self.positions_prefixed = torch.cat((before, positions), dim=1)
            n_rows = prefix + seq_len
            starts = group_starts(self.positions_prefixed, r)  # rows of the prefixed shard, padded with n_rows
            mine = (starts >= prefix - r + 1) & (starts < n_rows)  # groups that end in our rows
            counts = mine.sum(1)
            all_counts = all_gather_values(counts, sp)  # [world, B]
            width = int(all_counts.max())
            order = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)
            ours = torch.arange(starts.shape[1], device=x.device)[None] < counts[:, None]
            local = torch.where(ours, starts.gather(1, order), n_rows)
            local = F.pad(local, (0, max(0, width - local.shape[1])), value=n_rows)[:, :width]
            self.local_starts = local
            total_rows = sp.world * seq_len
            self.index = torch.zeros(batch, 0, dtype=torch.long, device=x.device)
            if width == 0:  # no complete group on any rank (every rank knows: the counts are shared)
                self.ranges = AttentionRanges(window_lo.int(), row.int(), cmp_lo.int(), cmp_hi.int())
                return
            global_starts = all_gather_values(torch.where(local < n_rows, local - prefix + sp.start, total_rows), sp)
            # compaction: for each batch row, rank k's first counts[k] entries, in rank order
            j = torch.arange(width, device=x.device)
            valid = (j[None, None, :] < all_counts[:, :, None]).permute(1, 0, 2).reshape(batch, -1)
            flat = (torch.arange(sp.world, device=x.device)[:, None] * width + j[None, :]).reshape(-1)
            self.total = valid.sum(1)
            n_total = int(self.total.max()) if batch else 0
            keep = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :n_total]
            self.index = flat[keep]  # [B, n_total] positions in the gathered [B, world * width] entries
            self.present = torch.arange(n_total, device=x.device)[None] < self.total[:, None]
            gathered_starts = global_starts.permute(1, 0, 2).reshape(batch, -1).gather(1, self.index)
            entry_starts = torch.where(self.present, gathered_starts, total_rows)
            t_global = sp.start + t
            cmp_lo, cmp_hi = entry_ranges(entry_starts, total_rows, r, t_global - positions, t_global)
        self.ranges = AttentionRanges(window_lo.int(), row.int(), cmp_lo.int(), cmp_hi.int())

    def gather(self, local_entries: torch.Tensor) -> torch.Tensor:
        """This rank's entries [B, width, c] -> every rank's, compacted in sequence order [B, N, c]
        (differentiable: the backward of the gather sends each rank its entries' gradients)."""
        if self.index.shape[1] == 0:
            return local_entries[:, :0]
        everyone = all_gather_sequence(local_entries, self.sp)  # [B, world * width, c]
        picked = everyone.gather(1, self.index[..., None].expand(-1, -1, everyone.shape[-1]))
        return picked * self.present[..., None].to(picked.dtype)


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, start_pos: int = 0, documents: bool = False
                ) -> tuple[torch.Tensor, None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.projections(x, positions)
        sp = self.options.sequence_parallel if self.options is not None else None
        mask = None
        if documents:  # causal AND same document: [B, 1, S, S] over the whole sequence
            if sp is not None:
                positions = all_gather_values(positions, sp).permute(1, 0, 2).reshape(batch, -1)
            doc = torch.cumsum(positions == 0, dim=1)
            total = positions.shape[1]
            causal = torch.ones(total, total, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]
        if sp is not None:
            from dsv4.parallel.ulysses import ulysses_attention

            return self.wo(ulysses_attention(q, k, v, sp, mask).reshape(batch, seq_len, -1)), None
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1)), None

    def projections(self, x: torch.Tensor, positions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> q [B, S, H, d_h], k and v [B, S, n_kv, d_h] (RoPE on q and k)."""
        batch, seq_len, _ = x.shape
        q = self.rotary(self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim), positions)
        k = self.rotary(self.wk(x).view(batch, seq_len, self.n_kv, self.head_dim), positions)
        return q, k, self.wv(x).view(batch, seq_len, self.n_kv, self.head_dim)
