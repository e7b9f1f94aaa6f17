"""The Triton V4 attention as a `torch.library.custom_op` with autograd, so it works under torch.compile.

(No `from __future__ import annotations` here: custom_op reads the real type hints.)
"""

import torch

from dsv4.ops.v4_attention.triton import attention_bwd, attention_fwd


@torch.library.custom_op("dsv4::v4_attention_fwd", mutates_args=())
def v4_attention_fwd_op(q: torch.Tensor, kv: torch.Tensor, ckv: torch.Tensor | None, idx: torch.Tensor | None,
                        sink: torch.Tensor, window_lo: torch.Tensor, window_hi: torch.Tensor, cmp_lo: torch.Tensor,
                        cmp_hi: torch.Tensor, scale: float, deterministic: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, kv, ckv, idx, sink, (window_lo, window_hi, cmp_lo, cmp_hi), scale)


@v4_attention_fwd_op.register_fake
def _fwd_fake(q, kv, ckv, idx, sink, window_lo, window_hi, cmp_lo, cmp_hi, scale, deterministic):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("dsv4::v4_attention_bwd", mutates_args=())
def v4_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, ckv: torch.Tensor | None,
                        idx: torch.Tensor | None, sink: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        window_lo: torch.Tensor, window_hi: torch.Tensor, cmp_lo: torch.Tensor, cmp_hi: torch.Tensor,
                        scale: float, deterministic: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ranges = (window_lo, window_hi, cmp_lo, cmp_hi)
    dq, dkv, dckv, dsink = attention_bwd(do, q, kv, ckv, idx, sink, out, lse, ranges, scale, deterministic)
    return dq, dkv, (dckv if dckv is not None else kv.new_empty(0)), dsink


@v4_attention_bwd_op.register_fake
def _bwd_fake(do, q, kv, ckv, idx, sink, out, lse, window_lo, window_hi, cmp_lo, cmp_hi, scale, deterministic):
    dckv = torch.empty_like(ckv) if ckv is not None else kv.new_empty(0)
    return torch.empty_like(q), torch.empty_like(kv), dckv, torch.empty_like(sink)


def _setup_context(ctx, inputs, output):
    q, kv, ckv, idx, sink, window_lo, window_hi, cmp_lo, cmp_hi, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, ckv, idx, sink, out, lse, window_lo, window_hi, cmp_lo, cmp_hi)
    ctx.args = (scale, deterministic)
    ctx.has_ckv = ckv is not None


def _backward(ctx, dout, dlse):
    q, kv, ckv, idx, sink, out, lse, *ranges = ctx.saved_tensors
    dq, dkv, dckv, dsink = v4_attention_bwd_op(dout, q, kv, ckv, idx, sink, out, lse, *ranges, *ctx.args)
    return dq, dkv, (dckv if ctx.has_ckv else None), None, dsink, None, None, None, None, None, None


v4_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def v4_attention_triton(q, kv, sink, softmax_scale, ranges, compressed_kv=None, topk_idx=None, deterministic=True):
    """Same contract as `dsv4.ops.v4_attention.v4_attention`; see there for shapes. lse is detached."""
    idx = topk_idx.to(torch.int32).contiguous() if topk_idx is not None else None
    ckv = compressed_kv.contiguous() if compressed_kv is not None else None
    r = [x.to(torch.int32).contiguous() for x in (ranges.window_lo, ranges.window_hi, ranges.cmp_lo, ranges.cmp_hi)]
    out, lse = v4_attention_fwd_op(q.contiguous(), kv.contiguous(), ckv, idx, sink.contiguous(), *r,
                                   float(softmax_scale), bool(deterministic))
    return out, lse.detach()
