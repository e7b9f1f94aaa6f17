"""Export a training checkpoint as consolidated fp32 weights (safetensors) plus the model config (json).

    python -m dsv4.export outputs/exp1/checkpoints                 # the tag in `latest`
    python -m dsv4.export outputs/exp1/checkpoints/step0000300 -o exported/exp1

writes `<out>/model.safetensors` (every parameter, fp32, full size; ZeRO 1-3 shards merged with DeepSpeed's
zero_to_fp32) and `<out>/config.json` (the ModelConfig, DeepSeek V4 config.json names). Load it with

    from dsv4.export import load_exported
    model = load_exported("exported/exp1")          # dsv4.build_model(config) + the weights, in eval mode
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dsv4.config import ConfigError, ModelConfig
from dsv4.loading import CONFIG, WEIGHTS
from dsv4.model import DSV4Model, build_model


def resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) for a checkpoints dir (its `latest`), a tag dir, or a run dir."""
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise ConfigError(f"{path}: not a checkpoint directory (no 'latest' and no *model_states.pt)")


def check_latest_tag(ckpt_dir: Path, tag: str, key: str | None = None) -> None:
    """ConfigError when the checkpoint `latest` names is not there: the file, the tag, the checkpoints that are and
    what to do."""
    if (ckpt_dir / tag).is_dir():
        return
    from dsv4.training.checkpointing import MANIFEST

    present = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file()) \
        if ckpt_dir.is_dir() else []
    fix = (f"pass one checkpoint directory instead (the newest complete one is {ckpt_dir / present[-1]}), or "
           f"write its tag into {ckpt_dir / 'latest'}" if present else "no complete checkpoint is there to use instead")
    raise ConfigError(f"{key + ': ' if key else ''}{ckpt_dir / 'latest'} names checkpoint {tag!r}, but "
                      f"{ckpt_dir / tag} does not exist (deleted or moved?); {fix}")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse (ConfigError naming `flag`) an output directory that cannot be created or written, before any work:
    a file in the way, or a first existing ancestor where a probe file cannot be made. Creates nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}={out}: is a file, not a directory; give a directory")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}={out}: {existing} is a file, not a directory; give a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}={out}: cannot write in {existing} ({e.strerror}); give a writable directory"
                          ) from None


def checkpoint_model_config(ckpt_dir: Path, tag: str) -> ModelConfig:
    from dsv4.training.checkpointing import MODEL_CONFIG

    stored = ckpt_dir / tag / MODEL_CONFIG
    if stored.is_file():
        return ModelConfig.from_dict(json.loads(stored.read_text()))
    run_config = ckpt_dir.parent / "config.yaml"  # older checkpoints: the run's Hydra config
    if run_config.is_file():
        from omegaconf import OmegaConf

        from dsv4.training.config import resolve_config

        return resolve_config(OmegaConf.load(run_config)).model
    raise ConfigError(f"{ckpt_dir / tag}: no {MODEL_CONFIG} and no {run_config}; cannot tell the model's config")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint (ZeRO 0-3). A checkpoint whose manifest does not verify is
    refused (ConfigError naming the file)."""
    from dsv4.training.checkpointing import MANIFEST, verify_checkpoint

    tag_dir = ckpt_dir / tag
    if (tag_dir / MANIFEST).is_file():
        problem = verify_checkpoint(tag_dir)
        if problem is not None:
            raise ConfigError(f"{tag_dir}: damaged checkpoint: {problem}")
    else:  # loaded anyway: checkpoints written before manifests existed have none
        print(f"warning: {tag_dir}: no {MANIFEST} (the checkpoint's manifest), so its files cannot be verified: it "
              "may be incomplete or changed; loading it unverified", file=sys.stderr, flush=True)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO-0: the module's full state is in the model states file
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"{tag_dir}: no mp_rank_*_model_states.pt")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {name: t.detach().to(torch.float32).contiguous() for name, t in state.items()}


def export(checkpoint: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write model.safetensors + config.json for `checkpoint`; returns the output directory."""
    from safetensors.torch import save_file

    if out_dir:
        check_out_dir(Path(out_dir), "--out")
    ckpt_dir, tag = resolve_checkpoint(Path(checkpoint))
    check_latest_tag(ckpt_dir, tag)
    out = Path(out_dir) if out_dir else ckpt_dir.parent / "export" / tag
    if not out_dir:
        check_out_dir(out, "--out (default <run>/export/<tag>)")
    cfg = checkpoint_model_config(ckpt_dir, tag)
    state = consolidated_state_dict(ckpt_dir, tag)
    expected = {name for name, _ in DSV4Model(cfg).named_parameters()}
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"{ckpt_dir / tag}: the checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "source": str(ckpt_dir / tag)})
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
    _save_tokenizer(ckpt_dir.parent, out)
    _save_training_info(ckpt_dir, tag, out)
    return out


def _save_training_info(ckpt_dir: Path, tag: str, out: Path) -> None:
    """The step and CSA attention phase the weights were trained to, so the export runs in that phase."""
    from dsv4.loading import TRAINING_INFO, ModelSource, _run_config, trained_phase

    source = ModelSource("checkpoint", ckpt_dir / tag, ckpt_dir.parent)
    info = {"checkpoint": tag, "attention_phase": trained_phase(source, _run_config(ckpt_dir.parent))}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2))


def _save_tokenizer(run_dir: Path, out: Path) -> None:
    """The run's tokenizer beside the weights (tokenizer.json + its EOS token), so the export is self-contained."""
    from dsv4.loading import TOKENIZER, TOKENIZER_CONFIG, ModelSource, _load_tokenizer, _run_config

    tokenizer, eos_id = _load_tokenizer(ModelSource("checkpoint", out, run_dir), _run_config(run_dir))
    tokenizer.save(str(out / TOKENIZER))
    (out / TOKENIZER_CONFIG).write_text(json.dumps({"eos_token": tokenizer.id_to_token(eos_id)}, indent=2))


def load_exported(path: str | Path, backend: str = "auto", phase: str = "sparse") -> DSV4Model:
    """The model of an exported directory: dsv4.build_model(config.json) with model.safetensors loaded (strict).
    dsv4.loading.load_model takes any of a run, checkpoint or export directory and returns the tokenizer too."""
    from safetensors.torch import load_file

    path = Path(path)
    model = build_model(json.loads((path / CONFIG).read_text()), backend=backend, phase=phase)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir (uses `latest`) or one checkpoint tag dir")
    parser.add_argument("-o", "--out", default=None, help="output dir (default: <run>/export/<tag>)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out / WEIGHTS} and {out / CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
