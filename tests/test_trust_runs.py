"""Real `python train.py` runs a user can get wrong or interrupt: one uninterrupted reference run (shared), then
Ctrl-C (once: checkpoint, summary, exit 0; twice: out at once), a second run into a live directory, a reused
directory, a checkpoint corrupted in place (refused by resume=true, skipped by auto), resuming to the reference's
exact losses and parameters; a fork; a resume with nothing to do; a full disk while checkpointing; exporting a
corrupted checkpoint; infinite gradient norms. Ctrl-C is a real SIGINT to the run's process group, as a terminal
sends it (the data worker and the W&B service get it too)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash
from test_fault_tolerance import read_metrics, start, wait_for_step
from test_training import QUICK, compose_config, env

from dsv4 import run_files as rf
from dsv4.config import ConfigError
from dsv4.run_config import resolve_config
from dsv4.training import run_dir as rd

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
# the default data worker and an offline W&B run; the DeepSpeed stage set through deepspeed.extra
RUN = [sys.executable, "train.py", *QUICK, f"train.steps={STEPS}", "deepspeed=zero2",
       "+deepspeed.extra={zero_optimization:{stage:1}}"]


def output(proc: subprocess.Popen, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    return proc.log.read_text()


def wait_for_text(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    """Until the run's output holds `text` (polled every 5 ms)."""
    deadline = time.time() + timeout
    while text not in proc.log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no {text!r} in the run's output (rc {proc.returncode}):\n"
                                 f"{proc.log.read_text()[-3000:]}")
        time.sleep(0.005)


def quick(*args: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=timeout,
                          **popen)


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under a directory: (size, mtime_ns, content hash)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            xxhash.xxh3_64(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run: checkpoints at steps 5 and 10, validation at 5 and 10."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = quick("train.save_interval=5", "train.keep_checkpoints=0", "train.eval_interval=5",
                f"train.output_dir={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"dir": out, "stdout": res.stdout, "metrics": {m["step"]: m for m in read_metrics(out)},
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
def test_reference_run_logs_what_a_user_looks_for(reference):
    out, stdout, steps = reference["dir"], reference["stdout"], reference["metrics"]
    assert stdout.splitlines()[0] == "dsv4-train: starting (loading PyTorch, DeepSpeed and the config) ..."
    assert "building the model and the DeepSpeed engine" in stdout
    assert "ZeRO-1 fp32 (deepspeed.extra: zero stage 2 -> 1)" in stdout, "the banner shows the stage that runs"
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert [steps[s]["phase"] for s in range(1, 10)] == ["dense"] * 4 + ["indexer_warmup"] * 4 + ["sparse"]
    assert all(steps[s]["indexer_loss"] > 0 for s in range(5, STEPS + 1))
    assert all(0 < m["sink_mass"] < 1 for m in steps.values())  # logged every step here (logging.interval=1)
    assert all(0 <= steps[s]["indexer_recall"] <= 1 for s in (9, 10)) and "indexer_recall" not in steps[1]
    # validation lands in metrics.jsonl on its steps, and the summary names the last one
    assert [s for s, m in steps.items() if "val_loss" in m] == [5, 10]
    assert steps[10]["val_loss"] == reference["summary"]["val_loss"] and reference["summary"]["val_step"] == 10
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step0000005", "step0000010"]
    assert list((out / "wandb").glob("offline-run-*")), "an offline W&B run is written"
    assert "step      1/10" in stdout and "| eta ?" in stdout.split("step      1/10")[1].splitlines()[0]
    assert not (out / rd.LOCK).exists(), "the lock goes with the run"


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resumes_to_the_reference(reference, tmp_path):
    """Ctrl-C: checkpoint at the next step, summary, exit 0, one line, no traceback; meanwhile a second run into
    the live directory refuses. The directory is not reused without resume; a checkpoint corrupted in place is
    refused by resume=true and skipped by auto, which ends with the reference's losses at every step and its final
    parameters, and never prunes the checkpoint it resumed from."""
    out = tmp_path / "run"
    args = [*RUN, "train.save_interval=2", "train.keep_checkpoints=2", f"train.output_dir={out}"]
    first = start(args, tmp_path / "first.log")
    wait_for_step(first, out, 4)
    with pytest.raises(ConfigError, match=r"another run is training in this directory \(pid \d+ on "):
        rd.claim_run_dir(resolve_config(compose_config(f"train.output_dir={out}")), out, print)
    os.killpg(first.pid, signal.SIGINT)
    text = output(first)
    assert first.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "Ctrl-C: stopping at the end of this step with a checkpoint" in text
    stopped = json.loads((out / "summary.json").read_text())  # strict JSON (null, never NaN)
    assert stopped["stopped_by"] == "signal" and stopped["val_loss"] is None and 4 <= stopped["steps"] < STEPS
    interrupted_at = stopped["steps"]
    assert (out / "checkpoints" / "latest").read_text() == rf.tag_for(interrupted_at)
    assert not (out / rd.LOCK).exists()

    again = quick(f"train.output_dir={out}")  # the same command again: refused, nothing touched
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds an interrupted run" in again.stderr and "train.resume=auto" in again.stderr

    shard = out / "checkpoints" / rf.tag_for(interrupted_at) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 4 KB of random bytes, size unchanged
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert shard.stat().st_size == size
    refused = quick(f"train.output_dir={out}", "train.resume=true")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{shard.parent} fails verification: file {shard.name}: its content does not match" in refused.stderr

    older = rf.list_checkpoints(out / "checkpoints")[1]  # the one before the stop (keep_checkpoints=2)
    last = quick(f"train.output_dir={out}", "train.resume=auto")
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-3000:]
    assert f"skipping damaged checkpoint {shard.parent}: file {shard.name}" in last.stdout
    assert f"resuming {older.path} (step {older.step}, verified)" in last.stdout
    assert older.path.is_dir(), "never pruned: the run resumed from it"
    records = read_metrics(out)  # one line per step: the resume dropped the lines logged after its checkpoint
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records:  # every logged step, including those redone after the interrupt, equals the reference
        ref = reference["metrics"][m["step"]]
        assert m["loss"] == ref["loss"] and m["data_checksum"] == ref["data_checksum"], (m, ref)
    final = json.loads((out / "summary.json").read_text())
    assert final["param_digests"] == reference["summary"]["param_digests"]


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start([sys.executable, "train.py", "train.seq_len=256", "train.micro_batch_size=2", "train.steps=1000",
                  "train.save_interval=1", "data.num_workers=0", "logging.wandb.enabled=false", "logging.interval=1",
                  f"train.output_dir={out}"], tmp_path / "log")
    wait_for_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    # the second once the run has taken the first, as a person presses it: two signals that arrive before Python's
    # handler runs (the main thread busy in one long C call, a loaded machine) are delivered to it as one
    wait_for_text(proc, "Ctrl-C: stopping at the end of this step")
    os.killpg(proc.pid, signal.SIGINT)
    text = output(proc)
    assert proc.returncode == 130, text[-3000:]
    assert "second Ctrl-C: exiting now without a checkpoint" in text and "Traceback" not in text
    assert not (out / rd.LOCK).exists()
    for info in rf.list_checkpoints(out / "checkpoints"):  # whatever was published is whole
        assert rf.verify_checkpoint(info.path) is None


@pytest.mark.slow
@pytest.mark.parametrize("when", ["dsv4-train: starting", "setting up: run dir"])
def test_ctrl_c_during_start_up_exits_at_once(tmp_path, when):
    """While importing (train.py's handler) and while setting up, after the lock was taken (the trainer's)."""
    out = tmp_path / "run"
    proc = start([*RUN, f"train.output_dir={out}", "logging.wandb.enabled=false"], tmp_path / "log")
    deadline = time.time() + 120
    while when not in proc.log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    text = output(proc, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "SIGINT during start-up: exiting" in text and "Traceback" not in text
    assert not (out / rd.LOCK).exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_fork_continues_another_run_and_writes_only_to_its_own_directory(reference, tmp_path):
    source = reference["dir"]
    before = snapshot(source)
    fork = tmp_path / "fork"
    res = quick(f"train.resume={source / 'checkpoints' / 'step0000005'}", f"train.output_dir={fork}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"fork of {source / 'checkpoints' / 'step0000005'} (step 5, verified)" in res.stdout
    assert snapshot(source) == before, "the source run is only read"
    forked = read_metrics(fork)
    assert [m["step"] for m in forked] == list(range(6, STEPS + 1))
    for m in forked:  # its data state came along: the same batches and losses as the source's own steps 6-10
        ref = reference["metrics"][m["step"]]
        assert m["loss"] == ref["loss"] and m["data_checksum"] == ref["data_checksum"]
    assert (fork / "checkpoints" / "step0000010").is_dir() and (fork / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_with_nothing_to_do_says_so_and_changes_nothing(reference, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference["dir"], copy)
    before = snapshot(copy)
    res = quick(f"train.output_dir={copy}", "train.resume=true", "train.steps=5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is at step 10 and train.steps=5: nothing to train (raise train.steps to continue)" in res.stdout
    assert snapshot(copy) == before


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_named_and_keeps_the_previous_checkpoint(reference, tmp_path):
    """RLIMIT_FSIZE makes every write past 4 MiB fail (EFBIG, as ENOSPC would): the run stops with one line naming
    the checkpoint, the rank and the error; the previous checkpoint stays published and intact, no partial one."""
    copy = tmp_path / "run"
    shutil.copytree(reference["dir"], copy)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    res = quick(f"train.output_dir={copy}", "train.resume=auto", "train.steps=11", "logging.wandb.enabled=false",
                preexec_fn=small_files)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"checkpoint step0000011 could not be written to {copy / 'checkpoints'} (rank 0: " in res.stderr
    assert f"the newest published checkpoint ({copy / 'checkpoints' / 'step0000010'}) is intact" in res.stderr
    assert (copy / "checkpoints" / "latest").read_text() == "step0000010"
    assert rf.verify_checkpoint(copy / "checkpoints" / "step0000010") is None
    assert not list((copy / "checkpoints").glob(".step*")), "the partial checkpoint is removed"


def test_export_refuses_a_checkpoint_corrupted_in_place(reference, tmp_path, capsys):
    from dsv4.export import main

    copy = tmp_path / "run"
    shutil.copytree(reference["dir"], copy)
    states = copy / "checkpoints" / "step0000010" / "mp_rank_00_model_states.pt"
    with open(states, "r+b") as f:
        f.seek(states.stat().st_size // 2)
        f.write(os.urandom(4096))
    assert main([str(copy)]) == 2
    assert "damaged checkpoint: file mp_rank_00_model_states.pt: its content does not match" in capsys.readouterr().err


@pytest.mark.slow
def test_infinite_gradient_norms_are_counted_and_skipped(tmp_path):
    """Gradient norms that overflow while the losses stay finite, on ZeRO-2: each such step is a bad step, skipped
    (no LR change), counted, named; train.max_bad_steps of them in a row stop the run, and the message names the
    last update that was applied. The overflow is made deterministic (an absurd LR makes it too, but whether its
    losses or its norms overflow first depends on the CPU's arithmetic): the indexer's loss joins at step 5 with a
    coefficient of 1e30, so its gradients (about 1e30 each) are finite while their squared norm is not."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=2", "train.steps=20",
                          "train.phases.dense_steps=4", "train.phases.indexer_warmup_steps=16",
                          "train.indexer_loss_coef=1e30", "train.max_bad_steps=3", "train.eval_batches=1",
                          "data.num_workers=0",
                          "logging.interval=1", "logging.wandb.enabled=false", f"train.output_dir={out}"],
                         cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    records = read_metrics(out)
    bad = [m["step"] for m in records if m["grad_norm"] is None]
    assert bad == [5, 6, 7], (bad, res.stdout[-2000:])
    assert all(m["loss"] is not None for m in records), "the losses stay finite: only the norms overflow"
    for before, m in zip(records, records[1:]):
        if m["grad_norm"] is None:  # skipped: counted, and the LR schedule did not move
            assert m["bad_steps"] == before["bad_steps"] + 1 and m["lr"] == before["lr"]
    assert f"step {bad[0]}: non-finite gradient norm (inf); update skipped" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "bad_steps" and summary["bad_steps"] == len(bad)
    last_good = max(m["step"] for m in records if m["grad_norm"] is not None)
    assert f"the last applied update was step {last_good}; the checkpoint at step {summary['steps']}" in res.stdout
