"""Checks of a resolved run config that only training makes: warnings about settings that are valid but probably
not what was meant, and settings this machine cannot run. The schema itself (RunConfig, resolve_config) is
dsv4.run_config."""

from __future__ import annotations

from dsv4.config import CSA_RATIO, ConfigError
from dsv4.run_config import RunConfig

# AdamW moves each weight by about lr per step whatever the gradient's size: above this, one step is several times
# the init scale (model.initializer_range 0.02) and training diverges (train.lr=10 took the tiny model's loss from
# 8.3 to 6871); the project's defaults and sweeps use 1e-3 to 3e-3.
MAX_SENSIBLE_LR = 0.1


def config_warnings(run: RunConfig) -> list[str]:
    """Settings that are valid but probably not what was meant, said before training."""
    return _schedule_warnings(run) + _attention_warnings(run)


def _attention_warnings(run: RunConfig) -> list[str]:
    """Model settings that do nothing, or silently change what a layer does, at train.seq_len."""
    m, seq_len, warnings = run.model, run.train.seq_len, []
    specs = m.layer_specs()
    entries = seq_len // CSA_RATIO
    if any(spec.indexer for spec in specs) and m.index_topk > entries:
        warnings.append(f"warning: model.index_topk={m.index_topk} > {entries}, the compressed entries a sequence of "
                        f"train.seq_len={seq_len} tokens has (seq_len // 4): CSA attends to every entry (dense), "
                        f"not a top-k; lower model.index_topk or raise train.seq_len")
    if all(spec.v4 for spec in specs) and m.num_key_value_heads != 1:
        warnings.append(f"warning: model.num_key_value_heads={m.num_key_value_heads} has no effect: no layer is dense "
                        "(compress_ratios entry -1); it sizes only the dense baseline's GQA")
    for i, (r, spec) in enumerate(zip(m.compress_ratios, specs)):
        if spec.compressor and r > seq_len:
            warnings.append(f"warning: layer {i} ({spec.label}) has compression ratio {r} > "
                            f"train.seq_len={seq_len}: it never emits a compressed entry and attends only to its "
                            "sliding window; raise train.seq_len or lower the ratio")
    return warnings


def _schedule_warnings(run: RunConfig) -> list[str]:
    t, warnings = run.train, []
    if t.lr > MAX_SENSIBLE_LR:
        warnings.append(f"warning: train.lr={t.lr:g} > {MAX_SENSIBLE_LR:g}: AdamW moves each weight by about lr per "
                        "step, so training will almost certainly diverge; typical values are 1e-4 to 1e-2")
    if t.warmup_steps >= t.steps:
        warnings.append(f"warning: train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the LR never reaches "
                        f"its peak (train.lr={t.lr:g}) and never decays; lower train.warmup_steps")
    sparse_from = t.phases.dense_steps + t.phases.indexer_warmup_steps
    if any(spec.indexer for spec in run.model.layer_specs()) and sparse_from >= t.steps:
        warnings.append(f"warning: train.steps={t.steps} ends before the sparse CSA phase (train.phases.dense_steps="
                        f"{t.phases.dense_steps} + indexer_warmup_steps={t.phases.indexer_warmup_steps}): no top-k "
                        "attention is trained; lower the phases or raise train.steps")
    return warnings


def check_environment(run: RunConfig, cuda_available: bool, triton_interpreter: bool) -> None:
    """Settings this machine cannot run, before anything is created."""
    if run.attention.backend == "triton" and not cuda_available and not triton_interpreter:
        raise ConfigError("attention.backend='triton': the Triton kernels need a CUDA GPU and none is visible; use "
                          "attention.backend=auto (PyTorch on CPU) or torch (TRITON_INTERPRET=1 runs the kernels in "
                          "Triton's CPU interpreter, very slowly)")
