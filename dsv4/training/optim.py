"""The optimizer, its LR schedule and the DeepSpeed JSON config a run trains with."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

from dsv4.run_config import RunConfig


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


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm itself and skips a step whose norm is not finite, telling
    DeepSpeed's engine so through `overflow` (no LR step, counted as skipped), as DeepSpeed's ZeRO and bf16
    optimizers already do. For the one path where DeepSpeed steps the client optimizer directly: ZeRO-0 in fp32
    (whose gradients are already all-reduced, so the norm is global)."""

    def __init__(self, params, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            clip = self.max_norm / (self._global_grad_norm + 1e-6)  # DeepSpeed's clip_grad_norm_ rule
            if clip < 1:
                torch._foreach_mul_(grads, clip)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, run: RunConfig, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. Where DeepSpeed steps it directly (ZeRO-0 fp32, see `effective_settings`), the
    finite-step variant, which also clips: the DeepSpeed config must then not clip (gradient_clipping 0)."""
    t = run.train
    kwargs = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps}
    groups = param_groups(model, t.weight_decay)
    if settings["zero_stage"] == 0 and settings["precision"] == "fp32":
        return FiniteStepAdamW(groups, max_norm=float(settings["gradient_clipping"] or 0.0), **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def effective_settings(ds_config: dict[str, Any]) -> dict[str, Any]:
    """What DeepSpeed will actually run with, after deepspeed.extra was merged: ZeRO stage, precision, clipping."""
    zero = ds_config.get("zero_optimization") or {}
    bf16 = bool((ds_config.get("bf16") or {}).get("enabled"))
    return {"zero_stage": int(zero.get("stage", 0)), "precision": "bf16" if bf16 else "fp32",
            "gradient_clipping": ds_config.get("gradient_clipping", 0.0),
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device"),
            "offload_param": (zero.get("offload_param") or {}).get("device")}


def describe_settings(settings: dict[str, Any], run: RunConfig) -> str:
    """`ZeRO-2 fp32`, with what deepspeed.extra changed named: `ZeRO-1 fp32 (deepspeed.extra: zero stage 2 -> 1)`."""
    text = f"ZeRO-{settings['zero_stage']} {settings['precision']}"
    changed = []
    if settings["zero_stage"] != run.deepspeed.zero_stage:
        changed.append(f"zero stage {run.deepspeed.zero_stage} -> {settings['zero_stage']}")
    if settings["gradient_clipping"] != run.train.grad_clip:
        changed.append(f"gradient clipping {run.train.grad_clip} -> {settings['gradient_clipping']}")
    for key in ("offload_optimizer", "offload_param"):
        if settings[key]:
            changed.append(f"{key} {settings[key]}")
    return text + (f" (deepspeed.extra: {', '.join(changed)})" if changed else "")
