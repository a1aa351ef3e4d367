"""mmkd-train: a student from a store of cached teacher targets (``train``), as one recipe (``TrainRecipe``).

What other stages use (mmkd-ablate trains, builds and scores many students with these).
"""

from __future__ import annotations

from typing import Any

from .build import build, student_kind, teacher_source
from .checkpoint import latest_checkpoint
from .config import STUDENT_CHOICES, TrainConfig
from .loop import train
from .recipe import TrainRecipe
from .report import TrainResult, plot_curves
from .resume import FREE_FIELDS, store_record
from .rundir import check_owned, mark_run
from .teachers import select_teachers

__all__ = [
    "FREE_FIELDS",
    "STUDENT_CHOICES",
    "TrainConfig",
    "TrainRecipe",
    "TrainResult",
    "build",
    "check_owned",
    "latest_checkpoint",
    "mark_run",
    "plot_curves",
    "select_teachers",
    "store_record",
    "student_kind",
    "teacher_source",
    "train",
    "train_command",
]


def train_command() -> Any:
    """mmkd-train's click command: its options, types and checks (mmkd-ablate parses its grid with them)."""
    import typer

    from . import cli  # imported late: ``python -m mmkd.train.cli`` (torchrun's ranks) must find it unimported

    return typer.main.get_command(cli.app)
