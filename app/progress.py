"""The progress display every stage uses.

In a terminal: a rich bar (description, bar, count, rate, elapsed, ETA) whose columns fit a 60-column
window. Anywhere else (a pipe, ``nohup … > log``, CI, a batch scheduler): one plain line every
``MMKD_PROGRESS_SECONDS`` seconds (default 30) and at the end, so a log file shows a run's progress.
Foreign progress bars (transformers, huggingface_hub) are switched off while ours runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
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
DEFAULT_SECONDS = 30.0


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = f" {self.unit}/s" if self.unit else "/s"
        return Text(f"{speed:,.1f}{unit}" if speed else f"-{unit}", style="cyan")


def silence_foreign_bars() -> None:
    """Switch off the tqdm bars of transformers and huggingface_hub (when loaded): they would mix with ours."""
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def interval_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("MMKD_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class LineProgress:
    """Plain progress lines for logs: ``description: 120/948 steps (13%), 4.1 steps/s, loss 0.41, eta 0:03:22``."""

    def __init__(self, description: str, total: int, completed: int, unit: str, fields: dict, every: float) -> None:
        self.description, self.total, self.unit, self.every = description, total, unit, every
        self.completed, self.start_completed = completed, completed
        self.fields = dict(fields)
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields) -> None:
        self.completed += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.line()

    def line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        done = self.completed - self.start_completed
        rate = done / elapsed if elapsed > 0 and done else 0.0
        pct = 100.0 * self.completed / self.total if self.total else 100.0
        parts = [
            f"{self.description}: {self.completed:,}/{self.total:,} {self.unit} ({pct:.0f}%)",
            f"{rate:,.1f} {self.unit}/s" if rate else f"- {self.unit}/s",
        ]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        if final:
            parts.append(f"{'done' if self.completed >= self.total else 'stopped'} in {_clock(elapsed)}")
        else:
            parts.append(f"eta {_clock((self.total - self.completed) / rate)}" if rate else "eta -")
        console.print(", ".join(parts), highlight=False, soft_wrap=True)


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
    placeholders in ``extra`` (and are printed as ``name value`` in plain lines)."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    silence_foreign_bars()
    if not console.is_terminal:
        lines = LineProgress(description, total, completed, unit, fields or {}, interval_seconds())
        lines.line()
        try:
            yield lines.advance
        finally:
            lines.line(final=True)
        return
    wide = console.width >= 100
    # a narrow window (down to 60 columns) gets a short name, a short bar and a rate without its unit
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=None if wide else 5),
        MofNCompleteColumn(),
        RateColumn(unit if wide else ""),
        *([TimeElapsedColumn()] if wide else []),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    name = description if wide else description[:14]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=total, completed=completed, **(fields or {}))

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
