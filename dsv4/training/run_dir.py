"""Where a run writes: global rank 0 chooses the run directory, every rank gets the same answer."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from dsv4.config import ConfigError
from dsv4.training.config import RunConfig


def choose_run_dir(run: RunConfig, rank: int) -> Path:
    """Collective: `train.output_dir`, else the directory `train.resume` names, else the newest run under
    outputs/ (resume true/auto), else outputs/<timestamp>."""
    choice = [None]
    if rank == 0:
        if run.train.output_dir:
            path = Path(run.train.output_dir)
        elif isinstance(run.train.resume, str) and run.train.resume != "auto":
            path = run_dir_of(Path(run.train.resume))
        elif run.train.resume is True or run.train.resume == "auto":
            path = latest_run_dir() or Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
        else:
            path = Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
        choice = [str(path)]
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def run_dir_of(path: Path) -> Path:
    """The run directory of a run directory or of its checkpoints/ directory."""
    if not path.exists():
        raise ConfigError(f"train.resume={str(path)!r}: no such directory")
    return path.parent if path.name == "checkpoints" else path


def latest_run_dir() -> Path | None:
    runs = sorted(Path("outputs").glob("*/checkpoints/latest"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.parent if runs else None
