"""python -m dsv4.generate: on a real training run's directory, checkpoint and export (one loader), and every
bad input named before any work."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_training import run

from dsv4 import generate as generate_cli
from dsv4.config import ModelConfig
from dsv4.loading import load_model
from dsv4.model import DSV4Model

CLOSING = re.compile(r"^prompt (\d+) tokens \| prefill [\d,.]+ tokens/s \| decode [\d,.]+ tokens/s \((\d+) tokens\) \| "
                     r"cache [\d,.]+ MiB \(a dense GQA cache of this model: [\d,.]+ MiB, [\d.]+%\)$")
PROMPT = "It was a dark and stormy night"


def generate(path, *args):
    return subprocess.run([sys.executable, "-m", "dsv4.generate", str(path), *args], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_on_a_run_dir_its_checkpoint_and_its_export(tmp_path, capsys):
    out = tmp_path / "run"
    res = run([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=2", "train.steps=2",
               "train.phases.dense_steps=0", "train.phases.indexer_warmup_steps=0", "train.eval_batches=1",
               "data.num_workers=0", "logging.wandb.enabled=false", f"train.output_dir={out}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert run([sys.executable, "-m", "dsv4.export", str(out), "-o", str(tmp_path / "export")]).returncode == 0

    res = generate(out, "--prompt", PROMPT, "--max-new-tokens", "6", "--no-stop")  # the command, as a user runs it
    assert res.returncode == 0, res.stderr[-3000:]
    closing = CLOSING.match(res.stderr.strip().splitlines()[-1])
    assert closing, res.stderr[-500:]
    assert int(closing.group(1)) == len(load_model(out).tokenizer.encode(PROMPT).ids)
    assert int(closing.group(2)) == 6
    assert res.stdout.startswith(PROMPT) and len(res.stdout.strip()) > len(PROMPT)
    for path in (out / "checkpoints" / "step0000002", tmp_path / "export"):  # the same loader: the same text
        assert generate_cli.main([str(path), "--prompt", PROMPT, "--max-new-tokens", "6", "--no-stop"]) == 0
        assert capsys.readouterr().out == res.stdout
    assert generate_cli.main([str(out), "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "0.9",
                              "--top-p", "0.9", "--top-k", "50", "--seed", "1", "--cache-dtype", "fp8"]) == 0
    assert CLOSING.match(capsys.readouterr().err.strip().splitlines()[-1])


def write_export(path: Path, cfg: ModelConfig, tokenizer: bool = True, **config_edits) -> Path:
    """An export directory as `python -m dsv4.export` writes it, for a fresh model (no training needed)."""
    path.mkdir(parents=True)
    save_file(DSV4Model(cfg).state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), **config_edits}))
    return path


def tiny(**overrides) -> ModelConfig:
    values = dict(vocab_size=4096, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
                  head_dim=16, qk_rope_head_dim=4, q_lora_rank=16, o_groups=1, o_lora_rank=8, sliding_window=8,
                  compress_ratios=[0, 4], index_n_heads=2, index_head_dim=8, index_topk=2)
    values.update(overrides)
    return ModelConfig(**values)


def fails(capsys, *argv) -> str:
    """Run the command in-process; it must exit 2 (argparse's usage errors raise SystemExit(2)). -> stderr."""
    try:
        code = generate_cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named_before_any_work(tmp_path, capsys):
    good = write_export(tmp_path / "good", tiny())
    assert "PATH: no such file or directory" in fails(capsys, tmp_path / "nope", "--prompt", "hi")
    (tmp_path / "empty").mkdir()
    assert "holds no model" in fails(capsys, tmp_path / "empty", "--prompt", "hi")
    mismatch = write_export(tmp_path / "mismatch", tiny(), hidden_size=48)
    err = fails(capsys, mismatch, "--prompt", "hi")
    assert "weights do not match the model config" in err and "mismatch" in err
    assert "--prompt: empty" in fails(capsys, good, "--prompt", "")
    short = write_export(tmp_path / "short", tiny(), max_position_embeddings=4)
    assert "exceed the model's max_position_embeddings (4)" in fails(capsys, short, "--prompt", PROMPT)
    assert "--cache-dtype" in fails(capsys, good, "--prompt", "hi", "--cache-dtype", "fp4")
    small_vocab = write_export(tmp_path / "small_vocab", tiny(vocab_size=1000))
    assert "more than the model's vocab_size (1000)" in fails(capsys, small_vocab, "--prompt", "hi")
    assert "--temperature=-1.0: must be >= 0" in fails(capsys, good, "--prompt", "hi", "--temperature", "-1")
    assert "--top-p=1.5" in fails(capsys, good, "--prompt", "hi", "--top-p", "1.5")
    if not torch.cuda.is_available():
        assert "--device=cuda: CUDA is not available" in fails(capsys, good, "--prompt", "hi", "--device", "cuda")


def test_loaded_model_runs_in_the_phase_its_training_ended_in(tmp_path):
    export = write_export(tmp_path / "e", tiny())
    assert load_model(export).model.options.phase == "sparse"  # no record: sparse
    (export / "training.json").write_text(json.dumps({"attention_phase": "dense"}))
    loaded = load_model(export)
    assert loaded.model.options.phase == loaded.phase == "dense"
    with torch.no_grad():
        assert loaded.model(torch.tensor([[1, 2, 3, 4, 5]])).shape == (1, 5, 4096)
