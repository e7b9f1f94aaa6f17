"""Rotary embeddings as DeepSeek V4 uses them.

- Interleaved pairs: channels (2i, 2i+1) of the rotary tail form one complex number (not rotate-half).
- Only the LAST `rope_dim` channels of a vector rotate; the leading channels are position-free.
- Window-only layers: base `rope_theta`, no YaRN. Compressed layers: `compress_rope_theta` plus YaRN
  frequency blending, and no attention temperature (cos/sin unscaled, softmax scale untouched).
- Frequencies are plain Python-computed tensors, not module buffers, so a bf16 cast of the model
  never degrades them.
"""

from __future__ import annotations

import math

import torch

from dsv4.config import RopeScaling


def rope_frequencies(rope_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Angular frequency of each of the rope_dim/2 pairs, float64, with YaRN blending when `scaling` is set."""
    half = rope_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / rope_dim))
    if scaling is None:
        return freqs

    def correction(n_rotations: float) -> float:
        return rope_dim * math.log(scaling.original_max_position_embeddings / (n_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction(scaling.beta_fast)), 0)
    high = min(math.ceil(correction(scaling.beta_slow)), rope_dim - 1)  # as the reference code clamps
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return freqs * (1 - ramp) + (freqs / scaling.factor) * ramp


class Rotary:
    """Applies RoPE to the tail of the last dimension at given positions. Stateless."""

    def __init__(self, rope_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        self.rope_dim = rope_dim
        self.freqs = rope_frequencies(rope_dim, theta, scaling)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int tensor of any shape P -> cos, sin of shape P + [rope_dim/2], float32."""
        angles = positions.to(torch.float64)[..., None] * self.freqs.to(positions.device)
        return angles.cos().float(), angles.sin().float()

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last `rope_dim` channels of x.

        x: [B, S, ..., D] with positions [S] or [B, S]; position dims broadcast over the middle dims.
        inverse=True applies the conjugate rotation (position -t), used to de-rotate attention outputs.
        """
        cos, sin = self.cos_sin(positions)
        if positions.dim() == 1:  # [S, half] -> [1, S, half]
            cos, sin = cos[None], sin[None]
        extra = x.dim() - 3  # dims between S and D
        for _ in range(extra):
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if inverse:
            sin = -sin
        return _Rotate.apply(x, cos, sin, self.rope_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rotate the interleaved pairs (re, im) of x's last rope_dim channels by (cos, sin), computed in fp32:
    (re cos - im sin, im cos + re sin), written as tail * [cos, cos] + swapped tail * [-sin, sin] so every op
    runs on contiguous memory (the same products and sums, so the same bits)."""
    cos2 = torch.stack((cos, cos), dim=-1).flatten(-2)  # [..., rope_dim]
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    tail = x[..., -rope_dim:].float()
    swapped = torch.stack((tail[..., 1::2], tail[..., 0::2]), dim=-1).flatten(-2)  # (im, re) per pair
    out = x.clone()  # the position-free channels pass through
    out[..., -rope_dim:] = tail * cos2 + swapped * sin2
    return out


class _Rotate(torch.autograd.Function):
    """RoPE as one autograd node: a rotation is orthogonal, so its backward is the inverse rotation of the
    gradient (the same products and sums autograd would form, without a graph of slices, stacks and cats)."""

    @staticmethod
    def forward(ctx, x, cos, sin, rope_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.rope_dim = rope_dim
        return _rotate(x, cos, sin, rope_dim)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, ctx.rope_dim), None, None, None
