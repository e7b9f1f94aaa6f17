"""Hangs and lost work on a fresh clone (issue 19): a stale JIT-build lock left by a killed run must not make later
runs wait forever in silence (it is removed with a warning naming it; a live one is waited for, saying so; an
immediate exit during start-up removes the lock it holds); a corpus too small to hold out one validation sequence
trains, checkpoints and ends with val_loss null and a warning (not a TypeError and no checkpoint); metrics.jsonl
holds one line per step after a resume or a restart from step 0 (the kill -9 / Ctrl-C resumes that compare losses
with an uninterrupted run assert it in test_fault_tolerance.py and test_trust_runs.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_fault_tolerance import read_metrics
from test_training import env

from data_pipelines.sources import is_held_out
from dsv4.training import build_lock as bl
from dsv4.training.metrics import trim_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.seq_len=64", "train.micro_batch_size=1", "train.warmup_steps=1", "train.eval_batches=1",
        "data.num_workers=0", "logging.wandb.enabled=false", "deepspeed=zero0"]


def hold_open(lock: Path) -> subprocess.Popen:
    """A process that creates `lock` as torch's FileBaton does (O_CREAT | O_EXCL) and keeps it open, as a build
    in progress does."""
    proc = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                             f"os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)\nprint('held', flush=True)\n"
                             "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


# ---------------------------------------------------------------- the build lock (no DeepSpeed; about 1 s)

def test_build_lock_rule_stale_live_and_network(tmp_path, monkeypatch):
    build = tmp_path / "ext" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    said: list[str] = []

    lock.touch()  # left by a run killed while building: nobody holds it, nobody builds there
    assert bl.judge(lock)[0] == "stale"
    assert bl.clear_stale(lock, said.append)[0] == "gone" and not lock.exists()
    assert f"removed the stale build lock {lock}" in said[-1] and "no process on this machine holds it" in said[-1]

    holder = hold_open(lock)  # a live build: its holder has the lock open
    try:
        verdict, why = bl.judge(lock)
        assert verdict == "live" and f"pid {holder.pid} " in why and "holds it" in why, why
        assert bl.clear_stale(lock, said.append)[0] == "live" and lock.exists()
    finally:
        stop(holder)
    compiler = subprocess.Popen(["sleep", "120"], cwd=build)  # the holder killed -9, its compiler still running
    try:
        verdict, why = bl.judge(lock)
        assert verdict == "live" and f"pid {compiler.pid} (sleep) builds in its directory" in why, why
    finally:
        stop(compiler)
    assert bl.judge(lock)[0] == "stale"

    # on a network filesystem a build on another machine is invisible: stale only after NETWORK_QUIET_S unchanged
    monkeypatch.setattr(bl, "filesystem_type", lambda path: "nfs4")
    verdict, why = bl.judge(lock)
    assert verdict == "wait" and "nfs4" in why, why
    old = time.time() - bl.NETWORK_QUIET_S - 60
    for p in (lock, build):
        os.utime(p, (old, old))
    assert bl.judge(lock)[0] == "stale"


def test_waiting_on_a_live_lock_says_so_and_ends_when_its_holder_dies(tmp_path, monkeypatch):
    """A build killed while another run waits on it: the waiter does not hang (the lock turns stale)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build = tmp_path / "ext" / bl.SHM_OP
    build.mkdir(parents=True)
    (build / f"{bl.SHM_OP}.so").touch()  # built: no "building" line, but a line saying what it waits for
    holder = hold_open(build / "lock")
    said: list[str] = []
    killer = subprocess.Popen(["bash", "-c", f"sleep 1; kill -9 {holder.pid}"])
    t0 = time.time()
    bl.prepare_jit_builds(said.append, announce=True, shm_jit=True)
    assert time.time() - t0 < 30 and not (build / "lock").exists()
    killer.wait(timeout=30)
    holder.wait(timeout=30)
    assert said[0].startswith("waiting for another build of deepspeed_shm_comm to finish (pid "), said
    assert said[1].startswith(f"warning: removed the stale build lock {build / 'lock'}"), said


def test_a_first_build_is_announced(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    said: list[str] = []
    bl.prepare_jit_builds(said.append, announce=True, shm_jit=True)
    assert said == [f"building DeepSpeed's shm_comm op (first run only, ~25 s)... (in {tmp_path / 'ext' / bl.SHM_OP})"]
    bl.prepare_jit_builds(said.append, announce=False, shm_jit=True)  # other local ranks say nothing
    (tmp_path / "ext" / bl.SHM_OP).mkdir(parents=True)
    (tmp_path / "ext" / bl.SHM_OP / f"{bl.SHM_OP}.so").touch()
    bl.prepare_jit_builds(said.append, announce=True, shm_jit=True)
    assert len(said) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_during_a_build_removes_the_lock_it_holds(tmp_path, sig):
    """train.py's start-up handlers (Ctrl-C or a launcher's SIGTERM while DeepSpeed compiles at process-group
    start-up, as the start-up interrupt tests do): the compiler is stopped and the lock removed, so no later run
    (CI) waits on it."""
    ext = tmp_path / "ext"
    build = ext / bl.SHM_OP
    build.mkdir(parents=True)
    script = f"""
import os, signal, subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
import train
from dsv4.training import build_lock
build_lock.prepare_jit_builds(print, announce=False, shm_jit=False)  # as init_distributed does
fd = os.open({str(build / 'lock')!r}, os.O_CREAT | os.O_EXCL)  # torch's FileBaton, held while building
ninja = subprocess.Popen(["sleep", "120"], cwd={str(build)!r})
train.handle_startup_signals("train")
print(ninja.pid, flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(env(1), TORCH_EXTENSIONS_DIR=str(ext)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ninja = int(proc.stdout.readline())
    assert (build / "lock").exists()
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig and f"{sig.name} during start-up: exiting" in err, err
    assert not (build / "lock").exists()
    deadline = time.time() + 10
    while psutil.pid_exists(ninja) and psutil.Process(ninja).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the build's compiler was left running"
        time.sleep(0.05)


# ---------------------------------------------------------------- metrics.jsonl: one line per step (fast)

def test_trim_metrics_keeps_one_line_per_step_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)]
    lines += [json.dumps({"step": 4, "loss": 4.0, "val_loss": 3.5}), json.dumps({"step": 5, "loss": 5.0})]
    lines += [json.dumps({"step": 3, "loss": 3.25}), json.dumps({"step": 4, "loss": 4.25, "val_loss": 3.4})]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # a resume that got past step 4, then kill -9
    assert trim_metrics(path, 4) == (4, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["step"] for m in kept] == [1, 2, 3, 4]
    assert kept[2]["loss"] == 3.25 and kept[3] == {"step": 4, "loss": 4.25, "val_loss": 3.4}, "the last line of a step"
    assert trim_metrics(path, 4) == (4, 0)
    assert trim_metrics(path, 0) == (0, 4) and path.read_text() == ""  # a restart from step 0
    assert trim_metrics(tmp_path / "none.jsonl", 3) == (0, 0)


# ---------------------------------------------------------------- real runs (about 10 s each)

@pytest.mark.slow
def test_a_stale_build_lock_and_a_run_killed_before_its_first_checkpoint_do_not_hang_the_restart(tmp_path):
    """A run killed while DeepSpeed compiled (its lock left in the extensions dir) after logging some steps but
    before any checkpoint: the restart with train.resume=auto removes the lock with a warning instead of waiting
    forever, starts from step 0 and starts metrics.jsonl over (one line per step)."""
    ext = tmp_path / "ext"
    built = bl.extensions_root() / bl.SHM_OP
    if bl.op_is_built(built.parent):  # reuse the built op (the real one is left alone); else it is built here
        shutil.copytree(built, ext / bl.SHM_OP, ignore=shutil.ignore_patterns("lock"))
    (ext / bl.SHM_OP).mkdir(parents=True, exist_ok=True)
    lock = ext / bl.SHM_OP / "lock"
    lock.touch()
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3))
                                       + '{"step": 4, "lo')
    timeout = 120 if bl.op_is_built(ext) else 400
    res = subprocess.run([sys.executable, "train.py", *TINY, "train.steps=2", "train.resume=auto",
                          f"train.output_dir={out}"], cwd=ROOT, env=dict(env(1), TORCH_EXTENSIONS_DIR=str(ext)),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"warning: removed the stale build lock {lock}" in res.stdout, res.stdout[-3000:]
    assert not lock.exists() and bl.op_is_built(ext)
    assert "starting from step 0" in res.stdout
    assert "metrics.jsonl: dropped 4 line(s) of an interrupted run that left no checkpoint" in res.stdout
    records = read_metrics(out)
    assert [m["step"] for m in records] == [1, 2] and records[0]["loss"] != 9.0


def held_in_documents(count: int) -> list[str]:
    """`count` distinct documents none of which the default hash split (data.val_fraction=0.02) holds out."""
    words = "the quick brown fox jumps over a lazy dog while rivers run under bright skies".split()
    docs, i = [], 0
    while len(docs) < count:
        text = f"document {i}: " + " ".join(words[(i * 3 + k) % len(words)] for k in range(40 + i % 30))
        if not is_held_out(text, 0.02):
            docs.append(text)
        i += 1
    return docs


@pytest.mark.slow
def test_a_corpus_with_no_held_out_sequence_trains_checkpoints_and_says_so(tmp_path):
    """The reported command on a 20-document jsonl: the empty validation split is named before training (the
    source's key, data.val_fraction and its val_path), every step trains, the run checkpoints, summary.json has
    val_loss null, exit 0 (it was a TypeError after the last step, exit 1, no checkpoint)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in held_in_documents(20)))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "data=jsonl_example", f"data.sources.0.path={data}",
                          "train.steps=6", "train.seq_len=128", "train.micro_batch_size=2", "train.warmup_steps=1",
                          "logging.wandb.enabled=false", f"train.output_dir={out}"], cwd=ROOT, env=env(1),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    warning = next(line for line in res.stdout.splitlines() if line.startswith("warning: no validation data"))
    assert res.stdout.index(warning) < res.stdout.index("step      1/6"), "said before training"
    assert "data.sources[0] (mydata): 0 held-out documents" in warning and "data.sources[0].val_path" in warning
    assert "data.val_fraction" in warning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss"] is None and summary["val_step"] is None
    assert summary["stopped_by"] is None
    assert (out / "checkpoints" / "latest").read_text() == "step0000006"
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))
    assert "validation loss n/a" in res.stdout
