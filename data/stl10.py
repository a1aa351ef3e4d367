"""`stl10`: the binary release (``stl10_binary/{train,test,unlabeled}_X.bin``, ``_y.bin``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset, hash_files
from .files import check_index, check_split, need_root, read_lines, reject_options

log = logging.getLogger(__name__)

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE


class Stl10Dataset(BaseDataset):
    """STL-10 96x96 images, read one at a time from the ``_X.bin`` file; labels loaded at construction.

    Args:
        directory: The ``stl10_binary`` directory.
        split: "train", "test" or "unlabeled" (no labels).
    """

    name = "stl10"
    modality = "image"

    def __init__(self, directory: Path, split: str) -> None:
        self.directory, self.split = directory, split
        self.images_file = directory / f"{split}_X.bin"
        names_file = directory / "class_names.txt"
        for p in (self.images_file, names_file):
            if not p.is_file():
                raise MmkdError(f"dataset 'stl10': missing file {p}")
        self.classes = [line.strip() for _, line in read_lines(names_file) if line.strip()]
        size = os.path.getsize(self.images_file)
        if size % IMAGE_BYTES:
            raise MmkdError(f"{self.images_file}: {size} bytes is not a whole number of 3x96x96 images")
        self._count = size // IMAGE_BYTES
        if not self._count:
            raise MmkdError(f"{self.images_file}: empty file (0 images)")
        self.labels_file: Path | None = None
        self._labels: np.ndarray | None = None
        if split != "unlabeled":
            self.labels_file = directory / f"{split}_y.bin"
            if not self.labels_file.is_file():
                raise MmkdError(f"dataset 'stl10': missing file {self.labels_file}")
            labels = np.fromfile(self.labels_file, np.uint8).astype(np.int64) - 1  # stored as 1..10
            if len(labels) != self._count:
                raise MmkdError(f"{self.labels_file}: {len(labels)} labels for {self._count} images")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise MmkdError(f"{self.labels_file}: labels outside 1..{len(self.classes)}")
            self._labels = labels
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self._count

    def image(self, i: int):
        from PIL import Image

        i = check_index(self.name, i, self._count)
        with open(self.images_file, "rb") as f:
            f.seek(i * IMAGE_BYTES)
            raw = np.frombuffer(f.read(IMAGE_BYTES), np.uint8)
        # Each image is stored channel by channel in column-major order.
        return Image.fromarray(np.ascontiguousarray(raw.reshape(3, SIDE, SIDE).transpose(2, 1, 0)), "RGB")

    def label(self, i: int) -> int | None:
        i = check_index(self.name, i, self._count)
        return None if self._labels is None else int(self._labels[i])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = [self.images_file] + ([self.labels_file] if self.labels_file else [])
            self._fingerprint = hash_files(files, {"name": self.name, "split": self.split})
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "directory": str(self.directory)}


@DATASETS.register("stl10", "stl-10")
def stl10(root: str | None = None, split: str = "train", **options: Any) -> Stl10Dataset:
    """``root`` is ``stl10_binary`` or its parent."""
    reject_options("stl10", options)
    split = check_split("stl10", split, ("train", "test", "unlabeled"))
    path = need_root("stl10", root)
    directory = path / "stl10_binary" if (path / "stl10_binary").is_dir() else path
    return Stl10Dataset(directory, split)
