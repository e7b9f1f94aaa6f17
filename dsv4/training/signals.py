"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and exit 0.

The handler only records the signal; the training loop all-reduces the flag once per step (MAX over ranks), so a
signal that reached one rank stops every rank at the same step and they all take part in the checkpoint. Each rank
writes `<run>/pids/rank<R>.pid` ("<hostname> <pid>") so a job script can signal the training processes themselves
(launchers such as `deepspeed` kill their children on SIGTERM instead of forwarding it): see launch/signal_ranks.sh.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM / SIGUSR1 on this rank; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device: torch.device) -> bool:
        """Collective (every rank, every step): True when any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def write_pid_file(run_dir: Path, rank: int) -> Path:
    """`<run>/pids/rank<R>.pid` = "<hostname> <pid>", for job scripts that forward preemption signals."""
    path = run_dir / "pids" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return path
