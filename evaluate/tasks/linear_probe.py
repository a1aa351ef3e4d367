"""Linear probe (``--task linear-probe``): logistic regression on frozen image embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmkd_core.errors import MmkdError
from mmkd_core.metrics import linear_probe

from ..encoders import Encoder
from .base import EVAL_TASKS, LazyImages, class_labels, open_dataset, spread

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "shapes"


def eval_linear_probe(
    encoder: Encoder,
    dataset: str = DEFAULT_DATASET,
    root: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    limit: int | None = None,
    *,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
    epochs: int = 100,
) -> dict[str, float]:
    """Linear probe: logistic regression on frozen image embeddings of ``train_split``, accuracy on
    ``test_split``.

    Args:
        encoder: A model that embeds images.
        dataset: A labelled image dataset.
        root: Its file or directory.
        train_split: Split the probe is fitted on.
        test_split: Split it is scored on.
        limit: Use this many samples of each split, spread evenly over it.
        batch_size: Images per forward pass.
        dataset_options: Extra dataset options.
        epochs: L-BFGS iterations.

    Returns:
        ``{dataset}/{test_split}/linear_probe_top1``.
    """
    encoder.require("image", "linear probe")
    feats, labels, splits = [], [], []
    for split in (train_split, test_split):
        ds = open_dataset(dataset, root, split, dataset_options)
        indices = spread(len(ds), limit)
        labels.append(class_labels(ds, indices, dataset))
        feats.append(encoder.encode_image(LazyImages(ds, indices), batch_size))
        splits.append(ds.split)
    if splits[0] == splits[1]:
        raise MmkdError(f"linear probe: train and test split are both {splits[0]!r}; pick two different splits")
    acc = linear_probe(feats[0], labels[0], feats[1], labels[1], epochs=epochs)
    return {f"{dataset}/{splits[1]}/linear_probe_top1": acc}


@EVAL_TASKS.register("linear-probe")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """Each dataset of ``cfg`` in turn, fitted on ``cfg.train_split`` and scored on each of its splits
    (default ``test``)."""
    out: dict[str, float] = {}
    for name, root in cfg.dataset_roots(DEFAULT_DATASET):
        for split in cfg.splits or ["test"]:
            out.update(
                eval_linear_probe(
                    encoder,
                    name,
                    root,
                    cfg.train_split,
                    split,
                    cfg.limit,
                    batch_size=cfg.batch_size,
                    dataset_options=cfg.dataset_options,
                )
            )
    return out
