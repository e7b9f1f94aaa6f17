"""Issue 19: a diverging run stops (train.diverge_loss), deepspeed.extra keys DeepSpeed does not know stop the run,
checkpoints without a manifest or with a dangling `latest`, Hydra's own errors exit 2, a failed run leaves no empty
run directory."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import compose_config, env

from dsv4.config import ConfigError
from dsv4.run_config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.seq_len=64", "train.micro_batch_size=2", "train.warmup_steps=1", "logging.interval=1",
        "train.eval_batches=1", "logging.wandb.enabled=false"]


def train_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(1), capture_output=True, text=True,
                          timeout=timeout)


def trainer_for(*overrides: str):
    from dsv4.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only what the divergence rule reads
    trainer.config = resolve_config(compose_config(*overrides))
    trainer.high_in_a_row = 0
    return trainer


def test_divergence_rule_counts_high_losses_in_a_row_after_warmup():
    t = trainer_for("train.warmup_steps=2", "train.max_bad_steps=2")  # tiny model: vocab 4096, auto limit 16.6
    assert [t._count_high_loss(s, 100.0) for s in (0, 1)] == [None, None]  # warm-up: not counted
    assert t._count_high_loss(2, 100.0) is None
    assert t._count_high_loss(3, 5.0) is None  # a loss below the limit starts the count over
    assert t._count_high_loss(4, 100.0) is None
    assert t._count_high_loss(5, 100.0) == "diverged"
    off = trainer_for("train.warmup_steps=0", "train.max_bad_steps=1", "train.diverge_loss=null")
    assert off._count_high_loss(5, 1e9) is None
    own = trainer_for("train.warmup_steps=0", "train.max_bad_steps=1", "train.diverge_loss=3.5")
    assert own._count_high_loss(0, 3.0) is None and own._count_high_loss(1, 4.0) == "diverged"
    for bad in ("-1", "yes", "true"):
        with pytest.raises(ConfigError, match="train.diverge_loss"):
            resolve_config(compose_config(f"train.diverge_loss={bad}"))


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """One real run of the tiny model with train.lr=10 (about 10 s): (its output, its run directory)."""
    out = tmp_path_factory.mktemp("diverged") / "run"
    res = train_py(*TINY, "train.lr=10", "train.steps=12", "train.max_bad_steps=2", f"train.output_dir={out}")
    return res, out


def test_lr_10_stops_as_diverged_with_a_checkpoint(diverged):
    res, out = diverged
    assert res.returncode == 0, res.stderr[-3000:]  # as train.max_bad_steps stops a run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "diverged" and summary["steps"] < 12
    assert "training diverged" in res.stdout and "train.lr=10" in res.stdout and "train.diverge_loss" in res.stdout
    assert (out / "checkpoints" / f"step{summary['steps']:07d}" / "complete.json").exists()


def test_deepspeed_extra_keys_deepspeed_does_not_read_are_refused():
    with pytest.raises(ConfigError, match=r"^deepspeed.extra.bogus_key=1: not a key of DeepSpeed's config"):
        resolve_config(compose_config("+deepspeed.extra.bogus_key=1"))
    with pytest.raises(ConfigError, match="deepspeed.extra.gradient_cliping.*did you mean gradient_clipping"):
        resolve_config(compose_config("+deepspeed.extra.gradient_cliping=0.5"))
    for real in ("gradient_clipping=0.5", "activation_checkpointing={}", "flops_profiler={enabled:false}",
                 "zero_optimization={stage:1}", "wall_clock_breakdown=true"):
        resolve_config(compose_config(f"+deepspeed.extra.{real}"))  # keys DeepSpeed reads pass


@pytest.mark.parametrize("override, says", [
    ("train.bogus=1", "error: Could not override 'train.bogus'; To append to your config use +train.bogus=1"),
    ("data.eos_token=<nope>", "quote the value for Hydra inside quotes for the shell: \"data.eos_token='<nope>'\""),
])
def test_hydra_errors_exit_2_with_one_line(override, says):
    res = train_py(override)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and says in res.stderr


def test_checkpoint_without_manifest_loads_with_a_warning(diverged, tmp_path, capfd):
    from dsv4.export import export
    from dsv4.loading import load_model

    run = shutil.copytree(diverged[1], tmp_path / "run")
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (tag_dir / "complete.json").unlink()
    capfd.readouterr()
    assert load_model(run).model is not None
    warning = [line for line in capfd.readouterr().err.splitlines() if "complete.json" in line]
    assert len(warning) == 1 and f"warning: {tag_dir}: no complete.json" in warning[0] and "unverified" in warning[0]
    export(run, tmp_path / "export")
    assert "cannot be verified" in capfd.readouterr().err


def test_latest_naming_a_missing_checkpoint_says_what_to_do(diverged, tmp_path, capsys):
    from dsv4.export import main
    from dsv4.loading import load_model

    run = shutil.copytree(diverged[1], tmp_path / "run")
    ckpts = run / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    (ckpts / "latest").write_text("step0000999")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpts / 'latest'} names checkpoint 'step0000999', but {ckpts / 'step0000999'} does not exist" in err
    assert f"the newest complete one is {ckpts / tag}" in err and "write its tag into" in err
    with pytest.raises(ConfigError, match=r"^path: .*names checkpoint 'step0000999'"):
        load_model(run)


def test_a_run_directory_the_run_created_and_left_empty_is_removed(tmp_path):
    from dsv4.training.run_dir import claim_run_dir

    def claim(path):
        return claim_run_dir(resolve_config(compose_config(f"train.output_dir={path}")), path, print)

    new = tmp_path / "a" / "b" / "run"
    lock = claim(new)
    assert (new / "run.lock").is_file()
    lock.release()  # failed before writing anything: the directories it created go, the one that existed stays
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()
    lock = claim(new)
    (new / "config.yaml").write_text("x")
    lock.release()
    assert (new / "config.yaml").is_file()  # something was written: kept
    existing = tmp_path / "existing"
    existing.mkdir()
    claim(existing).release()
    assert existing.is_dir()  # it existed before the run: kept, even empty
    res = train_py(*TINY, f"train.output_dir={tmp_path / 'fail' / 'run'}", f"train.resume={existing}")
    assert res.returncode == 2 and "nothing to resume" in res.stderr, res.stderr[-2000:]  # refused after the claim
    assert "setting up: run dir" in res.stdout and not (tmp_path / "fail").exists()
