"""Hydra sweeps where every job is its own (distributed) run.

Our own driver, for `-m` without `hydra/launcher=...` (with it, Hydra's submitit launcher runs the sweep instead:
dsv4/training/hydra_launcher.py).

    python train.py -m train.lr=1e-3,3e-3 attention=csa,v4_flash          # 4 jobs, one after another
    python train.py -m sweep=lr_x_layout --ranks 2                         # a sweep config, 2 ranks per job
    python launch/sweep.py --sweep topk_x_ratio --ranks 8 model=small      # the same driver
    python train.py -m sweep=lr_x_layout --ranks 2 --parallel 4            # 4 jobs at once, 2 GPUs each
    python launch/sweep.py --sweep lr_x_layout --job 3 --sweep-dir DIR     # only job 3 (a SLURM array task)

Overrides use Hydra's sweep syntax (`a=1,2`, `range(...)`, `choice(...)`, `glob(...)`), expanded to their cartesian
product by Hydra's own override parser. `sweep=NAME` adds the `params` of `conf/sweep/NAME.yaml` (the format of
Hydra's `hydra.sweeper.params`; a path to a yaml works too) and its fixed `overrides`. Each job runs as a new
process: `python train.py` for one rank, else `deepspeed --num_gpus N --master_port <free>` (or `--launcher
torchrun`), with

    train.output_dir=<sweep dir>/<job>-<overrides>   logging.wandb.group=<sweep name>-<time>
    logging.wandb.name=<its overrides>

so each job has its own run directory and W&B run, grouped by sweep. `<sweep dir>/jobs/<n>.json` records each
job (overrides, exit code, start and end); `<sweep dir>/sweep.json` lists every recorded job. A failed job does not
stop the sweep; the driver exits 1 if any failed.

`--parallel P` runs P jobs at once, each on its own `--ranks` GPUs (job slot k takes devices k*ranks ..
(k+1)*ranks-1 of `--devices`, default CUDA_VISIBLE_DEVICES or every visible GPU; without GPUs the jobs just run
side by side); each job's output then goes to `<sweep dir>/<n>.log`. `--job K` runs job K alone, for a scheduler
that starts one task per job (launch/sweep_array.sbatch): every task expands the same list, so K names the same
job everywhere, and the W&B group is taken from the sweep directory, which the tasks share.

Before any job runs (and in `--dry-run`, which prints the jobs and their commands and writes nothing), every
override is parsed, every job's config is composed and checked as train.py checks it (resolve_config), and the sweep
directory is created and written to: a mistake stops the driver with one line naming the override, key or
directory (and the job), exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SWEEP_CONFIGS = ROOT / "conf" / "sweep"


def load_sweep_config(name: str) -> dict[str, Any]:
    """conf/sweep/<name>.yaml (or a yaml path): {name, params: {key: "v1,v2"}, overrides: [...]}."""
    from omegaconf import OmegaConf

    path = Path(name) if name.endswith((".yaml", ".yml")) else SWEEP_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SWEEP_CONFIGS.glob("*.yaml")))
        raise SystemExit(f"sweep={name}: no such sweep config {path} (known: {known})")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(data) - {"name", "params", "overrides"}
    if unknown:
        raise SystemExit(f"{path}: unknown key {sorted(unknown)[0]} (use name, params, overrides)")
    return {"name": data.get("name") or path.stem, "params": data.get("params") or {},
            "overrides": list(data.get("overrides") or [])}


class SweepError(ValueError):
    """A mistake on the sweep's command line or in its jobs' configs: one line, exit code 2."""


def _one_line(error: BaseException) -> str:
    """The first line of an error's message, and of its cause's (Hydra puts the reason there)."""
    def first(e: BaseException) -> str:
        return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

    text = first(error)
    cause = error.__cause__
    if cause is not None and first(cause) not in text:
        text += f" ({first(cause)})"
    return text


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of a list of Hydra overrides: the cartesian product of every sweep override's values. An override
    Hydra cannot parse raises SweepError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:  # one at a time, so the message names the bad one
        try:
            parser.parse_overrides([override])
        except OverrideParseException as e:
            reason = next((line for line in e.message.splitlines()
                           if line.strip() and not line.startswith(("Error parsing override", "See https"))), "")
            raise SweepError(f"{override}: not a valid Hydra override ({reason.strip() or 'parse error'}; "
                             "see https://hydra.cc/docs/advanced/override_grammar/basic)") from None
    parsed = parser.parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def check_jobs(jobs: list[tuple[str, list[str]]]) -> None:
    """Compose and validate each job's config as train.py does (Hydra's compose, then resolve_config), before any
    job runs: the first bad key raises SweepError naming it and the job. `jobs`: (label, overrides) pairs."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dsv4.config import ConfigError
    from dsv4.run_config import resolve_config

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf"), job_name="sweep_check"):
        for label, overrides in jobs:
            try:
                resolve_config(compose(config_name="config", overrides=overrides))
            except (HydraException, OmegaConfBaseException, ConfigError) as e:
                raise SweepError(f"{label}: {_one_line(e)}") from None


def check_sweep_dir(sweep_dir: Path, setting: str = "--sweep-dir") -> None:
    """Create the sweep directory and write a file in it, before any job starts (os.access is no test: as root it
    says yes to a read-only mount); SweepError naming `setting` (--sweep-dir, or hydra.sweep.dir) when that fails."""
    probe = sweep_dir / "jobs" / f".write-test.{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SweepError(f"{setting} {sweep_dir}: cannot write there ({e.strerror or e}); choose a writable "
                         "directory") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slug(overrides: list[str]) -> str:
    """A job's swept overrides as a file name: `train.lr=1e-3 attention=csa` -> `train.lr-1e-3_attention-csa`."""
    text = "_".join(o.split("/")[-1].replace("=", "-") for o in overrides) or "base"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)[:80]


def hydra_quoted(value: str) -> str:
    """A Hydra quoted string: commas, brackets and `=` inside stay one value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(launcher: str, ranks: int, overrides: list[str], devices: list[str] | None = None
                ) -> tuple[list[str], dict[str, str]]:
    """The command of one job and the environment it adds (its GPUs, when it has a slot of them)."""
    bin_dir = Path(sys.executable).parent
    visible = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {}
    if launcher == "python" or (launcher == "auto" and ranks == 1):
        return [sys.executable, "train.py", *overrides], visible
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(ranks), "--master_port",
                str(_free_port()), "train.py", *overrides], visible
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES itself: name the GPUs with --include instead
    gpus = ["--include", "localhost:" + ",".join(devices)] if devices else ["--num_gpus", str(ranks)]
    return [str(bin_dir / "deepspeed"), *gpus, "--master_port", str(_free_port()), "train.py", *overrides], {}


def device_slots(parallel: int, ranks: int, devices: list[str]) -> list[list[str] | None]:
    """GPUs of each of the `parallel` job slots (None: no GPUs, jobs share the CPU)."""
    if not devices:
        return [None] * parallel
    if parallel * ranks > len(devices):
        raise SystemExit(f"--parallel {parallel} x --ranks {ranks} needs {parallel * ranks} GPUs; there are "
                         f"{len(devices)} ({','.join(devices)}): lower --parallel or --ranks, or set --devices")
    return [devices[k * ranks:(k + 1) * ranks] for k in range(parallel)]


def _visible_devices(arg: str | None) -> list[str]:
    if arg:
        return [d.strip() for d in arg.split(",") if d.strip()]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


RESULT_KEYS = ("steps", "val_loss", "val_ppl", "tokens_per_s", "stopped_by")


def job_results(run_dir: Path) -> dict[str, Any]:
    """A finished job's results from its summary.json (steps, val_loss, val_ppl, tokens_per_s, stopped_by);
    empty when it wrote none."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {key: summary.get(key) for key in RESULT_KEYS}


def results_table(records: list[dict[str, Any]]) -> str:
    """One line per job: its swept values, exit code, steps, validation loss and perplexity, tokens/s."""
    def number(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    width = max([len(record_label(r)) for r in records] + [4])
    lines = [f"{'job':>4}  {'overrides':<{width}}  {'exit':>4}  {'steps':>6}  {'val loss':>8}  {'ppl':>8}  "
             f"{'tok/s':>9}"]
    for r in records:
        lines.append(f"{r['job']:>4}  {record_label(r):<{width}}  {number(r.get('returncode'), 'd'):>4}  "
                     f"{number(r.get('steps'), 'd'):>6}  {number(r.get('val_loss'), '.4f'):>8}  "
                     f"{number(r.get('val_ppl'), '.2f'):>8}  {number(r.get('tokens_per_s'), ',.0f'):>9}")
    return "\n".join(lines)


def record_label(record: dict[str, Any]) -> str:
    """A job's swept overrides as the table shows them: its `label` (a hydra/launcher point), else from its run
    directory's name (<n>-<overrides>)."""
    return record.get("label") or Path(record["run_dir"]).name.split("-", 1)[-1]


def write_records(sweep_dir: Path, group: str) -> list[dict[str, Any]]:
    """sweep.json from every job record in <sweep dir>/jobs/ (several drivers may share the directory)."""
    records = [json.loads(p.read_text()) for p in sorted((sweep_dir / "jobs").glob("*.json"))]
    records.sort(key=lambda r: r["job"])
    tmp = sweep_dir / f".sweep.json.{os.getpid()}"
    tmp.write_text(json.dumps({"group": group, "jobs": records}, indent=2))
    os.replace(tmp, sweep_dir / "sweep.json")
    return records


def build_parser(prog: str = "launch/sweep.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=None, help="conf/sweep/<NAME>.yaml or a yaml path (or sweep=NAME)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per job (default 1)")
    parser.add_argument("--launcher", choices=("auto", "python", "deepspeed", "torchrun"), default="auto")
    parser.add_argument("--sweep-dir", default=None, help="default: outputs/sweeps/<name>-<time>")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at once, each on its own --ranks GPUs")
    parser.add_argument("--devices", default=None, help="GPU ids to share out, e.g. 0,1,2,3 (default: all visible)")
    parser.add_argument("--job", type=int, default=None, help="run only job K (one scheduler task per job)")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, run nothing")
    return parser


def sweep_help() -> str:
    """The sweep options, for `python train.py --help`."""
    usage = build_parser("python train.py -m").format_help()
    return ("== Sweeps ==\n\npython train.py -m KEY=V1,V2 ... [sweep=NAME] runs every combination as its own run; "
            "Hydra overrides as above.\n\n" + usage)


def main(argv: list[str] | None = None, prog: str = "launch/sweep.py") -> int:
    """The sweep driver (`prog`: how it was invoked, for its usage line: train.py passes "train.py -m")."""
    parser = build_parser(prog)
    try:
        return _run(parser, argv)
    except SweepError as e:
        parser.error(str(e))  # usage line, "PROG: error: ...", exit code 2
    except SystemExit as e:  # a one-line message (a sweep config, --parallel x --ranks): exit code 2 as well
        if isinstance(e.code, str):
            parser.error(e.code)
        raise
    return 2  # pragma: no cover


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]}")
    if args.parallel < 1 or args.ranks < 1:
        parser.error("--parallel and --ranks must be >= 1")
    if args.job is not None and not args.sweep_dir:
        parser.error("--job needs --sweep-dir (the directory every task of the sweep shares)")
    sweep_name = args.sweep
    overrides = []
    for item in rest:
        if item.startswith("sweep="):
            sweep_name = item.split("=", 1)[1]
        else:
            overrides.append(item)
    name = "sweep"
    if sweep_name:
        config = load_sweep_config(sweep_name)
        name = config["name"]
        overrides = [*config["overrides"], *(f"{k}={v}" for k, v in config["params"].items()), *overrides]
    jobs = expand(overrides)
    if args.job is not None and not 0 <= args.job < len(jobs):
        parser.error(f"--job {args.job}: the sweep has jobs 0..{len(jobs) - 1}")
    if args.job is not None:  # every task must name the group alike: take it from the shared directory
        group = f"{name}-{Path(args.sweep_dir).resolve().name}"
    else:
        group = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else ROOT / "outputs" / "sweeps" / group
    sweeping = {o.split("=", 1)[0] for job in jobs for o in job} - {
        o.split("=", 1)[0] for o in jobs[0] if all(o in job for job in jobs)}
    selected = [args.job] if args.job is not None else list(range(len(jobs)))
    parallel = min(args.parallel, len(selected))
    slots = device_slots(parallel, args.ranks, _visible_devices(args.devices) if parallel > 1 else [])

    def job_overrides(i: int) -> tuple[list[str], Path, list[str]]:
        """Job i's swept overrides, run directory and every override it runs with."""
        job = jobs[i]
        varying = [o for o in job if o.split("=", 1)[0] in sweeping]
        run_dir = sweep_dir / f"{i:03d}-{slug(varying)}"
        extra = [f"train.output_dir={hydra_quoted(str(run_dir))}"]
        if not any(o.startswith("logging.wandb.group=") for o in job):
            extra.append(f"logging.wandb.group={hydra_quoted(group)}")
        if not any(o.startswith("logging.wandb.name=") for o in job):
            extra.append(f"logging.wandb.name={hydra_quoted(','.join(varying) or name)}")
        return varying, run_dir, [*job, *extra]

    # every mistake before any work: each job's config, then (a real sweep) the sweep directory
    check_jobs([(f"job {i} ({' '.join(job_overrides(i)[0]) or 'no swept keys'})", job_overrides(i)[2])
                for i in selected])
    if not args.dry_run:
        check_sweep_dir(sweep_dir)
    print(f"sweep {group}: {len(jobs)} job(s), {args.ranks} rank(s) each, {parallel} at a time, in {sweep_dir}"
          + (" (dry run: nothing is written)" if args.dry_run else ""), flush=True)
    pending = list(selected)
    running: dict[int, tuple[int, subprocess.Popen, dict[str, Any], Any]] = {}  # slot -> job, process, record, log
    failed = 0
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            slot = min(set(range(parallel)) - set(running))
            job = jobs[i]
            varying, run_dir, job_args = job_overrides(i)
            cmd, job_env = job_command(args.launcher, args.ranks, job_args, slots[slot])
            where = f" on GPUs {','.join(slots[slot])}" if slots[slot] else ""
            print(f"[{i + 1}/{len(jobs)}] {' '.join(varying) or '(no swept keys)'} -> {run_dir}{where}", flush=True)
            record = {"job": i, "overrides": job, "run_dir": str(run_dir), "returncode": None}
            if args.dry_run:
                print("  " + " ".join([*(f"{k}={v}" for k, v in job_env.items()), *cmd]), flush=True)
                continue
            log = open(sweep_dir / f"{i:03d}.log", "w") if parallel > 1 else None  # noqa: SIM115
            record["started"] = time.time()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **job_env}, stdout=log,
                                    stderr=subprocess.STDOUT if log else None)
            running[slot] = (i, proc, record, log)
        for slot, (i, proc, record, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            if log:
                log.close()
            record.update(returncode=proc.returncode, ended=time.time(), **job_results(Path(record["run_dir"])))
            record["wall_s"] = round(record["ended"] - record["started"], 1)
            failed += proc.returncode != 0
            (sweep_dir / "jobs" / f"{i:03d}.json").write_text(json.dumps(record))
            write_records(sweep_dir, group)
            print(f"[{i + 1}/{len(jobs)}] exit code {proc.returncode}"
                  + (f" (output: {sweep_dir / f'{i:03d}.log'})" if log else ""), flush=True)
        if running:
            time.sleep(0.5)
    if args.dry_run:  # nothing written: no directory, no job records
        return 0
    records = write_records(sweep_dir, group)
    if not args.dry_run:
        print(results_table(records), flush=True)
        print(f"sweep {group}: {len(selected) - failed}/{len(selected)} job(s) succeeded (results in "
              f"{sweep_dir / 'sweep.json'})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
