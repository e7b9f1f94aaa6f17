"""What evaluation reads: the run's own validation split (exactly the trainer's), another source, the settings a
run was trained with, and the held-out documents the passkey filler comes from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipelines import DataError, StreamingData, prepare_data
from data_pipelines.corpus import bundled_split
from data_pipelines.packed import BUNDLED_CORPUS
from data_pipelines.recall import RecallSpec
from dsv4.config import ConfigError
from dsv4.loading import LoadedModel
from dsv4.run_config import DataConfig, SourceConfig, phase_for_step, resolve_config
from dsv4.run_files import MANIFEST, RUN_CONFIG, export_tokenizer, read_manifest

DEFAULT_SEQ_LEN = 512  # a model without its run (an export): unless --seq-len says otherwise
DEFAULT_BATCH_SIZE = 8
DEFAULT_BATCHES = 4


@dataclass(frozen=True)
class RunSettings:
    """The training run's settings evaluation follows (defaults for a model without its run)."""
    seq_len: int = DEFAULT_SEQ_LEN
    micro_batch: int = DEFAULT_BATCH_SIZE
    seed: int = 1234
    eval_batches: int = DEFAULT_BATCHES
    dp_world: int = 1  # data-parallel ranks: the trainer's validation set is their shares together
    documents: bool = False  # trained with document masking (data.cross_document_attention=false)
    val_fraction: float = 0.02
    final_phase: str = "sparse"  # the CSA phase the run ended in (the trainer's validation ran in it)
    data: Any = None  # the run's DataConfig
    passkey_digits: int | None = None  # the run's passkey source's key length, if it trained on one
    recall: dict[str, RecallSpec] = field(default_factory=dict)  # the run's recall sources (name -> settings)


def run_settings(loaded: LoadedModel) -> RunSettings:
    if loaded.run_config is None:
        return RunSettings()
    try:
        run = resolve_config(loaded.run_config)
    except ConfigError as e:
        raise ConfigError(f"{loaded.source.run_dir / RUN_CONFIG}: {e}") from None
    passkey = [s.passkey.digits for s in run.data.sources if s.kind == "passkey"]
    return RunSettings(seq_len=run.train.seq_len, micro_batch=run.train.micro_batch_size, seed=run.train.seed,
                       eval_batches=run.train.eval_batches, dp_world=_dp_world(loaded, run),
                       documents=not run.data.cross_document_attention, val_fraction=run.data.val_fraction,
                       final_phase=phase_for_step(run.train, run.train.steps - 1), data=run.data,
                       passkey_digits=passkey[0] if passkey else None, recall=_recall_specs(run.data))


def _recall_specs(data: Any) -> dict[str, RecallSpec]:
    return {s.name or f"recall{i}": RecallSpec(**dataclasses.asdict(s.recall))
            for i, s in enumerate(data.sources) if s.kind == "recall"}


def _dp_world(loaded: LoadedModel, run: Any) -> int:
    """Data-parallel ranks of the run, from the checkpoint's manifest (1 when it does not say)."""
    if loaded.source.kind != "checkpoint" or not (loaded.source.path / MANIFEST).is_file():
        return 1
    world = int(read_manifest(loaded.source.path).get("world_size") or 1)
    return max(1, world // run.parallel.sequence_parallel_size)


def tokenizer_setting(loaded: LoadedModel, settings: RunSettings) -> tuple[str | None, str | None]:
    """(data.tokenizer, data.eos_token) that load the model's own tokenizer."""
    saved = export_tokenizer(loaded.source.path) if loaded.source.kind == "export" else None
    if saved is not None:
        return saved
    if settings.data is not None:
        return settings.data.tokenizer, settings.data.eos_token
    return None, None


def data_config_for(spec: str, loaded: LoadedModel, settings: RunSettings) -> tuple[Any, bool]:
    """A DataConfig for `--data`: `bundled` (the bundled corpus), `bundled:PATH` (a <|doc|>-separated file) or a
    file glob (json lines / parquet / text). Returns (config, read every document) -- files are evaluated whole,
    the bundled formats on their held-out documents."""
    tokenizer, eos = tokenizer_setting(loaded, settings)
    common = {"tokenizer": tokenizer, "eos_token": eos, "num_workers": 0, "val_fraction": settings.val_fraction}
    if spec == "bundled" or spec.startswith("bundled:"):
        path = spec.split(":", 1)[1] if ":" in spec else None
        return DataConfig(sources=[SourceConfig(kind="bundled", name="bundled", path=path)], **common), False
    return DataConfig(sources=[SourceConfig(kind="files", name=Path(spec).stem or "data", path=spec)], **common), True


def validation_batches(loaded: LoadedModel, settings: RunSettings, data: str | None, num_batches: int,
                       seq_len: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Micro-batches to evaluate on, and what they are. Without `data`: the run's own validation split, built as
    the trainer builds it (all data-parallel ranks' shares), so the loss equals the trainer's."""
    if data is None:
        if settings.data is None:
            raise ConfigError(f"--data: {loaded.source.label} has no training run beside it (an export), so it has "
                              "no validation split of its own; give --data bundled or a file")
        config, whole = dataclasses.replace(settings.data, num_workers=0), False
    else:
        config, whole = data_config_for(data, loaded, settings)
    try:
        plan = prepare_data(config)
    except DataError as e:
        raise ConfigError(f"--data: {e}") from None
    if whole:  # read every document of the given files: they are the validation files
        plan = dataclasses.replace(plan, sources=tuple(dataclasses.replace(s, val_files=s.files)
                                                       for s in plan.sources))
    stream = StreamingData(plan, seq_len, batch_size, settings.seed, 0, 1)
    batches = stream.val_batches(num_batches * (settings.dp_world if data is None else 1))
    if not batches:
        raise ConfigError(f"--data: {data or 'the validation split'} gives no full sequence of {seq_len} tokens")
    what = plan.describe() + (" (every document)" if whole else " (held-out split)")
    return batches, what


def held_out_documents(settings: RunSettings) -> list[str]:
    """The bundled corpus' held-out documents (the passkey filler: text no bundled-corpus run trained on)."""
    return list(bundled_split(str(BUNDLED_CORPUS), settings.val_fraction)[1])
