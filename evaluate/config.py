"""What ``mmkd-eval`` runs: the evaluation's configuration, each option declared once as a field (its flag,
help and choices; ``mmkd-eval``'s command and ``--help`` are derived from it), written next to the results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.app.cli import choice, choices, did_you_mean
from mmkd.app.options import option
from mmkd.data import DATASETS
from mmkd_core.errors import MmkdError
from mmkd_core.teachers import TEACHERS

# importing the registry runs the tasks package, which registers every task first (no task module imports
# this one but for type checking): the task names are complete here
from .tasks.base import EVAL_TASKS


def model_name(flag: str) -> Callable[[str], str]:
    """A parser for an option that names a teacher or a directory: a near miss of a teacher's name that is
    no path is refused here, naming the teacher meant."""

    def parse(value: str) -> str:
        if value in TEACHERS or Path(value).expanduser().exists():
            return value
        names = TEACHERS.names()
        raise MmkdError(
            f"{flag} {value!r}: not a registered teacher{did_you_mean(value, names)} ({', '.join(names)}) "
            "and no such directory"
        )

    return parse


def _items(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma lists: ``--task a,b --task c`` -> [a, b, c]; none: None."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# the registries' names as the values' types: --help and completion list the names, the parsers decide
TeacherName = choices(TEACHERS.names())


@dataclass
class EvalConfig:
    """What ``mmkd-eval`` runs (written next to the results). Paraphrase evaluates all its datasets together
    (one ``mean``), the other dataset tasks each in turn; a task with no datasets given runs on its own
    default. Tasks, datasets and splits may be given as comma lists."""

    model: str = option(
        help=lambda: (
            f"Teacher name ({', '.join(TEACHERS.names())}), a training run directory (with student/) or a "
            "saved student directory."
        ),
        parser=model_name("--model"),
        metavar="NAME|DIR",
        type=TeacherName,
    )
    weights: str | None = option(None, help="Teacher checkpoint file or directory.")
    # empty: by what the model embeds (text: paraphrase; images: linear-probe; both: image-text and zero-shot)
    tasks: list[str] = option(
        list,
        flag="--task",
        repeat=True,
        parser=choice("--task", "task", EVAL_TASKS.in_order(), comma=True),
        metavar="TASK",
        type=choices(EVAL_TASKS.in_order()),
        help=lambda: (
            f"Task(s), repeatable or comma list: {', '.join(EVAL_TASKS.in_order())} (default: by what "
            "the model embeds)."
        ),
    )
    datasets: list[str] | None = option(
        None,
        flag="--dataset",
        repeat=True,
        parser=choice("--dataset", "dataset", DATASETS, comma=True),
        metavar="NAME",
        type=choices(DATASETS.names()),
        help=lambda: (
            f"Dataset(s), repeatable or comma list: {', '.join(DATASETS.names())} (default: mrpc for "
            "paraphrase, shapes otherwise)."
        ),
    )
    data_roots: list[str] | None = option(
        None,
        flag="--data-root",
        repeat=True,
        help="Data file or directory: one for all datasets, or one per dataset in order.",
    )
    splits: list[str] | None = option(
        None,
        flag="--split",
        aliases=("--splits",),
        repeat=True,
        help="Split(s) to evaluate (default: paraphrase: train and dev/test where present; others: test).",
    )
    train_split: str = option("train", help="Split the linear probe is fitted on.")
    limit: int | None = option(None, help="Use at most N pairs / images / samples per split.")
    batch_size: int = option(64, help="Inputs per forward pass.")
    teacher: str | None = option(
        None,
        parser=model_name("--teacher"),
        metavar="NAME|DIR",
        type=TeacherName,
        help="Reference model of the bias probe and of --task agreement (teacher name or directory).",
    )
    teacher_weights: str | None = option(None, help="Checkpoint of --teacher.")
    templates: list[str] | None = option(
        None, flag="--template", repeat=True, help="Zero-shot prompt template with {} (repeatable)."
    )
    dataset_options: dict[str, Any] = option(
        dict, flag="--dataset-option", keyvalue=True, help="Dataset option KEY=VALUE, e.g. count=1000 (repeatable)."
    )
    teacher_options: dict[str, Any] = option(
        dict, flag="--teacher-option", keyvalue=True, help="Option KEY=VALUE of the --model teacher (repeatable)."
    )
    tokenizer: str | None = option(None, help="Tokenizer directory for a student saved without one.")
    preprocess: dict[str, Any] = option(
        dict,
        keyvalue=True,
        help="Student image preprocessing override KEY=VALUE: size, mean, "
        "std, interpolation, crop_pct, crop_mode (repeatable).",
    )
    random_weights: bool = option(False, help="Random teacher weights (tests only).")
    device: str = option("cpu", help="torch device.")
    # None and a teacher: nothing is written
    out: Path | None = option(
        None, help="Directory for eval-<tasks>.json and plots (default: the run directory when --model is one)."
    )
    show_progress: bool = option(True, flag="--quiet/--no-quiet", invert=True, help="No progress bars.")

    def __post_init__(self) -> None:
        self.tasks = _items(self.tasks) or []
        self.datasets, self.splits = _items(self.datasets), _items(self.splits)
        self.data_roots, self.templates = self.data_roots or None, self.templates or None
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        if unknown:
            raise MmkdError(f"--task {unknown[0]!r}: choose from {', '.join(EVAL_TASKS.in_order())}")
        if len(set(self.tasks)) != len(self.tasks):
            raise MmkdError("--task: a task is listed twice")
        if self.batch_size < 1:
            raise MmkdError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MmkdError(f"--limit {self.limit}: must be at least 1")
        roots, datasets = self.data_roots or [], self.datasets or []
        if len(roots) > 1 and len(roots) != len(datasets):
            raise MmkdError(
                f"{len(roots)} --data-root for {len(datasets)} --dataset: give one root for all "
                "datasets or one per dataset, in the same order"
            )
        if self.teacher_weights and not self.teacher:
            raise MmkdError("--teacher-weights without --teacher")

    def dataset_roots(self, default: str) -> list[tuple[str, str | None]]:
        """(dataset, root) pairs a dataset task runs on; ``default`` is the task's dataset when none is given."""
        datasets = self.datasets or [default]
        roots = self.data_roots or [None]
        return [(d, roots[0] if len(roots) == 1 else roots[i]) for i, d in enumerate(datasets)]
