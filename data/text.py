"""`text`: a plain text file with one sentence per line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset, hash_files
from .files import check_index, need_root, read_lines, reject_options

log = logging.getLogger(__name__)


def _resolve(root: Path) -> Path:
    if root.is_file():
        return root
    txts = sorted(p for p in root.glob("*.txt") if p.is_file())
    if len(txts) != 1:
        found = ", ".join(p.name for p in txts) or "none"
        raise MmkdError(f"dataset 'text': {root} must hold exactly one .txt file (found: {found})")
    return txts[0]


class TextDataset(BaseDataset):
    """Sentences of a UTF-8 text file, one per line; lines are stripped and empty lines skipped.

    Args:
        path: The text file.
        split: Recorded as given; a text file has no splits of its own.
    """

    name = "text"
    modality = "text"

    def __init__(self, path: Path, split: str = "train") -> None:
        self.path = path
        self.split = split
        self._lines = [s for _, line in read_lines(path) if (s := line.strip())]
        if not self._lines:
            raise MmkdError(f"dataset 'text': {path} has no non-empty lines")
        log.debug("text: %d sentences from %s", len(self._lines), path)

    def __len__(self) -> int:
        return len(self._lines)

    def text(self, i: int) -> str:
        return self._lines[check_index(self.name, i, len(self._lines))]

    def fingerprint(self) -> str:
        return hash_files([self.path], {"name": self.name, "split": self.split})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path)}


@DATASETS.register("text")
def text(root: str | None = None, split: str = "train", **options: Any) -> TextDataset:
    """``root`` is the text file, or a directory holding exactly one .txt file."""
    reject_options("text", options)
    return TextDataset(_resolve(need_root("text", root)), split)
