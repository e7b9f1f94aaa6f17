"""Console and W&B metrics, from global rank 0 only. W&B is offline unless a key is set and never blocks
training: if it cannot start, the run continues with console output and says so."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from dsv4.run_config import WandbConfig


def wandb_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled:
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, cfg: WandbConfig, run_dir: Path, is_main: bool, config: dict[str, Any]) -> None:
        self.is_main = is_main
        self.run = None
        if not is_main:
            return
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, group=cfg.group,
                tags=list(cfg.tags), config=config, dir=str(run_dir), mode=mode,
                settings=wandb.Settings(init_timeout=90, silent=True),
            )
            print(f"W&B: {mode} run in {run_dir / 'wandb'}", flush=True)
        except Exception as e:  # no network, bad key, ...: keep training
            print(f"W&B disabled for this run: could not start ({type(e).__name__}: {e})", flush=True)
            self.run = None

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:
                print(f"W&B log failed at step {step} ({e}); continuing without W&B", flush=True)
                self.run = None

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None


class StepTimer:
    """Wall time per phase of a step (`with timer("forward"): ...`), summed over micro-batches. On CUDA each phase
    ends with a synchronize, so the split is the device's time, not the launch time."""

    def __init__(self, device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: StepTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)
        self.timer.totals[self.name] = self.timer.totals.get(self.name, 0.0) + time.perf_counter() - self.start


def peak_memory_bytes(device) -> int:
    """CUDA: max allocated by the caching allocator; CPU: this process's max resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def format_eta(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, so the JSON is strict (null, never NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs) -> str:
    """json.dumps that writes null for NaN / inf (valid JSON for every reader)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def eta_seconds(step_times: list[float], remaining: int) -> float:
    """Remaining time from the mean of the last 20 steady steps. The first step of a process (allocations,
    compilation, data workers starting) is never counted: until a second step is done the ETA is unknown (NaN)."""
    steady = step_times[1:][-20:]
    return sum(steady) / len(steady) * remaining if steady else float("nan")


def trim_metrics(path: Path, last_step: int) -> tuple[int, int]:
    """Keep in `path` (metrics.jsonl) one line per step up to `last_step`, the step a run starts from (its resumed
    checkpoint's, or 0), and drop the rest -> (kept, dropped). An interrupted run logged steps past its last
    checkpoint; the resumed run trains them again, so without this they would be in the file twice. Of a step
    logged more than once the last line is kept; a line cut by a kill -9 is dropped. Replaced atomically."""
    if not path.is_file():
        return 0, 0
    lines = path.read_text().splitlines()
    by_step: dict[int, str] = {}
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step <= last_step:
            by_step[step] = line
    kept = [by_step[s] for s in sorted(by_step)]
    if kept == lines:
        return len(kept), 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept), len(lines) - len(kept)
