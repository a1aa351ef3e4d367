"""`captions`: image-caption pairs from a tsv, a jsonl, a COCO captions json or a Karpathy-split json.

One sample per (image, caption) pair, grouped by image: ``image_id(i)`` is the index of sample i's
image among the distinct images, so retrieval can count any caption of an image as a hit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset, hash_files
from .files import check_index, need_root, open_rgb, read_lines, reject_options, sample_digest

log = logging.getLogger(__name__)

_SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
# Karpathy splits: "restval" is the part of COCO val2014 that the usual recipe trains on.
_KARPATHY = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}

Entries = list[tuple[str, str, str]]  # (image path, caption, where: "file:line" for error messages)


def _candidates(split: str) -> list[str]:
    return [
        f"{split}.tsv",
        f"{split}.jsonl",
        f"captions_{split}2017.json",
        f"captions_{split}2014.json",
        f"annotations/captions_{split}2017.json",
        f"annotations/captions_{split}2014.json",
        "dataset_coco.json",
        "dataset_flickr30k.json",
        "dataset_flickr8k.json",
    ]


def _find(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    tried = [root / c for c in _candidates(split)]
    for p in tried:
        if p.is_file():
            return p
    raise MmkdError(f"dataset 'captions': no {split} caption file found; looked for {', '.join(map(str, tried))}")


def _read_tsv(path: Path, base: Path) -> Entries:
    entries = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if lineno == 1 and [f.strip().lower() for f in fields] == ["image", "caption"]:
            continue
        if len(fields) != 2:
            raise MmkdError(f"{path}:{lineno}: expected 'image<TAB>caption', got {len(fields)} fields")
        entries.append((str(base / fields[0].strip()), fields[1], f"{path}:{lineno}"))
    return entries


def _read_jsonl(path: Path, base: Path) -> Entries:
    entries = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MmkdError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        obj = obj if isinstance(obj, dict) else {}
        image, caps = obj.get("image"), obj.get("caption", obj.get("captions"))
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(image, str) or not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise MmkdError(f'{path}:{lineno}: expected {{"image": str, "caption": str}}')
        entries += [(str(base / image), c, f"{path}:{lineno}") for c in caps]
    return entries


def _coco_dirs(path: Path, split: str) -> list[Path]:
    dirs = [path.parent]
    m = re.match(r"captions_([a-z]+)(\d{4})", path.stem)
    if m:
        dirs += [path.parent / f"{m[1]}{m[2]}", path.parent.parent / f"{m[1]}{m[2]}"]
    return dirs + [path.parent / "images"]


def _read_json(path: Path, split: str, images_dir: Path | None) -> Entries:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MmkdError(f"{path}: invalid JSON ({e})") from None
    try:
        if "annotations" in data:
            images = {im["id"]: im["file_name"] for im in data["images"]}
            by_image: dict[Any, list[tuple[str, str]]] = {k: [] for k in images}
            for k, ann in enumerate(data["annotations"]):
                if ann["image_id"] not in images:
                    raise MmkdError(f"{path}: annotation {k} refers to unknown image_id {ann['image_id']!r}")
                by_image[ann["image_id"]].append((ann["caption"], f"{path}: annotation {k}"))
            rel = [(images[i], c, w) for i, caps in by_image.items() for c, w in caps]
        else:
            wanted = _KARPATHY[split]
            rel = [
                (os.path.join(im.get("filepath", ""), im["filename"]), s["raw"], f"{path}: image {k}")
                for k, im in enumerate(data["images"])
                if im.get("split") in wanted
                for s in im["sentences"]
            ]
    except (KeyError, TypeError) as e:
        kind = "COCO captions or Karpathy split"
        raise MmkdError(f"{path}: not a {kind} json (missing or malformed entry {e})") from None
    if not rel:
        return []
    dirs = [images_dir] if images_dir is not None else _coco_dirs(path, split)
    base = next((d for d in dirs if (d / rel[0][0]).exists()), dirs[0])
    return [(str(base / r), c, w) for r, c, w in rel]


class CaptionsDataset(BaseDataset):
    """Image-caption pairs; see the module docstring.

    Args:
        path: The caption file (.tsv, .jsonl or .json).
        split: Split name; selects the images of a Karpathy json, else recorded.
        images_dir: Directory the json's image names are relative to (default: found next to the json).
    """

    name = "captions"
    modality = "image_text"

    def __init__(self, path: Path, split: str = "train", images_dir: str | None = None) -> None:
        self.path, self.split, self.images_dir = path, split, images_dir
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".txt"):
            entries = _read_tsv(path, path.parent)
        elif suffix == ".jsonl":
            entries = _read_jsonl(path, path.parent)
        elif suffix == ".json":
            entries = _read_json(path, split, Path(images_dir) if images_dir is not None else None)
        else:
            raise MmkdError(f"dataset 'captions': {path}: unknown format (expected .tsv, .jsonl or .json)")
        if not entries:
            raise MmkdError(f"dataset 'captions': {path} has no {split} captions")
        group: dict[str, int] = {}
        self._images: list[str] = []
        self._groups: list[int] = []
        self._captions: list[str] = []
        for image, cap, where in entries:
            if not isinstance(cap, str) or not cap.strip():
                raise MmkdError(f"{where}: empty caption")
            if image not in group:
                if not os.path.isfile(image):
                    problem = "is not a file" if os.path.exists(image) else "does not exist"
                    raise MmkdError(f"{where}: image {image} {problem}")
                group[image] = len(self._images)
                self._images.append(image)
            self._groups.append(group[image])
            self._captions.append(" ".join(cap.split()))
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._captions)

    @property
    def num_images(self) -> int:
        """Number of distinct images."""
        return len(self._images)

    def image_id(self, i: int) -> int:
        """Index of sample i's image among the distinct images (equal for all captions of an image)."""
        return self._groups[check_index(self.name, i, len(self._groups))]

    def image_path(self, i: int) -> str:
        """Sample i's image file."""
        return self._images[self.image_id(i)]

    def image(self, i: int):
        return open_rgb(self.image_path(i), self.path)

    def text(self, i: int) -> str:
        return self._captions[check_index(self.name, i, len(self._captions))]

    def fingerprint(self) -> str:
        """Bytes of the caption file plus path, size and ends of every image (``files.sample_digest``)."""
        if self._fingerprint is None:
            captions = hash_files([self.path], {"name": self.name, "split": self.split})
            self._fingerprint = sample_digest(self._images, self.path.parent, captions)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "num_images": self.num_images}


@DATASETS.register("captions", "coco", "flickr30k")
def captions(root: str | None = None, split: str = "train", **options: Any) -> CaptionsDataset:
    """``root`` is a caption file, or a directory holding ``{split}.tsv``/``.jsonl``/COCO/Karpathy json.

    Option ``images_dir``: where a json's image names are relative to.
    """
    images_dir = options.pop("images_dir", None)
    reject_options("captions", options)
    if split not in _SPLITS:
        raise MmkdError(f"dataset 'captions': unknown split {split!r}; known: train, val, test")
    split = _SPLITS[split]
    return CaptionsDataset(_find(need_root("captions", root), split), split, images_dir)
