"""What a run leaves on disk, and how everything that is not the trainer reads it.

    <run>/config.yaml                         the composed Hydra config (RUN_CONFIG)
    <run>/checkpoints/latest                  the newest published tag (LATEST; DeepSpeed's convention)
    <run>/checkpoints/stepNNNNNNN/            a published checkpoint: DeepSpeed's files, data_state_rank<R>.json
                                              (named by data_pipelines.data_state_path), model_config.json
                                              (MODEL_CONFIG) and complete.json (MANIFEST), written last
    <run>/checkpoints/.stepNNNNNNN.partial/   being written (or the job died while writing it): never read
    <run>/checkpoints/stepNNNNNNN_universal/  DeepSpeed's universal copy, for a resume on another number of ranks
    <run>/export/stepNNNNNNN/                 `python -m dsv4.export`'s default output: config.json, model.safetensors,
                                              tokenizer.json, tokenizer_config.json, training.json

Here: those names; the manifest's checksums and `verify_checkpoint`; the published checkpoints of a directory;
`resolve_run_path`, the one resolver from a path a user gives (a run directory, its checkpoints/ directory, one
stepNNNNNNN/ directory, an export directory) to what it holds; and the readers (a checkpoint's model config and
consolidated weights, the run's config.yaml, an export's tokenizer files and training info). The trainer writes
through dsv4.training.checkpointing, which takes its names from here.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from omegaconf import DictConfig, OmegaConf

from dsv4.config import ConfigError, ModelConfig
from dsv4.run_config import resolve_config

# ---------------------------------------------------------------- a run directory
CHECKPOINTS = "checkpoints"  # <run>/checkpoints/
RUN_CONFIG = "config.yaml"  # <run>/config.yaml
EXPORT = "export"  # <run>/export/<tag>/: the export's default directory

# ---------------------------------------------------------------- a checkpoints/ directory and one checkpoint
LATEST = "latest"
TAG_RE = re.compile(r"^step(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
MANIFEST = "complete.json"
MODEL_CONFIG = "model_config.json"
MODEL_STATES_GLOB = "*model_states.pt"  # DeepSpeed's module states: what makes a directory a checkpoint
HASH = "xxh3_128"  # about 7-10 GB/s on one core: small against writing the same bytes (benchmarks/RESULTS.md)
_RANK_IN_NAME = re.compile(r"rank_?(\d+)")

# ---------------------------------------------------------------- an export directory (python -m dsv4.export)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # {"eos_token": ...} beside an export's tokenizer.json
TRAINING_INFO = "training.json"  # {"checkpoint": ..., "attention_phase": ...} beside an export's weights
# an export in Hugging Face transformers' format (python -m dsv4.export --format hf): config.json and
# model.safetensors under HF's names, the tokenizer files above, and these
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
HF_EXPORT_SUFFIX = "-hf"  # <run>/export/<tag>-hf/: the HF export's default directory


def tag_for(step: int) -> str:
    """The published tag of the checkpoint taken after `step` optimizer steps."""
    return f"step{step:07d}"


def staging_tag(tag: str) -> str:
    """Hidden name a checkpoint is written under before it is published."""
    return f".{tag}.partial"


def step_of(tag: str) -> int | None:
    """The step a published tag names (step0000300 -> 300), None for any other name."""
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- checksums and the manifest

def file_checksum(path: Path) -> str:
    """xxh3-128 of a file's bytes, read through mmap (no copy out of the page cache: ~3x faster than read())."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def owner_rank(name: str, world: int) -> int:
    """The rank that checksums (and verifies) a file: the rank number in its name, usually the rank that wrote
    it, so the bytes are still in its page cache; else rank 0."""
    match = _RANK_IN_NAME.search(Path(name).name)
    return int(match.group(1)) % world if match else 0


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())


def verify_checkpoint(checkpoint: Path, rank: int = 0, world: int = 1) -> str | None:
    """None when the checkpoint is complete and intact, else why not, naming the file: a missing manifest, a
    missing or resized file, or content that no longer matches its checksum. Sizes are checked for every file;
    contents for the files `rank` owns among `world` (all of them by default), so ranks can share the reading."""
    if not checkpoint.is_dir():
        return "no such directory"
    if not (checkpoint / MANIFEST).is_file():
        return f"no {MANIFEST} (the job died while writing it, or it predates manifests)"
    try:
        manifest = read_manifest(checkpoint)
        files = manifest["files"]
        algorithm = manifest.get("hash", HASH)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, entry in files.items():
        size = entry["bytes"] if isinstance(entry, dict) else entry  # older manifests: sizes only
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        actual = path.stat().st_size
        if actual != size:
            return f"file {name} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
    for name, entry in files.items():
        if not isinstance(entry, dict) or algorithm != HASH or owner_rank(name, world) != rank:
            continue
        try:
            actual_sum = file_checksum(checkpoint / name)
        except OSError as e:
            return f"file {name} cannot be read: {e}"
        if actual_sum != entry[HASH]:
            return (f"file {name}: its content does not match the manifest's {HASH} checksum (changed after it was "
                    "written: corrupted on disk or overwritten)")
    return None


# ---------------------------------------------------------------- published checkpoints

@dataclass
class CheckpointInfo:
    path: Path
    tag: str
    step: int


def list_checkpoints(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Published checkpoints (`stepNNNNNNN`), newest step first. Staging directories are not listed."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        step = step_of(path.name)
        if step is not None and path.is_dir():
            found.append(CheckpointInfo(path, path.name, step))
    return sorted(found, key=lambda c: c.step, reverse=True)


def unpublished(ckpt_dir: Path) -> list[Path]:
    """Staging directories left by jobs that stopped while writing."""
    return sorted(ckpt_dir.glob(staging_tag("step*"))) if ckpt_dir.is_dir() else []


def newest_complete(ckpt_dir: Path, warn: Callable[[str], None],
                    verify: Callable[[Path], str | None] = verify_checkpoint) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; each one skipped (and each unpublished one) is reported via `warn`."""
    for path in unpublished(ckpt_dir):
        warn(f"warning: ignoring unpublished checkpoint {path} (the job stopped while writing it)")
    for info in list_checkpoints(ckpt_dir):
        problem = verify(info.path)
        if problem is None:
            return info
        warn(f"warning: skipping damaged checkpoint {info.path}: {problem}")
    return None


def read_latest(ckpt_dir: Path) -> str:
    """The tag `latest` names (OSError when there is no `latest`)."""
    return (ckpt_dir / LATEST).read_text().strip()


# ---------------------------------------------------------------- the resolver

@dataclass(frozen=True)
class RunPath:
    """What a path a user gave holds."""
    kind: str  # "run" | "checkpoints" (a run's checkpoints/ directory) | "checkpoint" (one tag directory) | "export"
    run_dir: Path | None  # the training run (None for an export directory)
    ckpt_dir: Path | None  # the checkpoints directory (None for an export directory)
    tag: str | None  # the checkpoint: the one the path names or `latest` names; None: the caller picks
    export_dir: Path | None = None

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint's tag directory, when a tag is known."""
        return self.ckpt_dir / self.tag if self.ckpt_dir is not None and self.tag is not None else None


def is_export_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def resolve_run_path(path: Path, by: str = "contents", key: str = "path", exports: bool = False) -> RunPath:
    """What `path` holds: a run directory, its checkpoints directory, one checkpoint, or (with `exports`) an export.

    by="names" (train.resume, which also names run directories that hold no checkpoint yet): the names decide. A
    stepNNNNNNN/ directory inside a directory named checkpoints/ is that checkpoint, a directory named checkpoints/
    is a run's checkpoints, any other directory is a run directory; the tag of the last two is left to the caller
    (`latest`, or the newest that verifies). ConfigError "<key>: no such directory" when `path` is no directory.

    by="contents" (export, loading): what a directory holds decides, whatever its name. With `exports`, config.json
    + model.safetensors make an export directory; a directory with a checkpoints/ directory in it is a run (its
    checkpoints/ is read on); a directory holding `latest` is a checkpoints directory (the tag is the one `latest`
    names: check it with check_latest_tag); one holding *model_states.pt is a checkpoint. ConfigError naming the
    directory otherwise. The run directory of a checkpoints directory is its parent."""
    if by == "names":
        if not path.is_dir():
            raise ConfigError(f"{key}: no such directory")
        if TAG_RE.match(path.name) and path.parent.name == CHECKPOINTS:
            return RunPath("checkpoint", path.parent.parent, path.parent, path.name)
        if path.name == CHECKPOINTS:
            return RunPath("checkpoints", path.parent, path, None)
        return RunPath("run", path, path / CHECKPOINTS, None)
    if by != "contents":
        raise ValueError(f"resolve_run_path: by={by!r}, choose 'names' or 'contents'")
    if exports and is_export_dir(path):
        return RunPath("export", None, None, None, path)
    kind = "checkpoints"
    if (path / CHECKPOINTS).is_dir():
        path, kind = path / CHECKPOINTS, "run"
    if (path / LATEST).is_file():
        return RunPath(kind, path.parent, path, read_latest(path))
    if path.is_dir() and any(path.glob(MODEL_STATES_GLOB)):
        return RunPath("checkpoint", path.parent.parent, path.parent, path.name)
    raise ConfigError(f"{path}: not a checkpoint directory (no '{LATEST}' and no {MODEL_STATES_GLOB})")


def check_latest_tag(ckpt_dir: Path, tag: str, key: str | None = None) -> None:
    """ConfigError when the checkpoint `latest` names is not there: the file, the tag, the checkpoints that are and
    what to do."""
    if (ckpt_dir / tag).is_dir():
        return
    present = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file()) \
        if ckpt_dir.is_dir() else []
    fix = (f"pass one checkpoint directory instead (the newest complete one is {ckpt_dir / present[-1]}), or "
           f"write its tag into {ckpt_dir / LATEST}" if present else "no complete checkpoint is there to use instead")
    raise ConfigError(f"{key + ': ' if key else ''}{ckpt_dir / LATEST} names checkpoint {tag!r}, but "
                      f"{ckpt_dir / tag} does not exist (deleted or moved?); {fix}")


# ---------------------------------------------------------------- readers

def read_run_config(run_dir: Path | None) -> DictConfig | None:
    """The run's composed config (config.yaml), or None when the run directory is unknown or has none."""
    if run_dir is None or not (run_dir / RUN_CONFIG).is_file():
        return None
    return OmegaConf.load(run_dir / RUN_CONFIG)


def find_run_config(path: Path) -> Path | None:
    """The config.yaml of the run that `path` (any file or directory inside a run, an export there too) belongs to:
    the nearest one at or above it; None outside any run."""
    return next((p / RUN_CONFIG for p in (path, *path.parents) if (p / RUN_CONFIG).is_file()), None)


def checkpoint_model_config(ckpt_dir: Path, tag: str) -> ModelConfig:
    """The model config a checkpoint was trained with: its model_config.json, else (older checkpoints) the run's
    config.yaml."""
    stored = ckpt_dir / tag / MODEL_CONFIG
    if stored.is_file():
        return ModelConfig.from_dict(json.loads(stored.read_text()))
    run_config = ckpt_dir.parent / RUN_CONFIG  # older checkpoints: the run's Hydra config
    if run_config.is_file():
        return resolve_config(OmegaConf.load(run_config)).model
    raise ConfigError(f"{ckpt_dir / tag}: no {MODEL_CONFIG} and no {run_config}; cannot tell the model's config")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint (ZeRO 0-3). A checkpoint whose manifest does not verify is
    refused (ConfigError naming the file)."""
    tag_dir = ckpt_dir / tag
    if (tag_dir / MANIFEST).is_file():
        problem = verify_checkpoint(tag_dir)
        if problem is not None:
            raise ConfigError(f"{tag_dir}: damaged checkpoint: {problem}")
    else:  # loaded anyway: checkpoints written before manifests existed have none
        print(f"warning: {tag_dir}: no {MANIFEST} (the checkpoint's manifest), so its files cannot be verified: it "
              "may be incomplete or changed; loading it unverified", file=sys.stderr, flush=True)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        # deepspeed: heavy, and needed only for ZeRO-sharded checkpoints
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO-0: the module's full state is in the model states file
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"{tag_dir}: no mp_rank_*_model_states.pt")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {name: t.detach().to(torch.float32).contiguous() for name, t in state.items()}


def export_tokenizer(export_dir: Path) -> tuple[str, str | None] | None:
    """(tokenizer.json path, EOS token or None) an export saved beside its weights; None when it saved none (older
    exports)."""
    if not (export_dir / TOKENIZER).is_file():
        return None
    meta_path = export_dir / TOKENIZER_CONFIG
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return str(export_dir / TOKENIZER), meta.get("eos_token")


def read_training_info(export_dir: Path) -> dict[str, Any]:
    """What an export records of its training (training.json: the checkpoint, the attention phase); {} if none."""
    info_path = export_dir / TRAINING_INFO
    return json.loads(info_path.read_text()) if info_path.is_file() else {}
