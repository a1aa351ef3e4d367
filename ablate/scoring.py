"""The ablation's evaluation: ``--eval`` specs as the evaluation stage's tasks, each with its headline
number, scored through ``run_evaluation`` for the teacher, the init students and the runs alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.app.cli import did_you_mean
from mmkd.data import DATASETS
from mmkd.evaluate import RUN_TASKS, EvalConfig, check_run_task, run_evaluation
from mmkd_core.errors import MmkdError


@dataclass(frozen=True)
class EvalTask:
    """One ``--eval`` of the ablation: an evaluation-stage task and its headline number.

    Attributes:
        spec: As given, with the data path made absolute (what a finished run recorded).
        task: The evaluation stage's task (``paraphrase``, ``image-text``, ``zero-shot``, ``linear-probe``).
        dataset: Its dataset.
        root: The data's file or directory (None: the dataset needs none).
        label: Column prefix of the table (``mrpc``, ``retrieval``, ``zero-shot:cifar10``).
    """

    spec: str
    task: str
    dataset: str
    root: str | None
    label: str

    @property
    def headline_name(self) -> str:
        return HEADLINE_NAMES[self.task]


# the headline of each task: paraphrase retrieval the protocol's mean of its numbers (8 for MRPC's train and
# dev split: R@1, R@5 both ways), retrieval the mean R@1 of both directions, classification top-1
HEADLINE_NAMES = {"paraphrase": "mean", "image-text": "mean R@1", "zero-shot": "top-1", "linear-probe": "top-1"}
# ablation tasks beyond mmkd-train's (RUN_TASKS), as evaluation-stage task names: TASK:DATASET[:ROOT]
DATASET_TASKS = ("zero-shot", "linear-probe", "image-text")
# the tasks each student kind can be scored on
_KIND_TASKS = {
    "text": {"paraphrase"},
    "multimodal": {"paraphrase", "image-text", "zero-shot", "linear-probe"},
}
# mmkd-train's --eval retrieval: held-out shapes scenes with two objects each (what evaluate_run scores)
HELD_OUT = {"count": 1000, "min_objects": 2, "max_objects": 2}


def parse_eval(spec: str) -> EvalTask:
    """``retrieval``, ``mrpc:PATH``, ``qqp:PATH`` (mmkd-train's ``--eval``) or ``zero-shot:DATASET[:ROOT]``,
    ``linear-probe:DATASET[:ROOT]``, ``image-text:DATASET[:ROOT]`` (mmkd-eval's tasks)."""
    name, _, rest = spec.partition(":")
    if name in RUN_TASKS:
        check_run_task(spec)
        if name == "retrieval":
            return EvalTask(spec, "image-text", "shapes", None, "retrieval")
        root = str(Path(rest).expanduser().resolve())
        return EvalTask(f"{name}:{root}", "paraphrase", name, root, name)
    if name in DATASET_TASKS:
        dataset, _, root = rest.partition(":")
        if not dataset:
            raise MmkdError(f"--eval {spec!r}: give the dataset as {name}:DATASET[:ROOT]")
        if dataset not in DATASETS:
            known = DATASETS.names()
            raise MmkdError(
                f"--eval {spec!r}: unknown dataset {dataset!r}{did_you_mean(dataset, known)} "
                f"(known: {', '.join(known)})"
            )
        if root:
            if not Path(root).expanduser().exists():
                raise MmkdError(f"--eval {spec}: {root} does not exist")
            root = str(Path(root).expanduser().resolve())
        label = f"{name}:{dataset}"
        return EvalTask(f"{label}:{root}" if root else label, name, dataset, root or None, label)
    known = [*RUN_TASKS, *DATASET_TASKS]
    raise MmkdError(
        f"--eval {spec!r}: unknown task{did_you_mean(name, known)} (choose retrieval, mrpc:PATH, qqp:PATH, "
        "zero-shot:DATASET[:ROOT], linear-probe:DATASET[:ROOT] or image-text:DATASET[:ROOT])"
    )


def headline(task: EvalTask, metrics: Mapping[str, float]) -> float:
    """The task's headline number from its metrics (see HEADLINE_NAMES)."""
    if task.task == "paraphrase":
        values = list(metrics.values())
    elif task.task == "image-text":
        values = [v for k, v in metrics.items() if k.endswith(("/i2t_r1", "/t2i_r1"))]
    elif task.task == "zero-shot":
        values = [v for k, v in metrics.items() if k.endswith("/zero_shot_top1")]
    else:
        values = [v for k, v in metrics.items() if k.endswith("/linear_probe_top1")]
    if not values:
        raise MmkdError(f"--eval {task.spec}: the evaluation gave no {task.headline_name} ({sorted(metrics)})")
    return float(sum(values) / len(values))


def evaluate(
    model: str,
    tasks: Sequence[EvalTask],
    attrs: Mapping[str, Any],
    *,
    weights: str | None = None,
    teacher_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = False,
    errors_as_results: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score a model (a teacher name, or a student directory) on every task, through the evaluation stage's
    ``run_evaluation``: the teacher, the init students and the trained ones go through the same code.

    Returns:
        ``{label: {"metrics": {...}, "headline": float}}``; with ``errors_as_results`` a task the model
        cannot do (a text teacher on image-text retrieval) gives ``{"error": message}`` instead of raising.
    """
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        options: dict[str, Any] = {}
        splits = None
        if task.task != "paraphrase":
            splits = ["test"]
        if task.label == "retrieval":
            options = {**dict(attrs["dataset"].get("options") or {}), **HELD_OUT}
        cfg = EvalConfig(
            model=model,
            tasks=[task.task],
            weights=weights,
            teacher_options=dict(teacher_options or {}),
            datasets=[task.dataset],
            data_roots=[task.root] if task.root else None,
            splits=splits,
            dataset_options=options,
            device=device,
            show_progress=progress,
        )
        try:
            report = run_evaluation(cfg)
        except MmkdError as e:
            if not errors_as_results:
                raise
            out[task.label] = {"error": str(e)}
            continue
        metrics = {k: float(v) for k, v in report.results.items() if k != "mean"}
        out[task.label] = {"metrics": metrics, "headline": headline(task, metrics), "model": report.model}
    return out


def check_fits(tasks: Sequence[EvalTask], kind: str) -> None:
    """Refuse, before anything trains, a task the student kind cannot be scored on."""
    for t in tasks:
        if t.task not in _KIND_TASKS.get(kind, {"linear-probe"}):
            raise MmkdError(f"--eval {t.spec}: a {kind} student cannot be scored on {t.task}")
