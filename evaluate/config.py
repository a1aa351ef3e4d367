"""What ``mmkd-eval`` runs: the evaluation's configuration, written next to its results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .tasks.base import EVAL_TASKS


@dataclass
class EvalConfig:
    """What ``mmkd-eval`` runs (written next to the results).

    Attributes:
        model: Teacher name, training run directory or student directory (see ``load_encoder``).
        tasks: Any of the registered tasks (``mmkd.evaluate.TASKS``); empty: by what the model embeds (text:
            paraphrase; images: linear-probe; both: image-text and zero-shot).
        weights: Teacher checkpoint.
        random_weights: Random teacher weights (tests only).
        teacher_options: Teacher options.
        tokenizer: Tokenizer directory for a student saved without one.
        preprocess: ImagePreprocess fields overriding a student's recorded image preprocessing.
        datasets: Datasets of the dataset tasks; None: each task's default (mrpc; shapes). Paraphrase
            evaluates all of them together (one ``mean``), the other tasks each in turn.
        data_roots: One root for every dataset (a GLUE directory holds MRPC/ and QQP/), or one per dataset.
        splits: Splits to evaluate (the test splits of linear-probe); None: paraphrase's available ones, else
            ``test``.
        train_split: Split the linear probe is fitted on.
        limit: Pairs (paraphrase), images (image-text) or samples per split (classification) to use.
        batch_size: Inputs per forward pass.
        templates: Zero-shot prompt templates; None: ``metrics.DEFAULT_TEMPLATES``.
        dataset_options: Extra dataset options (e.g. ``{"count": 1000}`` for shapes).
        teacher: Reference model of the bias probe (teacher name or student/run directory).
        teacher_weights: Its checkpoint.
        device: Torch device.
        out: Directory for ``eval-<tasks>.json`` and plots; None: the run directory when ``model`` is one,
            else nothing is written.
        show_progress: Progress bars on stderr.
    """

    model: str
    tasks: list[str] = field(default_factory=list)
    weights: str | None = None
    random_weights: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None
    data_roots: list[str] | None = None
    splits: list[str] | None = None
    train_split: str = "train"
    limit: int | None = None
    batch_size: int = 64
    templates: list[str] | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    teacher_weights: str | None = None
    device: str = "cpu"
    out: Path | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
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
