"""Fault tolerance: write-then-publish checkpoints, resume=auto, kill -9 and resume (bit-exact losses, data order
and final parameters against an uninterrupted 2-rank run), SIGTERM to one rank and Ctrl-C to torchrun checkpoint
every rank and exit 0, a checkpoint corrupted in place is skipped naming the file, and non-finite losses stop the
run with a checkpoint and a message that says which update was the last one applied."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_training import BIN, env, run

from dsv4 import run_files as rf
from dsv4.training import checkpointing as ck

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- publish / verify / pick / prune (no DeepSpeed)


def _fake_staged(ckpt_dir: Path, step: int, payload: bytes = b"x" * 100) -> None:
    staging = ckpt_dir / rf.staging_tag(rf.tag_for(step))
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(payload)
    (staging / "data_state_rank0.json").write_text("{}")


def test_publish_verify_and_auto_pick(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_staged(ckpt, step)
        ck.publish(ckpt, rf.tag_for(step), step, world_size=2, keep=0, model_config={"hidden_size": 8})
    assert (ckpt / "latest").read_text() == "step0000006"
    assert rf.verify_checkpoint(ckpt / "step0000006") is None
    assert rf.read_manifest(ckpt / "step0000006")["world_size"] == 2
    _fake_staged(ckpt, 8)  # a job that died while writing step 8: never published, never picked

    with open(ckpt / "step0000006" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(40)  # a truncated file
    warnings: list[str] = []
    found = rf.newest_complete(ckpt, warnings.append)
    assert found is not None and found.tag == "step0000004"
    assert any(".step0000008.partial" in w and "unpublished" in w for w in warnings), warnings
    assert any("step0000006" in w and "40 bytes" in w for w in warnings), warnings

    (ckpt / "step0000004" / rf.MANIFEST).unlink()  # no manifest: incomplete as well
    assert rf.newest_complete(ckpt, warnings.append).tag == "step0000002"

    assert ck.prune(ckpt, keep=1, protect=["step0000002"]) == ["step0000004"]
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000002", "step0000006"]


def test_publish_replaces_an_existing_tag(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _fake_staged(ckpt, 4, b"old")
    ck.publish(ckpt, "step0000004", 4, 1, keep=0)
    _fake_staged(ckpt, 4, b"new!")
    ck.publish(ckpt, "step0000004", 4, 1, keep=0)
    assert (ckpt / "step0000004" / "mp_rank_00_model_states.pt").read_bytes() == b"new!"
    assert rf.verify_checkpoint(ckpt / "step0000004") is None
    assert not list(ckpt.glob(".step*"))


# ---------------------------------------------------------------- real 2-rank runs, killed and resumed

STEPS = 16
ARGS = ["train.py", "train.seq_len=128", "train.micro_batch_size=4", f"train.steps={STEPS}", "train.save_interval=2",
        "train.keep_checkpoints=2", "train.warmup_steps=3", "train.phases.dense_steps=4",
        "train.phases.indexer_warmup_steps=2", "train.eval_batches=1", "logging.interval=1",
        "logging.wandb.enabled=false", "deepspeed=zero2"]


def torchrun(out: Path, *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *ARGS, f"train.output_dir={out}", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a kill -9 can cut the last one)."""
    records = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a run with its output in `log` (a file: a pipe nobody reads could fill up and stall the run), in a
    session of its own: a SIGINT to its process group is then what a terminal's Ctrl-C sends."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(1), stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Until this run (not an earlier one into the same directory) has logged `step`. A resumed run first drops the
    lines logged after its checkpoint, so its own lines are those that were not in the file when it started."""
    deadline = time.time() + timeout
    earlier = getattr(proc, "earlier_records", None)
    if earlier is None:
        earlier = proc.earlier_records = read_metrics(run_dir)  # type: ignore[attr-defined]
    while time.time() < deadline:
        records = [m for m in read_metrics(run_dir) if m not in earlier]
        if records and records[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}:\n"
                                 f"{proc.log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill9(proc: subprocess.Popen) -> None:
    # the launcher, both ranks and their data workers at once: a node dying (torchrun starts each rank in a
    # session of its own, so walk the process tree rather than signal one process group)
    tree = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    out = proc.log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def stopped_summary(run_dir: Path) -> dict:
    stopped = json.loads((run_dir / "summary.json").read_text())
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert stopped["stopped_by"] == "signal" and stopped["steps"] < STEPS, stopped
    assert tag == rf.tag_for(stopped["steps"]) and rf.verify_checkpoint(run_dir / "checkpoints" / tag) is None
    assert all((run_dir / "checkpoints" / tag / f"data_state_rank{r}.json").is_file() for r in (0, 1))
    return stopped


@pytest.mark.slow
@pytest.mark.dist
def test_kill9_sigterm_corruption_ctrl_c_resume_bit_exact(tmp_path):
    """Reference run; then: kill -9 at a random step, resume=auto, SIGTERM to rank 1 only (both ranks checkpoint,
    exit 0), corrupt that checkpoint in place (same size: skipped with a warning naming the file), resume, Ctrl-C
    as a terminal sends it to torchrun (it forwards SIGINT to the ranks: both checkpoint), resume to the end. Every
    step's loss and every rank's data checksum, and the final parameters, equal the uninterrupted run's."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    print(f"kill schedule seed {seed}")
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    finish(start(torchrun(ref_dir), tmp_path / "ref.log"))
    reference = {m["step"]: m for m in read_metrics(ref_dir)}
    assert sorted(reference) == list(range(1, STEPS + 1))

    # 1. kill -9 somewhere in steps 3..6: the next run takes over its stale lock
    proc = start(torchrun(out), tmp_path / "run1.log")
    wait_for_step(proc, out, rng.randint(3, 6))
    kill9(proc)

    # 2. resume=auto, then SIGTERM rank 1 only a few steps on: every rank checkpoints at the same step, rc 0
    proc = start(torchrun(out, "train.resume=auto"), tmp_path / "run2.log")
    wait_for_step(proc, out, 9)
    pid_line = (out / "pids" / "rank1.pid").read_text().split()
    os.kill(int(pid_line[1]), signal.SIGTERM)
    text = finish(proc)
    assert "taking over the lock" in text and "its process is gone" in text, text[-3000:]
    assert "train.resume=auto: resuming" in text and "stop signal received (on another rank)" in text, text[-3000:]
    sigterm_at = stopped_summary(out)["steps"]

    # 3. the newest checkpoint gets 4 KB overwritten (same size): resume=auto skips it, naming the file, and takes
    # the previous one; then Ctrl-C reaches torchrun, which sends SIGINT to both ranks: they checkpoint and exit 0
    shard = out / "checkpoints" / rf.tag_for(sigterm_at) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 3)
        f.write(os.urandom(4096))
    resumed_from = (sigterm_at - 1) // 2 * 2
    proc = start(torchrun(out, "train.resume=auto"), tmp_path / "run3.log")
    wait_for_step(proc, out, resumed_from + rng.randint(1, 3))
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)  # torchrun itself reports the signal (its own traceback) and exits 1
    text = proc.log.read_text()
    assert f"skipping damaged checkpoint {shard.parent}: file {shard.name}: its content" in text, text[-3000:]
    assert f"resuming {out / 'checkpoints' / rf.tag_for(resumed_from)} (step {resumed_from}" in text
    assert "Ctrl-C: stopping at the end of this step" in text and "stop signal received (SIGINT)" in text
    stopped_summary(out)
    assert rf.verify_checkpoint(out / "checkpoints" / rf.tag_for(resumed_from)) is None, "never pruned"

    # 4. resume to the end
    text = finish(start(torchrun(out, "train.resume=auto"), tmp_path / "run4.log"))
    last_resumed = int(text.split("train.resume=auto: resuming ")[1].split("(step ")[1].split(",")[0])

    records = read_metrics(out)  # one line per step: each resume dropped the lines logged after its checkpoint
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    for m in records:  # every logged step, including those redone after a kill, equals the reference
        ref = reference[m["step"]]
        assert m["loss"] == ref["loss"] and m["lm_loss"] == ref["lm_loss"], (seed, m, ref)
        assert m["data_checksum"] == ref["data_checksum"] and len(m["data_checksum"]) == 2, (seed, m, ref)
    # keep_checkpoints=2, and the checkpoint the last run resumed from is never pruned by it
    kept = {rf.tag_for(STEPS - 2), rf.tag_for(STEPS), rf.tag_for(last_resumed)}
    assert {p.name for p in (out / "checkpoints").glob("step*")} == kept
    final = json.loads((out / "summary.json").read_text())
    assert final["param_digests"][0] == final["param_digests"][1]
    assert final["param_digests"] == json.loads((ref_dir / "summary.json").read_text())["param_digests"]


@pytest.mark.slow
def test_nonfinite_losses_skip_then_stop_with_checkpoint(tmp_path):
    """An absurd LR blows the loss up: each non-finite step is skipped and counted, max_bad_steps in a row stop
    the run (rc 0) with a checkpoint and a message."""
    out = tmp_path / "run"
    res = run([sys.executable, "train.py", "train.seq_len=64", "train.micro_batch_size=2", "train.steps=40",
               "train.lr=1e9", "train.warmup_steps=0", "train.grad_clip=0", "train.max_bad_steps=2",
               "train.eval_batches=1", "logging.interval=1", "logging.wandb.enabled=false", "deepspeed=zero0",
               f"train.output_dir={out}"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "non-finite loss on at least one rank; update skipped" in res.stdout, res.stdout[-3000:]
    assert "stopping: 2 skipped updates in a row (non-finite loss or gradient norm; train.max_bad_steps=2)" in \
        res.stdout, res.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: null where a value is not finite
    assert summary["stopped_by"] == "bad_steps" and summary["bad_steps"] >= 2 and summary["steps"] < 40
    assert (out / "checkpoints" / "latest").read_text() == rf.tag_for(summary["steps"])
    records = read_metrics(out)
    assert records[-1]["bad_steps"] == summary["bad_steps"] and records[-1]["loss"] is None
    applied = [m["step"] for m in records if m["loss"] is not None]
    assert applied and records[0]["grad_norm"] > 0, "ZeRO-0 fp32 reports its gradient norm"
    assert f"the last applied update was step {applied[-1]}; the checkpoint at step {summary['steps']}" in res.stdout
