"""Small file helpers shared by the adapters: option checks, file lookup, line reading, image opening."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError

# Bytes read from each end of an image file by ``sample_digest``.
EDGE_BYTES = 64 * 1024

SPLIT_ALIASES = {"validation": "val", "valid": "val"}


class SampleIndexError(MmkdError, IndexError):
    """A sample index outside 0..len-1 (an MmkdError that ``except IndexError`` also catches)."""


def check_index(name: str, i: int, n: int) -> int:
    """``i`` as an int in 0..n-1 (negative indices are not wrapped), else SampleIndexError."""
    i = int(i)
    if not 0 <= i < n:
        raise SampleIndexError(f"dataset {name!r}: sample {i} out of range 0..{n - 1}")
    return i


def reject_options(name: str, options: dict[str, Any]) -> None:
    """Raise MmkdError when a factory got options it does not know."""
    if options:
        raise MmkdError(f"dataset {name!r}: unknown option(s) {', '.join(sorted(options))}")


def check_split(name: str, split: str, allowed: Sequence[str]) -> str:
    """Normalise split aliases ("validation" -> "val") and reject unknown splits."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in allowed:
        raise MmkdError(f"dataset {name!r}: unknown split {split!r}; known: {', '.join(allowed)}")
    return split


def need_root(name: str, root: str | os.PathLike | None) -> Path:
    """``root`` as an existing Path, or MmkdError."""
    if root is None:
        raise MmkdError(f"dataset {name!r} needs a root (the data's file or directory)")
    path = Path(root).expanduser()
    if not path.exists():
        raise MmkdError(f"dataset {name!r}: {path} does not exist")
    return path


def find_file(name: str, dirs: Iterable[Path], filenames: Sequence[str], what: str) -> Path:
    """The first ``dir/filename`` that is a file; else an error listing everything looked for."""
    tried = []
    for d in dirs:
        for fn in filenames:
            p = d / fn
            if p.is_file():
                return p
            tried.append(str(p))
    raise MmkdError(f"dataset {name!r}: no {what} found; looked for {', '.join(tried)}")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without the newline), decoding UTF-8 line by line.

    A UTF-8 byte-order mark on the first line is removed. Decoding errors name the file and line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MmkdError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MmkdError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def sample_digest(paths: Iterable[str | os.PathLike], base: str | os.PathLike, extra: Any = None) -> str:
    """sha256 over each file's path relative to ``base``, its size, and its first and last 64 KiB.

    Hashing every byte of an ImageNet-sized folder takes hours; the ends of a file change whenever an
    image is re-encoded or replaced, and the size catches most other edits. An edit confined to the
    middle of a large file that keeps its size is not detected.

    This pass runs before anything is written, so it also refuses empty (0-byte) and unreadable files:
    an extraction would otherwise stop at them midway.
    """
    import json

    h = hashlib.sha256()
    base = os.fspath(base)
    for p in paths:
        p = os.fspath(p)
        try:
            size = os.path.getsize(p)
            if size == 0:
                raise MmkdError(f"{p}: empty file (0 bytes)")
            h.update(f"{os.path.relpath(p, base)}\0{size}\0".encode())
            with open(p, "rb") as f:
                h.update(f.read(EDGE_BYTES))
                if size > 2 * EDGE_BYTES:
                    f.seek(size - EDGE_BYTES)
                    h.update(f.read(EDGE_BYTES))
                elif size > EDGE_BYTES:
                    h.update(f.read())
        except OSError as e:
            raise MmkdError(f"{p}: cannot read ({e.strerror or e})") from None
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


# 16-bit greyscale (PNG, TIFF): PIL's convert("RGB") clips these to 255 instead of scaling them
_WIDE_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(im):
    """Any PIL image as a new 8-bit RGB image: greyscale, palette, CMYK, alpha (dropped), 16-bit greyscale."""
    from PIL import Image

    if im.mode in _WIDE_GREY:
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # what PIL asks for; converting such palettes to RGB directly warns
    return im.convert("RGB")


def open_rgb(path: str | os.PathLike, listed_in: str | os.PathLike | None = None):
    """Open an image file as an RGB ``PIL.Image``; unreadable files are an MmkdError naming them (and
    ``listed_in``, the file that listed them)."""
    import struct
    import zlib

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: a truncated one fails here, naming it
            return to_rgb(im)
    # PIL's decoders report damage as any of these; DecompressionBombError: a file claiming huge dimensions
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
        zlib.error,
        Image.DecompressionBombError,
    ) as e:
        where = f" (listed in {listed_in})" if listed_in else ""
        raise MmkdError(f"cannot read image {path}{where}: {e}") from None
