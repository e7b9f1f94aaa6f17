"""Export a training checkpoint as consolidated fp32 weights (safetensors) plus the model config (json).

    python -m dsv4.export outputs/exp1/checkpoints                 # the tag in `latest`
    python -m dsv4.export outputs/exp1/checkpoints/step0000300 -o exported/exp1
    python -m dsv4.export outputs/exp1 --format hf -o exported/exp1-hf   # transformers' DeepseekV4ForCausalLM

writes `<out>/model.safetensors` (every parameter, fp32, full size; ZeRO 1-3 shards merged with DeepSpeed's
zero_to_fp32) and `<out>/config.json` (the ModelConfig, DeepSeek V4 config.json names). Load it with

    from dsv4.export import load_exported
    model = load_exported("exported/exp1")          # dsv4.build_model(config) + the weights, in eval mode

`--format hf` (dsv4/hf.py holds the mapping) writes a directory transformers loads offline as its own
DeepseekV4ForCausalLM (`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`):
config.json, model.safetensors under HF's names, tokenizer.json + tokenizer_config.json + special_tokens_map.json,
generation_config.json (default directory `<run>/export/<tag>-hf`). A schedule HF cannot express is refused
before any work. The default stays `--format dsv4`, so every existing command, script and loader keeps working.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from dsv4.config import ConfigError, ModelConfig
from dsv4.hf import check_hf_expressible, write_hf_directory
from dsv4.loading import ModelSource, load_tokenizer_of, trained_phase
from dsv4.model import DSV4Model, build_model
from dsv4.run_files import (
    CONFIG,
    EXPORT,
    HF_EXPORT_SUFFIX,
    TOKENIZER,
    TOKENIZER_CONFIG,
    TRAINING_INFO,
    WEIGHTS,
    check_latest_tag,
    checkpoint_model_config,
    consolidated_state_dict,
    read_run_config,
    resolve_run_path,
)


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


def check_out_file(path: Path, flag: str = "--out") -> None:
    """Open `path` for append (an existing file is left as it is; a new one is removed again), so that a file that
    cannot be written is named (ConfigError naming `flag`) before the work rather than after it."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}={path}: cannot write this file ({e.strerror}); give a writable path") from None
    if not existed:
        path.unlink(missing_ok=True)


FORMATS = ("dsv4", "hf")


def export(checkpoint: str | Path, out_dir: str | Path | None = None, format: str = "dsv4") -> Path:
    """Write model.safetensors + config.json (+ tokenizer files) for `checkpoint` in `format` ("dsv4": ours, read by
    load_exported; "hf": transformers' DeepseekV4ForCausalLM); returns the output directory."""
    if format not in FORMATS:
        raise ConfigError(f"--format={format}: choose from {', '.join(FORMATS)}")
    if out_dir:
        check_out_dir(Path(out_dir), "--out")
    found = resolve_run_path(Path(checkpoint), by="contents")  # a run, its checkpoints/ or one checkpoint; no export
    ckpt_dir, tag, run_dir = found.ckpt_dir, found.tag, found.run_dir
    check_latest_tag(ckpt_dir, tag)
    suffix = HF_EXPORT_SUFFIX if format == "hf" else ""
    out = Path(out_dir) if out_dir else run_dir / EXPORT / f"{tag}{suffix}"
    if not out_dir:
        check_out_dir(out, f"--out (default <run>/export/<tag>{suffix})")
    cfg = checkpoint_model_config(ckpt_dir, tag)
    if format == "hf":
        check_hf_expressible(cfg)  # before merging any shard
    state = consolidated_state_dict(ckpt_dir, tag)
    expected = {name for name, _ in DSV4Model(cfg).named_parameters()}
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"{ckpt_dir / tag}: the checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    if format == "hf":
        _save_hf(cfg, state, ckpt_dir, tag, run_dir, out)
        return out
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "source": str(ckpt_dir / tag)})
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
    _save_tokenizer(run_dir, out)
    _save_training_info(ckpt_dir, tag, out)
    return out


def _save_hf(cfg: ModelConfig, state: dict, ckpt_dir: Path, tag: str, run_dir: Path, out: Path) -> None:
    """transformers' DeepseekV4ForCausalLM directory (dsv4.hf) with the run's tokenizer and EOS, and training.json."""
    tokenizer, eos_id = load_tokenizer_of(ModelSource("checkpoint", out, run_dir), read_run_config(run_dir))
    write_hf_directory(out, cfg, state, tokenizer, eos_id, _trained_phase(ckpt_dir, tag), source=str(ckpt_dir / tag))
    _save_training_info(ckpt_dir, tag, out)


def _trained_phase(ckpt_dir: Path, tag: str) -> str:
    source = ModelSource("checkpoint", ckpt_dir / tag, ckpt_dir.parent)
    return trained_phase(source, read_run_config(ckpt_dir.parent))


def _save_training_info(ckpt_dir: Path, tag: str, out: Path) -> None:
    """The step and CSA attention phase the weights were trained to, so the export runs in that phase."""
    info = {"checkpoint": tag, "attention_phase": _trained_phase(ckpt_dir, tag)}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2))


def _save_tokenizer(run_dir: Path, out: Path) -> None:
    """The run's tokenizer beside the weights (tokenizer.json + its EOS token), so the export is self-contained."""
    tokenizer, eos_id = load_tokenizer_of(ModelSource("checkpoint", out, run_dir), read_run_config(run_dir))
    tokenizer.save(str(out / TOKENIZER))
    (out / TOKENIZER_CONFIG).write_text(json.dumps({"eos_token": tokenizer.id_to_token(eos_id)}, indent=2))


def load_exported(path: str | Path, backend: str = "auto", phase: str = "sparse") -> DSV4Model:
    """The model of an exported directory: dsv4.build_model(config.json) with model.safetensors loaded (strict).
    dsv4.loading.load_model takes any of a run, checkpoint or export directory and returns the tokenizer too."""
    path = Path(path)
    model = build_model(json.loads((path / CONFIG).read_text()), backend=backend, phase=phase)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir (uses `latest`) or one checkpoint tag dir")
    parser.add_argument("-o", "--out", default=None, help="output dir (default: <run>/export/<tag>, with --format hf "
                        "<run>/export/<tag>-hf)")
    parser.add_argument("--format", default="dsv4", choices=FORMATS,
                        help="dsv4 (default): ours, for dsv4.export.load_exported and every dsv4 command; hf: "
                        "transformers' DeepseekV4ForCausalLM (AutoModelForCausalLM.from_pretrained)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out / WEIGHTS} and {out / CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
