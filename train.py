"""Train a DeepSeek-V4-attention decoder. Hydra composes the config (conf/); DeepSpeed runs it.

    python train.py                                   # one process (CPU or one GPU)
    deepspeed --num_gpus 2 train.py deepspeed=zero3   # several ranks (CPU ranks use gloo)
    torchrun --standalone --nproc_per_node 2 train.py
    python train.py -m train.lr=1e-3,3e-3 --ranks 2    # a sweep: each job its own run (dsv4/training/sweep.py)
    python train.py -m hydra/launcher=slurm train.lr=1e-3,3e-3   # each point a SLURM job (training/hydra_launcher.py)

Ctrl-C (SIGINT), SIGTERM or SIGUSR1 while training: checkpoint at the next step boundary, summary, exit 0; a second
Ctrl-C exits at once. A mistake (a bad key, a missing file, a directory in use) stops with one line, exit code 2.
"""

import os
import signal
import sys

MULTIRUN = ("-m", "--multirun")
REPO = os.path.dirname(os.path.abspath(__file__))  # submitit's tasks start in the working directory, not here
USER_HYDRA_FULL_ERROR = "HYDRA_FULL_ERROR" in os.environ  # the user's: Hydra's errors then keep their traceback
SWEEP_OPTIONS = ("--ranks", "--parallel", "--launcher", "--sweep-dir", "--devices", "--job", "--dry-run", "--sweep")


def _exit_during_startup(signum: int, frame) -> None:
    """Ctrl-C while importing and setting up: nothing trained yet, so leave at once (no traceback). A JIT build of
    a DeepSpeed op in progress is stopped and its lock removed: left behind, it would hang every later run."""
    if os.environ.get("RANK", "0") == "0":
        print(f"\n{signal.Signals(signum).name} during start-up: exiting; nothing was trained", file=sys.stderr,
              flush=True)
    build_lock = sys.modules.get("dsv4.training.build_lock")  # comes with dsv4.training.distributed; no import here
    if build_lock is not None:
        build_lock.release_held_locks()
    os._exit(128 + signum)


def route(argv: list[str]) -> tuple[str, list[str] | str]:
    """What a command line asks for: ("sweep", driver args) when -m / --multirun appears anywhere, ("launcher",
    args) when it also names a hydra/launcher, ("train", Hydra args) for one run, or ("error", message) for a sweep
    option without -m."""
    if any(arg in MULTIRUN for arg in argv):
        args = [arg for arg in argv if arg not in MULTIRUN]
        return ("launcher" if any(arg.startswith("hydra/launcher=") for arg in args) else "sweep"), args
    sweep_like = [arg for arg in argv if arg.startswith("sweep=") or arg.split("=", 1)[0] in SWEEP_OPTIONS]
    if sweep_like:
        return "error", (f"{sweep_like[0]}: sweeps run with -m, e.g. python train.py -m {' '.join(argv)} "
                         "(see python train.py -m --help)")
    return "train", argv


def handle_startup_signals(kind: str) -> None:
    """Ctrl-C, and for one run also SIGTERM (a launcher's or scheduler's stop), exit at once until the trainer
    installs its own handlers: DeepSpeed may be compiling under a lock in between."""
    signal.signal(signal.SIGINT, _exit_during_startup)
    if kind == "train":
        signal.signal(signal.SIGTERM, _exit_during_startup)


def main() -> None:
    kind, args = route(sys.argv[1:])
    handle_startup_signals(kind)
    if kind == "sweep":
        # Hydra's multirun would run every job in this process; each job is a distributed run of its own instead
        from dsv4.training.sweep import main as sweep_main

        sys.exit(sweep_main(args, prog="train.py -m"))
    if kind == "launcher":
        sys.exit(launcher_sweep(args))
    if kind == "error":
        print(f"error: {args}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(args):
        print("dsv4-train: starting (loading PyTorch, DeepSpeed and the config) ...", flush=True)
    from dsv4.training.distributed import strip_launcher_args

    # The deepspeed launcher appends --local_rank=N, which Hydra rejects: move it to LOCAL_RANK first.
    sys.argv = strip_launcher_args(sys.argv)
    user_full_error = USER_HYDRA_FULL_ERROR
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors (composing the config) come here; run() unsets it
    try:
        hydra_main()
    except SystemExit:
        if {"-h", "--help"} & set(args):
            from dsv4.training.sweep import sweep_help

            print(sweep_help())
        raise
    except Exception as e:
        from hydra.errors import HydraException

        if user_full_error or not isinstance(e, HydraException):
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def launcher_sweep(args: list[str]) -> int:
    """`-m hydra/launcher=...`: every check before submission, Hydra's multirun through the submitit launcher (each
    task one rank: the task function below), then the results table and sweep.json -> the exit code."""
    from hydra.errors import HydraException

    from dsv4.training.hydra_launcher import SweepError, finish_sweep, prepare_sweep

    try:
        plan = prepare_sweep(args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if plan.dry_run:
        return 0
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # tasks and sbatch's --signal: the signal the trainer handles
    signal.signal(signal.SIGINT, signal.default_int_handler)  # submitted: Ctrl-C stops waiting, not "start-up"
    sys.argv = [sys.argv[0], "-m", *plan.hydra_args]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    error = None
    try:
        hydra_main()
    except HydraException as e:
        print(f"error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\nCtrl-C: stopped waiting for the sweep ({plan.sweep_dir}); jobs already submitted to SLURM keep "
              "running (squeue), local ones are stopped", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # a task that died leaves no result: submitit raises; the table still shows every point
        error = e
    finally:
        if not USER_HYDRA_FULL_ERROR:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return finish_sweep(plan, error)


def hydra_error_line(e: Exception) -> str:
    """One line for an error of Hydra's (a bad override, an unknown key or config): its message without the
    search path and caret lines, and for an override the shell unquoted (`data.eos_token=<eos>`), how to quote it."""
    parts: list[str] = []
    for line in str(e).splitlines():
        if line.startswith("Config search path"):
            break
        text = line.strip()
        if not text or set(text) <= {"^", " "} or text.startswith("See https://hydra.cc"):
            continue
        if line.startswith("\t") and parts:  # the options of a config group, one a line
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + text
        else:
            parts.append(text.rstrip("."))
    if isinstance(e.__cause__, Exception) and str(e.__cause__).strip():
        cause = str(e.__cause__).strip().splitlines()[0]
        if cause not in parts:
            parts.append(cause)
    message = "; ".join(parts)
    override = getattr(e, "override", None)
    if override and "=" in override:
        key, value = override.split("=", 1)
        message += (f"; if the value has characters Hydra's grammar reserves (< > [ ] {{ }} , = spaces), quote the "
                    f"value for Hydra inside quotes for the shell: \"{key}='{value}'\"")
    return message


def _hydra_entry():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def run(cfg: DictConfig) -> int | None:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not USER_HYDRA_FULL_ERROR:
            os.environ.pop("HYDRA_FULL_ERROR")  # errors of the run itself: Hydra's usual short traceback
        if os.environ.get("SUBMITIT_EXECUTOR") and HydraConfig.get().mode == RunMode.MULTIRUN:
            # a task of a -m hydra/launcher=... sweep: one rank of its point's run; it returns (submitit records it)
            if REPO not in sys.path:
                sys.path.insert(0, REPO)
            from dsv4.training.launcher_task import run_task

            return run_task(cfg)
        from data_pipelines import DataError
        from dsv4.config import ConfigError
        from dsv4.training.checkpointing import CheckpointError
        from dsv4.training.distributed import shutdown
        from dsv4.training.trainer import train

        try:
            train(cfg)
        except (ConfigError, DataError, CheckpointError) as e:
            rank = os.environ.get("RANK", "0")
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        shutdown(0)

    return run


def hydra_main() -> None:
    _hydra_entry()()


if __name__ == "__main__":
    main()
