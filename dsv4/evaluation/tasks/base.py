"""What an evaluation task is: a name, its flags and their checks, a run, a table and W&B scalars.

Each task is one module of dsv4/evaluation/tasks/ that defines `TASK`; dsv4/evaluation/tasks/__init__.py lists
them in order, and `python -m dsv4.evaluate` builds its parser, runs, tables and metrics from that list.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dsv4.config import ConfigError
from dsv4.evaluation.data import RunSettings
from dsv4.loading import LoadedModel


@dataclass(frozen=True)
class Flag:
    """One command-line flag: the arguments of argparse's add_argument. Tasks that read the same flag list the same
    Flag; the parser adds it once."""
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.name, **self.options)


def flag(name: str, **options: Any) -> Flag:
    return Flag(name, options)


@dataclass
class EvalContext:
    """What a task's run reads: the model, the run's settings, the common seed and the task options (evaluate()'s
    keywords, every task's defaults filled in)."""
    loaded: LoadedModel
    settings: RunSettings
    seed: int
    options: Mapping[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)  # results several tasks read (see `once`)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute() the first time `key` is asked for in this evaluation, the same value after: tasks that read
        the same forwards (ppl and positions) share one pass."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


def no_checks(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def no_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    summary: its entry in the command's task list (--help), lines as they are printed after the name.
    run: its results (its entry of the JSON) for one model.
    format: its lines of the printed table.
    metrics: its scalars for W&B (eval/...).
    flags: its command-line flags; check turns them (the whole argparse namespace) into its options, before any
        work, raising ConfigError that names the flag; defaults: those options' defaults (evaluate()'s keywords).
    default: whether it is in the default --tasks.
    """
    name: str
    summary: str
    run: Callable[[EvalContext], dict[str, Any]]
    format: Callable[[dict[str, Any]], list[str]]
    metrics: Callable[[dict[str, Any]], dict[str, float]] = no_metrics
    flags: tuple[Flag, ...] = ()
    check: Callable[[argparse.Namespace], dict[str, Any]] = no_checks
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default: bool = True


def progress(line: str) -> None:
    """A progress line on stderr (stdout's tables and --out's JSON stay as they are)."""
    print(line, file=sys.stderr, flush=True)


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Flags that, when given, must be >= 1; ConfigError naming the first that is not."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ConfigError(f"--{dest.replace('_', '-')}={value}: must be >= 1")
