"""Teacher inputs and outputs for a joint image–text teacher (FLAVA): one sample per image–caption pair.

Each pair's image views are rendered as ``ImageFeeder`` renders them and its caption is tokenized as
``TextFeeder`` tokenizes it. Per pair and view the store gets the joint output (``pooled``) and, for MSD, the
teacher's output with the text removed (``pooled_without_text``: the image alone), with the image removed
(``pooled_without_image``: the caption alone) and the ``saliency`` of each modality,
``[1 − cos(t, t_¬image), 1 − cos(t, t_¬text)]``. How a modality is removed is the teacher's convention,
recorded in the store's ``teacher.removal``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.losses import SALIENCY_MODALITIES, msd_saliency
from mmkd_core.targets import recipe_targets

from .feeders import Extra, ImageFeeder, TextFeeder

# the order of the saliency array's last axis
OUTPUTS = ("pooled_without_text", "pooled_without_image", "saliency")


class JointFeeder(ImageFeeder):
    """Image views of each pair (``ImageFeeder``) with its tokenized caption (``TextFeeder``) beside them.

    The store's time axis is the caption's: ``input_ids`` (N, T) and ``lengths`` are the captions', as in a
    text store; the image's tokens are not stored (joint stores are pooled-only), ``view_params`` replay
    the views. The teacher's multimodal sequence length varies with the caption; nothing stored depends on it.
    """

    def __init__(self, dataset, teacher, n: int, views: int, seed: int, crop_scale, workers: int) -> None:
        if not hasattr(teacher, "forward_removed"):
            raise MmkdError(f"--teacher {teacher.name}: a joint teacher must say how it removes a modality")
        super().__init__(dataset, teacher, n, views, seed, crop_scale, workers)
        self.text = TextFeeder(dataset, teacher, n)
        self.pooled_dim: int | None = None

    def extra_attrs(self) -> dict[str, Any]:
        return {**super().extra_attrs(), "msd": {"saliency": list(SALIENCY_MODALITIES), "outputs": list(OUTPUTS)}}

    def time_steps(self, probe: dict) -> int:
        return self.text.time_steps(probe)

    def row_lengths(self, n: int, time_steps: int) -> np.ndarray:
        return self.text.lengths

    def extras(self) -> tuple[Extra, ...]:
        """The per-modality outputs, per (sample, view), float32."""
        if self.pooled_dim is None:
            raise RuntimeError("JointFeeder.extras: run targets() on the probe batch first (it fixes the width)")
        v, e = self.views, self.pooled_dim
        per_view = ("sample", "view", "pooled_channel")
        return (
            ("pooled_without_text", (v, e), "float32", per_view),
            ("pooled_without_image", (v, e), "float32", per_view),
            ("saliency", (v, len(SALIENCY_MODALITIES)), "float32", ("sample", "view", "modality")),
        )

    def _with_text(self, batch: dict[str, Any], positions: np.ndarray) -> dict[str, Any]:
        """``batch`` with each row's caption (a pair's views share it) beside its pixels."""
        text = self.text.rows_batch(positions)["inputs"]
        return {**batch, "inputs": {**batch["inputs"], **text}}

    def probe_batch(self) -> dict[str, Any]:
        return self._with_text(super().probe_batch(), np.array([0]))

    def batches(self, shards: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        for batch in super().batches(shards, batch_size):
            yield self._with_text(batch, batch["positions"])

    def targets(self, teacher, batch: dict[str, Any], recipe: dict, autocast: Callable) -> dict[str, Any]:
        """The joint output and the outputs with each modality removed, each through the store's recipe."""
        if recipe.get("tokens", True):
            raise MmkdError(
                f"--teacher {teacher.name}: a joint teacher's store is pooled-only (per-token targets of one "
                "image+caption sequence have no student counterpart); pass --pooled-only"
            )
        with autocast():  # the teacher only: the target statistics are taken in float32 outside autocast
            outs = teacher.forward_removed(**batch["inputs"])
        pooled = {k: recipe_targets(o.hidden_states, o.mask, o.embed, recipe)[1] for k, o in outs.items()}
        sal = msd_saliency(pooled["joint"], {"image": pooled["without_image"], "text": pooled["without_text"]})
        self.pooled_dim = int(pooled["joint"].shape[-1])
        return {
            "tokens": None,
            "pooled": pooled["joint"],
            "mask": outs["joint"].mask,
            "pooled_without_text": pooled["without_text"],
            "pooled_without_image": pooled["without_image"],
            "saliency": torch.stack([sal[m] for m in SALIENCY_MODALITIES], dim=-1),
        }

    def finish_shard(self, shard: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        return {
            **super().finish_shard(shard, lo, hi),
            "lengths": self.text.lengths[lo:hi],
            "input_ids": self.text.input_ids[lo:hi],
        }
