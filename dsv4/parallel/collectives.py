"""Differentiable collectives over a sequence-parallel group, with byte counters for benchmarks/sp_comm.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class SequenceParallel:
    """What the model needs to know about sequence parallelism (injected; no DeepSpeed inside).

    group: the SP process group; rank / world: this rank's index in it and its size; shard_len: tokens per
    rank (every sequence has world * shard_len tokens; rank r holds tokens r*shard_len .. (r+1)*shard_len-1).
    bytes_sent counts what this rank's collectives send, per kind (forward only), for the comm benchmark."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    shard_len: int
    bytes_sent: dict[str, int] = field(default_factory=dict)

    @property
    def start(self) -> int:
        return self.rank * self.shard_len

    def count(self, kind: str, tensor: torch.Tensor, copies: int = 1) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + tensor.numel() * tensor.element_size() * copies


def _supports_reduce_scatter(group) -> bool:
    return dist.get_backend(group) != "gloo"


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(sp.world)]
        dist.all_gather(parts, x, group=sp.group)
        sp.count("all_gather", x, sp.world - 1)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp = ctx.sp
        chunks = [c.contiguous() for c in grad.chunk(sp.world, dim=1)]
        if _supports_reduce_scatter(sp.group):
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter(out, chunks, group=sp.group)
        else:  # gloo has no reduce_scatter: all-reduce, keep our slice (same sums, more bytes)
            total = grad.contiguous().clone()
            dist.all_reduce(total, group=sp.group)
            out = total.chunk(sp.world, dim=1)[sp.rank].contiguous()
        return out, None


class _ShiftToNextRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        sp.count("halo", x)
        return _ring_shift(x.contiguous(), sp, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ring_shift(grad.contiguous(), ctx.sp, forward=False), None


def _ring_shift(x: torch.Tensor, sp: SequenceParallel, forward: bool) -> torch.Tensor:
    """Send x to the next rank (forward) or the previous one (backward); receive from the other side."""
    to = (sp.rank + (1 if forward else -1)) % sp.world
    frm = (sp.rank - (1 if forward else -1)) % sp.world
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, dist.get_global_rank(sp.group, to), sp.group),
           dist.P2POp(dist.irecv, out, dist.get_global_rank(sp.group, frm), sp.group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def all_gather_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, n, ...] per rank -> [B, world * n, ...] in rank order; backward sums each slice's gradient
    over the group (reduce-scatter)."""
    return _AllGatherSequence.apply(x, sp)


def shift_to_next_rank(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Every rank sends x to rank + 1 and gets rank - 1's (rank 0 gets the last rank's, which callers
    ignore). Backward sends the gradient back the same way."""
    return _ShiftToNextRank.apply(x, sp)


def all_gather_values(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Non-differentiable: every rank's x (same shape on every rank) -> [world, *x.shape] in rank order."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(sp.world)]
    sp.count("all_gather_values", x, sp.world - 1)
    dist.all_gather(parts, x, group=sp.group)
    return torch.stack(parts)


def all_reduce_sum(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Non-differentiable sum over the group (counts, statistics)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=sp.group)
    return x
