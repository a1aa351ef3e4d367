"""`mnist` and `fashion-mnist`: the idx files (``train-images-idx3-ubyte[.gz]`` and friends)."""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mmkd_core.errors import MmkdError

from .base import DATASETS, ArrayImageDataset, hash_files
from .files import check_split, find_file, need_root, reject_options

log = logging.getLogger(__name__)

MNIST_CLASSES = [str(k) for k in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Where the Debian package dataset-fashion-mnist installs the files: the default root of fashion-mnist.
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise MmkdError(f"{path}: cannot read ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 idx file as an array, after checking its magic number and size against its header."""
    data = _read(path)
    if len(data) < 4 + 4 * ndim:
        raise MmkdError(f"{path}: too short for an idx file ({len(data)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        raise MmkdError(
            f"{path}: bad idx magic number 0x{data[:4].hex()} (expected 0x{_UBYTE:06x}{ndim:02x}: "
            f"unsigned bytes, {ndim} dimensions)"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise MmkdError(f"{path}: {len(data)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class IdxDataset(ArrayImageDataset):
    """Greyscale idx images (returned as RGB) with labels.

    Images are loaded and checked at construction and dropped when pickled; a DataLoader worker reloads
    them on its first ``image`` call.

    Args:
        name: "mnist" or "fashion-mnist".
        images_file: The idx3 images file (gzipped or not).
        labels_file: The idx1 labels file.
        split: "train" or "test".
        classes: Class names.
    """

    image_mode = "L"

    modality = "image"

    def __init__(self, name: str, images_file: Path, labels_file: Path, split: str, classes: list[str]):
        self.name, self.split, self.classes = name, split, classes
        self.images_file, self.labels_file = images_file, labels_file
        self._labels = read_idx(labels_file, 1)
        if not len(self._labels):
            raise MmkdError(f"{labels_file}: holds no samples (its header says 0)")
        self._images: np.ndarray | None = self._load_images()
        if self._labels.size and self._labels.max() >= len(classes):
            raise MmkdError(f"{labels_file}: labels outside 0..{len(classes) - 1}")
        self._fingerprint: str | None = None

    def _load_images(self) -> np.ndarray:
        images = read_idx(self.images_file, 3)
        if len(images) != len(self._labels):
            raise MmkdError(
                f"{self.images_file}: {len(images)} images but {self.labels_file} has {len(self._labels)} labels"
            )
        return images

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            extra = {"name": self.name, "split": self.split}
            self._fingerprint = hash_files([self.images_file, self.labels_file], extra)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "images_file": str(self.images_file), "labels_file": str(self.labels_file)}


def _create(name: str, root: Path, split: str, classes: list[str]) -> IdxDataset:
    dirs = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    p = _PREFIX[split]

    def names(kind: str, n: int) -> list[str]:
        base = [f"{p}-{kind}-idx{n}-ubyte", f"{p}-{kind}.idx{n}-ubyte"]
        return [b + ext for b in base for ext in ("", ".gz")]

    images = find_file(name, dirs, names("images", 3), f"{split} images file")
    labels = find_file(name, dirs, names("labels", 1), f"{split} labels file")
    return IdxDataset(name, images, labels, split, classes)


@DATASETS.register("mnist")
def mnist(root: str | None = None, split: str = "train", **options: Any) -> IdxDataset:
    """MNIST digits; ``root`` holds the idx files (also found under ``raw/`` or ``MNIST/raw/``)."""
    reject_options("mnist", options)
    split = check_split("mnist", split, ("train", "test"))
    return _create("mnist", need_root("mnist", root), split, MNIST_CLASSES)


@DATASETS.register("fashion-mnist", "fashion_mnist", "fashionmnist")
def fashion_mnist(root: str | None = None, split: str = "train", **options: Any) -> IdxDataset:
    """Fashion-MNIST; ``root`` defaults to the Debian package's /usr/share/datasets/fashion-mnist."""
    reject_options("fashion-mnist", options)
    split = check_split("fashion-mnist", split, ("train", "test"))
    if root is None:
        if not FASHION_DEBIAN_DIR.is_dir():
            raise MmkdError(
                "dataset 'fashion-mnist' needs a root, or the Debian package dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist) which installs into {FASHION_DEBIAN_DIR}"
            )
        root = str(FASHION_DEBIAN_DIR)
    return _create("fashion-mnist", need_root("fashion-mnist", root), split, FASHION_CLASSES)
