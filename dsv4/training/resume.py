"""Which checkpoint a run resumes from, checked before anything is built.

`train.resume`:
- `auto`: the newest checkpoint of this run directory that verifies (sizes and checksums); every one skipped is
  named with its reason; none: start at step 0 (a job script can always pass it);
- `true`: the checkpoint named in `latest`; refused when there is none or when it fails verification;
- a directory: a run directory or its checkpoints/ (the tag in `latest`), or one checkpoint (stepNNNNNNN/). When it
  belongs to another run than `train.output_dir`, the run is a fork: it continues from that checkpoint (its data
  state included) and writes only to its own directory.

Verification is shared: every rank checks every size and the checksums of its share of the files. A checkpoint
trained with another model config is refused, naming the keys. One written by another number of ranks is converted
once to DeepSpeed's universal format, in this run's checkpoints/ (the source is only read)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dsv4 import run_files
from dsv4.config import ConfigError
from dsv4.run_config import RunConfig
from dsv4.run_files import CHECKPOINTS, LATEST, MANIFEST, MODEL_CONFIG, UNIVERSAL_SUFFIX
from dsv4.training.distributed import decided_by_rank0


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path  # the checkpoints/ directory holding it (another run's for a fork)
    tag: str
    step: int
    universal: bool  # written by another number of ranks: loaded through a universal copy
    load_dir: Path  # where DeepSpeed loads from: ckpt_dir, or this run's checkpoints/ for the universal copy

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.universal else self.tag


def shown(resume: Any) -> str:
    """train.resume as a user writes it (true, auto, a path)."""
    return str(resume).lower() if isinstance(resume, bool) else str(resume)


def resume_source(run: RunConfig, run_dir: Path) -> tuple[Path, str | None]:
    """(checkpoints directory, tag) that train.resume names; tag None means `latest` (true) or newest (auto)."""
    resume = run.train.resume
    if resume is True or resume == "auto":
        return run_dir / CHECKPOINTS, None
    named = run_files.resolve_run_path(Path(resume), by="names", key=f"train.resume={shown(resume)}")
    return named.ckpt_dir, named.tag


def find_resume_point(run: RunConfig, run_dir: Path, world: int, say) -> ResumePoint | None:
    """Collective: the verified checkpoint to resume from, or None to start at step 0 (auto, none found)."""
    ckpt_dir, candidates = decided_by_rank0(lambda: _candidates(run, run_dir, say))
    chosen = None
    for tag in candidates:
        problem = verify_collectively(ckpt_dir / tag)
        if problem is None:
            chosen = tag
            break
        if run.train.resume == "auto":
            say(f"warning: skipping damaged checkpoint {ckpt_dir / tag}: {problem}")
            continue
        decided_by_rank0(lambda tag=tag, problem=problem: _refuse_damaged(run, ckpt_dir / tag, problem, say))
        chosen = tag  # no manifest at all (older checkpoints): loaded unverified, with a warning
        break
    if chosen is None:
        say(f"train.resume=auto: no complete checkpoint in {ckpt_dir}; starting from step 0")
        return None
    return decided_by_rank0(lambda: _prepare(run, run_dir, ckpt_dir, chosen, world, say))


def _candidates(run: RunConfig, run_dir: Path, say) -> tuple[Path, list[str]]:
    resume = run.train.resume
    ckpt_dir, tag = resume_source(run, run_dir)
    if tag is not None:
        return ckpt_dir, [tag]
    if resume == "auto":
        for path in run_files.unpublished(ckpt_dir):
            say(f"warning: ignoring unpublished checkpoint {path} (the job stopped while writing it)")
        return ckpt_dir, [c.tag for c in run_files.list_checkpoints(ckpt_dir)]
    if not (ckpt_dir / LATEST).is_file():
        raise ConfigError(f"train.resume={shown(resume)}: nothing to resume: no checkpoint in {ckpt_dir} (no "
                          f"'{LATEST}'). Drop train.resume to start a new run, or use train.resume=auto "
                          "to start from step 0 when there is no checkpoint")
    return ckpt_dir, [run_files.read_latest(ckpt_dir)]


def verify_collectively(checkpoint: Path) -> str | None:
    """Collective: the lowest rank's problem with the checkpoint, each rank reading its share of the contents."""
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, run_files.verify_checkpoint(checkpoint, dist.get_rank(), dist.get_world_size()))
    return next((p for p in problems if p is not None), None)


def _refuse_damaged(run: RunConfig, checkpoint: Path, problem: str, say) -> None:
    if not (checkpoint / MANIFEST).is_file() and checkpoint.is_dir():
        say(f"warning: {checkpoint} has no {MANIFEST}; loading it unverified")
        return
    raise ConfigError(f"train.resume={shown(run.train.resume)}: {checkpoint} fails verification: {problem}. Use "
                      "train.resume=auto to take the newest checkpoint that verifies, or name an older one "
                      f"(train.resume={checkpoint.parent}/stepNNNNNNN)")


def _prepare(run: RunConfig, run_dir: Path, ckpt_dir: Path, tag: str, world: int, say) -> ResumePoint:
    """Rank 0: the chosen checkpoint's step, its model config checked against this run's, the universal copy."""
    checkpoint = ckpt_dir / tag
    manifest = run_files.read_manifest(checkpoint) if (checkpoint / MANIFEST).is_file() else {}
    step = int(manifest.get("step", run_files.step_of(tag) or 0))
    check_model_config(run, checkpoint)
    written_by = manifest.get("world_size")
    universal = written_by is not None and written_by != world
    load_dir = ckpt_dir
    if universal:
        say(f"train.resume: {checkpoint} was written by {written_by} ranks, this run has {world}: resuming through "
            "a universal checkpoint")
        load_dir = run_dir / CHECKPOINTS
        convert_to_universal(checkpoint, load_dir / (tag + UNIVERSAL_SUFFIX), say)
    how = "fork of" if ckpt_dir.resolve() != (run_dir / CHECKPOINTS).resolve() else "resuming"
    say(f"train.resume={shown(run.train.resume)}: {how} {checkpoint} (step {step}, verified)")
    return ResumePoint(ckpt_dir, tag, step, universal, load_dir)


def check_model_config(run: RunConfig, checkpoint: Path) -> None:
    """ConfigError naming every model key whose value differs from the checkpoint's model_config.json."""
    stored_path = checkpoint / MODEL_CONFIG
    if not stored_path.is_file():
        return  # older checkpoints: DeepSpeed's load names the first mismatching tensor
    stored: dict[str, Any] = json.loads(stored_path.read_text())
    mine = run.model.to_dict()
    differ = [key for key in sorted(set(stored) | set(mine)) if stored.get(key) != mine.get(key)]
    if differ:
        shown = "; ".join(f"model.{k}: checkpoint {stored.get(k)!r}, this run {mine.get(k)!r}" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(f"train.resume: {checkpoint} was trained with another model config: {shown}{more}. Resume "
                          f"with the checkpoint's model settings (they are in {stored_path}), or start a new run")


def convert_to_universal(checkpoint: Path, target: Path, say) -> None:
    """DeepSpeed's universal format (layout-free: loads on any number of ranks), written once to `target`."""
    if (target / "zero").is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"converting {checkpoint} to a universal checkpoint in {target}")
    res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(checkpoint), "--output_folder", str(target), "--inject_missing_state",
                          "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"train.resume: converting {checkpoint} to a universal checkpoint failed: "
                          f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
