"""Rich progress bars on stderr, shared by every long-running step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


def new_progress(fields: str = "", enabled: bool = True) -> Progress:
    """An unstarted rich `Progress` on stderr: description, bar, n/total, elapsed, remaining, then
    `fields`, a format string over a task's extra fields (e.g. "mse {task.fields[mse]:.4f}")."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    return Progress(*columns, console=stderr_console, disable=not enabled, transient=False)


@contextmanager
def progress_bar(
    description: str, total: float | None, enabled: bool = True, fields: str = ""
) -> Iterator[Progress]:
    """A started rich `Progress` with one task (id 0); `fields` is a format string over the task's
    extra fields (e.g. "mse {task.fields[mse]:.4f}"), shown after the bar."""
    progress = new_progress(fields, enabled)
    with progress:
        progress.add_task(description, total=total)
        yield progress
