"""Tasks by name (`config.data.task`). Adding a task: one module implementing `fd_jax.tasks.base.Task`,
and one line here."""

from __future__ import annotations

from fd_jax.tasks.arithmetic import ArithmeticTask
from fd_jax.tasks.arithmetic_tools import ArithmeticToolsTask
from fd_jax.tasks.base import Task
from fd_jax.tasks.lean import LeanTask
from fd_jax.tasks.lean_agentic import LeanAgenticTask

TASKS: dict[str, Task] = {
    "arithmetic": ArithmeticTask(),  # exact integer arithmetic: the CPU test bed, no Lean
    "arithmetic_tools": ArithmeticToolsTask(),  # the test bed in episodes with a calculator tool
    "lean": LeanTask(),  # Lean 4 theorem proving (miniF2F, Lean Workbook, ...)
    "lean_agentic": LeanAgenticTask(),  # the same in episodes with Lean and Mathlib tools (the paper's environment)
}


def get_task(name: str) -> Task:
    """`TASKS[name]`; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {list(TASKS)}") from None


def prompt_format_names() -> tuple[str, ...]:
    """Every value `data.prompt_format` may take, over all tasks."""
    return tuple(dict.fromkeys(name for task in TASKS.values() for name in task.prompt_formats))


__all__ = ["TASKS", "Task", "get_task", "prompt_format_names"]
