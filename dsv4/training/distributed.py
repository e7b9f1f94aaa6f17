"""Process-group setup and teardown that work the same under `python`, `deepspeed` and `torchrun`."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from dsv4.config import ConfigError
from dsv4.training.build_lock import prepare_jit_builds

T = TypeVar("T")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local_rank N` (added by the deepspeed launcher, rejected by Hydra),
    moving the value into LOCAL_RANK."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Initialise the default process group (gloo on CPU, nccl on CUDA) -> (rank, world, local_rank, device).

    A plain `python train.py` becomes a world of one, so one code path serves every launcher."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # DeepSpeed JIT-builds its shm_comm op here under torch's build lock: a stale lock would hang us silently
        prepare_jit_builds(lambda message: print(message, flush=True), announce=local_rank == 0,
                           shm_jit=_shm_op_jit_built())
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def _shm_op_jit_built() -> bool:
    """Whether deepspeed.init_distributed JIT-builds (or, when built, loads through torch's build lock) the
    shm_comm op: the CPU accelerator does, unless DeepSpeed was installed with it prebuilt (DS_BUILD_SHM_COMM=1)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    return not (installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name)


def close_process_group(barrier: bool = True) -> None:
    """Leave the default process group: a barrier first (only when every rank gets there), then destroy it."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shutdown(exit_code: int = 0) -> None:
    """barrier -> destroy -> flush -> os._exit: avoids gloo's abort at interpreter exit (torch#190489)."""
    try:
        close_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """Collective: `decide()` runs on global rank 0 only and every rank gets its result. A ConfigError it raises is
    raised on every rank (so every rank stops with the same message instead of waiting for rank 0)."""
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = decide()
        except ConfigError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]
