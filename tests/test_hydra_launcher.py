"""Sweeps through Hydra's submitit launcher (`train.py -m hydra/launcher=local|slurm`, issue 20): each point a
submitit job whose tasks are the ranks of one DeepSpeed run, ranks taken from the job environment; mistakes named
before submission; preemption checkpoints, hands the signal to submitit, which requeues, and the continuation
resumes to the losses of an uninterrupted run; the results table and sweep.json at the end."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from test_training import env, metrics

from dsv4.training import hydra_launcher
from dsv4.training.hydra_launcher import SweepError, check_shared_dir, filesystem_type, prepare_sweep
from dsv4.training.launcher_task import hand_over_preemption, master_port, rank_environment, resume_setting
from dsv4.training.signals import StopRequest

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["train.seq_len=64", "train.micro_batch_size=2", "train.eval_batches=1", "train.warmup_steps=2"]
LOCAL_2_RANKS = ["hydra/launcher=local", "hydra.launcher.tasks_per_node=2"]


def test_route_hands_a_sweep_that_names_a_launcher_to_hydra():
    from train import route

    assert route(["-m", "hydra/launcher=slurm", "train.lr=1e-3,3e-3"]) == (
        "launcher", ["hydra/launcher=slurm", "train.lr=1e-3,3e-3"])
    assert route(["train.lr=1e-3,3e-3", "-m"]) == ("sweep", ["train.lr=1e-3,3e-3"])  # the own driver, as before


# ---------------------------------------------------------------- the rank environment

SLURM_2x2 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[017-018]"}


@pytest.mark.parametrize("procid, nodeid, localid", [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)])
def test_rank_environment_of_2_nodes_x_2_tasks_from_slurm_variables(monkeypatch, procid, nodeid, localid):
    """What SLURM sets for task `procid` of a 2-node x 2-task job -> the variables the process group starts from:
    every task agrees on the master (the first node) and the port; ranks and local ranks follow SLURM's."""
    for key, value in {**SLURM_2x2, "SLURM_PROCID": str(procid), "SLURM_NODEID": str(nodeid),
                       "SLURM_LOCALID": str(localid)}.items():
        monkeypatch.setenv(key, value)
    assert rank_environment() == {"RANK": str(procid), "LOCAL_RANK": str(localid), "WORLD_SIZE": "4",
                                  "LOCAL_WORLD_SIZE": "2", "NODE_RANK": str(nodeid), "MASTER_ADDR": "gpu017",
                                  "MASTER_PORT": str(20000 + 4242 % 20000)}


def test_rank_environment_of_the_local_executor(monkeypatch):
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    got = rank_environment()
    assert (got["RANK"], got["LOCAL_RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("1", "1", "2", "127.0.0.1")
    assert got["MASTER_PORT"] == str(master_port("31337")) and 20000 <= master_port("31337") < 40000
    assert 20000 <= master_port("4242_3") < 40000  # an array task's id is not a number


# ---------------------------------------------------------------- mistakes before submission

@pytest.mark.parametrize("args, says", [
    (["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"],
     "hydra.launcher.tasks_per_node=4 with gpus_per_node=8: each task is one rank on one GPU"),
    (["hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=1"],
     "hydra.launcher.tasks_per_node=2 with gpus_per_node=1"),
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_nod=8"], "hydra.launcher.gpus_per_nod: not a setting of"),
    (["hydra/launcher=slurm", "+hydra.launcher.gpus_per_nod=8"], "hydra.launcher.gpus_per_nod: not a setting of"),
    (["hydra/launcher=local", "hydra.launcher.partition=gpu"], "hydra.launcher.partition: not a setting of the "
                                                               "submitit local launcher"),
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_task=1"], "hydra.launcher.gpus_per_task=1: give gpus_per_node"),
    (["hydra/launcher=local", "hydra.launcher.nodes=2"], "hydra.launcher.nodes=2: the local launcher runs on this"),
    (["hydra/launcher=basic"], "is not a submitit launcher; use hydra/launcher=local or hydra/launcher=slurm"),
    (["hydra/launcher=local", "--ranks", "2"], "--ranks: an option of the own sweep driver; with hydra/launcher=... "
                                                "use hydra.launcher.tasks_per_node"),
    (["hydra/launcher=local", "train.lr=1e-3,-1"], "job 1 (train.lr=-1): train.lr=-1.0: must be > 0"),
    (["hydra/launcher=local", "hydra.sweep.dir=/proc/dsv4-sweep/x"], "hydra.sweep.dir /proc/dsv4-sweep/x: cannot "
                                                                      "write there"),
])
def test_launcher_mistakes_are_named_before_anything_is_submitted(tmp_path, capsys, args, says):
    sweep_dir = [] if any(a.startswith("hydra.sweep.dir=") for a in args) else [f"hydra.sweep.dir={tmp_path / 's'}"]
    with pytest.raises(SweepError) as info:
        prepare_sweep([*args, *sweep_dir, "train.steps=2"])
    assert says in str(info.value), str(info.value)
    assert not (tmp_path / "s").exists() and "submitting" not in capsys.readouterr().out


def test_train_py_names_a_launcher_mistake_in_one_line_with_exit_code_2(tmp_path):
    res = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
                          f"hydra.sweep.dir={tmp_path / 's'}"], cwd=ROOT, env=env(1), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: hydra.launcher.tasks_per_node=2 with gpus_per_node=8")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()


def test_a_multi_node_sweep_dir_must_be_on_a_filesystem_the_nodes_share(capsys):
    """Detected from the submitting machine's mount table: memory or container filesystems are refused, a local disk
    is warned about for several nodes (this machine could be the NFS server), network filesystems pass."""
    mounts = ("/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nserver:/export /shared nfs4 rw 0 0\n"
              "overlay /scratch overlay rw 0 0\n")
    assert filesystem_type(Path("/shared/sweeps/a"), mounts) == "nfs4"  # the deepest mount point holding it
    assert filesystem_type(Path("/home/me/sweeps"), mounts) == "ext4"
    for path in ("/dev/shm/sweeps", "/scratch/s"):
        with pytest.raises(SweepError, match=f"hydra.sweep.dir {path}: on a .* filesystem of this machine"):
            check_shared_dir(Path(path), 1, mounts)
    check_shared_dir(Path("/shared/sweeps/a"), 4, mounts)
    check_shared_dir(Path("/home/me/sweeps"), 1, mounts)
    assert capsys.readouterr().err == ""
    check_shared_dir(Path("/home/me/sweeps"), 2, mounts)
    assert "warning: hydra.sweep.dir /home/me/sweeps is on a local ext4 disk" in capsys.readouterr().err


def test_dry_run_prints_the_points_and_hydra_arguments_and_writes_nothing(tmp_path, capsys):
    plan = prepare_sweep(["hydra/launcher=slurm", "hydra.launcher.nodes=2", "sweep=lr_x_layout", "train.steps=2",
                          f"hydra.sweep.dir={tmp_path / 'lr'}", "--dry-run"])
    out = capsys.readouterr().out
    assert plan.dry_run and plan.launcher == "slurm" and len(plan.points) == 6 and not (tmp_path / "lr").exists()
    assert plan.group == "lr_x_layout-lr" and plan.points[5].label == "train.lr-0.003_attention-v4_flash"
    assert "6 point(s) through hydra/launcher (slurm), 16 rank(s) each (2 node(s) x 8)" in out
    assert f"[6/6] train.lr=0.003 attention=v4_flash -> {tmp_path / 'lr' / '5'}" in out
    assert f"hydra.sweep.dir='{tmp_path / 'lr'}'" in plan.hydra_args
    assert "hydra.job.config.override_dirname.exclude_keys=['logging.wandb.group','train.steps']" in plan.hydra_args
    assert "logging.wandb.group='lr_x_layout-lr'" in plan.hydra_args


# ---------------------------------------------------------------- preemption, directly

def test_preemption_signal_checkpoints_first_then_goes_to_submitits_requeue(monkeypatch):
    """While training, submitit's signal (USR1 here) only asks the trainer to stop at its next step boundary (with a
    checkpoint); afterwards hand_over_preemption gives it back to submitit's handler, which requeues. Any other stop
    signal (SIGTERM, Ctrl-C) is not handed over."""
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")
    requeues: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: requeues.append(signum))  # submitit's handler
    stop = StopRequest()
    try:
        stop.install()  # what the trainer's loop does
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1" and requeues == []  # no requeue mid-step
        assert hand_over_preemption(stop) and requeues == [signal.SIGUSR1]
        term = StopRequest()
        term.signal_name = "SIGTERM"
        assert not hand_over_preemption(term) and requeues == [signal.SIGUSR1]
    finally:
        stop.uninstall()
        signal.signal(signal.SIGUSR1, previous)


def test_a_task_resumes_its_own_checkpoints_and_forks_only_on_its_first_attempt(tmp_path):
    assert resume_setting(False, tmp_path) == "auto" and resume_setting("auto", tmp_path) == "auto"
    assert resume_setting("/runs/base", tmp_path) == "/runs/base"  # first attempt of a fork
    (tmp_path / "checkpoints").mkdir()
    assert resume_setting("/runs/base", tmp_path) == "auto"  # requeued: continue its own run


# ---------------------------------------------------------------- real sweeps through submitit's local executor

def run_sweep(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "-m", *args], cwd=ROOT, env=env(1), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.dist
def test_local_launcher_sweep_two_points_each_a_two_rank_run(tmp_path):
    """`train.py -m hydra/launcher=local train.lr=1e-3,3e-3`: two submitit jobs, each two tasks = the two gloo ranks
    of one run in <sweep dir>/<n>; the table and sweep.json list both with their validation losses; one W&B group."""
    sweep_dir = tmp_path / "sweep"
    res = run_sweep([*LOCAL_2_RANKS, "train.lr=1e-3,3e-3", *SHORT, "train.steps=2", f"hydra.sweep.dir={sweep_dir}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["group"] == "sweep-sweep" and [j["returncode"] for j in sweep["jobs"]] == [0, 0]
    table = res.stdout[res.stdout.index(" job  overrides"):].splitlines()
    for line, job, lr in zip(table[1:3], sweep["jobs"], ("0.001", "0.003")):
        assert job["steps"] == 2 and job["val_loss"] > 0 and job["run_dir"] == str(sweep_dir / str(job["job"]))
        assert line.split()[:5] == [str(job["job"]), f"train.lr-{lr}", "0", "2", f"{job['val_loss']:.4f}"], line
    assert sweep["jobs"][0]["val_loss"] != sweep["jobs"][1]["val_loss"]
    assert "2/2 point(s) succeeded" in res.stdout
    for job, lr in zip(sweep["jobs"], ("0.001", "0.003")):
        run_dir = Path(job["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert len(summary["param_digests"]) == 2 and len(set(summary["param_digests"])) == 1  # two ranks, in sync
        assert sorted(p.name for p in (run_dir / "pids").iterdir()) == ["rank0.pid", "rank1.pid"]
        logs = sorted(p.name for p in (sweep_dir / ".submitit" / job["job_id"]).glob("*_log.out"))
        assert logs == [f"{job['job_id']}_0_log.out", f"{job['job_id']}_1_log.out"]  # one submitit job, two tasks
        assert metrics(run_dir)[0]["lr"] > 0
        blob = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        assert b"sweep-sweep" in blob and f"train.lr={lr}".encode() in blob  # grouped, named by its overrides
    assert metrics(sweep_dir / "0")[-1]["lr"] != metrics(sweep_dir / "1")[-1]["lr"]


@pytest.mark.slow
@pytest.mark.dist
def test_preempted_point_checkpoints_requeues_and_resumes_to_the_uninterrupted_losses(tmp_path):
    """Two identical points of two ranks each; point 0's tasks get submitit's signal (USR1, as SLURM's --signal or
    the local executor's timeout sends it) a few steps in: every rank checkpoints at the next step, submitit's
    checkpoint hook requeues the job, and the continuation (train.resume=auto) trains the same losses as point 1."""
    sweep_dir, steps = tmp_path / "sweep", 16
    proc = subprocess.Popen([sys.executable, "train.py", "-m", *LOCAL_2_RANKS, "train.lr=1e-3,1e-3", *SHORT,
                             f"train.steps={steps}", "logging.interval=1", f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT,
                            env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweep_dir / "0"
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        assert time.time() < deadline and proc.poll() is None, "point 0 did not reach step 3"
        time.sleep(0.05)
    for pid_file in (run_dir / "pids").iterdir():
        os.kill(int(pid_file.read_text().split()[1]), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    job_id = json.loads((sweep_dir / "jobs" / "000.json").read_text())["job_id"]
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    stopped_at = int(re.search(r"step (\d+): stop signal received \(SIGUSR1\)", log).group(1))
    assert 3 <= stopped_at < steps
    assert "Calling checkpoint method." in log and f"Requeued job {job_id}" in log  # submitit's hook, then requeue
    assert f"resuming {run_dir / 'checkpoints' / f'step{stopped_at:07d}'} (step {stopped_at}, verified)" in log
    preempted, uninterrupted = metrics(run_dir), metrics(sweep_dir / "1")
    assert [m["step"] for m in preempted] == list(range(1, steps + 1))  # one line per step across both attempts
    assert [m["loss"] for m in preempted] == [m["loss"] for m in uninterrupted]
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(j["returncode"], j["steps"]) for j in sweep["jobs"]] == [(0, steps), (0, steps)]
    assert sweep["jobs"][0]["val_loss"] == sweep["jobs"][1]["val_loss"]
    summaries = [json.loads((sweep_dir / n / "summary.json").read_text()) for n in ("0", "1")]
    assert summaries[0]["param_digests"] == summaries[1]["param_digests"]
    assert summaries[0]["start_step"] == stopped_at


FAKE_SBATCH = """#!/bin/sh
for arg in "$@"; do script="$arg"; done
cp "$script" "$(dirname "$0")/job.sh"
echo "Submitted batch job 4242"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
echo "4242_0|FAILED|node1"
echo "4242_1|FAILED|node1"
"""


def test_slurm_submission_with_sbatch_faked(tmp_path):
    """`-m hydra/launcher=slurm` as submitted, with sbatch, srun and sacct faked: one array job of the two points
    (array_parallelism), each point 2 nodes x 8 tasks on 8 GPUs a node, USR1 before the time limit (the signal the
    trainer checkpoints on, set before submitit was imported), the tasks told the same, srun given the CPUs. Both
    points die (sacct: FAILED, no result): the table still lists them and the sweep exits 1."""
    if filesystem_type(tmp_path) in hydra_launcher.NODE_LOCAL_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on {filesystem_type(tmp_path)}: a SLURM sweep directory there is refused")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sweep_dir = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                          "hydra.launcher.partition=gpu", "train.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}"],
                         cwd=ROOT, env={**env(1), "PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True,
                         text=True, timeout=300)
    script = (bin_dir / "job.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR1@300", "#SBATCH --time=1440", "export SUBMITIT_PREEMPT_SIGNAL=USR1",
                 'export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK', f"-m submitit.core._submit {sweep_dir}/.submitit"):
        assert line in script, script
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    rows = res.stdout[res.stdout.index(" job  overrides"):].splitlines()[1:3]
    assert [row.split()[:3] for row in rows] == [["0", "train.lr-0.001", "-"], ["1", "train.lr-0.003", "-"]]
    assert "the launcher reported a failed job (UncompletedJobError" in res.stderr


def test_finish_sweep_lists_a_point_whose_task_left_no_record(tmp_path, capsys):
    """A task that died (killed, out of memory) writes no record and submitit raises: the table still has its row,
    exit code unknown, and the sweep fails."""
    points = [hydra_launcher.Point(i, [f"train.lr={i + 1}"], [f"train.lr={i + 1}"]) for i in range(2)]
    plan = hydra_launcher.SweepPlan([], tmp_path, "g", "local", points, False)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "000.json").write_text(json.dumps({"job": 0, "label": "train.lr-1", "run_dir": "x",
                                                            "returncode": 0, "steps": 2, "val_loss": 1.5}))
    assert hydra_launcher.finish_sweep(plan, RuntimeError("job 2 failed")) == 1
    out = capsys.readouterr()
    rows = out.out.splitlines()[1:3]
    assert rows[0].split()[:5] == ["0", "train.lr-1", "0", "2", "1.5000"] and rows[1].split()[:3] == [
        "1", "train.lr-2", "-"]
    assert "1/2 point(s) succeeded" in out.out and "RuntimeError: job 2 failed" in out.err
    assert f"point 1 (train.lr-2): no record (its tasks died or never ran); its tasks' output: {tmp_path}" in out.out
    assert [j["job"] for j in json.loads((tmp_path / "sweep.json").read_text())["jobs"]] == [0, 1]
