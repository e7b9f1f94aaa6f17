"""Sequence-parallel setup for training: DeepSpeed's SP groups (passed to deepspeed.initialize as `mpu`, so ZeRO
reduces over the right groups), the injected context for the model, batch sharding and the loss normaliser.

World = data-parallel size x sequence_parallel_size; the ranks of one SP group are consecutive, read the same
sample (same data-parallel rank) and each keeps its contiguous shard. DeepSpeed SUMS gradients over an SP group
and averages over data parallelism, so each rank's loss is (sum of its tokens' losses) / (tokens of the whole
sequence). ZeRO-3's default reduce-scatter averages over SP too (cpu-stack.md §3.3); it is turned off
automatically when sequence_parallel_size > 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv4.config import ConfigError, ModelConfig
from dsv4.parallel import SequenceParallel
from dsv4.parallel.collectives import all_reduce_sum


@dataclass
class ParallelLayout:
    sp: SequenceParallel | None  # None when sequence_parallel_size == 1
    mpu: Any  # DeepSpeed's parallel_state_sp module, or None
    dp_rank: int
    dp_world: int

    @property
    def sp_size(self) -> int:
        return self.sp.world if self.sp is not None else 1


def check_sequence_parallel(sp_size: int, world: int, seq_len: int, model: ModelConfig) -> None:
    key = "parallel.sequence_parallel_size"
    if sp_size < 1:
        raise ConfigError(f"{key}={sp_size}: must be >= 1")
    if sp_size == 1:
        return
    if world % sp_size:
        raise ConfigError(f"{key}={sp_size}: must divide the number of ranks ({world})")
    if seq_len % sp_size:
        raise ConfigError(f"{key}={sp_size}: must divide train.seq_len ({seq_len})")
    shard = seq_len // sp_size
    specs = model.layer_specs()
    ratios = sorted({r for r, spec in zip(model.compress_ratios, specs) if spec.compressor})
    for r in ratios:
        if shard % r:
            raise ConfigError(f"{key}={sp_size}: the shard length train.seq_len / {sp_size} = {shard} must be a "
                              f"multiple of every compression ratio ({ratios}), so no group straddles two ranks")
    if shard < model.sliding_window - 1:
        raise ConfigError(f"{key}={sp_size}: the shard length {shard} must be >= sliding_window - 1 "
                          f"({model.sliding_window - 1}): the window halo comes from the previous rank only")
    if any(not spec.v4 for spec in specs) and model.num_attention_heads % sp_size:
        raise ConfigError(f"{key}={sp_size}: dense layers use Ulysses, which needs num_attention_heads "
                          f"({model.num_attention_heads}) divisible by it")
    if any(spec.overlap and shard < r for r, spec in zip(model.compress_ratios, specs)):  # lookback: one rank back
        raise ConfigError(f"{key}={sp_size}: the shard length {shard} is shorter than a CSA group")


def setup_sequence_parallel(sp_size: int, rank: int, world: int, seq_len: int) -> ParallelLayout:
    """Create the SP groups (after the default process group exists)."""
    if sp_size == 1:
        return ParallelLayout(sp=None, mpu=None, dp_rank=rank, dp_world=world)
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(sp_size)
    group = mpu.get_sequence_parallel_group()
    sp = SequenceParallel(group=group, rank=mpu.get_sequence_parallel_rank(), world=sp_size,
                          shard_len=seq_len // sp_size)
    return ParallelLayout(sp=sp, mpu=mpu, dp_rank=rank // sp_size, dp_world=world // sp_size)


def shard_batch(batch: dict[str, torch.Tensor], sp: SequenceParallel | None) -> dict[str, torch.Tensor]:
    """This rank's contiguous shard of every [B, S] tensor (labels were shifted on the full sequence)."""
    if sp is None:
        return batch
    mine = slice(sp.start, sp.start + sp.shard_len)
    return {k: (v[:, mine] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in batch.items()}


def lm_loss_for_backward(out, sp: SequenceParallel | None) -> torch.Tensor:
    """Local token-loss sum / the token count of the whole sequence (summed over the SP group)."""
    if sp is None:
        return out.lm_loss
    total = all_reduce_sum(out.num_tokens.to(out.lm_loss_sum.device), sp)
    return out.lm_loss_sum / total.clamp_min(1)
