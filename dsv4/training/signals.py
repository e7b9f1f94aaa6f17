"""Interrupts and preemption.

While training, SIGINT (Ctrl-C), SIGTERM and SIGUSR1 ask the run to checkpoint at the next step boundary and exit
0. The handler only records the signal; the training loop all-reduces the flag once per step, so a signal that
reached one rank stops every rank at the same step and they all take part in the checkpoint. A second SIGINT
exits at once (exit code 130), without a checkpoint and without a traceback; the newest published checkpoint is
untouched. Before training starts (imports, data checks, building, loading), SIGINT and SIGTERM exit at once:
nothing has been trained yet.

Each rank writes `<run>/pids/rank<R>.pid` ("<hostname> <pid>") so a job script can signal the training processes
themselves (launchers such as `deepspeed` and `torchrun` kill their children some seconds after forwarding a
signal): see launch/signal_ranks.sh.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dsv4.training.build_lock import release_held_locks

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def exit_now(message: str, code: int, announce: bool, cleanup: Callable[[], None] | None = None) -> None:
    """Leave at once, from a signal handler: one line (when `announce`), `cleanup()`, os._exit (no traceback). A
    JIT build of a DeepSpeed op in progress (deepspeed.initialize builds some) is stopped and its lock removed."""
    if announce:
        print(message, file=sys.stderr, flush=True)
    if cleanup is not None:
        try:
            cleanup()
        except Exception:  # leaving anyway
            pass
    release_held_locks()
    sys.stdout.flush()
    os._exit(code)


def exit_at_once_during_setup(announce: bool, cleanup: Callable[[], None] | None = None) -> None:
    """SIGINT / SIGTERM before training: exit at once with one line (nothing trained, nothing to save)."""
    def handle(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        exit_now(f"{name} during start-up: exiting; nothing was trained, no checkpoint was touched", 128 + signum,
                 announce, cleanup)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


class StopRequest:
    """Records SIGINT / SIGTERM / SIGUSR1 on this rank; a second SIGINT exits at once."""

    def __init__(self, announce: bool = False, cleanup: Callable[[], None] | None = None) -> None:
        self.signal_name: str | None = None
        self.announce = announce  # this rank prints the one-line messages (global rank 0)
        self.cleanup = cleanup
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                exit_now("second Ctrl-C: exiting now without a checkpoint (the newest published checkpoint is "
                         "untouched)", 130, self.announce, self.cleanup)
            if self.announce:
                print("\nCtrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again to exit at once "
                      "without one)", flush=True)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device: torch.device) -> bool:
        """Collective (every rank): True when any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def write_pid_file(run_dir: Path, rank: int) -> Path:
    """`<run>/pids/rank<R>.pid` = "<hostname> <pid>", for job scripts that forward preemption signals."""
    path = run_dir / "pids" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return path
