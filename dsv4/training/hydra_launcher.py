"""Sweeps through Hydra's submitit launcher, the submitting side: `python train.py -m hydra/launcher=slurm|local
KEY=V1,V2 ...`.

Hydra expands the sweep and hands every point to hydra-submitit-launcher (conf/hydra/launcher/{slurm,local}.yaml):
one SLURM job (or one local submitit job) per point, `nodes` x `tasks_per_node` tasks each, every task one rank of
the point's DeepSpeed run (dsv4/training/launcher_task.py: the same trainer, no `deepspeed` CLI). train.py calls

    prepare_sweep(args)  before Hydra's multirun: every check before anything is submitted (each point's config, as
                         the own driver checks it; the launcher's keys; tasks_per_node against gpus_per_node; the
                         sweep directory: writable, and for SLURM not on a filesystem only this machine sees), the
                         points printed -> a SweepPlan holding the arguments Hydra runs with
    finish_sweep(plan)   after it: sweep.json and the results table, as the own driver (sweep.py) writes them

Layout: <sweep dir> = hydra.sweep.dir (default outputs/sweeps/<name>-<time>), each point's run directory
<sweep dir>/<n> (Hydra's job directory), its record <sweep dir>/jobs/<n>.json, submitit's files and the tasks' logs
in <sweep dir>/.submitit/<job id>/. W&B: every point's run in the group <name>-<time>, named by its swept overrides.

Preemption and time limits: submitit is told to signal SIGUSR1 (SUBMITIT_PREEMPT_SIGNAL, set before submission),
which the trainer already handles (dsv4/training/signals.py): every rank checkpoints at its next step boundary, then
the task hands the signal to submitit, which requeues the job; the continuation resumes with train.resume=auto.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from dsv4.training.sweep import (
    ROOT,
    SweepError,
    check_jobs,
    check_sweep_dir,
    expand,
    hydra_quoted,
    job_results,
    load_sweep_config,
    record_label,
    results_table,
    slug,
    write_records,
)

PREEMPT_SIGNAL = "USR1"  # submitit's preemption/timeout signal for these jobs: one the trainer checkpoints on
LAUNCHERS = {"LocalLauncher": ("local", LocalQueueConf), "SlurmLauncher": ("slurm", SlurmQueueConf)}
# filesystems that live in one machine's memory or container: never what another node sees at the same path
NODE_LOCAL_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "overlay", "squashfs"}
# local disks: shared with other nodes only when this host exports them (an NFS server)
LOCAL_DISK_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "vfat"}
DRIVER_OPTIONS = {
    "--ranks": "hydra.launcher.tasks_per_node (and gpus_per_node)",
    "--parallel": "hydra.launcher.array_parallelism (SLURM; the local launcher starts every point at once)",
    "--sweep-dir": "hydra.sweep.dir=DIR",
    "--launcher": "hydra/launcher=local|slurm",
    "--devices": "hydra.launcher.gpus_per_node",
    "--job": "nothing: the launcher submits every point",
    "--sweep": "sweep=NAME",
}


@dataclasses.dataclass
class Point:
    """One sweep point: Hydra job number `index`, its overrides, and those that differ between points."""
    index: int
    overrides: list[str]
    varying: list[str]

    @property
    def label(self) -> str:
        return slug(self.varying)


@dataclasses.dataclass
class SweepPlan:
    """What prepare_sweep decided: Hydra's arguments (after -m), the sweep directory and W&B group, the points."""
    hydra_args: list[str]
    sweep_dir: Path
    group: str
    launcher: str  # "local" | "slurm"
    points: list[Point]
    dry_run: bool


def override_key(override: str) -> str:
    """The key an override sets, without its +, ++ or ~ prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def _is_hydra_override(override: str) -> bool:
    return override_key(override).startswith(("hydra.", "hydra/"))


def prepare_sweep(args: list[str]) -> SweepPlan:
    """Check everything a sweep through hydra/launcher=... needs before any job is submitted, and print its points.
    `args`: the command line after -m. A mistake raises SweepError naming the key, value or directory."""
    dry_run = "--dry-run" in args
    options = [a for a in args if a.startswith("-") and a != "--dry-run"]
    if options:
        name = options[0].split("=", 1)[0]
        hint = DRIVER_OPTIONS.get(name)
        raise SweepError(f"{options[0]}: " + (f"an option of the own sweep driver; with hydra/launcher=... use {hint}"
                                              if hint else "not an option of a hydra/launcher sweep (only --dry-run)"))
    overrides = [a for a in args if a != "--dry-run"]
    name, sweep_config = "sweep", [o for o in overrides if o.startswith("sweep=")]
    overrides = [o for o in overrides if not o.startswith("sweep=")]
    if sweep_config:
        try:
            config = load_sweep_config(sweep_config[-1].split("=", 1)[1])
        except SystemExit as e:  # its one-line message
            raise SweepError(str(e.code)) from None
        name = config["name"]
        overrides = [*config["overrides"], *(f"{k}={v}" for k, v in config["params"].items()), *overrides]
    hydra_overrides = [o for o in overrides if _is_hydra_override(o)]
    task_overrides = [o for o in overrides if not _is_hydra_override(o)]

    jobs = expand(task_overrides)
    keys = {override_key(o) for o in jobs[0]}
    swept = {override_key(o) for job in jobs for o in job} - {
        override_key(o) for o in jobs[0] if all(o in job for job in jobs)}
    points = [Point(i, job, [o for o in job if override_key(o) in swept]) for i, job in enumerate(jobs)]
    launcher_cfg, sweep_dir_setting = _launcher_config(hydra_overrides, jobs[0])
    launcher = check_launcher(launcher_cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    user_dir = [o for o in hydra_overrides if override_key(o) == "hydra.sweep.dir"]
    sweep_dir = (Path(sweep_dir_setting) if user_dir else ROOT / "outputs" / "sweeps" / f"{name}-{stamp}").absolute()
    group = f"{name}-{stamp if not user_dir else sweep_dir.name}"
    extra = [] if any(override_key(o) == "logging.wandb.group" for o in task_overrides) else [
        f"logging.wandb.group={hydra_quoted(group)}"]
    preempt = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", PREEMPT_SIGNAL)
    if preempt != PREEMPT_SIGNAL:
        raise SweepError(f"SUBMITIT_PREEMPT_SIGNAL={preempt}: the trainer checkpoints on {PREEMPT_SIGNAL} (and TERM, "
                         "INT); unset it")
    if launcher == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise SweepError("hydra/launcher=slurm: sbatch is not on PATH: submit from a SLURM login node (or use "
                         "hydra/launcher=local on this machine)")
    check_jobs([(f"job {p.index} ({' '.join(p.varying) or 'no swept keys'})", [*p.overrides, *extra])
                for p in points])
    if launcher == "slurm":
        check_shared_dir(sweep_dir, int(launcher_cfg["nodes"]))
    if not dry_run:  # the last check: it creates the directory
        check_sweep_dir(sweep_dir, "hydra.sweep.dir")
    fixed = ",".join(hydra_quoted(k) for k in sorted((keys - swept) | {"logging.wandb.group"}))
    hydra_args = [*(o for o in hydra_overrides if override_key(o) != "hydra.sweep.dir"),
                  f"hydra.sweep.dir={hydra_quoted(str(sweep_dir))}",
                  # the fixed keys: a task names its W&B run and record by the others (and override_dirname agrees)
                  f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]",
                  *task_overrides, *extra]
    plan = SweepPlan(hydra_args, sweep_dir, group, launcher, points, dry_run)
    _print_plan(plan, launcher_cfg)
    return plan


def _launcher_config(hydra_overrides: list[str], first_job: list[str]) -> tuple[dict[str, Any], str]:
    """The launcher's settings and hydra.sweep.dir as Hydra composes them (first point's config)."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="sweep_check"):
            cfg = compose(config_name="config", overrides=[*hydra_overrides, *first_job], return_hydra_config=True)
            launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
            return launcher, str(cfg.hydra.sweep.dir)
    except (HydraException, OmegaConfBaseException) as e:
        key = getattr(e.__cause__, "full_key", None) or ""
        if isinstance(e.__cause__, ConfigAttributeError) and key.startswith("hydra.launcher."):
            choice = next((o.split("=", 1)[1] for o in hydra_overrides if o.startswith("hydra/launcher=")), "")
            unknown_launcher_key(key.split(".", 2)[2], "local" if "local" in choice else "slurm")
        reason = "; ".join(line.strip().rstrip(".") for line in str(e).splitlines()[:2] if line.strip())
        cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None and str(e.__cause__) else ""
        raise SweepError(reason + (f" ({cause})" if cause and cause not in reason else "")) from None


def check_launcher(launcher: Mapping[str, Any]) -> str:
    """The launcher's settings before submission: a submitit launcher, no key its plugin does not know, one rank per
    GPU. -> "local" or "slurm"; SweepError naming the hydra.launcher key otherwise."""
    target = str(launcher.get("_target_", ""))
    kind, schema = LAUNCHERS.get(target.rsplit(".", 1)[-1], (None, None))
    if kind is None or not target.startswith("hydra_plugins.hydra_submitit_launcher."):
        raise SweepError(f"hydra/launcher: {target or 'no _target_'} is not a submitit launcher; use "
                         "hydra/launcher=local or hydra/launcher=slurm (without hydra/launcher, -m runs our own "
                         "driver)")
    unknown = sorted(set(launcher) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        unknown_launcher_key(unknown[0], kind)
    tasks, gpus = int(launcher.get("tasks_per_node") or 1), int(launcher.get("gpus_per_node") or 0)
    if gpus and tasks != gpus:
        raise SweepError(f"hydra.launcher.tasks_per_node={tasks} with gpus_per_node={gpus}: each task is one rank on "
                         f"one GPU, so set tasks_per_node={gpus} (or gpus_per_node=0 for CPU ranks)")
    if launcher.get("gpus_per_task"):
        raise SweepError(f"hydra.launcher.gpus_per_task={launcher['gpus_per_task']}: give gpus_per_node (= "
                         "tasks_per_node) instead; each rank takes GPU LOCAL_RANK of its node's GPUs")
    if kind == "local" and int(launcher.get("nodes") or 1) != 1:
        raise SweepError(f"hydra.launcher.nodes={launcher['nodes']}: the local launcher runs on this machine only "
                         "(nodes=1); use hydra/launcher=slurm for several nodes")
    return kind


def unknown_launcher_key(key: str, kind: str) -> None:
    """Raise the SweepError for a hydra.launcher key the submitit `kind` launcher does not know, listing those it
    does."""
    known = sorted(f.name for f in dataclasses.fields(LAUNCHERS[f"{kind.title()}Launcher"][1])
                   if not f.name.startswith("_"))
    raise SweepError(f"hydra.launcher.{key}: not a setting of the submitit {kind} launcher (known: "
                     f"{', '.join(known)})")


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path` (its deepest mount point in /proc/mounts), or "" if unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    path = path.absolute()
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_shared_dir(sweep_dir: Path, nodes: int, mounts: str | None = None) -> None:
    """A SLURM sweep's directory must be seen by the compute nodes (submitit's pickles, the checkpoints, the results).
    Detected from this host's mount table: a memory or container filesystem (tmpfs, overlay, ...) is refused; a
    local disk (ext4, xfs, ...) is only shared when this host exports it, so several nodes get a warning."""
    kind = filesystem_type(sweep_dir, mounts)
    if kind in NODE_LOCAL_FILESYSTEMS:
        raise SweepError(f"hydra.sweep.dir {sweep_dir}: on a {kind} filesystem of this machine, which the compute "
                         "nodes cannot see; choose a directory on a shared filesystem (NFS, Lustre, GPFS, ...)")
    if kind in LOCAL_DISK_FILESYSTEMS and nodes > 1:
        print(f"warning: hydra.sweep.dir {sweep_dir} is on a local {kind} disk of this machine: the {nodes} nodes "
              "of each job must see it (checkpoints, resume); unless this machine exports it, choose a shared "
              "filesystem", file=sys.stderr, flush=True)


def _print_plan(plan: SweepPlan, launcher: Mapping[str, Any]) -> None:
    ranks = int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)
    print(f"sweep {plan.group}: {len(plan.points)} point(s) through hydra/launcher ({plan.launcher}), "
          f"{ranks} rank(s) each ({launcher.get('nodes') or 1} node(s) x {launcher.get('tasks_per_node') or 1}), in "
          f"{plan.sweep_dir}" + (" (dry run: nothing is submitted or written)" if plan.dry_run else ""), flush=True)
    for p in plan.points:
        print(f"[{p.index + 1}/{len(plan.points)}] {' '.join(p.varying) or '(no swept keys)'} -> "
              f"{plan.sweep_dir / str(p.index)}", flush=True)
    if plan.dry_run:
        print("  python train.py -m " + " ".join(plan.hydra_args), flush=True)
    else:
        print(f"submitting; each job's output: {plan.sweep_dir / '.submitit'}/<job id>/", flush=True)


def finish_sweep(plan: SweepPlan, error: BaseException | None = None) -> int:
    """After Hydra's multirun (or its failure: a task that died leaves no result): sweep.json and the results table,
    a record for every point (those no task recorded: exit code unknown). -> 0 when every point succeeded, else 1."""
    if error is not None:
        text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        print(f"error: the launcher reported a failed job ({type(error).__name__}: {text}); see "
              f"{plan.sweep_dir / '.submitit'}", file=sys.stderr, flush=True)
    jobs_dir = plan.sweep_dir / "jobs"
    for p in plan.points:
        path = jobs_dir / f"{p.index:03d}.json"
        if not path.exists():
            run_dir = plan.sweep_dir / str(p.index)
            path.write_text(json.dumps({"job": p.index, "overrides": p.overrides, "label": p.label,
                                        "run_dir": str(run_dir), "returncode": None, **job_results(run_dir)}))
    records = write_records(plan.sweep_dir, plan.group)
    print(results_table(records), flush=True)
    for r in records:
        if r.get("returncode") != 0:
            where = plan.sweep_dir / ".submitit" / str(r.get("job_id") or "<job id>")
            code = r.get("returncode")
            status = f"exit code {code}" if code is not None else "no record (its tasks died or never ran)"
            print(f"point {r['job']} ({record_label(r)}): {status}; its tasks' output: {where}/", flush=True)
    ok = sum(r.get("returncode") == 0 for r in records)
    print(f"sweep {plan.group}: {ok}/{len(records)} point(s) succeeded (results in {plan.sweep_dir / 'sweep.json'})",
          flush=True)
    return 0 if ok == len(records) and error is None else 1
