"""Progress on stderr, shared by every long-running step: a live rich bar on a terminal, otherwise
(a log file, a pipe) one plain line every `SAE_CIRCUITS_PROGRESS_INTERVAL` seconds (default 30)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)

INTERVAL_VARIABLE = "SAE_CIRCUITS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def new_progress(fields: str = "", enabled: bool = True) -> Progress:
    """An unstarted `Progress` on stderr: description, bar, n/total, elapsed, remaining, then
    `fields`, a format string over a task's extra fields (e.g. "mse {task.fields[mse]:.4f}").
    When stderr is not a terminal, it prints periodic plain lines instead of the bar."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    if enabled and not stderr_console.is_terminal:
        return _LoggedProgress(fields, _interval(), *columns, console=stderr_console)
    return Progress(*columns, console=stderr_console, disable=not enabled, transient=False)


@contextmanager
def progress_bar(
    description: str, total: float | None, enabled: bool = True, fields: str = ""
) -> Iterator[Progress]:
    """A started `Progress` (see `new_progress`) with one task (id 0); `fields` is a format string
    over the task's extra fields (e.g. "mse {task.fields[mse]:.4f}"), shown after the bar."""
    progress = new_progress(fields, enabled)
    with progress:
        progress.add_task(description, total=total)
        yield progress


def _interval() -> float:
    text = os.environ.get(INTERVAL_VARIABLE, "")
    try:
        return max(float(text), 0.0) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


class _LoggedProgress(Progress):
    """A `Progress` without live display that prints `description: n/total (pct), rate/s, ETA,
    fields` for each task at most every `interval` seconds, and once more when the task ends."""

    def __init__(self, fields: str, interval: float, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, disable=True, **kwargs)
        self.fields, self.interval = fields, interval
        self.printed: dict[TaskID, tuple[float, float | None]] = {}  # time, completed

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def stop(self) -> None:
        for task_id in self.task_ids:
            self._maybe_print(task_id, final=True)
        super().stop()

    def _maybe_print(self, task_id: TaskID, final: bool = False) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        last, last_completed = self.printed.get(task_id, (-float("inf"), None))
        due = now - last >= self.interval or (task.finished and last_completed != task.completed)
        if not (due or (final and last_completed != task.completed)):
            return
        self.printed[task_id] = (now, task.completed)
        self.console.print(self._line(task), markup=False, highlight=False, soft_wrap=True)

    def _line(self, task: Any) -> str:
        total = f"/{task.total:g}" if task.total else ""
        share = f" ({task.completed / task.total:.0%})" if task.total else ""
        parts = [f"{task.description}: {task.completed:g}{total}{share}"]
        speed = task.finished_speed or task.speed
        if speed:
            parts.append(f"{speed:.3g}/s")
        if task.time_remaining is not None and not task.finished:
            parts.append(f"ETA {_duration(task.time_remaining)}")
        parts.append(f"elapsed {_duration(task.finished_time or task.elapsed or 0.0)}")
        if self.fields:
            text = self.fields.format(task=task)
            if text:
                parts.append(text)
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
