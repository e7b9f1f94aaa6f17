"""Hydra sweeps where every job is its own (distributed) run.

    python train.py -m train.lr=1e-3,3e-3 attention=csa,v4_flash          # 4 jobs, one after another
    python train.py -m sweep=lr_x_layout --ranks 2                         # a sweep config, 2 ranks per job
    python launch/sweep.py --sweep topk_x_ratio --ranks 8 model=small      # the same driver

Overrides use Hydra's sweep syntax (`a=1,2`, `range(...)`, `choice(...)`, `glob(...)`), expanded to their cartesian
product by Hydra's own override parser. `sweep=NAME` adds the `params` of `conf/sweep/NAME.yaml` (the format of
Hydra's `hydra.sweeper.params`; a path to a yaml works too) and its fixed `overrides`. Each job runs as a new
process: `python train.py` for one rank, else `deepspeed --num_gpus N --master_port <free>` (or `--launcher
torchrun`), with

    train.output_dir=<sweep dir>/<job>-<overrides>   logging.wandb.group=<sweep name>-<time>
    logging.wandb.name=<its overrides>

so each job has its own run directory and W&B run, grouped by sweep. `<sweep dir>/sweep.json` lists the jobs,
their overrides and exit codes. A failed job does not stop the sweep; the driver exits 1 if any failed.
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


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of a list of Hydra overrides: the cartesian product of every sweep override's values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slug(overrides: list[str]) -> str:
    text = "_".join(o.split("/")[-1].replace("=", "-") for o in overrides) or "base"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)[:80]


def _quoted(value: str) -> str:
    """A Hydra quoted string: commas, brackets and `=` inside stay one value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(launcher: str, ranks: int, overrides: list[str]) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "python" or (launcher == "auto" and ranks == 1):
        return [sys.executable, "train.py", *overrides]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(ranks), "--master_port",
                str(_free_port()), "train.py", *overrides]
    return [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_free_port()), "train.py",
            *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=None, help="conf/sweep/<NAME>.yaml or a yaml path (or sweep=NAME)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per job (default 1)")
    parser.add_argument("--launcher", choices=("auto", "python", "deepspeed", "torchrun"), default="auto")
    parser.add_argument("--sweep-dir", default=None, help="default: outputs/sweeps/<name>-<time>")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, run nothing")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]}")
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group = f"{name}-{stamp}"
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else ROOT / "outputs" / "sweeps" / group
    sweeping = {o.split("=", 1)[0] for job in jobs for o in job} - {
        o.split("=", 1)[0] for o in jobs[0] if all(o in job for job in jobs)}
    print(f"sweep {group}: {len(jobs)} job(s), {args.ranks} rank(s) each, in {sweep_dir}", flush=True)
    records = []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(jobs):
        varying = [o for o in job if o.split("=", 1)[0] in sweeping]
        run_dir = sweep_dir / f"{i:03d}-{_slug(varying)}"
        extra = [f"train.output_dir={_quoted(str(run_dir))}"]
        if not any(o.startswith("logging.wandb.group=") for o in job):
            extra.append(f"logging.wandb.group={_quoted(group)}")
        if not any(o.startswith("logging.wandb.name=") for o in job):
            extra.append(f"logging.wandb.name={_quoted(','.join(varying) or name)}")
        cmd = job_command(args.launcher, args.ranks, [*job, *extra])
        print(f"[{i + 1}/{len(jobs)}] {' '.join(varying) or '(no swept keys)'} -> {run_dir}", flush=True)
        if args.dry_run:
            print("  " + " ".join(cmd), flush=True)
            records.append({"job": i, "overrides": job, "run_dir": str(run_dir), "returncode": None})
            continue
        started = time.time()
        rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ)).returncode
        records.append({"job": i, "overrides": job, "run_dir": str(run_dir), "returncode": rc,
                        "wall_s": round(time.time() - started, 1)})
        print(f"[{i + 1}/{len(jobs)}] exit code {rc}", flush=True)
        (sweep_dir / "sweep.json").write_text(json.dumps({"group": group, "jobs": records}, indent=2))
    (sweep_dir / "sweep.json").write_text(json.dumps({"group": group, "jobs": records}, indent=2))
    failed = [r for r in records if r["returncode"] not in (0, None)]
    if not args.dry_run:
        print(f"sweep {group}: {len(records) - len(failed)}/{len(records)} job(s) succeeded", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
