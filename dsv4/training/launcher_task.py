"""One task of a sweep submitted through Hydra's submitit launcher (dsv4/training/hydra_launcher.py): one rank of
its sweep point's DeepSpeed run, started without the `deepspeed` CLI.

    run_task(cfg)          train.py's task function calls this in every task: the rank environment, the point's
                           run directory and W&B run, train.resume=auto, the trainer, the point's record
    rank_environment(job)  RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from submitit's job
                           environment (SLURM's variables under SLURM, submitit's own under the local executor);
                           init_distributed starts the process group from them
    hand_over_preemption(stop)  after the trainer's checkpoint, submitit's signal goes back to submitit: its handler
                           (global rank 0) calls the launcher's checkpoint hook and requeues the job
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import submitit
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from data_pipelines import DataError
from dsv4.config import ConfigError
from dsv4.run_files import CHECKPOINTS
from dsv4.training.checkpointing import CheckpointError
from dsv4.training.distributed import close_process_group
from dsv4.training.hydra_launcher import override_key
from dsv4.training.signals import StopRequest
from dsv4.training.sweep import job_results, slug
from dsv4.training.trainer import Trainer


def master_port(job_id: str) -> int:
    """A port every task of one job derives alike from its job id (SLURM's, or the local controller's pid): two
    jobs sharing a node differ unless their ids are congruent mod 20000."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + number % 20000


def rank_environment(job: submitit.JobEnvironment | None = None) -> dict[str, str]:
    """The variables the process group starts from, for this task of a submitit job: global rank, local rank, world
    size, the master (the job's first node; 127.0.0.1 on one node) and a port derived from the job id. `job`:
    default this process's submitit.JobEnvironment."""
    job = job if job is not None else submitit.JobEnvironment()
    nodes = job.num_nodes
    master = "127.0.0.1" if nodes == 1 else job.hostnames[0]
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // nodes), "NODE_RANK": str(job.node), "MASTER_ADDR": master,
            "MASTER_PORT": str(master_port(job.raw_job_id))}


def point_overrides(hydra: DictConfig) -> list[str]:
    """This point's swept overrides: its task overrides less the fixed ones, which prepare_sweep lists in
    hydra.job.config.override_dirname.exclude_keys."""
    fixed = set(hydra.job.config.override_dirname.exclude_keys)
    return [o for o in hydra.overrides.task if override_key(o) not in fixed]


def resume_setting(current: Any, run_dir: Path) -> Any:
    """train.resume for a task: `auto` (continue this point's own checkpoints after a requeue, start fresh the first
    time), except a fork (a path) on its first attempt, before this point has checkpoints of its own."""
    forking = isinstance(current, str) and current not in ("auto", "true", "false")
    return current if forking and not (run_dir / CHECKPOINTS).is_dir() else "auto"


def run_task(cfg: DictConfig) -> int:
    """One task of a sweep point: one rank of its run. Returns its exit code (0; 2 for a mistake, named on stderr; 1
    for an error, its traceback in the task's log) rather than raising, so the sweep goes on and every point gets a
    record in <sweep dir>/jobs/."""
    env = rank_environment()
    os.environ.update(env)
    rank = int(env["RANK"])
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    varying = point_overrides(hydra)
    with open_dict(cfg):
        cfg.train.output_dir = str(run_dir)
        cfg.train.resume = resume_setting(cfg.train.resume, run_dir)
        if cfg.logging.wandb.name is None:
            cfg.logging.wandb.name = ",".join(varying) or f"point{hydra.job.num}"
    record: dict[str, Any] = {"job": int(hydra.job.num), "overrides": list(hydra.overrides.task),
                              "label": slug(varying), "run_dir": str(run_dir), "returncode": None,
                              "started": time.time(), "job_id": submitit.JobEnvironment().job_id}
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.train()
        code = 0
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception:  # a bug or a failing rank: the traceback goes to this task's log, the sweep goes on
        traceback.print_exc()
        code = 1
    if rank == 0:
        record.update(returncode=code, ended=time.time(), **job_results(run_dir))
        record["wall_s"] = round(record["ended"] - record["started"], 1)
        jobs_dir = Path(hydra.sweep.dir) / "jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True)
        (jobs_dir / f"{record['job']:03d}.json").write_text(json.dumps(record))
    close_process_group(barrier=code == 0)
    sys.stdout.flush()
    sys.stderr.flush()
    if trainer is not None and getattr(trainer, "stop", None) is not None:
        hand_over_preemption(trainer.stop)
    return code


def hand_over_preemption(stop: StopRequest) -> bool:
    """After the trainer stopped with a checkpoint: when the stop was submitit's preemption/timeout signal, restore
    submitit's handler and deliver the signal to it again. On global rank 0 that handler calls the launcher's
    checkpoint hook (this point, resubmitted as it was) and requeues the job, leaving with SystemExit; on the other
    ranks it does nothing. -> whether the signal was handed over."""
    preempt = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    if stop.signal_name != preempt.name:
        return False
    stop.uninstall()
    if not callable(signal.getsignal(preempt)):  # nobody to hand it to: the default action would kill the task
        return False
    os.kill(os.getpid(), preempt)
    return True
