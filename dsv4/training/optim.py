"""The optimizer, its LR schedule and the DeepSpeed JSON config a run trains with."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

from dsv4.training.config import RunConfig


def lr_lambda(train, step: int) -> float:
    """Multiplier of the peak LR at scheduler step `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norm gains, sinks or the compressor's additive slot bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith(".ape") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(run: RunConfig, use_bf16: bool) -> dict[str, Any]:
    ds, train = run.deepspeed, run.train
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                            "overlap_comm": ds.overlap_comm}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if run.parallel.sequence_parallel_size > 1:  # its reduce-scatter averages over SP ranks (cpu-stack §3.3)
            zero["reduce_scatter"] = False
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        # gradients summed across sequence-parallel ranks stay fp32: bf16 sums drift (pitfall 9)
        "seq_parallel_communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, OmegaConf.to_container(OmegaConf.create(ds.extra)) if ds.extra else {})


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
