"""What every evaluation task shares: the task registry, and the samples a task embeds.

A task is one module of this package that registers a runner ``run(encoder, cfg, out_dir)`` under its
``--task`` name; the runner evaluates every dataset and split ``cfg`` asks for and returns a flat
``{key: float}`` dict (see :mod:`mmkd.evaluate.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmkd.data import BaseDataset, create_dataset
from mmkd_core.errors import MmkdError
from mmkd_core.registry import Registry


class TaskRegistry(Registry):
    """A registry that also keeps its names in the order they were registered: the order ``--help`` and
    errors list the tasks in (the package imports the task modules in that order)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self._order: list[str] = []

    def register(self, name: str, *aliases: str) -> Callable[[Callable], Callable]:
        """Decorator registering a task's runner under ``name``."""
        deco = super().register(name, *aliases)

        def remember(fn: Callable) -> Callable:
            fn = deco(fn)
            self._order.append(name)
            return fn

        return remember

    def in_order(self) -> tuple[str, ...]:
        """The registered names, in the order they were registered."""
        return tuple(self._order)


EVAL_TASKS = TaskRegistry("task")


class LazyImages(Sequence):
    """Images of chosen samples of a dataset, decoded only when indexed (one batch at a time)."""

    def __init__(self, dataset: BaseDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset.image(self.indices[i])


def open_dataset(name: str, root: str | None, split: str, options: dict[str, Any] | None) -> BaseDataset:
    """The dataset ``name`` (its split under ``root``), with extra dataset options."""
    return create_dataset(name, root, split, **(options or {}))


def spread(n: int, limit: int | None) -> list[int]:
    """``limit`` sample indices spread evenly over 0..n-1 (all when no limit): folder-ordered datasets
    keep every class in a subset."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise MmkdError(f"--limit {limit}: give a positive number of samples")
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def class_labels(dataset: BaseDataset, indices: Sequence[int], name: str) -> np.ndarray:
    """The class labels of the chosen samples; a dataset without labels is an error."""
    labels = [dataset.label(i) for i in indices]
    if dataset.classes is None or any(y is None for y in labels):
        raise MmkdError(f"dataset {name!r} ({dataset.split}) has no class labels to evaluate against")
    return np.array(labels, dtype=np.int64)
