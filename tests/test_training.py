"""Training end to end: the real train.py under python, the deepspeed launcher and torchrun (CPU ranks, gloo),
with resume, bad input stopping before training, and the pieces of the loop."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dsv4.config import ConfigError
from dsv4.run_config import TrainConfig, apply_layout, phase_for_step, resolve_config
from dsv4.training.distributed import strip_launcher_args
from dsv4.training.trainer import deepspeed_config, lr_lambda

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# short runs: small sequences, few steps, all three CSA phases
QUICK = ["train.seq_len=128", "train.micro_batch_size=4", "train.warmup_steps=5", "logging.interval=1",
         "train.eval_batches=2", "train.phases.dense_steps=4", "train.phases.indexer_warmup_steps=4"]


def env(threads: int = 1) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), WANDB_MODE="offline",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600, threads: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(threads), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compose_config(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


# ---------------------------------------------------------------- pieces of the loop (fast)

def test_default_config_composes_and_validates():
    run_cfg = resolve_config(compose_config())
    assert run_cfg.model.compress_ratios == [0, 4, 32, 4]
    assert run_cfg.deepspeed.zero_stage == 2


@pytest.mark.parametrize("layout,expected", [
    ("v4_flash", [0, 0, 4, 32, 4, 32]), ("v4_pro", [32, 32, 4, 32, 4, 32]), ("dense", [-1] * 6),
    ("window", [0] * 6), ("csa", [4] * 6), ("hca", [32] * 6),
])
def test_attention_layouts(layout, expected):
    run_cfg = resolve_config(compose_config(f"attention={layout}", "model.num_hidden_layers=6",
                                            "model.compress_ratios=[0,0,0,32,0,0]"))
    assert run_cfg.model.compress_ratios == expected
    assert apply_layout({"num_hidden_layers": 3, "compress_ratios": [0, 0, 0]},
                        resolve_config(compose_config("attention=hca")).attention) == [128] * 3


@pytest.mark.parametrize("override,key", [
    ("model.o_groups=3", "model.o_groups"),
    ("model.compress_ratios=[0,4,2,4]", "model.compress_ratios[2]"),
    ("train.lr=-1", "train.lr"),
    ("train.seq_len=0", "train.seq_len"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("attention.backend=cuda", "attention.backend"),
    ("logging.wandb.mode=loud", "logging.wandb.mode"),
    ("train.steps=many", "train.steps"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        resolve_config(compose_config(override))
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_config_for_sequence_parallelism(zero):
    """Under SP: gradients summed across SP ranks in fp32 (bf16 sums drift), and ZeRO-3's reduce-scatter (which
    averages over SP ranks) off; keys from deepspeed.extra still win."""
    run = resolve_config(compose_config(f"deepspeed={zero}", "parallel.sequence_parallel_size=2"))
    ds = deepspeed_config(run, use_bf16=True)
    assert ds["seq_parallel_communication_data_type"] == "fp32"
    assert ds["zero_optimization"].get("reduce_scatter", True) is (zero != "zero3")
    run = resolve_config(compose_config(f"deepspeed={zero}", "+deepspeed.extra.gradient_clipping=0.5"))
    assert deepspeed_config(run, use_bf16=False)["gradient_clipping"] == 0.5


def test_lr_schedule_and_phases():
    t = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_lambda(t, 0) == pytest.approx(0.1) and lr_lambda(t, 9) == pytest.approx(1.0)
    assert lr_lambda(t, 10) == pytest.approx(1.0) and lr_lambda(t, 100) == pytest.approx(0.1)
    assert lr_lambda(t, 55) == pytest.approx(0.55)
    t.phases.dense_steps, t.phases.indexer_warmup_steps = 3, 2
    assert [phase_for_step(t, s) for s in range(6)] == ["dense"] * 3 + ["indexer_warmup"] * 2 + ["sparse"]


def test_launcher_local_rank_is_stripped(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["train.py", "--local_rank=3", "train.steps=2"]) == ["train.py", "train.steps=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_launcher_args(["train.py", "--local_rank", "1", "x=1"]) == ["train.py", "x=1"]


# ---------------------------------------------------------------- bad input stops before training

def test_missing_data_file_stops_before_training(tmp_path):
    missing = tmp_path / "nope.txt"
    res = run([sys.executable, "train.py", f"data.path={missing}", f"train.output_dir={tmp_path / 'run'}"])
    assert res.returncode != 0
    assert "data.path" in res.stderr and str(missing) in res.stderr, res.stderr[-1500:]
    assert "step " not in res.stdout
    assert not (tmp_path / "run").exists()


def test_bad_config_stops_before_training_naming_the_key(tmp_path):
    res = run([sys.executable, "train.py", "model.qk_rope_head_dim=7", f"train.output_dir={tmp_path / 'run'}"])
    assert res.returncode != 0
    assert "model.qk_rope_head_dim=7" in res.stderr, res.stderr[-1500:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real runs

@pytest.mark.slow
@pytest.mark.dist
def test_deepspeed_launcher_two_ranks_ctrl_c_then_resume_loss_falls(tmp_path):
    """The real `deepspeed` launcher through launch/single_node.sh (it appends --local_rank), 2 CPU ranks over
    gloo, ZeRO-2. Ctrl-C as a terminal sends it (SIGINT to the whole process group; DeepSpeed's launcher then also
    SIGTERMs every process of the job): both ranks checkpoint at the same step, write the summary and exit 0,
    without a traceback. Resuming trains on to step 40 and the loss falls."""
    out = tmp_path / "run"
    args = ["bash", "launch/single_node.sh", "2", *QUICK, "deepspeed=zero2", "train.steps=40", "train.lr=3e-3",
            f"train.output_dir={out}"]
    e = dict(env(1), MASTER_PORT=str(free_port()))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 12) and time.time() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGINT)
    first.wait(timeout=120)
    text = (tmp_path / "first.log").read_text()
    assert "ranks 2 on cpu" in text and text.count("==== summary ====") == 1, "only global rank 0 prints"
    assert "stop signal received (SIGINT)" in text and "Traceback" not in text, text[-3000:]
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["stopped_by"] == "signal" and 12 <= stopped["steps"] < 40
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped['steps']:07d}"
    for rank in (0, 1):
        assert (out / "checkpoints" / f"step{stopped['steps']:07d}" / f"data_state_rank{rank}.json").is_file()

    res = subprocess.run([*args, "train.resume=auto"], cwd=ROOT, env=dict(e, MASTER_PORT=str(free_port())),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"at step {stopped['steps']}" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    first_steps = [m["lm_loss"] for m in metrics(out)[:10]]
    assert summary["steps"] == 40 and summary["lm_loss_end"] < sum(first_steps) / 10 - 1.0, summary
    assert summary["val_loss"] < sum(first_steps) / 10 - 1.0, summary


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_zero3(tmp_path):
    out = tmp_path / "run"
    res = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "train.py", *QUICK, "deepspeed=zero3",
               "train.steps=10", f"train.output_dir={out}", "logging.wandb.enabled=false"], threads=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = metrics(out)
    assert len(steps) == 10 and steps[-1]["lm_loss"] < steps[0]["lm_loss"]
    assert (out / "checkpoints" / "step0000010").is_dir()


def test_document_masking_reaches_the_model_only_when_asked():
    from dsv4.training.trainer import doc_positions

    batch = {"positions": torch.tensor([[0, 1, 0, 1, 2]])}
    on = resolve_config(compose_config("data.cross_document_attention=false"))
    off = resolve_config(compose_config())
    assert torch.equal(doc_positions(batch, on, torch.device("cpu")), batch["positions"])
    assert doc_positions(batch, off, torch.device("cpu")) is None
