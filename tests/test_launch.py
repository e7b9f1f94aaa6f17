"""Cluster launch paths on one machine: two "nodes" with DeepSpeed's --no_ssh per-node launchers (one CPU rank each)
train in sync; `train.py -m` runs each sweep job as its own run with its own directory and W&B run, grouped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import BIN, env, free_port, metrics

from dsv4.training.sweep import device_slots, expand, job_command

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["train.seq_len=64", "train.micro_batch_size=2", "train.eval_batches=1", "train.warmup_steps=2"]


def test_sweep_expansion_uses_hydra_syntax():
    jobs = expand(["train.lr=1e-3,3e-3", "attention=csa,dense", "train.steps=5", "train.seed=range(1,3)"])
    assert len(jobs) == 8
    assert jobs[0] == ["train.lr=0.001", "attention=csa", "train.steps=5", "train.seed=1"]
    assert {tuple(j[:2]) for j in jobs} == {(f"train.lr={lr}", f"attention={a}")
                                            for lr in ("0.001", "0.003") for a in ("csa", "dense")}


def test_sweep_device_slots_and_commands():
    """--parallel shares out GPUs: slot k takes k*ranks .. (k+1)*ranks-1; deepspeed names them with --include."""
    assert device_slots(2, 2, ["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    assert device_slots(3, 1, []) == [None, None, None]
    with pytest.raises(SystemExit, match="--parallel 3 x --ranks 2 needs 6 GPUs"):
        device_slots(3, 2, ["0", "1", "2", "3"])
    cmd, extra = job_command("deepspeed", 2, ["train.lr=1"], ["2", "3"])
    assert cmd[1:3] == ["--include", "localhost:2,3"] and extra == {}
    cmd, extra = job_command("auto", 1, ["train.lr=1"], ["5"])
    assert cmd[1] == "train.py" and extra == {"CUDA_VISIBLE_DEVICES": "5"}


def test_sweep_single_job_for_a_scheduler_array(tmp_path):
    """--job K runs (here: prints) only job K and names the W&B group after the shared sweep directory, so every
    array task agrees."""
    sweep_dir = tmp_path / "array7"
    res = subprocess.run([sys.executable, "launch/sweep.py", "--job", "1", "--sweep-dir", str(sweep_dir), "--dry-run",
                          "train.lr=1e-3,2e-3,3e-3"], cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[2/3] train.lr=0.002" in res.stdout and "train.lr=0.001" not in res.stdout
    assert "logging.wandb.group='sweep-array7'" in res.stdout
    assert not sweep_dir.exists()  # a dry run writes nothing
    bad = subprocess.run([sys.executable, "launch/sweep.py", "--job", "3", "--sweep-dir", str(sweep_dir),
                          "train.lr=1e-3,2e-3"], cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--job 3: the sweep has jobs 0..1" in bad.stderr


def test_sweep_array_script_runs_its_task(tmp_path):
    """launch/sweep_array.sbatch outside SLURM, with the variables SLURM sets: task 1 runs job 1 in SWEEP_DIR."""
    e = dict(env(1), SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="99", GPUS="1", SWEEP_DIR=str(tmp_path / "s"))
    res = subprocess.run(["bash", "launch/sweep_array.sbatch", "--dry-run", "train.lr=1e-3,2e-3"], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[2/2] train.lr=0.002" in res.stdout and "train.lr=0.001" not in res.stdout
    assert "logging.wandb.group='sweep-s'" in res.stdout and not (tmp_path / "s").exists()  # dry: nothing written


@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_no_ssh_train_in_sync(tmp_path):
    """launch/multi_node_no_ssh.sh on node ranks 0 and 1 (loopback), one CPU rank per node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    e = dict(env(1), MASTER_PORT=str(free_port()), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    args = [*SHORT, "train.steps=6", "train.save_interval=3", f"train.output_dir={out}"]
    nodes = [subprocess.Popen(["launch/multi_node_no_ssh.sh", str(hostfile), str(node), "127.0.0.1", *args], cwd=ROOT,
                              env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (1, 0)]
    logs = [p.communicate(timeout=400)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs[0][-3000:] + logs[1][-3000:]
    node0 = logs[1]
    assert "ranks 2 on cpu" in node0 and node0.count("==== summary ====") == 1
    assert "==== summary ====" not in logs[0], "only global rank 0 prints"
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] is not None and digests[0] == digests[1], digests
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert len(metrics(out)[0]["data_checksum"]) == 2
    assert sorted(p.name for p in (out / "pids").iterdir()) == ["rank0.pid", "rank1.pid"]


@pytest.mark.slow
def test_sweep_two_jobs_two_runs_one_wandb_group(tmp_path):
    """Two jobs at once (--parallel 2): each its own run directory, log and offline W&B run, in one group."""
    sweep_dir = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "train.py", "-m", *SHORT, "train.steps=2", "train.lr=1e-3,2e-3",
                          "--sweep-dir", str(sweep_dir), "--parallel", "2"], cwd=ROOT, env=env(1),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    group = sweep["group"]
    assert [j["returncode"] for j in sweep["jobs"]] == [0, 0]
    # the results of every job, in sweep.json and as a table at the end
    assert [j["steps"] for j in sweep["jobs"]] == [2, 2] and all(j["val_loss"] > 0 for j in sweep["jobs"])
    table = res.stdout[res.stdout.index(" job  overrides"):].splitlines()
    for line, job in zip(table[1:3], sweep["jobs"]):
        assert line.split()[1:5] == [f"train.lr-{('0.001', '0.002')[job['job']]}", "0", "2",
                                     f"{job['val_loss']:.4f}"], line
    assert max(j["started"] for j in sweep["jobs"]) < min(j["ended"] for j in sweep["jobs"]), "ran one by one"
    assert all("==== summary ====" in (sweep_dir / f"{i:03d}.log").read_text() for i in range(2))
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "jobs")
    assert [p.name for p in run_dirs] == ["000-train.lr-0.001", "001-train.lr-0.002"]
    for run_dir, lr in zip(run_dirs, ("0.001", "0.002")):
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
        wandb_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_runs) == 1, "one offline W&B run per job"
        blob = wandb_runs[0].read_bytes()  # wandb 0.31 has no reader: the group and name are in the records
        assert group.encode() in blob and f"train.lr={lr}".encode() in blob
    first = metrics(run_dirs[0])
    second = metrics(run_dirs[1])
    assert first[0]["lr"] != second[0]["lr"]
