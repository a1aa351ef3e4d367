"""Zero-shot classification (``--task zero-shot``): each class is the mean embedding of its prompts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmkd_core.errors import MmkdError
from mmkd_core.metrics import DEFAULT_TEMPLATES, prompt_embeddings, zero_shot

from ..encoders import Encoder
from .base import EVAL_TASKS, LazyImages, class_labels, open_dataset, spread

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "shapes"


def eval_zero_shot(
    encoder: Encoder,
    dataset: str = DEFAULT_DATASET,
    root: str | None = None,
    split: str = "test",
    templates: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Zero-shot classification: each class is the mean embedding of its prompts (class names from
    ``classes``, underscores as spaces); an image's prediction is the most similar class.

    Args:
        encoder: A model that embeds both images and text.
        dataset: A labelled image dataset.
        root: Its file or directory.
        split: Split to evaluate.
        templates: Prompt templates with one ``{}``; default ``metrics.DEFAULT_TEMPLATES``.
        limit: Use this many samples, spread evenly over the split.
        batch_size: Inputs per forward pass.
        dataset_options: Extra dataset options.

    Returns:
        ``{dataset}/{split}/zero_shot_top1`` and ``zero_shot_top5``.
    """
    encoder.require("image", "zero-shot classification")
    encoder.require("text", "zero-shot classification")
    templates = list(templates or DEFAULT_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise MmkdError(f"zero-shot template {bad[0]!r}: needs exactly one {{}} for the class name")
    ds = open_dataset(dataset, root, split, dataset_options)
    indices = spread(len(ds), limit)
    labels = class_labels(ds, indices, dataset)
    names = [c.replace("_", " ") for c in ds.classes]
    prompts = [t.format(c) for c in names for t in templates]
    # encode every prompt in one call (batched), then let prompt_embeddings average them per class
    table = dict(zip(prompts, encoder.encode_text(prompts, batch_size), strict=True))
    class_emb = prompt_embeddings(lambda texts: np.stack([table[t] for t in texts]), names, templates)
    img = encoder.encode_image(LazyImages(ds, indices), batch_size)
    out = zero_shot(img, class_emb, labels)
    return {f"{dataset}/{ds.split}/zero_shot_{k}": v for k, v in out.items()}


@EVAL_TASKS.register("zero-shot")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """Each dataset of ``cfg`` in turn, on each of its splits (default ``test``)."""
    out: dict[str, float] = {}
    for name, root in cfg.dataset_roots(DEFAULT_DATASET):
        for split in cfg.splits or ["test"]:
            out.update(
                eval_zero_shot(
                    encoder,
                    name,
                    root,
                    split,
                    cfg.templates,
                    limit=cfg.limit,
                    batch_size=cfg.batch_size,
                    dataset_options=cfg.dataset_options,
                )
            )
    return out
