"""Variants of mmkd-train's recipe that the benchmarks and tests measure the cache against; none of them is
a production option.

- ``InMemoryRecipe``: reads the whole store into RAM before the first step, instead of streaming it.
- ``OnlineTeacherRecipe``: computes every batch's targets with the teacher, run on the batch's own inputs
  (the replayed views or token ids the store supplies), instead of reading the stored ones: what caching
  replaces.
"""

from __future__ import annotations

from typing import Any

import torch

from mmkd.train.config import TrainConfig
from mmkd.train.loop import run  # noqa: F401  (the benchmarks run their variants with it)
from mmkd.train.recipe import TrainRecipe
from mmkd_core.targets import recipe_targets

INPUT_ARRAYS = ("lengths", "input_ids", "view_params", "index")  # the store's inputs, without its targets


class InMemoryRecipe(TrainRecipe):
    def dataset_for(self, remainder: str, **options: Any):
        return super().dataset_for(remainder, in_memory=True, **options)


class OnlineTeacherRecipe(TrainRecipe):
    def __init__(self, cfg: TrainConfig, teacher, given: set[str] | None = None) -> None:
        super().__init__(cfg, given)
        self.teacher = teacher

    def dataset_for(self, remainder: str, **options: Any):
        return super().dataset_for(remainder, names=INPUT_ARRAYS, **options)

    def batch_targets(self, batch: dict[str, Any]) -> dict[str, Any]:
        return live_targets(self.teacher, batch, self.reader.attrs["recipe"])


def live_targets(teacher, batch: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The batch with its targets computed by ``teacher`` on the batch's own inputs (replayed views or
    token ids) instead of read from the store."""
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask") if k in batch}
    with torch.inference_mode():
        out = teacher(**inputs)
        tokens, pooled = recipe_targets(out.hidden_states, out.mask, out.embed, recipe)
    live = dict(batch, pooled=pooled.clone())
    if tokens is not None:
        live["tokens"] = tokens.clone()
    return live
