"""Which checkpoint a run resumes from (global rank 0 decides, every rank gets the answer), and DeepSpeed's
universal conversion when it was written by another number of ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dsv4.config import ConfigError
from dsv4.training import checkpointing
from dsv4.training.config import RunConfig

UNIVERSAL_SUFFIX = "_universal"


def resume_tag(run: RunConfig, ckpt_dir: Path, world: int, say) -> tuple[str | None, bool]:
    """Collective: the checkpoint tag to resume from, or None to start at step 0, and whether it was written by
    another number of ranks (then it is resumed through a universal checkpoint).

    `true` (or a directory): the tag named in `latest`, refused if its manifest says it is incomplete.
    `auto`: the newest checkpoint whose manifest verifies, skipping (with a warning) any that does not."""
    choice: list[Any] = [None, None, False]
    if dist.get_rank() == 0:
        try:
            choice[0], choice[2] = _pick_resume_tag(run, ckpt_dir, world, say)
            if choice[2]:
                convert_to_universal(ckpt_dir, choice[0], say)
        except ConfigError as e:
            choice[1] = str(e)
    dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    return choice[0], choice[2]


def convert_to_universal(ckpt_dir: Path, tag: str, say) -> None:
    """DeepSpeed's universal format (layout-free: loads on any number of ranks), written once next to the tag."""
    target = ckpt_dir / (tag + UNIVERSAL_SUFFIX)
    if (target / "zero").is_dir():
        return
    say(f"converting {ckpt_dir / tag} to a universal checkpoint in {target}")
    res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(ckpt_dir / tag), "--output_folder", str(target), "--inject_missing_state",
                          "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"train.resume: converting {ckpt_dir / tag} to a universal checkpoint failed: "
                          f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")


def _pick_resume_tag(run: RunConfig, ckpt_dir: Path, world: int, say) -> tuple[str | None, bool]:
    resume = run.train.resume
    if resume == "auto":
        found = checkpointing.newest_complete(ckpt_dir, say)
        if found is None:
            say(f"train.resume=auto: no complete checkpoint in {ckpt_dir}; starting from step 0")
            return None, False
        say(f"train.resume=auto: newest complete checkpoint is {found.path} (step {found.step})")
        tag = found.tag
    else:
        latest = ckpt_dir / checkpointing.LATEST
        if not latest.is_file():
            if isinstance(resume, str):
                raise ConfigError(f"train.resume={resume!r}: no checkpoint ('latest') in {ckpt_dir}")
            say(f"train.resume=true: no checkpoint in {ckpt_dir}; starting from step 0")
            return None, False
        tag = latest.read_text().strip()
        problem = checkpointing.verify_checkpoint(ckpt_dir / tag)
        if problem is not None and (ckpt_dir / tag / checkpointing.MANIFEST).is_file():
            raise ConfigError(f"train.resume={resume!r}: {ckpt_dir / tag} (named in {latest}) is incomplete: "
                              f"{problem}. Use train.resume=auto to take the newest complete checkpoint")
        if problem is not None:
            say(f"warning: {ckpt_dir / tag} has no {checkpointing.MANIFEST}; loading it unverified")
    manifest_file = ckpt_dir / tag / checkpointing.MANIFEST
    if manifest_file.is_file():
        written_by = checkpointing.read_manifest(ckpt_dir / tag).get("world_size")
        if written_by is not None and written_by != world:
            say(f"train.resume: {ckpt_dir / tag} was written by {written_by} ranks, this run has {world}: "
                "resuming through a universal checkpoint")
            return tag, True
    return tag, False
