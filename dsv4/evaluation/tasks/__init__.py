"""The evaluation tasks, in the order `python -m dsv4.evaluate` runs and prints them: name -> Task.

A task is one module here that defines TASK (dsv4/evaluation/tasks/base.py says what a Task holds); adding one
to TASKS gives it its --tasks name, its flags, its run, its table, its JSON entry and its W&B scalars.
"""

from __future__ import annotations

from dsv4.evaluation.tasks import passkey, positions, ppl, recall
from dsv4.evaluation.tasks.base import EvalContext, Flag, Task

TASKS: dict[str, Task] = {task.name: task for task in (ppl.TASK, positions.TASK, passkey.TASK, recall.TASK)}
DEFAULT_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.default)

__all__ = ["DEFAULT_TASKS", "TASKS", "EvalContext", "Flag", "Task"]
