"""Where a run writes, and one live run per directory.

Global rank 0 picks the run directory (every rank gets the same answer), then claims it:

- the directory must be creatable and writable (`train.output_dir` is named otherwise);
- `run.lock` holds the live run's host, pid, process start time and SLURM job id, refreshed every
  LOCK_REFRESH_S by a background thread. A second run into the directory refuses, naming them. A lock whose
  process is gone (same host), or that nobody refreshed for LOCK_STALE_S (another host), or that was left by an
  earlier incarnation of the same SLURM job (a requeue), is stale: it is taken over with a warning;
- a directory that already holds a run (metrics, checkpoints or a summary) is only reused to continue it
  (`train.resume`); a fork (`train.resume=<another run>`) needs a directory that holds no run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from dsv4.config import ConfigError
from dsv4.run_config import RunConfig
from dsv4.run_files import CHECKPOINTS, LATEST, list_checkpoints, resolve_run_path

LOCK = "run.lock"
LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 300.0


def pick_run_dir(run: RunConfig) -> Path:
    """`train.output_dir`, else the run directory `train.resume` names, else the newest run under outputs/ (resume
    true/auto), else outputs/<timestamp>. Global rank 0 decides (distributed.decided_by_rank0)."""
    if run.train.output_dir:
        return Path(run.train.output_dir)
    if isinstance(run.train.resume, str) and run.train.resume != "auto":
        return run_dir_of(Path(run.train.resume))
    if run.train.resume is True or run.train.resume == "auto":
        return latest_run_dir() or Path("outputs") / time.strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / time.strftime("%Y%m%d-%H%M%S")


def run_dir_of(path: Path) -> Path:
    """The run directory of a run directory, its checkpoints/ directory or one checkpoint (stepNNNNNNN/) in it."""
    return resolve_run_path(path, by="names", key=f"train.resume={str(path)!r}").run_dir


def latest_run_dir() -> Path | None:
    runs = sorted(Path("outputs").glob(f"*/{CHECKPOINTS}/{LATEST}"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.parent if runs else None


def is_fork(run: RunConfig, run_dir: Path) -> bool:
    """train.resume names another run's directory than the one this run writes to."""
    resume = run.train.resume
    if not isinstance(resume, str) or resume == "auto":
        return False
    return run_dir_of(Path(resume)).resolve() != run_dir.resolve()


def held_run(run_dir: Path) -> str | None:
    """What run a directory already holds ("a finished run (...)", "an interrupted run (...)"), or None."""
    checkpoints = list_checkpoints(run_dir / CHECKPOINTS)
    metrics = run_dir / "metrics.jsonl"
    steps = f"checkpoints up to step {checkpoints[0].step}" if checkpoints else "no checkpoint"
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except ValueError:
            summary = {}
        if isinstance(summary, dict) and "stopped_by" in summary and summary["stopped_by"] is None:
            return f"a finished run (step {summary.get('steps')}, {steps})"
        return f"an interrupted run ({steps})"
    if checkpoints or (metrics.is_file() and metrics.stat().st_size > 0):
        return f"an interrupted run ({steps})"
    return None


def claim_run_dir(run: RunConfig, run_dir: Path, say) -> RunLock:
    """Global rank 0, before anything is written: create the directory, take its lock, and refuse to reuse a
    directory holding a run unless it is being continued. Raises ConfigError naming train.output_dir."""
    key = f"train.output_dir={str(run_dir)!r}" if run.train.output_dir else f"run directory {run_dir}"
    if run.train.resume is True and not run_dir.is_dir():
        raise ConfigError(f"train.resume=true: nothing to resume: {key} does not exist. Drop train.resume to start a "
                          "new run, or use train.resume=auto to start from step 0 when there is no checkpoint")
    created = None  # the topmost directory this run creates: removed again if the run writes nothing into it
    missing = run_dir.absolute()
    while not missing.exists() and missing != missing.parent:
        created, missing = missing, missing.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create it ({type(e).__name__}: {e}); choose a writable directory") from None
    lock = RunLock(run_dir, created)
    try:
        lock.acquire(key, say)
    except BaseException:
        lock.remove_if_empty()
        raise
    try:
        _check_reuse(run, run_dir, key)
    except ConfigError:
        lock.release()
        raise
    return lock


def _check_reuse(run: RunConfig, run_dir: Path, key: str) -> None:
    held = held_run(run_dir)
    if held is None:
        return
    if run.train.resume is False:
        raise ConfigError(f"{key} already holds {held}; continue it with train.resume=auto, or choose a new "
                          "train.output_dir (nothing was changed)")
    if is_fork(run, run_dir):
        raise ConfigError(f"{key} already holds {held}: continuing train.resume={run.train.resume} into it would "
                          "mix two runs. Choose a new train.output_dir for the fork, or continue this directory's own "
                          "run with train.resume=auto (nothing was changed)")


class RunLock:
    """`<run>/run.lock`: one live run per directory (see the module docstring)."""

    def __init__(self, run_dir: Path, created: Path | None = None) -> None:
        self.path = run_dir / LOCK
        self.run_dir = run_dir
        self.created = created  # the topmost directory claim_run_dir created (None: the run directory existed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self, key: str, say) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(key, say)
                continue
            except OSError as e:
                raise ConfigError(f"{key}: cannot write in it ({type(e).__name__}: {e}); choose a writable "
                                  "directory") from None
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            break
        self.held = True
        self._thread = threading.Thread(target=self._refresh, name="run-lock-refresh", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self, key: str, say) -> None:
        holder = read_lock(self.path)
        if holder is None:  # removed (or half-written) between our attempt and now: look again
            if self.path.exists() and time.time() - self.path.stat().st_mtime > LOCK_REFRESH_S:
                self.path.unlink(missing_ok=True)
            time.sleep(0.1)
            return
        why = stale_reason(holder, time.time() - self.path.stat().st_mtime)
        if why is None:
            raise ConfigError(f"{key}: another run is training in this directory ({describe_holder(holder)}); "
                              f"wait for it to finish, stop it, or choose another train.output_dir. If no such run "
                              f"is alive, delete {self.path}")
        say(f"warning: taking over the lock {self.path} of an earlier run ({describe_holder(holder)}): {why}")
        self.path.unlink(missing_ok=True)

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        if self.held:
            holder = read_lock(self.path)
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False
        self.remove_if_empty()

    def remove_if_empty(self) -> None:
        """A run directory this run created and wrote nothing into (a run that failed before writing anything):
        remove it, with the empty parents it created, so no empty directory is left behind. Only empty directories
        are removed (rmdir), and never one that existed before the run."""
        if self.created is None:
            return
        try:
            tree = []
            for root, dirs, files in os.walk(self.run_dir):
                if files or any(os.path.islink(os.path.join(root, d)) for d in dirs):
                    return  # something was written: keep it all
                tree.append(root)
            for root in sorted(tree, key=lambda r: -len(Path(r).parts)):
                os.rmdir(root)  # fails (and stops) at the first directory holding anything
            directory = self.run_dir.absolute().parent
            while directory != self.created.parent and directory.is_relative_to(self.created):
                directory.rmdir()
                directory = directory.parent
        except OSError:
            pass
        finally:
            self.created = None


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def stale_reason(holder: dict[str, Any], age_s: float) -> str | None:
    """Why a lock no longer belongs to a live run, or None when it may."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job and holder.get("pid") != os.getpid():
        return f"it was left by an earlier start of this SLURM job ({job}, requeued)"
    if holder.get("host") == socket.gethostname():
        if not _alive(holder):
            return "its process is gone"
        return None
    if age_s > LOCK_STALE_S:
        return f"not refreshed for {age_s:.0f} s (its host stopped updating it)"
    return None


def _alive(holder: dict[str, Any]) -> bool:
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder.get("started", 0))) < 1.0  # not a recycled pid
    except psutil.AccessDenied:  # exists, but not ours to inspect
        return True
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
