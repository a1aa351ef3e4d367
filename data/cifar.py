"""`cifar10` and `cifar100`: the python pickle releases (``cifar-10-batches-py``, ``cifar-100-python``)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mmkd_core.errors import MmkdError

from .base import DATASETS, ArrayImageDataset, hash_files
from .files import check_split, need_root, reject_options

log = logging.getLogger(__name__)

_LAYOUT = {
    # name: (directory name, meta file, {split: batch files})
    "cifar10": (
        "cifar-10-batches-py",
        "batches.meta",
        {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]},
    ),
    "cifar100": ("cifar-100-python", "meta", {"train": ["train"], "test": ["test"]}),
}
# What the release pickles (Python 2, protocol 2) and numpy's own array pickles need; nothing that runs code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Hand-written on purpose: torchvision's CIFAR dataset calls pickle.load on the files, which runs any
    code a replaced file carries; this one resolves only the names the release needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys; any failure is an MmkdError naming the file."""
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise MmkdError(f"{path}: not a CIFAR python pickle ({e})") from None
    if not isinstance(d, dict):
        raise MmkdError(f"{path}: not a CIFAR python pickle (holds {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _field(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise MmkdError(f"{path}: missing entry {key!r} (found: {', '.join(map(str, d))})")
    return d[key]


def _names(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class CifarDataset(ArrayImageDataset):
    """CIFAR images (32x32 RGB) with labels.

    Pixel arrays are loaded (and checked) at construction and dropped when pickled; a DataLoader worker
    reloads them on its first ``image`` call, so sending the object to workers stays cheap.

    Args:
        name: "cifar10" or "cifar100".
        directory: The extracted release directory.
        split: "train" or "test".
        labels: CIFAR-100 only: "fine" (100 classes) or "coarse" (20 superclasses).
    """

    modality = "image"

    def __init__(self, name: str, directory: Path, split: str, labels: str = "fine") -> None:
        self.name, self.directory, self.split, self.label_kind = name, directory, split, labels
        _, meta_name, batches = _LAYOUT[name]
        self.files = [directory / b for b in batches[split]]
        self.meta_file = directory / meta_name
        for p in [self.meta_file, *self.files]:
            if not p.is_file():
                raise MmkdError(f"dataset {name!r}: missing file {p}")
        meta = load_pickle(self.meta_file)
        names_key = "label_names" if name == "cifar10" else f"{labels}_label_names"
        self.classes = _names(_field(meta, names_key, self.meta_file))
        self._images, self._labels = self._load()
        if not len(self._labels):
            raise MmkdError(f"dataset {name!r}: {', '.join(map(str, self.files))} hold no images")
        self._fingerprint: str | None = None

    def _load_images(self) -> np.ndarray:
        return self._load()[0]

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        labels_key = "labels" if self.name == "cifar10" else f"{self.label_kind}_labels"
        images, labels = [], []
        for p in self.files:
            d = load_pickle(p)
            data, y = _field(d, "data", p), _field(d, labels_key, p)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
                raise MmkdError(f"{p}: 'data' is not a uint8 (N, 3072) array")
            if data.shape[1] != 3072 or len(y) != data.shape[0]:
                raise MmkdError(f"{p}: 'data' has shape {data.shape} for {len(y)} labels, expected (N, 3072)")
            y = np.asarray(y, dtype=np.int64)
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise MmkdError(f"{p}: labels outside 0..{len(self.classes) - 1}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(y)
        return np.concatenate(images), np.concatenate(labels)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            extra = {"name": self.name, "split": self.split, "labels": self.label_kind}
            self._fingerprint = hash_files([self.meta_file, *self.files], extra)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "directory": str(self.directory), "num_classes": len(self.classes)}
        if self.name == "cifar100":
            out["options"] = {"labels": self.label_kind}
        return out


def _directory(name: str, root: str | None) -> Path:
    path = need_root(name, root)
    dirname, meta, _ = _LAYOUT[name]
    for d in (path, path / dirname):
        if (d / meta).is_file():
            return d
    raise MmkdError(f"dataset {name!r}: no {meta} in {path} or {path / dirname}")


@DATASETS.register("cifar10", "cifar-10")
def cifar10(root: str | None = None, split: str = "train", **options: Any) -> CifarDataset:
    """``root`` is ``cifar-10-batches-py`` or its parent."""
    reject_options("cifar10", options)
    split = check_split("cifar10", split, ("train", "test"))
    return CifarDataset("cifar10", _directory("cifar10", root), split)


@DATASETS.register("cifar100", "cifar-100")
def cifar100(root: str | None = None, split: str = "train", **options: Any) -> CifarDataset:
    """``root`` is ``cifar-100-python`` or its parent. Option ``labels``: "fine" (default) or "coarse"."""
    labels = options.pop("labels", "fine")
    reject_options("cifar100", options)
    split = check_split("cifar100", split, ("train", "test"))
    if labels not in ("fine", "coarse"):
        raise MmkdError(f"dataset 'cifar100': option labels must be 'fine' or 'coarse', got {labels!r}")
    return CifarDataset("cifar100", _directory("cifar100", root), split, labels)
