"""Fault-tolerant checkpoints: write, then publish; pick the newest complete one; keep the last K.

Layout of `<run>/checkpoints/`:

    step0000100/            a published checkpoint (DeepSpeed files, data_state_rank<R>.json, model_config.json,
                            complete.json written last)
    .step0000200.partial/   being written (or the job died while writing it): never picked
    latest                  the newest published tag (DeepSpeed's convention; `train.resume=true` reads it)

Publishing (`save_checkpoint`):

1. every rank writes its data state and DeepSpeed writes its shards into the hidden staging directory
   `.stepNNNNNNN.partial` (a DeepSpeed tag that no resume rule ever matches);
2. barrier; global rank 0 lists every file with its size in `complete.json` (written to a temporary name, fsynced,
   then renamed), renames the staging directory to `stepNNNNNNN` (an atomic rename on POSIX filesystems), rewrites
   `latest` atomically, and prunes old checkpoints; barrier.

A job killed at any point leaves either no `stepNNNNNNN` or a complete one. A checkpoint damaged afterwards (a
truncated file, a lost shard) fails `verify_checkpoint` because the sizes no longer match its manifest.
The checkpoint directory must be one filesystem that every rank sees (shared storage on several nodes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "complete.json"
MODEL_CONFIG = "model_config.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    """The published tag of the checkpoint taken after `step` optimizer steps."""
    return f"step{step:07d}"


def staging_tag(tag: str) -> str:
    """Hidden name a checkpoint is written under before it is published."""
    return f".{tag}.partial"


@dataclass
class CheckpointInfo:
    path: Path
    tag: str
    step: int


def _fsync_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(checkpoint: Path, step: int, world_size: int, extra: dict[str, Any] | None = None) -> None:
    """List every file of the checkpoint with its size; written last, it marks the checkpoint complete."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"step": step, "world_size": world_size, "files": files, **(extra or {})}
    _fsync_write(checkpoint / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete, else why not (missing manifest, missing or truncated file)."""
    if not checkpoint.is_dir():
        return "no such directory"
    if not (checkpoint / MANIFEST).is_file():
        return f"no {MANIFEST} (the job died while writing it, or it predates manifests)"
    try:
        manifest = read_manifest(checkpoint)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        actual = path.stat().st_size
        if actual != size:
            return f"file {name} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Published checkpoints (`stepNNNNNNN`), newest step first. Staging directories are not listed."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = TAG_RE.match(path.name)
        if match and path.is_dir():
            found.append(CheckpointInfo(path, path.name, int(match.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def newest_complete(ckpt_dir: Path, warn: Callable[[str], None]) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; each one skipped (and each unpublished one) is reported via `warn`."""
    if ckpt_dir.is_dir():
        for path in sorted(ckpt_dir.glob(".step*.partial")):
            warn(f"warning: ignoring unpublished checkpoint {path} (the job stopped while writing it)")
    for info in list_checkpoints(ckpt_dir):
        problem = verify_checkpoint(info.path)
        if problem is None:
            return info
        warn(f"warning: skipping incomplete checkpoint {info.path}: {problem}")
    return None


def prune(ckpt_dir: Path, keep: int, protect: str) -> list[str]:
    """Delete all but the newest `keep` published checkpoints (0 keeps all); never `protect`. Returns the tags
    removed."""
    if keep <= 0:
        return []
    removed = []
    for info in list_checkpoints(ckpt_dir)[keep:]:
        if info.tag == protect:
            continue
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.tag)
    return removed


def publish(ckpt_dir: Path, tag: str, step: int, world_size: int, keep: int,
            model_config: dict[str, Any] | None = None) -> Path:
    """Global rank 0, after every rank finished writing the staging directory: manifest, rename, `latest`, prune."""
    staging = ckpt_dir / staging_tag(tag)
    final = ckpt_dir / tag
    if model_config is not None:
        _fsync_write(staging / MODEL_CONFIG, json.dumps(model_config, indent=1))
    write_manifest(staging, step, world_size)
    if final.exists():  # the same step saved again (a resumed run repeating it): replace the old one
        old = ckpt_dir / f".{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_write(ckpt_dir / LATEST, tag)
    prune(ckpt_dir, keep, protect=tag)
    return final


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, world_size: int, keep: int,
                    save_rank_state: Callable[[Path], None], client_state: dict[str, Any],
                    model_config: dict[str, Any] | None = None) -> Path:
    """Collective: every rank writes its shard and its own state into the staging directory, then global rank 0
    publishes. `save_rank_state(staging_dir)` writes this rank's extra files (the data stream position)."""
    tag = tag_for(step)
    staging = ckpt_dir / staging_tag(tag)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a job that died while writing this step
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    save_rank_state(staging)
    engine.save_checkpoint(str(ckpt_dir), tag=staging_tag(tag), client_state=client_state, save_latest=False)
    dist.barrier()
    final = ckpt_dir / tag
    if rank == 0:
        publish(ckpt_dir, tag, step, world_size, keep, model_config)
    dist.barrier()
    return final
