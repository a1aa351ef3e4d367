"""The interface every dataset implements, and the dataset registry."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np

from mmkd_core.errors import MmkdError
from mmkd_core.registry import Registry

DATASETS: Registry = Registry("dataset")

# Modalities a dataset can have. "image_text" samples have both an image and a caption.
MODALITIES = ("image", "text", "image_text")


class BaseDataset:
    """A dataset of samples addressed by position 0..len-1.

    Subclasses set ``name``, ``split``, ``modality`` and implement ``__len__``, ``fingerprint`` and
    whichever of ``image``/``text``/``label`` their modality has. Objects are cheap to pickle (they hold
    paths and small lists, never open file handles), so they can be sent to DataLoader workers.

    Attributes:
        name: Registry name of the adapter ("mrpc", "cifar10", ...).
        split: Split name ("train", "test", "dev", ...).
        modality: One of MODALITIES.
        classes: Class names indexed by label, or None when the dataset has no labels.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    split: str = "train"
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int):
        """Sample i's image as an RGB ``PIL.Image.Image``."""
        raise MmkdError(f"dataset {self.name!r} has no images")

    def text(self, i: int) -> str:
        """Sample i's text (sentence or caption)."""
        raise MmkdError(f"dataset {self.name!r} has no text")

    def label(self, i: int) -> int | None:
        """Sample i's class index, or None."""
        return None

    def fingerprint(self) -> str:
        """A hex digest that changes whenever the content (files, options, split) changes."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in a store's provenance (name, split, options, size)."""
        return {"name": self.name, "split": self.split, "num_samples": len(self)}


class ArrayImageDataset(BaseDataset):
    """A labelled image dataset whose pixels fit in one uint8 array (MNIST, CIFAR).

    Subclasses set ``_labels`` (and may set ``_images``) in their constructor and implement
    ``_load_images``. The pixels are dropped when the object is pickled and reloaded on first use, so
    DataLoader workers receive a small object.
    """

    _images: np.ndarray | None = None
    _labels: np.ndarray
    image_mode = "RGB"  # PIL mode of the stored array; images are returned as RGB

    def _load_images(self) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self._labels)

    def image(self, i: int):
        from PIL import Image

        from .files import check_index

        i = check_index(self.name, i, len(self._labels))
        if self._images is None:
            self._images = self._load_images()
        return Image.fromarray(np.ascontiguousarray(self._images[i]), self.image_mode).convert("RGB")

    def label(self, i: int) -> int:
        from .files import check_index

        return int(self._labels[check_index(self.name, i, len(self._labels))])


def create_dataset(name: str, root: str | None = None, split: str = "train", **options: Any) -> BaseDataset:
    """Build a registered dataset.

    Args:
        name: Registry name or alias ("imagenet" is "imagefolder").
        root: Directory or file holding the data; datasets that generate their data ignore it.
        split: Which split to read.
        **options: Adapter-specific options (e.g. ``count``, ``seed``, ``resolution`` for ``shapes``).
    """
    factory = DATASETS.get(name)
    return factory(root=root, split=split, **options)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)


def hash_files(paths, extra: Any = None) -> str:
    """sha256 over the bytes of the given files (in order) and a JSON-able ``extra``."""
    import json

    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode().rsplit(b"/", 1)[-1])
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()
