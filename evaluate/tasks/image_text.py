"""Image–text retrieval (``--task image-text``): image→text and text→image, R@1/5/10."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmkd_core.errors import MmkdError
from mmkd_core.metrics import image_text_retrieval

from ..encoders import Encoder
from .base import EVAL_TASKS, LazyImages, open_dataset

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "shapes"


def eval_image_text(
    encoder: Encoder,
    dataset: str = DEFAULT_DATASET,
    root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    *,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Image→text and text→image retrieval, R@1/5/10.

    Caption sets (COCO, Flickr30k: several captions per image) count any caption of the query image as an
    image→text hit. Datasets with one caption per sample (``shapes``) count any caption whose *text* equals
    the true one, since identical scenes get identical captions; text→image stays strict (the caption's
    own image).

    Args:
        encoder: A model that embeds both images and text.
        dataset: An image–caption dataset.
        root: Its file or directory (``shapes`` needs none).
        split: Split to evaluate.
        limit: Use only the first this many images (with all their captions).
        batch_size: Inputs per forward pass.
        dataset_options: Extra dataset options (e.g. ``{"count": 1000}`` for shapes).

    Returns:
        ``{dataset}/{split}/i2t_r{k}`` and ``t2i_r{k}`` for k in 1, 5, 10.
    """
    encoder.require("image", "image-text retrieval")
    encoder.require("text", "image-text retrieval")
    ds = open_dataset(dataset, root, split, dataset_options)
    if ds.modality != "image_text":
        raise MmkdError(f"image-text retrieval needs an image–caption dataset; {dataset!r} has {ds.modality} samples")
    if limit is not None and limit < 1:
        raise MmkdError(f"--limit {limit}: give a positive number of images")
    if hasattr(ds, "image_id"):
        keep = [i for i in range(len(ds)) if limit is None or ds.image_id(i) < limit]
        first: dict[int, int] = {}
        for i in keep:
            first.setdefault(ds.image_id(i), i)
        position = {image: k for k, image in enumerate(sorted(first))}
        image_samples = [first[image] for image in sorted(first)]
        owner = np.array([position[ds.image_id(i)] for i in keep])
        captions = [ds.text(i) for i in keep]
        caption_texts = None
    else:
        image_samples = list(range(min(len(ds), limit or len(ds))))
        owner = np.arange(len(image_samples))
        captions = caption_texts = [ds.text(i) for i in image_samples]
    img = encoder.encode_image(LazyImages(ds, image_samples), batch_size)
    txt = encoder.encode_text(captions, batch_size)
    logger.info("%s/%s: %d images, %d captions", dataset, ds.split, len(img), len(txt))
    out = image_text_retrieval(img, txt, owner, caption_texts=caption_texts)
    return {f"{dataset}/{ds.split}/{k}": v for k, v in out.items()}


@EVAL_TASKS.register("image-text")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """Each dataset of ``cfg`` in turn, on each of its splits (default ``test``)."""
    out: dict[str, float] = {}
    for name, root in cfg.dataset_roots(DEFAULT_DATASET):
        for split in cfg.splits or ["test"]:
            out.update(
                eval_image_text(
                    encoder,
                    name,
                    root,
                    split,
                    cfg.limit,
                    batch_size=cfg.batch_size,
                    dataset_options=cfg.dataset_options,
                )
            )
    return out
