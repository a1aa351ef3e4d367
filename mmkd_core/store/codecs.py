"""The store's compressors: the ``--codec`` spelling and its recorded form, the zarr compressors it gives each
array, and which of zarr's codec pipelines (its own, or the Rust one of ``zarrs``) reads and writes them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ..errors import MmkdError

log = logging.getLogger(__name__)

# The default compressor, chosen by benchmarks/codecs.py on real targets (docs/codecs.md; medians, CPU time of
# one core): blosc lz4 with byte shuffle compresses at 3,650 MB/s per core on MiniLM WordNet targets and 2,850 on
# float16 of ViT-B targets' entropy, zstd-3 at 950 and 630, so one core of lz4 keeps up with a GPU teacher's
# 1-2 GB/s where zstd-3 needs two or three; it decompresses 2-13x faster for every epoch the loader reads. It
# costs 9-12 % more bytes (stored/raw 0.113 vs 0.101 on padded text, 1.00 vs 0.92 on ViT-like data): padding
# compresses to nothing with either, and float mantissas hardly compress with either. ``--codec zstd-3`` when
# disk counts more than time.
DEFAULT_CODEC: dict[str, Any] = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
# what stores written before ``storage.codec`` was recorded hold (read and resumed as that)
LEGACY_CODEC: dict[str, Any] = {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
CODEC_NAMES = ("lz4", "lz4hc", "zstd", "blosclz", "zlib", "none")
_CODEC_LEVELS = {"lz4": 5, "lz4hc": 5, "zstd": 3, "blosclz": 5, "zlib": 5}
_SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")


# zarr's codec pipelines: its own (Python, blosc through numcodecs) and the Rust one of the `zarrs` package
# (`pip install 'mmkd[zarrs]'`). Measured here (benchmarks/codecs.py, docs/codecs.md; identical arrays): zarrs
# reads a store's arrays 1.6-1.7x faster per core but writes them at 0.5-0.65x, so it is for readers (set
# MMKD_ZARRS=1 for mmkd-train), not extraction. Opt-in, not on whenever installed: it is one setting for the
# whole process (zarr.config), it bypasses the Python store layer (where tests inject faults), and it falls
# back, with a warning per array, on stores it cannot handle (memory://, fsspec URLs).
DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
ZARRS_ENV = "MMKD_ZARRS"


def use_zarrs(enabled: bool = True) -> bool:
    """Select zarr's codec pipeline for this process: zarrs' Rust one, or zarr's default. Arrays opened from
    then on use it.

    Args:
        enabled: zarrs' pipeline (True) or zarr's default (False).

    Returns:
        Whether zarrs is in use: False when it is not installed or fails to import, and then the default
        pipeline is kept (with a warning when zarrs was asked for).
    """
    if enabled:
        try:
            import zarrs  # noqa: F401
        except Exception as e:  # noqa: BLE001 — any import failure (missing, ABI) falls back the same way
            log.warning(
                "%s: zarrs is unavailable (%s: %s); using zarr's default codec pipeline", ZARRS_ENV, type(e).__name__, e
            )
            enabled = False
    zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE if enabled else DEFAULT_PIPELINE})
    return enabled


@contextlib.contextmanager
def codec_pipeline(name: str) -> Iterator[None]:
    """``default`` or ``zarrs`` for the arrays opened inside the block (tests, benchmarks; one thread)."""
    path = {"default": DEFAULT_PIPELINE, "zarrs": ZARRS_PIPELINE}[name]
    with zarr.config.set({"codec_pipeline.path": path}):
        yield


def parse_codec(text: str) -> dict[str, Any]:
    """``NAME[-LEVEL][-SHUFFLE]`` (``lz4``, ``zstd-3``, ``zstd-1-bitshuffle``, ``none``) -> the recorded form
    ``{"cname", "clevel", "shuffle"}``; blosc's byte shuffle unless named."""
    parts = str(text).strip().lower().split("-")
    cname, rest = parts[0], parts[1:]
    if cname == "none" and not rest:
        return {"cname": "none", "clevel": 0, "shuffle": "noshuffle"}
    clevel = _CODEC_LEVELS.get(cname)
    shuffle = "shuffle"
    if rest and rest[0].isdigit():
        clevel = int(rest.pop(0))
    if rest and rest[0] in _SHUFFLES:
        shuffle = rest.pop(0)
    if clevel is None or rest or not 1 <= clevel <= 9:
        raise MmkdError(
            f"--codec {text!r}: expected NAME[-LEVEL][-SHUFFLE], NAME one of {', '.join(CODEC_NAMES)}, LEVEL 1-9, "
            f"SHUFFLE one of {', '.join(_SHUFFLES)} (e.g. lz4, zstd-3, zstd-1-bitshuffle)"
        )
    return {"cname": cname, "clevel": clevel, "shuffle": shuffle}


def codec_name(codec: dict[str, Any]) -> str:
    """The ``--codec`` spelling of a recorded codec: ``lz4-5``, ``zstd-3-bitshuffle``, ``none``."""
    if codec["cname"] == "none":
        return "none"
    tail = "" if codec["shuffle"] == "shuffle" else f"-{codec['shuffle']}"
    return f"{codec['cname']}-{codec['clevel']}{tail}"


def recorded_codec(storage: dict[str, Any] | None) -> dict[str, Any]:
    """The codec a store's ``storage`` attribute records; a store written before it was recorded: zstd-3."""
    codec = (storage or {}).get("codec")
    return dict(codec) if isinstance(codec, dict) else dict(LEGACY_CODEC)


def compressors(dtype: str, codec: dict[str, Any] | None = None) -> list[BloscCodec | Crc32cCodec]:
    """The zarr bytes-to-bytes codecs of an array of ``dtype`` under ``codec`` (default DEFAULT_CODEC): the
    compressor (none for ``codec`` none), then a crc32c checksum of each compressed chunk, which zarr checks
    on every read (a flipped byte, a truncated or foreign chunk raises instead of decoding to other numbers).

    Returns:
        What ``zarr.Group.create_array`` takes as ``compressors``.
    """
    codec = codec or DEFAULT_CODEC
    if codec["cname"] == "none":
        return [Crc32cCodec()]
    size = np.dtype(dtype).itemsize
    shuffle = BloscShuffle(codec["shuffle"]) if size > 1 else BloscShuffle.noshuffle
    blosc = BloscCodec(cname=codec["cname"], clevel=int(codec["clevel"]), shuffle=shuffle, typesize=size)
    return [blosc, Crc32cCodec()]


if os.environ.get(ZARRS_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    use_zarrs(True)
