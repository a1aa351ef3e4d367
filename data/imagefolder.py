"""`imagefolder` (alias `imagenet`): images in one directory per class, ``root/split/class/*.jpg``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset
from .files import check_index, need_root, open_rgb, reject_options, sample_digest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Directory names that mean "this is a dataset root with splits", never a class.
_SPLIT_DIRS = {"train", "val", "valid", "validation", "test", "dev"}


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise MmkdError(f"dataset 'imagefolder': {root} is not a directory")
    if (root / split).is_dir():
        return root / split
    dirs = _subdirs(root)
    if dirs and not _SPLIT_DIRS & set(dirs):
        return root  # root itself holds the class directories
    found = ", ".join(dirs) or "no subdirectories"
    raise MmkdError(f"dataset 'imagefolder': no split directory {root / split} (found: {found})")


def _images(class_dir: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, fn))
    return found


class ImageFolderDataset(BaseDataset):
    """Images under ``directory/<class>/`` (searched recursively), labelled by sorted class name.

    Args:
        directory: The split's directory (holding one directory per class).
        split: Split name, recorded.
    """

    name = "imagefolder"
    modality = "image"

    def __init__(self, directory: Path, split: str) -> None:
        self.directory, self.split = directory, split
        self.classes = _subdirs(directory)
        if not self.classes:
            raise MmkdError(f"dataset 'imagefolder': {directory} has no class directories")
        self._files: list[str] = []
        labels: list[int] = []
        for k, cls in enumerate(self.classes):
            files = _images(directory / cls)
            if not files:
                log.warning("imagefolder: class directory %s has no images", directory / cls)
            self._files += [os.path.relpath(f, directory) for f in files]
            labels += [k] * len(files)
        if not self._files:
            raise MmkdError(f"dataset 'imagefolder': no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory}")
        self._labels = labels
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._files)

    def path(self, i: int) -> Path:
        """Sample i's image file."""
        return self.directory / self._files[check_index(self.name, i, len(self._files))]

    def image(self, i: int):
        return open_rgb(self.path(i))

    def label(self, i: int) -> int:
        return self._labels[check_index(self.name, i, len(self._labels))]

    def fingerprint(self) -> str:
        """Relative path, size and first and last 64 KiB of every image (see ``files.sample_digest``).

        This still reads up to 128 KiB per image (about a full pass over ImageNet's small JPEGs), so it
        is computed once per object, on first call.
        """
        if self._fingerprint is None:
            paths = (os.path.join(self.directory, f) for f in self._files)
            extra = {"name": self.name, "split": self.split, "classes": self.classes}
            self._fingerprint = sample_digest(paths, self.directory, extra)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "directory": str(self.directory), "num_classes": len(self.classes)}


@DATASETS.register("imagefolder", "imagenet")
def imagefolder(root: str | None = None, split: str = "train", **options: Any) -> ImageFolderDataset:
    """``root/split/<class>/*`` or, when ``root/split`` does not exist, ``root/<class>/*``."""
    reject_options("imagefolder", options)
    root_path = need_root("imagefolder", root)
    return ImageFolderDataset(_split_dir(root_path, split), split)
