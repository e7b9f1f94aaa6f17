"""Checks that keep a long run honest: non-finite losses agreed across ranks, a checksum of the data each rank
trained on (to compare data order between runs), and a digest of each rank's parameters (ranks in sync)."""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist

CHECKSUM_MOD = 2**31 - 1


def all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Collective: True only when the loss is finite on every rank (so every rank skips the same updates)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def batch_checksum(input_ids: torch.Tensor) -> int:
    """An order-sensitive checksum of a micro-batch's token ids (positions weight the ids)."""
    ids = input_ids.detach().to("cpu", torch.int64).reshape(-1)
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.int64) % 9973 + 1
    return int((ids * weights).sum()) % CHECKSUM_MOD


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order. Collective under ZeRO-3 (every rank must call it): each
    partitioned parameter is gathered in turn, one at a time, so memory stays at one full parameter."""
    h = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        gather = contextlib.nullcontext()
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather the whole parameter for the digest
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
        with gather:
            h.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(module: torch.nn.Module) -> list[str]:
    """Collective: every rank's parameter digest, in rank order."""
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, param_digest(module))
    return digests
