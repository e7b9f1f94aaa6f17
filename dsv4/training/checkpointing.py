"""Fault-tolerant checkpoints, the writing side: write, checksum, then publish; keep the last K.

The layout of `<run>/checkpoints/` (stepNNNNNNN/, .stepNNNNNNN.partial/, latest), the manifest's reading and
verification, and picking the newest checkpoint that verifies are dsv4.run_files, which everything that reads a run
shares.

Publishing (`save_checkpoint`, a collective):

1. DeepSpeed writes its shards and every rank its data state into the hidden staging directory
   `.stepNNNNNNN.partial` (a DeepSpeed tag that no resume rule ever matches). A rank that fails to write (a full
   disk, no permission) is reported to every rank, the staging directory is removed and every rank raises
   CheckpointError naming the rank and the error; published checkpoints are untouched.
2. Right after writing, every rank checksums its share of the files (xxh3-128, while they are in its page cache;
   a file belongs to the rank whose number is in its name, else to rank 0).
3. Global rank 0 lists every file with its size and checksum in `complete.json` (written to a temporary name,
   fsynced, then renamed), renames the staging directory to `stepNNNNNNN` (an atomic rename on POSIX
   filesystems), rewrites `latest` atomically, and prunes old checkpoints when asked (never the protected ones).

A job killed at any point leaves either no `stepNNNNNNN` or a complete one. A checkpoint damaged afterwards (a
truncated file, a lost shard, bytes overwritten in place) fails `run_files.verify_checkpoint`: sizes are compared
with the manifest, then contents with its checksums. The checkpoint directory must be one filesystem every rank sees.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dsv4.run_files import (
    HASH,
    LATEST,
    MANIFEST,
    MODEL_CONFIG,
    UNIVERSAL_SUFFIX,
    file_checksum,
    list_checkpoints,
    owner_rank,
    staging_tag,
    tag_for,
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written. The message names the rank, the directory and the cause."""


def _fsync_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- checksums and the manifest

def checkpoint_files(checkpoint: Path) -> list[str]:
    """Every file of a checkpoint directory (relative names, sorted), the manifest excepted."""
    return [str(p.relative_to(checkpoint)) for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")]


def checksum_share(checkpoint: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """{name: {"bytes": size, HASH: checksum}} of the files this rank owns (every file when world is 1)."""
    return {name: {"bytes": (checkpoint / name).stat().st_size, HASH: file_checksum(checkpoint / name)}
            for name in checkpoint_files(checkpoint) if owner_rank(name, world) == rank}


def write_manifest(checkpoint: Path, step: int, world_size: int, files: dict[str, dict[str, Any]] | None = None,
                   extra: dict[str, Any] | None = None) -> None:
    """List every file of the checkpoint with its size and checksum (computed here unless `files` gives them);
    written last, it marks the checkpoint complete."""
    entries = dict(files) if files is not None else {}
    for name in checkpoint_files(checkpoint):  # files no rank has checksummed yet (e.g. model_config.json)
        if name not in entries:
            entries[name] = {"bytes": (checkpoint / name).stat().st_size, HASH: file_checksum(checkpoint / name)}
    manifest = {"step": step, "world_size": world_size, "hash": HASH, "files": dict(sorted(entries.items())),
                **(extra or {})}
    _fsync_write(checkpoint / MANIFEST, json.dumps(manifest, indent=1))


# ---------------------------------------------------------------- published checkpoints

def prune(ckpt_dir: Path, keep: int, protect: Iterable[str]) -> list[str]:
    """Delete all but the newest `keep` published checkpoints (0 keeps all), with their universal copies; never
    a tag in `protect`. Returns the tags removed."""
    if keep <= 0:
        return []
    protected = set(protect)
    removed = []
    for info in list_checkpoints(ckpt_dir)[keep:]:
        if info.tag in protected:
            continue
        shutil.rmtree(info.path, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (info.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        removed.append(info.tag)
    return removed


def publish(ckpt_dir: Path, tag: str, step: int, world_size: int, keep: int,
            model_config: dict[str, Any] | None = None, files: dict[str, dict[str, Any]] | None = None,
            allow_prune: bool = True, protect: Iterable[str] = ()) -> Path:
    """Global rank 0, after every rank finished writing the staging directory: manifest, rename, `latest`, and
    (when `allow_prune`) prune all but the newest `keep`, never `tag` or a tag in `protect`."""
    staging = ckpt_dir / staging_tag(tag)
    final = ckpt_dir / tag
    if model_config is not None:
        _fsync_write(staging / MODEL_CONFIG, json.dumps(model_config, indent=1))
    write_manifest(staging, step, world_size, files)
    if final.exists():  # the same step saved again (a resumed run repeating it): replace the old one
        old = ckpt_dir / f".{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_write(ckpt_dir / LATEST, tag)
    if allow_prune:
        prune(ckpt_dir, keep, protect={tag, *protect})
    return final


# ---------------------------------------------------------------- the collective save

@dataclass
class SaveReport:
    path: Path
    bytes: int
    write_s: float
    checksum_s: float  # the slowest rank's share


def _first_problem(problem: str | None, world: int) -> tuple[int, str] | None:
    """Collective: (rank, problem) of the lowest rank that reports one, or None when every rank succeeded."""
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    return next(((r, p) for r, p in enumerate(problems) if p is not None), None)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, world_size: int, keep: int,
                    save_rank_state: Callable[[Path], None], client_state: dict[str, Any],
                    model_config: dict[str, Any] | None = None, allow_prune: bool = True,
                    protect: Iterable[str] = ()) -> SaveReport:
    """Collective: every rank writes its shard and its own state into the staging directory and checksums its
    share, then global rank 0 publishes. `save_rank_state(staging_dir)` writes this rank's extra files (the data
    stream position). Raises CheckpointError on every rank when any rank fails; nothing is published then."""
    tag = tag_for(step)
    staging = ckpt_dir / staging_tag(tag)
    t0 = time.perf_counter()
    problem = None
    if rank == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a job that died while writing this step
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = _describe(e)
    _raise_if_failed(_first_problem(problem, world_size), tag, staging, ckpt_dir, rank)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=staging_tag(tag), client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        problem = _describe(e)
        dist.barrier()  # the writes come after DeepSpeed's other collectives; the other ranks wait at its last barrier
    if problem is None:
        try:
            save_rank_state(staging)
        except OSError as e:
            problem = _describe(e)
    _raise_if_failed(_first_problem(problem, world_size), tag, staging, ckpt_dir, rank)
    write_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    share: dict[str, dict[str, Any]] = {}
    try:
        share = checksum_share(staging, rank, world_size)
    except OSError as e:
        problem = _describe(e)
    shares: list[Any] = [None] * world_size
    dist.all_gather_object(shares, (share, time.perf_counter() - t1, problem))
    _raise_if_failed(next(((r, s[2]) for r, s in enumerate(shares) if s[2] is not None), None), tag, staging,
                     ckpt_dir, rank)
    files = {name: entry for s in shares for name, entry in s[0].items()}
    if rank == 0:
        try:
            publish(ckpt_dir, tag, step, world_size, keep, model_config, files, allow_prune, protect)
        except OSError as e:
            problem = _describe(e)
    _raise_if_failed(_first_problem(problem, world_size), tag, staging, ckpt_dir, rank)
    return SaveReport(ckpt_dir / tag, sum(e["bytes"] for e in files.values()), write_s, max(s[1] for s in shares))


def _raise_if_failed(failure: tuple[int, str] | None, tag: str, staging: Path, ckpt_dir: Path, rank: int) -> None:
    """Every rank, after agreeing: remove the staging directory (rank 0) and raise the same CheckpointError."""
    if failure is None:
        return
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs; never published
    latest = ckpt_dir / LATEST
    kept = (f"the newest published checkpoint ({ckpt_dir / latest.read_text().strip()}) is intact"
            if latest.is_file() else "no earlier checkpoint was published")
    failed_rank, problem = failure
    raise CheckpointError(f"checkpoint {tag} could not be written to {ckpt_dir} (rank {failed_rank}: {problem}); "
                          f"{kept}. Free space or fix the directory, then resume with train.resume=auto")
