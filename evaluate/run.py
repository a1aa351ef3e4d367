"""What training asks of evaluation at the end of a run: the tasks ``mmkd-train --eval`` names, scored on
the run's exported student as users load it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .encoders import Encoder, load_encoder
from .tasks.image_text import eval_image_text
from .tasks.paraphrase import eval_paraphrase

HELD_OUT_SCENES = 1000


def _held_out_retrieval(encoder: Encoder, name: str, root: str, store_attrs: dict[str, Any]) -> dict[str, float]:
    """Image–caption retrieval on held-out shapes scenes with two objects each, drawn as the store's were."""
    options = dict(store_attrs["dataset"].get("options") or {})
    options.update(count=HELD_OUT_SCENES, min_objects=2, max_objects=2)
    return eval_image_text(encoder, "shapes", split="test", dataset_options=options)


def _paraphrase(encoder: Encoder, name: str, root: str, store_attrs: dict[str, Any]) -> dict[str, float]:
    """Zero-shot paraphrase retrieval on the dataset ``name`` under ``root``."""
    return eval_paraphrase(encoder, name, root)


# each --eval task (the name before any ":PATH") and how it is scored
_RUNNERS: dict[str, Callable[[Encoder, str, str, dict[str, Any]], dict[str, float]]] = {
    "retrieval": _held_out_retrieval,
    "mrpc": _paraphrase,
    "qqp": _paraphrase,
}
RUN_TASKS = tuple(_RUNNERS)


def check_run_task(task: str) -> None:
    """Refuse an ``--eval`` task before training starts, not after the run (a typo would cost the run)."""
    name, sep, root = task.partition(":")
    if name not in RUN_TASKS:
        raise MmkdError(f"--eval {task!r}: choose retrieval, mrpc:PATH or qqp:PATH")
    if name in ("mrpc", "qqp"):
        if not root:
            raise MmkdError(f"--eval {task}: give the data as {name}:PATH")
        if not Path(root).exists():
            raise MmkdError(f"--eval {task}: {root} does not exist")
    elif sep:
        raise MmkdError(f"--eval {task!r}: retrieval takes no path")


def default_run_tasks(student_kind: str, store_attrs: dict[str, Any]) -> list[str]:
    """Held-out image–caption retrieval for a multimodal student trained on shapes; nothing otherwise."""
    return ["retrieval"] if student_kind == "multimodal" and store_attrs["dataset"]["name"] == "shapes" else []


def evaluate_run(
    run_dir: str | Path, store_attrs: dict[str, Any], tasks: list[str], show_progress: bool = False
) -> dict[str, float]:
    """Score the run's exported student. Tasks: ``retrieval`` (held-out shapes scenes with two objects each,
    drawn as the store's scenes were), ``mrpc:PATH`` / ``qqp:PATH`` (zero-shot paraphrase retrieval)."""
    for task in tasks:
        check_run_task(task)
    encoder = load_encoder(str(run_dir))
    encoder.show_progress = show_progress
    results: dict[str, float] = {}
    for task in tasks:
        name, _, root = task.partition(":")
        results.update(_RUNNERS[name](encoder, name, root, store_attrs))
    return results
