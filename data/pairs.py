"""The images of an image–caption dataset, one sample per distinct image, and which image each caption shows.

An image teacher runs once per image and view, not once per caption (COCO has five captions per image): a
pair store's sample axis is the images (``PairImages``) and its captions live beside them, each pointing at
its image's row (``caption_images``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from mmkd_core.errors import MmkdError

from .base import BaseDataset


def caption_images(dataset: BaseDataset) -> np.ndarray:
    """(M,) int64: the image number of each caption (sample) of ``dataset``, numbered by first appearance.

    Datasets with several captions per image say which image a caption shows (``image_id``); in the others
    every sample is its own image.
    """
    if dataset.modality != "image_text":
        raise MmkdError(f"dataset {dataset.name!r} has no image–caption pairs ({dataset.modality} data)")
    if not hasattr(dataset, "image_id"):
        return np.arange(len(dataset), dtype=np.int64)
    number: dict[Any, int] = {}  # image id -> image number, by first appearance
    return np.array([number.setdefault(dataset.image_id(i), len(number)) for i in range(len(dataset))], dtype=np.int64)


class PairImages(BaseDataset):
    """The distinct images of an image–caption dataset; image j is the one its caption rows point at.

    Args:
        pairs: The image–caption dataset (one sample per caption).
    """

    modality = "image"

    def __init__(self, pairs: BaseDataset) -> None:
        self.pairs = pairs
        self.name = pairs.name  # type: ignore[misc]
        self.split = pairs.split
        self.classes = pairs.classes
        self.image_of_caption = caption_images(pairs)
        n = int(self.image_of_caption.max()) + 1 if len(self.image_of_caption) else 0
        self._first = np.full(n, -1, dtype=np.int64)
        for i in range(len(self.image_of_caption) - 1, -1, -1):
            self._first[self.image_of_caption[i]] = i

    def __len__(self) -> int:
        return len(self._first)

    def first_caption(self, j: int) -> int:
        """The position in the pair dataset of image j's first caption."""
        if not 0 <= j < len(self._first):
            raise MmkdError(f"dataset {self.name!r}: image {j} is out of range (it has {len(self._first)} images)")
        return int(self._first[j])

    def image(self, j: int):
        return self.pairs.image(self.first_caption(j))

    def label(self, j: int) -> int | None:
        return self.pairs.label(self.first_caption(j))

    def fingerprint(self) -> str:
        """The pair dataset's fingerprint, marked as its images."""
        return hashlib.sha256(f"{self.pairs.fingerprint()}:images".encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {**self.pairs.describe(), "unit": "image", "num_images": len(self), "num_captions": len(self.pairs)}
