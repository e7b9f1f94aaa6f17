"""Small building blocks shared by the attention and the decoder.

Every parameter is read inside the forward of the module that owns it: under ZeRO-3 a parameter
is only materialised while its own module runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dim with no gain (V4's per-head query norm)."""
    return _RMSNorm.apply(x, None, eps)


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) (* gain), in fp32, as one autograd node. The forward is the plain formula; the backward is
    its closed form, dx = (g - y_hat mean(g y_hat)) / rms(x) with g = dy (* gain) and y_hat = x / rms(x), instead
    of autograd's chain through pow, mean, rsqrt and the products (several passes over x and its gradient)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        y = xf * inv_rms
        if weight is not None:
            y = y * weight.float()
        ctx.save_for_backward(x, inv_rms, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, d_y):
        x, inv_rms, weight = ctx.saved_tensors
        y_hat = x.float() * inv_rms
        g = d_y.float()
        d_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                d_weight = (g * y_hat).reshape(-1, y_hat.shape[-1]).sum(0).to(weight.dtype)
            g = g * weight.float()
        d_x = (g - y_hat * (g * y_hat).mean(-1, keepdim=True)) * inv_rms
        return d_x.to(x.dtype), d_weight, None


class Linear(nn.Linear):
    """Bias-free linear layer."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)


class Fp32Linear(Linear):
    """Linear layer computed in fp32 whatever the parameter dtype (the compressor's projections)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class GroupedLinear(nn.Module):
    """V4's grouped low-rank output projection `wo_a`: group j of the input maps through its own matrix.

    weight: [groups * out_per_group, in_per_group], viewed as [groups, out_per_group, in_per_group]
    (the released checkpoint's layout). Input [..., groups, in_per_group] -> output [..., groups * out_per_group].
    """

    def __init__(self, groups: int, in_per_group: int, out_per_group: int) -> None:
        super().__init__()
        self.groups, self.out_per_group = groups, out_per_group
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group))
        # nn.Linear's default (fan_in = in_per_group), so a layer built on its own holds no uninitialised
        # memory. DSV4Model.reset_parameters re-initialises every weight with the model's std; the global RNG
        # is restored afterwards so a model's initialisation for a given seed does not depend on this draw.
        with torch.random.fork_rng(devices=[]):
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, self.out_per_group, -1)
        return torch.einsum("...gi,goi->...go", x, w.to(x.dtype)).flatten(-2)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (w2(silu(w1 x) * w3 x)); DeepSeek's naming."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(hidden, dim)
        self.w3 = Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
