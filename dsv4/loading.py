"""One loader for everything that runs a trained model (generate, evaluate, the lm-eval backend, export).

    from dsv4.loading import load_model
    loaded = load_model("outputs/exp1")        # a run dir, its checkpoints/ dir, one stepNNNNNNN/ dir,
    loaded.model, loaded.tokenizer, loaded.eos_id   # or a `python -m dsv4.export` directory

What each path means:
- an export directory (config.json + model.safetensors, written by `python -m dsv4.export`): the weights and
  config stored there, and the tokenizer.json saved beside them (older exports: the bundled tokenizer); an export
  in transformers' DeepseekV4 format (`--format hf`, or any HF deepseek_v4 directory of that plain form) too;
- a run directory or its checkpoints/ directory: the checkpoint named in `latest`;
- a checkpoint tag directory (stepNNNNNNN/): that checkpoint.
For checkpoints the model config comes from the checkpoint's model_config.json and the tokenizer from the
run's config.yaml (data.tokenizer / data.eos_token), so a model is always read with the tokenizer it was
trained on. Every mistake (no such path, a directory holding no model, weights that do not match the config,
a tokenizer larger than the model's vocabulary) raises ConfigError naming the path and what to do. Paths are
resolved, and checkpoints and run configs read, by dsv4.run_files; dsv4.export builds on this module.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from data_pipelines import DataError
from data_pipelines.tokenizer import TokenizerSpec, eos_id_of, load_tokenizer
from dsv4.config import ConfigError, ModelConfig
from dsv4.hf import OURS_KEY, from_hf_config, from_hf_state_dict, is_hf_config
from dsv4.model import DSV4Model
from dsv4.run_config import phase_for_step, resolve_config
from dsv4.run_files import (
    CONFIG,
    WEIGHTS,
    check_latest_tag,
    checkpoint_model_config,
    consolidated_state_dict,
    export_tokenizer,
    read_run_config,
    read_training_info,
    resolve_run_path,
    step_of,
)


@dataclass
class ModelSource:
    """Where a model's weights are: an export directory, or a DeepSpeed checkpoint (directory + tag)."""
    kind: str  # "export" | "checkpoint"
    path: Path  # the export directory, or the checkpoint tag directory
    run_dir: Path | None  # the training run it came from, when known

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass
class LoadedModel:
    model: DSV4Model  # in eval mode
    config: ModelConfig
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int
    source: ModelSource
    run_config: Any = None  # the run's composed config (OmegaConf) when the run directory is known
    phase: str = "sparse"  # the CSA attention phase the model runs in (the one its training ended in)


def find_source(path: str | Path, key: str = "path") -> ModelSource:
    """Resolve a user's path to a model source; ConfigError (naming `key`) when it holds no model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: no such file or directory: {path}")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file; give a run directory, a checkpoint directory or an export "
                          f"directory (with {CONFIG} and {WEIGHTS})")
    try:
        found = resolve_run_path(path, by="contents", exports=True)
    except ConfigError:
        raise ConfigError(f"{key}: {path} holds no model: not an export directory ({CONFIG} + {WEIGHTS}) and "
                          "not a run or checkpoint directory (checkpoints/latest or *model_states.pt). Train "
                          "with train.save_interval or let the run finish, then pass its run directory") from None
    if found.kind == "export":
        return ModelSource("export", path, None)
    check_latest_tag(found.ckpt_dir, found.tag, key)
    return ModelSource("checkpoint", found.checkpoint, found.run_dir)


def load_tokenizer_of(source: ModelSource, run_config: DictConfig | None) -> tuple[Any, int]:
    """(tokenizer, EOS id) the model was trained with: an export's own tokenizer.json, else the run's data.tokenizer
    and data.eos_token, else the bundled tokenizer."""
    saved = export_tokenizer(source.path) if source.kind == "export" else None
    if saved is not None:
        spec = TokenizerSpec(*saved)
    elif run_config is not None and "data" in run_config:
        spec = TokenizerSpec(run_config.data.get("tokenizer"), run_config.data.get("eos_token"))
    else:  # an export or checkpoint without its run: the bundled tokenizer, which the defaults train with
        spec = TokenizerSpec(None, None)
    try:
        tokenizer = load_tokenizer(spec)
        return tokenizer, eos_id_of(tokenizer, spec)
    except DataError as e:
        raise ConfigError(f"{source.label}: the model's tokenizer cannot be loaded ({e})") from None


def _state_dict(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if source.kind == "export":
        config = json.loads((source.path / CONFIG).read_text())
        if is_hf_config(config):  # transformers' DeepseekV4 names (dsv4.export --format hf)
            cfg = from_hf_config(config, str(source.path / CONFIG))
            return cfg, from_hf_state_dict(cfg, load_file(str(source.path / WEIGHTS)), str(source.path / WEIGHTS))
        try:
            cfg = ModelConfig.from_dict(config, prefix=CONFIG)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source.path / CONFIG}: not a valid model config ({e})") from None
        return cfg, load_file(str(source.path / WEIGHTS))
    ckpt_dir, tag = source.path.parent, source.path.name
    cfg = checkpoint_model_config(ckpt_dir, tag)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's merge prints progress: keep stdout for results
        return cfg, consolidated_state_dict(ckpt_dir, tag)


def trained_phase(source: ModelSource, run_config: DictConfig | None) -> str:
    """The CSA phase of the last step the weights were trained in: a model whose run stopped before the sparse
    phase attends to every visible compressed entry, as it was trained to (its indexer may still be untrained).
    Exports record it in training.json; a checkpoint's run config and step tell it; otherwise "sparse"."""
    if source.kind == "export":
        config = json.loads((source.path / CONFIG).read_text())
        recorded = (config.get(OURS_KEY) or {}).get("attention_phase", "sparse") if is_hf_config(config) else "sparse"
        return read_training_info(source.path).get("attention_phase", recorded)
    step = step_of(source.path.name)
    if run_config is None or step is None:
        return "sparse"
    try:
        train = resolve_config(run_config).train
    except (ConfigError, ValueError, TypeError, KeyError):  # a run config of another version: assume sparse
        return "sparse"
    return phase_for_step(train, max(step - 1, 0))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """ConfigError naming the first parameter that is missing, unexpected or of another shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(name for name in set(expected) & set(state)
                   if tuple(expected[name].shape) != tuple(state[name].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the config gives {tuple(expected[wrong[0]].shape)}")
        raise ConfigError(f"{label}: the weights do not match the model config stored with them ({detail}; "
                          f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               backend: str = "auto", key: str = "path", phase: str | None = None) -> LoadedModel:
    """The model at `path` (see the module docstring) in eval mode on `device` in `dtype`, with its tokenizer.
    phase: the CSA attention phase; None = the one its training ended in (see trained_phase)."""
    source = find_source(path, key)
    run_config = read_run_config(source.run_dir)
    cfg, state = _state_dict(source)
    phase = phase or trained_phase(source, run_config)
    model = DSV4Model(cfg, backend=backend, phase=phase)
    check_state_dict(model, state, source.label)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer, eos_id = load_tokenizer_of(source, run_config)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(f"{source.label}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the "
                          f"model's vocab_size ({cfg.vocab_size}); this model was not trained with it")
    return LoadedModel(model, cfg, tokenizer, eos_id, source, run_config, phase)


# model config keys that do not change what a given set of weights computes
_NOT_COMPARED = ("initializer_range",)
_DENSE_ONLY = ("num_key_value_heads", "dense_head_dim")


def model_config_differences(source: ModelConfig, target: ModelConfig) -> list[str]:
    """'key: value there, value here' for every model key that differs (dense-only keys only with a dense layer)."""
    theirs, ours = source.to_dict(), target.to_dict()
    dense = any(not spec.v4 for spec in source.layer_specs() + target.layer_specs())
    return [f"model.{key}: {theirs[key]!r} there, {ours[key]!r} here" for key in ours
            if key not in _NOT_COMPARED and (dense or key not in _DENSE_ONLY) and theirs.get(key) != ours[key]]


def initial_weights(path: str | Path, cfg: ModelConfig, key: str = "train.init_from") -> dict[str, torch.Tensor]:
    """The weights a new run starts from (train.init_from): a run, checkpoint or export directory (ours or HF's
    DeepseekV4 format); ConfigError naming every model key that differs from `cfg`, or the first parameter that
    does not fit."""
    source = find_source(path, key)
    source_cfg, state = _state_dict(source)
    differences = model_config_differences(source_cfg, cfg)
    if differences:
        raise ConfigError(f"{key}={path}: its model config differs from this run's: {'; '.join(differences)}. "
                          "Set those model keys to match")
    with torch.device("meta"):  # shapes only: no memory for a second model
        model = DSV4Model(cfg)
    check_state_dict(model, state, source.label)
    return state
