"""`mrpc` and `qqp`: positive paraphrase pairs from GLUE tsv files or the original MRPC txt files.

Samples are sentences with both sides of a pair interleaved: sample 2k is pair k's first sentence,
sample 2k+1 its second, so retrieval queries one side against the other.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset, hash_files
from .files import check_index, need_root, read_lines, reject_options

log = logging.getLogger(__name__)

# The MRPC txt header starts with a UTF-8 BOM that was itself re-encoded as UTF-8 (mojibake).
_BOM_MOJIBAKE = "\u00ef\u00bb\u00bf"


@dataclass(frozen=True)
class _Format:
    columns: tuple[str, str, str]  # header names of label, sentence 1, sentence 2
    positions: tuple[int, int, int]  # their positions in a file without a header
    num_columns: int
    dirs: tuple[str, ...]  # subdirectories of root to look in
    files: dict[str, tuple[str, ...]]  # split -> file names to look for, in order


FORMATS = {
    "mrpc": _Format(
        ("quality", "#1 string", "#2 string"),
        (0, 3, 4),
        5,
        ("", "MRPC", "mrpc"),
        {
            "train": ("train.tsv", "msr_paraphrase_train.txt"),
            "dev": ("dev.tsv",),
            "test": ("test.tsv", "msr_paraphrase_test.txt"),
        },
    ),
    "qqp": _Format(
        ("is_duplicate", "question1", "question2"),
        (5, 3, 4),
        6,
        ("", "QQP", "qqp"),
        {"train": ("train.tsv",), "dev": ("dev.tsv",), "test": ("test.tsv",)},
    ),
}
_SPLITS = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}


def _find(name: str, root: Path, split: str) -> Path:
    if root.is_file():
        return root
    fmt = FORMATS[name]
    tried = [root / d / f for d in fmt.dirs for f in fmt.files[split]]
    for p in tried:
        if p.is_file():
            return p
    raise MmkdError(f"dataset {name!r}: no {split} file found; looked for {', '.join(map(str, tried))}")


def read_pairs(name: str, path: Path, max_pairs: int | None, strict: bool = True) -> list[tuple[str, str]]:
    """The positive pairs of a GLUE/MRPC file, in file order, at most ``max_pairs``.

    Args:
        name: "mrpc" or "qqp" (selects the columns).
        path: The tsv/txt file.
        max_pairs: Keep at most this many positive pairs (None: all).
        strict: Raise on a malformed line; when False, skip it and log how many were skipped.
    """
    fmt = FORMATS[name]
    lines = read_lines(path)
    # Fields are never quoted in these files but contain stray quote characters.
    rows = csv.reader((line for _, line in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    pairs: list[tuple[str, str]] = []
    positions, width, skipped = fmt.positions, fmt.num_columns, 0
    try:
        for row in rows:
            lineno = rows.line_num
            if lineno == 1 and row:
                header = [c.strip().lower() for c in row]
                header[0] = header[0].removeprefix(_BOM_MOJIBAKE)
                if not header[0].isdigit():
                    missing = [c for c in fmt.columns if c not in header]
                    if missing:
                        raise MmkdError(
                            f"{path}:1: header lacks column(s) {', '.join(missing)} (GLUE test files have no labels)"
                        )
                    positions = tuple(header.index(c) for c in fmt.columns)
                    width = len(header)
                    continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            label = row[positions[0]].strip() if len(row) == width else None
            if label not in ("0", "1"):
                problem = f"{len(row)} columns, expected {width}" if label is None else f"label {label!r}"
                if strict:
                    raise MmkdError(f"{path}:{lineno}: malformed line ({problem})")
                skipped += 1
                continue
            if label == "1":
                pairs.append((row[positions[1]].strip(), row[positions[2]].strip()))
                if max_pairs is not None and len(pairs) >= max_pairs:
                    break
    except csv.Error as e:
        raise MmkdError(f"{path}:{rows.line_num}: malformed line ({e})") from None
    if skipped:
        log.warning("%s: skipped %d malformed lines", path, skipped)
    if not pairs:
        raise MmkdError(f"dataset {name!r}: {path} has no positive pairs")
    return pairs


class ParaphraseDataset(BaseDataset):
    """Sentences of the positive pairs of a paraphrase corpus; see the module docstring for the order.

    Args:
        name: "mrpc" or "qqp".
        path: The file read.
        split: "train", "dev" or "test".
        max_pairs: Keep at most the first this many positive pairs (None: all).
        strict: Raise on a malformed line instead of skipping it.
    """

    modality = "text"

    def __init__(self, name: str, path: Path, split: str, max_pairs: int | None = 25000, strict: bool = True):
        if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
            raise MmkdError(f"dataset {name!r}: max_pairs must be a positive integer or None, got {max_pairs!r}")
        self.name = name  # one class serves both registry names
        self.path, self.split, self.max_pairs, self.strict = path, split, max_pairs, strict
        self._pairs = read_pairs(name, path, max_pairs, strict)
        log.debug("%s: %d positive pairs from %s", name, len(self._pairs), path)

    def __len__(self) -> int:
        return 2 * len(self._pairs)

    def text(self, i: int) -> str:
        i = check_index(self.name, i, len(self))
        return self._pairs[i // 2][i % 2]

    def pairs(self) -> list[tuple[str, str]]:
        """The positive pairs (sentence 1, sentence 2) in file order."""
        return list(self._pairs)

    def fingerprint(self) -> str:
        opts = {"name": self.name, "split": self.split, "max_pairs": self.max_pairs, "strict": self.strict}
        return hash_files([self.path], opts)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "path": str(self.path),
            "num_pairs": len(self._pairs),
            "options": {"max_pairs": self.max_pairs, "strict": self.strict},
        }


def _factory(name: str, root: str | None, split: str, options: dict[str, Any]) -> ParaphraseDataset:
    max_pairs = options.pop("max_pairs", 25000)
    strict = options.pop("strict", True)
    reject_options(name, options)
    if split not in _SPLITS:
        raise MmkdError(f"dataset {name!r}: unknown split {split!r}; known: train, dev, test")
    split = _SPLITS[split]
    return ParaphraseDataset(name, _find(name, need_root(name, root), split), split, max_pairs, strict)


@DATASETS.register("mrpc")
def mrpc(root: str | None = None, split: str = "train", **options: Any) -> ParaphraseDataset:
    """Microsoft Research Paraphrase Corpus. Options: ``max_pairs`` (25000), ``strict`` (True)."""
    return _factory("mrpc", root, split, options)


@DATASETS.register("qqp")
def qqp(root: str | None = None, split: str = "train", **options: Any) -> ParaphraseDataset:
    """GLUE Quora Question Pairs. Options: ``max_pairs`` (25000), ``strict`` (True)."""
    return _factory("qqp", root, split, options)
