"""Nothing a user does by mistake loses work or passes silently: checksummed checkpoints (a same-size corruption
is found, named, skipped or refused), pruning that never removes the checkpoint a run stands on, one live run per
directory (lock, stale takeover), no reuse of a directory holding a run, forks, resume mistakes, config warnings,
strict JSON, launcher mistakes, data mistakes. In-process where the pieces allow; the real runs are in
test_interrupts.py, test_fault_tolerance.py and test_training.py."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import compose_config

from data_pipelines import DataError, prepare_data
from dsv4 import run_files as rf
from dsv4.config import ConfigError
from dsv4.run_config import DataConfig, SourceConfig, resolve_config
from dsv4.training import checkpointing as ck
from dsv4.training import run_dir as rd
from dsv4.training.config import check_environment, config_warnings
from dsv4.training.metrics import dumps_strict, eta_seconds
from dsv4.training.optim import FiniteStepAdamW, deepspeed_config, describe_settings, effective_settings
from dsv4.training.resume import _candidates, _refuse_damaged, check_model_config

ROOT = Path(__file__).resolve().parent.parent


def stage(ckpt_dir: Path, step: int, payload: bytes = b"x" * 10_000) -> None:
    staging = ckpt_dir / rf.staging_tag(rf.tag_for(step))
    staging.mkdir(parents=True)
    (staging / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(payload)
    (staging / "mp_rank_00_model_states.pt").write_bytes(payload[::-1])
    (staging / "data_state_rank0.json").write_text("{}")


def corrupt_in_place(path: Path, offset: int = 100, size: int = 4096) -> None:
    """Random bytes written over part of a file: same size, different content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))


# ---------------------------------------------------------------- checksums, verification, pruning

def test_same_size_corruption_is_found_named_and_skipped(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        stage(ckpt, step)
        ck.publish(ckpt, rf.tag_for(step), step, world_size=2, keep=0, model_config={"hidden_size": 8})
    manifest = rf.read_manifest(ckpt / "step0000004")
    entry = manifest["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert manifest["hash"] == "xxh3_128" and entry["bytes"] == 10_000 and len(entry["xxh3_128"]) == 32
    assert set(manifest["files"]) == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt",
                                      "data_state_rank0.json", "model_config.json"}

    shard = ckpt / "step0000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    corrupt_in_place(shard, size=4000)
    assert shard.stat().st_size == 10_000
    problem = rf.verify_checkpoint(ckpt / "step0000004")
    assert problem is not None and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in problem and "checksum" in problem
    # shared verification: the file's owner (rank 1, from its name) reads it; rank 0 checks only its size
    assert rf.verify_checkpoint(ckpt / "step0000004", rank=1, world=2) == problem
    assert rf.verify_checkpoint(ckpt / "step0000004", rank=0, world=2) is None
    warnings: list[str] = []
    found = rf.newest_complete(ckpt, warnings.append)
    assert found is not None and found.tag == "step0000002"
    assert any("skipping damaged checkpoint" in w and "step0000004" in w and "optim_states.pt" in w for w in warnings)


def test_older_size_only_manifests_still_verify(tmp_path):
    checkpoint = tmp_path / "step0000003"
    checkpoint.mkdir()
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"abc")
    (checkpoint / rf.MANIFEST).write_text(json.dumps({"step": 3, "world_size": 1,
                                                      "files": {"mp_rank_00_model_states.pt": 3}}))
    assert rf.verify_checkpoint(checkpoint) is None
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"abcd")
    assert "4 bytes, the manifest says 3" in rf.verify_checkpoint(checkpoint)


def test_pruning_waits_for_a_healthy_checkpoint_and_spares_the_protected(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        stage(ckpt, step)
        ck.publish(ckpt, rf.tag_for(step), step, 1, keep=0)
    (ckpt / "step0000002_universal").mkdir()
    stage(ckpt, 8)  # written after non-finite losses: published, prunes nothing
    ck.publish(ckpt, rf.tag_for(8), 8, 1, keep=2, allow_prune=False)
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000002", "step0000002_universal", "step0000004",
                                                          "step0000006", "step0000008"]
    stage(ckpt, 10)  # healthy: prunes to the newest 2, but never the checkpoint the run resumed from (step 4)
    ck.publish(ckpt, rf.tag_for(10), 10, 1, keep=2, protect=["step0000004"])
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000004", "step0000008", "step0000010"]
    assert (ckpt / "latest").read_text() == "step0000010"


# ---------------------------------------------------------------- the run directory: lock, reuse, forks

def _run(*overrides: str):
    return resolve_config(compose_config(*overrides))


def test_lock_refuses_a_live_run_and_takes_over_stale_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    said: list[str] = []
    live = rd.RunLock(tmp_path)
    live.acquire("train.output_dir='x'", said.append)
    holder = json.loads((tmp_path / rd.LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"another run is training in this directory \(pid {os.getpid()} on "):
        rd.RunLock(tmp_path).acquire("train.output_dir='x'", said.append)
    live.release()
    assert not (tmp_path / rd.LOCK).exists()

    # a process that is gone (same host): taken over with a warning
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / rd.LOCK).write_text(json.dumps({**holder, "pid": int(dead.stdout)}))
    lock = rd.RunLock(tmp_path)
    lock.acquire("k", said.append)
    assert said and "taking over the lock" in said[-1] and "its process is gone" in said[-1]
    lock.release()

    # another host: live while it refreshes the lock, stale once it stops
    (tmp_path / rd.LOCK).write_text(json.dumps({**holder, "host": "node-elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="pid 1 on node-elsewhere"):
        rd.RunLock(tmp_path).acquire("k", said.append)
    old = time.time() - rd.LOCK_STALE_S - 60
    os.utime(tmp_path / rd.LOCK, (old, old))
    lock = rd.RunLock(tmp_path)
    lock.acquire("k", said.append)
    assert "not refreshed for" in said[-1]
    lock.release()

    # a requeued SLURM job (same job id) takes over its earlier start's lock at once
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / rd.LOCK).write_text(json.dumps({**holder, "host": "node-elsewhere", "pid": 1, "slurm_job": "4242"}))
    lock = rd.RunLock(tmp_path)
    lock.acquire("k", said.append)
    assert "earlier start of this SLURM job (4242" in said[-1]
    lock.release()


def test_a_directory_holding_a_run_is_only_reused_to_continue_it(tmp_path):
    said: list[str] = []
    used = tmp_path / "used"
    (used / "checkpoints").mkdir(parents=True)
    stage(used / "checkpoints", 20)
    ck.publish(used / "checkpoints", "step0000020", 20, 1, keep=0)
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.name for p in used.rglob("*"))
    with pytest.raises(ConfigError) as err:
        rd.claim_run_dir(_run(f"train.output_dir={used}"), used, said.append)
    message = str(err.value)
    assert f"train.output_dir='{used}' already holds an interrupted run (checkpoints up to step 20)" in message
    assert "train.resume=auto" in message and "new train.output_dir" in message
    assert sorted(p.name for p in used.rglob("*")) == before, "a refused run changes nothing"
    (used / "summary.json").write_text(json.dumps({"stopped_by": None, "steps": 20}))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        rd.claim_run_dir(_run(f"train.output_dir={used}"), used, said.append)
    rd.claim_run_dir(_run(f"train.output_dir={used}", "train.resume=auto"), used, said.append).release()

    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="would mix two runs. Choose a new train.output_dir for the fork"):
        rd.claim_run_dir(_run(f"train.output_dir={used}", f"train.resume={other}"), used, said.append)
    fresh = tmp_path / "fork"
    rd.claim_run_dir(_run(f"train.output_dir={fresh}", f"train.resume={used}"), fresh, said.append).release()
    assert rd.is_fork(_run(f"train.output_dir={fresh}", f"train.resume={used}/checkpoints/step0000020"), fresh)

    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match=r"train.output_dir='.*a_file/run': cannot create it \(NotADirectoryError"):
        rd.claim_run_dir(_run(f"train.output_dir={not_a_dir / 'run'}"), not_a_dir / "run", said.append)
    with pytest.raises(ConfigError, match="train.resume=true: nothing to resume: .* does not exist"):
        rd.claim_run_dir(_run(f"train.output_dir={tmp_path / 'nope'}", "train.resume=true"), tmp_path / "nope",
                         said.append)
    assert not (tmp_path / "nope").exists()


def test_resume_mistakes_are_named(tmp_path):
    said: list[str] = []
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"train.resume=true: nothing to resume: no checkpoint in .*checkpoints"):
        _candidates(_run("train.resume=true"), run_dir, said.append)
    stage(run_dir / "checkpoints", 6)
    ck.publish(run_dir / "checkpoints", "step0000006", 6, 1, keep=0, model_config=_run().model.to_dict())
    assert _candidates(_run("train.resume=true"), run_dir, said.append)[1] == ["step0000006"]
    tag_dir = run_dir / "checkpoints" / "step0000006"
    assert _candidates(_run(f"train.resume={tag_dir}"), tmp_path / "fork", said.append) == \
        (run_dir / "checkpoints", ["step0000006"])
    with pytest.raises(ConfigError, match=r"fails verification: file mp_rank_00_model_states.pt: its content"):
        _refuse_damaged(_run("train.resume=true"), tag_dir, "file mp_rank_00_model_states.pt: its content ...",
                        said.append)
    check_model_config(_run(), tag_dir)  # the same model: fine
    with pytest.raises(ConfigError) as err:
        check_model_config(_run("model.hidden_size=64", "model.index_topk=8"), tag_dir)
    assert "model.hidden_size: checkpoint 128, this run 64" in str(err.value)
    assert "model.index_topk: checkpoint 16, this run 8" in str(err.value) and "model_config.json" in str(err.value)


# ---------------------------------------------------------------- config mistakes and warnings

def test_warnings_for_runs_that_never_warm_up_or_reach_sparse_attention():
    warnings = config_warnings(_run("train.steps=20"))
    assert any("train.warmup_steps=30 >= train.steps=20: the LR never reaches its peak" in w for w in warnings)
    assert any("train.steps=20 ends before the sparse CSA phase" in w and "dense_steps=100" in w for w in warnings)
    assert config_warnings(_run("train.steps=200", "train.phases.dense_steps=10")) == []
    assert config_warnings(_run("train.steps=20", "train.warmup_steps=5", "attention=window")) == []


def test_environment_and_deepspeed_extra_mistakes_are_named():
    with pytest.raises(ConfigError, match="attention.backend='triton': the Triton kernels need a CUDA GPU"):
        check_environment(_run("attention.backend=triton"), cuda_available=False, triton_interpreter=False)
    check_environment(_run("attention.backend=triton"), cuda_available=False, triton_interpreter=True)
    for extra, key in (("train_micro_batch_size_per_gpu:2", "train.micro_batch_size"),
                       ("optimizer:{type:Adam}", "train.lr"), ("fp16:{enabled:true}", "deepspeed.precision=bf16")):
        with pytest.raises(ConfigError) as err:
            _run(f"+deepspeed.extra={{{extra}}}")
        assert str(err.value).startswith(f"deepspeed.extra.{extra.split(':')[0]}") and key in str(err.value)
    run = _run("+deepspeed.extra={zero_optimization:{stage:1}}")
    settings = effective_settings(deepspeed_config(run, use_bf16=False))
    assert settings["zero_stage"] == 1
    assert describe_settings(settings, run) == "ZeRO-1 fp32 (deepspeed.extra: zero stage 2 -> 1)"


def test_strict_json_and_an_eta_from_steady_steps():
    text = dumps_strict({"loss": float("nan"), "norms": [1.0, float("inf")], "ok": 2})
    assert json.loads(text) == {"loss": None, "norms": [1.0, None], "ok": 2} and "NaN" not in text
    assert math.isnan(eta_seconds([30.0], 100)), "no ETA from the warm-up step alone"
    assert eta_seconds([30.0, 1.0, 1.0], 10) == pytest.approx(10.0), "the first step is not counted"


def test_finite_step_adamw_skips_a_non_finite_norm_and_tells_deepspeed():
    """ZeRO-0 fp32: DeepSpeed steps the client optimizer itself; the engine reads `overflow` (no LR step, skipped)
    and `_global_grad_norm`."""
    weight = torch.nn.Parameter(torch.ones(4))
    opt = FiniteStepAdamW([weight], max_norm=1.0, lr=0.1)
    weight.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    opt.step()
    assert opt._global_grad_norm == pytest.approx(5.0) and not opt.overflow
    assert torch.allclose(weight.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-6), "clipped to norm 1"
    before = weight.detach().clone()
    weight.grad = torch.tensor([float("inf"), 1.0, 0.0, 0.0])
    opt.step()
    assert opt.overflow and math.isinf(opt._global_grad_norm) and torch.equal(weight.detach(), before)


# ---------------------------------------------------------------- launcher and data mistakes

def test_command_line_routes_sweeps_and_names_sweep_options_without_m():
    from train import route

    assert route(["train.lr=1e-3,2e-3", "-m", "--ranks", "2"]) == ("sweep", ["train.lr=1e-3,2e-3", "--ranks", "2"])
    kind, message = route(["sweep=lr_x_layout", "--ranks", "2"])
    assert kind == "error" and message.startswith("sweep=lr_x_layout: sweeps run with -m")
    assert route(["train.steps=3"]) == ("train", ["train.steps=3"])


def test_help_lists_the_sweep_options():
    res = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== Configuration groups ==" in res.stdout  # Hydra's own help
    assert "== Sweeps ==" in res.stdout and "--parallel" in res.stdout and "--ranks" in res.stdout


def test_inspect_names_a_config_that_does_not_exist():
    from data_pipelines.inspect import main

    res = subprocess.run([sys.executable, "-m", "data_pipelines.inspect", "nosuch"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "data=nosuch: In 'config': Could not find 'data/nosuch' (choose one of: bundled" in res.stderr
    assert main(["train.seq_len=0"]) == 2
    assert "dsv4.training" not in (ROOT / "data_pipelines" / "inspect.py").read_text()


def test_data_path_directory_and_jsonl_without_text_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data.path: .* is a directory; give one .txt or .txt.gz file"):
        prepare_data(DataConfig(path=str(tmp_path)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": f"doc {i}", "id": i}) + "\n" for i in range(5)))
    source = SourceConfig(kind="files", path=str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(sources=[source]))
    assert "data.sources[0].text_field='text': the field is missing in every one of the first 5 rows" in str(err.value)
    assert "keys found: content, id" in str(err.value)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": [i]}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match="the field is a list, not a string"):
        prepare_data(DataConfig(sources=[source]))
