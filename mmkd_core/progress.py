"""The rich progress bar both stages use: count, rate, elapsed and ETA."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


@contextlib.contextmanager
def progress_bar(
    description: str,
    total: int,
    completed: int = 0,
    unit: str = "samples",
    enabled: bool = True,
    extra: str = "",
    fields: dict | None = None,
) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n, **fields)``; ``fields`` (initial values given here) fill ``{task.fields[...]}``
    placeholders in ``extra``."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, **(fields or {}))

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
