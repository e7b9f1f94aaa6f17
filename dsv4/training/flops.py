"""Model FLOPs of one training step, counted for what V4 attention computes, and MFU.

Per sequence of S tokens (queries t = 0 .. S-1), training FLOPs are

    6 * P_matmul * S                                                     (weight matmuls, forward + backward)
  + 3 * sum over layers of 4 * H * d * sum_t keys(t)                     (attention: QK^T and PV, 2 FLOPs per MAC)
  + 3 * sum over CSA layers of 2 * H_I * d_I * sum_t n(t)                (the lightning indexer's scores, when it runs)

where 3 = forward + backward (backward ~ 2x forward), and per layer kind (the formulas live in dsv4/layer_kinds.py),
with W = sliding_window, m the layer's compression ratio and n(t) = (t + 1) // m the compressed entries visible to
query t:

    window-only (ratio 0):  keys(t) = min(t + 1, W)
    HCA (ratio m > 4):      keys(t) = min(t + 1, W) + n(t)                          (every visible entry)
    CSA (ratio 4):          keys(t) = min(t + 1, W) + n(t)                          (phases dense, indexer_warmup)
                            keys(t) = min(t + 1, W) + min(index_topk, n(t))         (phase sparse: its top-k)
                            indexer scores n(t) entries with H_I = index_n_heads of d_I = index_head_dim
                            (phases indexer_warmup and sparse; idle in phase dense)
    dense (ratio -1):       keys(t) = t + 1 with H = num_attention_heads of d = the dense head size

H = num_attention_heads and d = head_dim for V4 layers (one shared K=V head: keys are counted once per query head,
because each head computes its own scores and weighted sum). P_matmul counts the parameters of every weight matrix
used in a matmul: all parameters with two or more dimensions except the token embedding (a lookup) and the
compressors' additive position bias `ape`. Not counted: norms, RoPE, softmax, the sink, the compressors' pooling,
the indexer's top-k and KL loss, the optimizer, and recomputation in the backward pass (model FLOPs, not hardware
FLOPs; the query-chunked PyTorch path recomputes each chunk's scores, so hardware FLOPs are higher).

MFU = step FLOPs (all sequences of all ranks) / step time / (peak FLOP/s per rank * ranks). The peak comes from
`logging.peak_tflops`: a number (TFLOP/s per rank), `auto` (the table below by CUDA device name; no MFU on CPU or an
unknown device) or null (no MFU).
"""

from __future__ import annotations

import math

import torch

from dsv4.config import ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s per GPU, without sparsity), matched by substring of the CUDA device name in
# this order. fp32 training runs far below these (TF32 is half, plain fp32 a small fraction): give a number then.
PEAK_TFLOPS_BF16: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / NVL
    ("A100", 312.0),
]


def layer_attention_counts(cfg: ModelConfig, layer: int, seq_len: int, phase: str) -> dict[str, int | str]:
    """Per layer: its kind, the keys summed over all queries, and the indexer's scored entries summed over queries
    (the kind's formula, dsv4/layer_kinds.py)."""
    spec = cfg.layer_spec(layer)
    counts = spec.attention_counts(cfg, cfg.compress_ratios[layer], seq_len, phase)
    return {"kind": spec.name, "keys": counts.keys, "indexer_entries": counts.indexer_entries}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: >= 2-D weights except the token embedding and the `ape` biases."""
    total = 0
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape
        if len(shape) < 2 or name.endswith(".ape") or name.startswith("embed."):
            continue
        total += math.prod(shape)
    return total


def attention_flops_per_sequence(cfg: ModelConfig, seq_len: int, phase: str) -> float:
    """Forward + backward attention and indexer FLOPs for one sequence (see the module docstring)."""
    total = 0.0
    for layer in range(cfg.num_hidden_layers):
        forward = cfg.layer_spec(layer).attention_flops(cfg, cfg.compress_ratios[layer], seq_len, phase)
        total += 3 * forward["attention"]
        total += 3 * forward["indexer"]
    return total


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int, phase: str, n_matmul_params: int) -> float:
    """Model FLOPs to train on one sequence of `seq_len` tokens: 6 * P * S plus attention and indexer."""
    return 6.0 * n_matmul_params * seq_len + attention_flops_per_sequence(cfg, seq_len, phase)


def peak_flops_per_rank(setting, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s per rank or None, where it came from) for `logging.peak_tflops` = number | 'auto' | null."""
    if setting is None:
        return None, "logging.peak_tflops=null: MFU not reported"
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting) * 1e12, f"logging.peak_tflops={setting}"
    if device.type != "cuda":
        return None, f"logging.peak_tflops=auto: no peak known for {device.type}; MFU not reported (give a number)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in name:
            return tflops * 1e12, f"logging.peak_tflops=auto: {name} -> {tflops} TFLOP/s (bf16 dense)"
    return None, f"logging.peak_tflops=auto: {name} is not in the table; MFU not reported (give a number)"
