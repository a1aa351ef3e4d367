"""The target store: a zarr v3 group, chunked and sharded along the sample axis only.

Layout (the public contract, see DESIGN.md): ``tokens`` (N, V, T, D), ``pooled`` (N, V, E), for int8
``tokens_scale`` (N, V, T), ``pooled_scale`` (N, V) and their outlier arrays (see ``quant``), ``lengths``
(N,), ``input_ids`` (N, T), ``view_params`` (N, V, P), ``index`` (N,), and ``shards_done`` (num_shards,)
uint8 — one chunk per shard, so writers of different shards never touch the same file. Group
attribute ``mmkd`` holds the provenance and ``complete``.

Every array carries zarr v3 ``dimension_names`` (``DIMS``), so the store is ordinary array data:
``xarray.open_zarr(path, consolidated=False)`` opens it as one Dataset, and ``StoreReader.to_dask`` /
``to_xarray`` give the same arrays lazily with the targets decoded. Target arrays say in their attributes
how they decode (bfloat16: ``quant.BFLOAT16_RULE``; int8: the rule in ``mmkd.storage.dequantize``).
Readers never require ``dimension_names``: stores written before them read as before.

A shard is the unit of work: it is checked whole, written, then marked done. Resume skips done shards.

One writer at a time: ``StoreWriter`` holds the lock file ``<store>.lock`` beside the store directory (see
``lock_path``) from ``open`` to ``close``/``finish``. ``--overwrite`` deletes only an mmkd store.

A store is a local directory or an fsspec URL (``s3://bucket/x.zarr``, ``memory://x.zarr``; see
``location``): the same rules hold on both, the lock being an object beside the store created only if absent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from . import location, quant
from .errors import MmkdError
from .location import Location, StoreURL, store_location

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# provenance fields that must agree for a store to be resumed or reused; `versions` is recorded, not compared
CONFIG_FIELDS = ("format_version", "teacher", "recipe", "preprocess", "views", "dataset", "storage")
TARGET_CHUNK_BYTES = 4 << 20
CHUNKS_PER_SHARD = 16
# keys of ``storage`` that describe the dtype's decoding and were added after format 1 was first written: a
# store recorded without them is compared (on resume) as if they were absent from the expected record too
LATER_STORAGE_KEYS = ("decode",)

# The default compressor, chosen by benchmarks/codecs.py on real targets (README "Codecs"; medians, CPU time of
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
# (`pip install 'mmkd[zarrs]'`). Measured here (benchmarks/codecs.py, README "Codecs"; identical arrays): zarrs
# reads a store's arrays 1.6-1.7x faster per core but writes them at 0.5-0.65x, so it is for readers (set
# MMKD_ZARRS=1 for mmkd-train), not extraction. Opt-in, not on whenever installed: it is one setting for the
# whole process (zarr.config), it bypasses the Python store layer (where tests inject faults), and it falls
# back, with a warning per array, on stores it cannot handle (memory://, fsspec URLs).
DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
ZARRS_ENV = "MMKD_ZARRS"


def use_zarrs(enabled: bool = True) -> bool:
    """Select zarr's codec pipeline for this process: zarrs' Rust one, or zarr's default. Arrays opened from
    then on use it. Returns whether zarrs is in use: False when it is not installed or fails to import, and
    then the default pipeline is kept (with a warning when zarrs was asked for)."""
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


TARGETS = ("tokens", "pooled")
# zarr v3 dimension_names of each array. One name per axis length: xarray aligns the arrays of one Dataset
# by name, so a name means the same length everywhere. pooled's width E may differ from tokens' D, and the
# int8 outlier count K follows the width, so pooled has its own channel and outlier names.
DIMS: dict[str, tuple[str, ...]] = {
    "tokens": ("sample", "view", "time", "channel"),
    "pooled": ("sample", "view", "pooled_channel"),
    "lengths": ("sample",),
    "input_ids": ("sample", "time"),
    "view_params": ("sample", "view", "param"),
    "view_checksum": ("sample", "view"),
    "index": ("sample",),
    "shards_done": ("shard",),
}
OUTLIER_DIMS = {"tokens": "outlier", "pooled": "pooled_outlier"}
INT8_POINTER = "by the rule in the group attribute mmkd.storage.dequantize, with A = {target}"


def dimension_names(name: str) -> tuple[str, ...] | None:
    """The dimension names the store gives array ``name`` (int8 parts included); None for unknown names."""
    if name in DIMS:
        return DIMS[name]
    for target in TARGETS:
        dims = DIMS[target]
        if name == f"{target}_scale":
            return dims[:-1]
        if name in (f"{target}_outlier_idx", f"{target}_outlier_val"):
            return (*dims[:-1], OUTLIER_DIMS[target])
    return None


def array_attrs(dtype: str, name: str) -> dict[str, Any]:
    """Attributes of array ``name`` in a store of logical ``dtype``: how a target array decodes to float32."""
    if name in TARGETS:
        if dtype == "bfloat16":
            return {"mmkd_logical_dtype": "bfloat16", "decode": quant.BFLOAT16_RULE}
        if dtype == "int8":
            return {
                "mmkd_logical_dtype": "int8",
                "dequantize": INT8_POINTER.format(target=name),
                "mmkd_parts": [name + part for part in quant.INT8_PARTS[1:]],
            }
        return {"mmkd_logical_dtype": dtype}
    if dtype == "int8":
        for target in TARGETS:
            if name in (target + part for part in quant.INT8_PARTS[1:]):
                return {"mmkd_part_of": target, "dequantize": INT8_POINTER.format(target=target)}
    return {}


@dataclass
class Layout:
    """Shapes and storage choices of a store.

    Attributes:
        num_samples: N.
        views: V.
        time_steps: T (padded length for text; patches + CLS for images).
        dim: D of per-token targets.
        pooled_dim: E of pooled targets (0: no pooled array).
        dtype: Logical dtype of targets: float16, float32, bfloat16 or int8.
        store_tokens: False for pooled-only stores.
        input_ids: Whether token ids are stored (text teachers).
        view_params: P, parameters per view (0: none).
        chunk_size: Samples per chunk (0: chosen for ~4 MiB chunks).
        shard_size: Samples per shard (0: 16 chunks).
        extras: Further per-sample arrays stored as given (no target encoding), each
            ``(name, trailing shape, zarr dtype, dimension names)``; the dimension names include ``sample``
            first. A pair store's captions use one (``image``); so do joint teachers' per-modality outputs.
        codec: Compressor of every array (``parse_codec``'s form). None: DEFAULT_CODEC for a new store, the
            store's own when one is resumed (``StoreWriter.open`` fills it in).
    """

    num_samples: int
    views: int
    time_steps: int
    dim: int
    pooled_dim: int
    dtype: str = "float16"
    store_tokens: bool = True
    input_ids: bool = False
    view_params: int = 0
    chunk_size: int = 0
    shard_size: int = 0
    extras: tuple[tuple[str, tuple[int, ...], str, tuple[str, ...]], ...] = ()
    codec: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        quant.storage_dtype(self.dtype)
        if self.num_samples < 1:
            raise MmkdError("the dataset selection is empty: nothing to extract")
        if not self.chunk_size:
            per_sample = self.views * (self.time_steps * self.dim * 2 if self.store_tokens else self.pooled_dim * 4)
            self.chunk_size = max(1, min(self.num_samples, TARGET_CHUNK_BYTES // max(per_sample, 1)))
        if not self.shard_size:
            self.shard_size = self.chunk_size * CHUNKS_PER_SHARD
        if self.shard_size % self.chunk_size:
            raise MmkdError(f"--shard-size {self.shard_size} must be a multiple of the chunk size {self.chunk_size}")
        self.shard_size = min(self.shard_size, math.ceil(self.num_samples / self.chunk_size) * self.chunk_size)

    @property
    def buffer_dtype(self) -> str:
        """dtype of a shard's target buffers on their way to ``StoreWriter.write_shard``: the stored dtype of a
        float16/float32/bfloat16 store (batches encoded as they arrive, ``encode_targets``), float32 for int8,
        whose encoding needs the whole shard's float32 values."""
        return "float32" if self.dtype == "int8" else quant.storage_dtype(self.dtype)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)

    def storage_attrs(self) -> dict[str, Any]:
        out = {
            "dtype": self.dtype,
            "zarr_dtype": quant.storage_dtype(self.dtype),
            "chunk_samples": self.chunk_size,
            "shard_samples": self.shard_size,
            "tokens": self.store_tokens,
            "codec": dict(self.codec or DEFAULT_CODEC),
        }
        if self.extras:
            out["extras"] = [name for name, *_ in self.extras]
        if self.dtype == "int8":
            out["int8_outliers"] = {
                "tokens": quant.outliers_for(self.dim),
                "pooled": quant.outliers_for(self.pooled_dim),
            }
            out["dequantize"] = quant.INT8_RULE
        if self.dtype == "bfloat16":
            out["decode"] = quant.BFLOAT16_RULE
        return out

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, zarr dtype) of every array in the store."""
        n, v, t, d = self.num_samples, self.views, self.time_steps, self.dim
        st = self.storage_attrs()
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        targets = {"tokens": (n, v, t, d)} if self.store_tokens else {}
        if self.pooled_dim:
            targets["pooled"] = (n, v, self.pooled_dim)
        for name, shape in targets.items():
            out[name] = (shape, st["zarr_dtype"])
            if self.dtype == "int8":
                k = quant.outliers_for(shape[-1])
                out[f"{name}_scale"] = (shape[:-1], "float32")
                out[f"{name}_outlier_idx"] = ((*shape[:-1], k), "uint16")
                out[f"{name}_outlier_val"] = ((*shape[:-1], k), "float16")
        out["lengths"] = ((n,), "int32")
        if self.input_ids:
            out["input_ids"] = ((n, t), "int32")
        if self.view_params:
            out["view_params"] = ((n, v, self.view_params), "float32")
            out["view_checksum"] = ((n, v), "uint64")  # of each view's teacher input (views.CHECKSUM_RULE)
        out["index"] = ((n,), "int64")
        for name, trailing, dtype, dims in self.extras:
            if name in out or name in DIMS or len(dims) != 1 + len(trailing) or dims[0] != "sample":
                raise ValueError(f"extra array {name!r}: a new name with dimension names ('sample', ...) per axis")
            out[name] = ((n, *trailing), dtype)
        return out

    def dimension_names(self, name: str) -> tuple[str, ...] | None:
        """The dimension names of array ``name`` in this layout."""
        for extra, _, _, dims in self.extras:
            if extra == name:
                return tuple(dims)
        return dimension_names(name)


def _codecs(dtype: str, codec: dict[str, Any] | None = None):
    """zarr compressors of an array of ``dtype`` under ``codec`` (default DEFAULT_CODEC); None: uncompressed."""
    codec = codec or DEFAULT_CODEC
    if codec["cname"] == "none":
        return None
    size = np.dtype(dtype).itemsize
    shuffle = BloscShuffle(codec["shuffle"]) if size > 1 else BloscShuffle.noshuffle
    return [BloscCodec(cname=codec["cname"], clevel=int(codec["clevel"]), shuffle=shuffle, typesize=size)]


def config_diff(stored: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> str | None:
    """Dotted name of the first field that differs between two provenance dicts, or None."""
    keys = list(expected) + [k for k in stored if k not in expected]
    for k in keys:
        name = f"{prefix}{k}"
        if k not in stored or k not in expected:
            return name
        a, b = stored[k], expected[k]
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_diff(a, b, name + ".")
            if sub:
                return sub
        elif _norm(a) != _norm(b):
            return name
    return None


def _as_recorded(full: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """``full`` without the LATER_STORAGE_KEYS that ``stored`` was written without (an older store resumes)."""
    st, sst = full.get("storage"), stored.get("storage")
    if not isinstance(st, dict) or not isinstance(sst, dict):
        return full
    return {**full, "storage": {k: v for k, v in st.items() if k in sst or k not in LATER_STORAGE_KEYS}}


def _norm(v: Any) -> Any:
    # tuples come back from JSON as lists
    return json.loads(json.dumps(v, default=str))


def _describe_diff(stored: dict, expected: dict, field: str) -> str:
    def get(d: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return "<absent>"
            d = d[part]
        return d

    return f"{field}: store has {get(stored, field)!r}, expected {get(expected, field)!r}"


LOCK_SUFFIX = ".lock"


def lock_path(path: str | Location) -> Location:
    """The lock file of a store: ``<store>.lock`` beside the store directory (e.g. ``s.zarr.lock``), or the
    object ``<url>.lock`` beside a store at a URL.

    Beside, not inside: it exists before the store does, survives ``--overwrite`` deleting the store, and no
    zarr reader ever sees it. The path is resolved, so two spellings of one store share one lock.
    """
    p = store_location(path).resolve()
    return p.with_name(p.name + LOCK_SUFFIX)


class StoreLock:
    """An exclusive lock on one store, held by one StoreWriter from ``open`` to ``close``.

    The lock file is created atomically (``O_CREAT | O_EXCL``) and holds JSON ``{pid, host, started,
    token}``. A lock left by a process that died on this host (a kill -9, a crash) is taken over with a
    warning that names it, so that re-running the killed command continues it, as the store promises; the
    takeover renames the stale file first, so two re-runs racing for it cannot both win. A lock from
    another host, or from a live process, is refused: its pid cannot be judged from here.

    Beside a store at a URL the lock is an object created only if absent (``StoreURL.create``: S3's
    ``If-None-Match: *``); object storage has no rename, so this host's takeovers take turns instead.
    """

    def __init__(self, path: Location) -> None:
        self.path = path
        self.token: str | None = None

    def acquire(self, store: Location) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": secrets.token_hex(8),
        }
        if isinstance(self.path, StoreURL):
            self._acquire_object(store, json.dumps(info).encode())
            self.token = info["token"]
            return
        try:
            fd = self._create(store)
        except FileExistsError:
            raise MmkdError(self._held_message(store)) from None
        except OSError as e:
            raise MmkdError(
                f"cannot create the lock file {self.path} ({e.strerror}); choose an --out in a writable directory"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.token = info["token"]

    def _acquire_object(self, store: Location, data: bytes) -> None:
        try:
            self.path.create(data)
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise MmkdError(
                f"cannot create the lock object {self.path} ({e}); check that the bucket exists and may be written"
            ) from None
        stale = self._stale()
        if stale is None:
            raise MmkdError(self._held_message(store))
        with _host_mutex(str(self.path)):
            now = self._stale()  # another re-run of this host may have taken it over while this one looked
            try:
                if now is not None and now.get("token") == stale.get("token"):
                    self.path.unlink(missing_ok=True)
                self.path.create(data)
            except FileExistsError:
                raise MmkdError(self._held_message(store)) from None
        log.warning(
            "took over the stale lock %s of pid %s (started %s), which is no longer running; %s continues "
            "from its finished shards",
            self.path,
            stale["pid"],
            stale.get("started", "?"),
            store,
        )

    def _create(self, store: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:
            info = self._stale()
            if info is None:
                raise
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)  # atomic: of two racing re-runs only one moves the stale lock
        except FileNotFoundError:
            raise FileExistsError(self.path) from None
        aside.unlink(missing_ok=True)
        log.warning(
            "took over the stale lock %s of pid %s (started %s), which is no longer running; %s continues "
            "from its finished shards",
            self.path,
            info["pid"],
            info.get("started", "?"),
            store,
        )
        return os.open(self.path, flags, 0o644)

    def _stale(self) -> dict[str, Any] | None:
        """The lock's record if it was left by a process of this host that no longer runs, else None."""
        try:
            info = _read_lock(self.path)
        except FileNotFoundError:
            return None
        ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and info.get("host") == socket.gethostname()
        return info if ok and not _pid_alive(info["pid"]) else None

    def release(self) -> None:
        if self.token is None:
            return
        try:
            held = _read_lock(self.path)
            if held is not None and held.get("token") == self.token:
                self.path.unlink()
            else:
                log.warning("lock %s is no longer this writer's (now %s); left in place", self.path, held)
        except FileNotFoundError:
            log.warning("lock %s was deleted while this writer held it", self.path)
        self.token = None

    def _held_message(self, store: Path) -> str:
        info = _read_lock(self.path)
        if info is None:  # created but not yet written, or damaged: look again once
            time.sleep(0.2)
            info = _read_lock(self.path)
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return (
                f"{store} is locked by {self.path}, which is unreadable; if no extraction of this store is "
                f"running, delete {self.path} and run again"
            )
        pid, host, started = info["pid"], info.get("host"), info.get("started", "?")
        if host != socket.gethostname():
            return (
                f"{store} is locked by pid {pid} on host {host} since {started} ({self.path}); if no "
                f"extraction of this store runs there, delete {self.path} and run again"
            )
        if not _pid_alive(pid):
            return (
                f"stale lock {self.path} from pid {pid} (started {started}), which is no longer running; "
                "delete it to continue (finished shards are kept)"
            )
        me = ", this process: another StoreWriter of it is still open" if pid == os.getpid() else ""
        return (
            f"{store} is being written by pid {pid} (since {started}{me}): lock {self.path}; wait for it to "
            f"finish, or if pid {pid} is not writing this store, delete {self.path}"
        )


@contextlib.contextmanager
def _host_mutex(key: str) -> Iterator[None]:
    """Mutual exclusion among this host's processes (stale locks are taken over by their own host only): an
    flock on a file in the temp directory, which the kernel releases when its holder dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): takeovers race as they would without it
        yield
        return
    name = "mmkd-takeover-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    fd = os.open(Path(tempfile.gettempdir()) / name, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_lock(path: Location) -> dict[str, Any] | None:
    """The lock's JSON; None when it is empty or unparseable. FileNotFoundError when it is gone."""
    text = path.read_text()
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates; assume alive, which refuses rather than corrupts
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    try:  # an exited child nobody has reaped yet still answers signal 0, but holds nothing
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _mmkd_attrs(path: Location) -> dict[str, Any] | None:
    """The ``mmkd`` attribute of the zarr v3 group at ``path`` (read from its zarr.json), or None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = (meta.get("attributes") or {}).get("mmkd")
    return attrs if isinstance(attrs, dict) else None


def _remove_store(path: Location) -> None:
    """Delete the mmkd store at ``path`` and refuse anything else: its top-level zarr.json must carry the
    ``mmkd`` attribute and every other top-level entry must be a zarr node (a directory with a zarr.json)."""
    if path.is_symlink():
        raise MmkdError(
            f"{path} is a symbolic link; --overwrite does not delete through links: pass the store's "
            f"own path {path.resolve()}"
        )
    if _mmkd_attrs(path) is None:
        raise MmkdError(
            f"{path} is not an mmkd store (no zarr.json with an 'mmkd' attribute); --overwrite "
            "never deletes it: choose another --out"
        )
    foreign = sorted(
        e.name
        for e in path.iterdir()
        if e.name != "zarr.json" and not (e.is_dir() and not e.is_symlink() and (e / "zarr.json").is_file())
    )
    if foreign:
        raise MmkdError(
            f"{path} is an mmkd store but also holds {foreign[0]!r}, which is not part of a store; "
            "--overwrite will not delete it: move it out or choose another --out"
        )
    log.warning("--overwrite: deleting the store %s", path)
    location.remove(path)


def _where(name: str, pos: tuple[int, ...], lo: int, index: np.ndarray | None) -> str:
    """'array 'tokens', sample 12 (dataset index 40), view 0, time step 3' for a position in a shard array."""
    i = int(pos[0])
    out = f"array {name!r}, sample {lo + i}"
    if index is not None and len(index) > i and int(index[i]) != lo + i:
        out += f" (dataset index {int(index[i])})"
    if len(pos) > 1:
        out += f", view {int(pos[1])}"
    if name == "tokens" and len(pos) > 2:
        out += f", time step {int(pos[2])}"
    return out


def _first(bad: np.ndarray) -> tuple[int, ...] | None:
    flat = np.flatnonzero(bad)
    return tuple(int(i) for i in np.unravel_index(flat[0], bad.shape)) if flat.size else None


def _nonfinite(where: str, value: Any) -> MmkdError:
    return MmkdError(
        f"{where}: the teacher's target is {value}; a non-finite target is never stored — check the weights "
        "and --autocast (float16 compute can overflow)"
    )


def _unstorable(where: str, value: float, dtype: str, what: str | None = None) -> MmkdError:
    hint = "--dtype float32" if dtype == "bfloat16" else "--dtype bfloat16 or --dtype float32"
    return MmkdError(
        f"{where}: value {value:.7g} is beyond the range of {what or dtype} and would be stored as inf; use {hint}"
    )


# the exponent bits of float16 and bfloat16 (as uint16): all ones is inf or NaN
_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _nonfinite_bits(bits: np.ndarray, dtype: str) -> np.ndarray | None:
    """Where the 16-bit floats ``bits`` (uint16) are inf or NaN, or None when nowhere: a mask and one max, some
    times faster than ``np.isfinite`` on float16."""
    mask = _EXPONENT[dtype]
    exponent = bits & np.uint16(mask)
    if not exponent.size or int(exponent.max()) != mask:
        return None
    return exponent == mask


def encode_targets(name: str, x: Any, dtype: str, locate: Callable[[int], tuple[int, int]]) -> np.ndarray:
    """A batch of float32 targets (a torch tensor on any device, or an array) in the stored form of a float16,
    bfloat16 or float32 store, checked as ``StoreWriter.write_shard`` checks a float32 shard.

    Encoding batch by batch lets extraction keep its shard buffers in the stored dtype (half the bytes of
    float32 for float16/bfloat16, and half the bytes copied from a GPU), while a value that the dtype cannot
    hold is still refused before anything is written.

    Args:
        name: The array (``tokens``, ``pooled``), for the message.
        x: float32 values, one row per result: (B, T, D) tokens or (B, E) pooled.
        dtype: float16, bfloat16 or float32.
        locate: ``locate(row of x) -> (sample, view)`` for the message (the first sample given that row).

    Raises:
        MmkdError: a value is NaN or inf, or the dtype turns it into inf (float16 above 65504); the message
            names the array, the sample and the value, as ``write_shard``'s does.
    """
    import torch

    def where(pos: tuple[int, ...]) -> str:
        return _where(name, (*locate(int(pos[0])), *pos[1:]), 0, None)

    t = torch.as_tensor(x)
    t = t if t.dtype == torch.float32 else t.float()
    if t.device.type != "cpu":  # check and cast on the device, where both are cheap; copy half the bytes over
        y = t if dtype == "float32" else t.to(torch.float16 if dtype == "float16" else torch.bfloat16)
        if bool(torch.isfinite(y).all()):
            y = y.cpu()
            return y.numpy() if dtype != "bfloat16" else y.view(torch.int16).numpy().view(np.uint16)
        t = t.cpu()  # a refusal: find and name it below
    a = t.numpy()
    finite = np.isfinite(a)  # numpy's is much faster than torch's on the CPU
    if not finite.all():
        pos = _first(~finite)
        raise _nonfinite(where(pos), a[pos])
    if dtype == "float32":
        return a
    # torch's cast: round to nearest even like numpy's astype (bit-identical), several times faster on the CPU
    bits = t.to(torch.float16 if dtype == "float16" else torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bad = _nonfinite_bits(bits, dtype)
    if bad is not None:
        pos = _first(bad)
        raise _unstorable(where(pos), float(a[pos]), dtype)
    return bits.view(np.float16) if dtype == "float16" else bits


def _check_finite(name: str, x: np.ndarray, lo: int, index: np.ndarray | None) -> None:
    pos = _first(~np.isfinite(x))
    if pos is not None:
        raise _nonfinite(_where(name, pos, lo, index), x[pos])


def _check_encoded(name: str, x: np.ndarray, dtype: str, lo: int, index: np.ndarray | None) -> None:
    """Refuse inf or NaN in a shard that arrives encoded (``encode_targets`` checked it batch by batch; this
    catches a caller that did not)."""
    bad = _nonfinite_bits(x.view(np.uint16), dtype)
    if bad is not None:
        pos = _first(bad)
        raise _nonfinite(_where(name, pos, lo, index), float(quant.decode_float(np.asarray(x[pos]), dtype)))


def _check_storable(
    name: str, x: np.ndarray, enc: dict[str, np.ndarray], dtype: str, lo: int, index: np.ndarray | None
) -> None:
    """Refuse finite float32 targets that the storage dtype turns into inf (float16 above 65504, the float16
    outliers of int8, bfloat16 near float32's maximum)."""
    if dtype == "float16":
        bad = _nonfinite_bits(enc[name].view(np.uint16), dtype)
        pos, value, what = (None if bad is None else _first(bad)), x, "float16"
    elif dtype == "int8":  # int8 keeps each vector's largest channels as float16
        val = enc[f"{name}_outlier_val"]
        pos, what = _first(~np.isfinite(val)), "float16 (int8 keeps its outlier channels as float16)"
        value = np.take_along_axis(x, enc[f"{name}_outlier_idx"].astype(np.int64), axis=-1)
    elif dtype == "bfloat16":
        pos, value, what = _first((enc[name] & 0x7F80) == 0x7F80), x, "bfloat16"
    else:
        return
    if pos is not None:
        raise _unstorable(_where(name, pos, lo, index), float(value[pos]), dtype, what)


class StoreWriter:
    """Creates or resumes a store and writes it shard by shard, holding the store's lock (``lock_path``)
    from ``open`` until ``close`` (``finish`` closes too; so does leaving a ``with`` block)."""

    def __init__(self, path: Location, layout: Layout, group: zarr.Group, lock: StoreLock | None = None) -> None:
        self.path, self.layout, self.group = path, layout, group
        self._lock = lock
        missing = [name for name in (*layout.arrays(), "shards_done") if name not in group]
        if missing:
            raise MmkdError(
                f"{path} lacks the array {missing[0]!r} (its creation was interrupted or it was made "
                "by another version); pass --overwrite to start it afresh"
            )
        # zarr compares every chunk it writes with the fill value to skip empty ones (a chunk-sized np.full and
        # array_equal: 60 % of its own time per shard, benchmarks/codecs.py); targets are never all zero, and
        # an all-zero chunk written anyway reads back the same
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in layout.arrays()}
        self._done = group["shards_done"]
        self.closed = False

    @classmethod
    def open(
        cls,
        path: str | Location,
        layout: Layout,
        config: dict[str, Any],
        versions: dict[str, str],
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
        locked: bool = True,
    ) -> StoreWriter:
        """Lock the store, then create it, or resume it when its configuration equals ``config``.

        Args:
            path: Store directory or URL.
            layout: Shapes and storage.
            config: Provenance fields in CONFIG_FIELDS except ``storage`` and ``format_version``.
            versions: Library versions, recorded.
            overwrite: Replace an existing mmkd store whose configuration differs. Only an mmkd store (a
                zarr group whose zarr.json carries the ``mmkd`` attribute) is ever deleted; any other
                existing path except an empty directory is refused, with or without it.
            extra: Further attributes recorded but not compared (e.g. where the source data was read).
            locked: Take the store's lock. False only for a store inside another whose writer holds the
                lock (a pair store's captions).

        Raises:
            MmkdError: another writer holds the lock (or left a stale one), the path is not a store, or the
                configuration differs without ``overwrite``.
        """
        path = store_location(path)
        if not locked:
            return cls(path, layout, cls._open_group(path, layout, config, versions, overwrite, extra))
        lock = StoreLock(lock_path(path))
        lock.acquire(path)
        try:
            return cls(path, layout, cls._open_group(path, layout, config, versions, overwrite, extra), lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _open_group(
        path: Location,
        layout: Layout,
        config: dict[str, Any],
        versions: dict[str, str],
        overwrite: bool,
        extra: dict[str, Any] | None,
    ) -> zarr.Group:
        full = {"format_version": FORMAT_VERSION, **config, "storage": layout.storage_attrs()}
        if path.is_symlink() and not path.exists():
            raise MmkdError(f"{path} is a symbolic link to nothing; choose another --out")
        if path.exists():
            if not path.is_dir():
                raise MmkdError(
                    f"{path} exists and is not a directory; mmkd will not replace it, even with "
                    "--overwrite: choose another --out"
                )
            existing = _mmkd_attrs(path)
            if existing is None:
                if any(path.iterdir()):
                    raise MmkdError(
                        f"{path} exists and is not an mmkd store (no zarr.json with an 'mmkd' "
                        "attribute); mmkd never deletes it, even with --overwrite: choose another --out"
                    )
                # an empty directory: nothing to lose, the store is created in it
            else:
                stored = {k: existing.get(k) for k in CONFIG_FIELDS}
                if isinstance(stored["storage"], dict):  # recorded before the codec was: zstd-3
                    stored["storage"] = {**stored["storage"], "codec": recorded_codec(stored["storage"])}
                expected = _as_recorded(full, stored)
                if layout.codec is None and isinstance(stored["storage"], dict):  # no --codec: the store's own
                    expected = {**expected, "storage": {**expected["storage"], "codec": stored["storage"]["codec"]}}
                diff = config_diff(stored, expected)
                if diff is None and not overwrite:
                    group = zarr.open_group(str(path), mode="r+")
                    if "shards_done" in group:
                        log.info("resuming %s", path)
                        layout.codec = stored["storage"]["codec"]
                        return group
                    # shards_done is created last: without it the creation was cut short and no work exists
                    log.warning(
                        "%s: its creation was interrupted before any shard was written; creating it again", path
                    )
                if diff is not None and not overwrite:
                    raise MmkdError(
                        f"{path} holds a store with another configuration "
                        f"({_describe_diff(stored, expected, diff)}); pass --overwrite to replace it or choose "
                        "another --out"
                    )
                _remove_store(path)
        layout.codec = dict(layout.codec or DEFAULT_CODEC)
        # the attribute comes first: a creation cut short still reads as ours, so --overwrite may replace it
        attrs = {**full, **(extra or {}), "versions": versions, "complete": False}
        group = zarr.open_group(str(path), mode="w", attributes={"mmkd": attrs})
        for name, (shape, dtype) in layout.arrays().items():
            chunks = (layout.chunk_size, *shape[1:])
            shards = (layout.shard_size, *shape[1:])
            group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards,
                compressors=_codecs(dtype, layout.codec),
                fill_value=0,
                dimension_names=layout.dimension_names(name),
                attributes=array_attrs(layout.dtype, name),
            )
        group.create_array(
            "shards_done",
            shape=(layout.num_shards,),
            dtype="uint8",
            chunks=(1,),
            fill_value=0,
            compressors=None,
            dimension_names=DIMS["shards_done"],
        )
        return group

    def done_shards(self) -> set[int]:
        return {int(i) for i in np.flatnonzero(self._done[:])}

    def write_shard(self, k: int, data: dict[str, np.ndarray]) -> None:
        """Check shard k whole, write it, then mark it done. Nothing is written when a check fails.

        Args:
            k: Shard number.
            data: ``tokens`` (n, V, T, D) float32 (omitted for pooled-only stores), ``pooled`` (n, V, E)
                float32, ``lengths``, ``index`` and, as the layout has them, ``input_ids``, ``view_params``.
                A float16 or bfloat16 store also takes its targets already encoded (``Layout.buffer_dtype``,
                ``encode_targets``): they are then only checked for inf and NaN, not converted again.

        Raises:
            MmkdError: a target is NaN or inf, or its value does not fit the storage dtype (float16 above
                65504 becomes inf); the message names the array, the sample and the value.
        """
        if self.closed:
            raise RuntimeError(f"StoreWriter of {self.path} is closed")
        lo, hi = self.layout.shard_range(k)
        index = data.get("index")
        targets = [name for name in ("tokens", "pooled") if name in self._arrays]
        missing = [name for name in targets if name not in data]
        if missing:
            raise ValueError(f"shard {k}: no {missing[0]!r} array given")
        enc = dict(data)
        x = {}
        for name in targets:
            if self.layout.buffer_dtype != "float32" and data[name].dtype == self.layout.buffer_dtype:
                enc[name] = np.ascontiguousarray(data[name])  # encoded already (encode_targets)
                _check_encoded(name, enc[name], self.layout.dtype, lo, index)
            else:  # float32 (np.ascontiguousarray copies only what is not float32 and contiguous)
                x[name] = np.ascontiguousarray(data[name], dtype=np.float32)
                _check_finite(name, x[name], lo, index)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, naming the value
            for name in x:
                if self.layout.dtype == "int8":
                    del enc[name]
                    enc.update(quant.encode_int8(x[name], quant.outliers_for(x[name].shape[-1]), name))
                else:
                    enc[name] = quant.encode_float(x[name], self.layout.dtype)
        for name in x:
            _check_storable(name, x[name], enc, self.layout.dtype, lo, index)
        for name in self._arrays:
            if name not in enc:
                raise ValueError(f"shard {k}: no {name!r} array given")
            if enc[name].shape[0] != hi - lo:
                raise ValueError(f"shard {k}: {name} has {enc[name].shape[0]} samples, expected {hi - lo}")
        for name, arr in self._arrays.items():  # nothing of the shard was written before this point
            arr[lo:hi] = enc[name] if enc[name].dtype == arr.dtype else enc[name].astype(arr.dtype)
        self._done[k] = 1  # only after every array of the shard is written

    def finish(self) -> bool:
        """Mark the store complete when every shard is done, then close; returns whether it is complete."""
        if self.closed:
            raise RuntimeError(f"StoreWriter of {self.path} is closed")
        try:
            complete = len(self.done_shards()) == self.layout.num_shards
            attrs = dict(self.group.attrs["mmkd"])
            if complete and not attrs.get("complete"):
                attrs["complete"] = True
                self.group.attrs["mmkd"] = attrs
            return complete
        finally:
            self.close()

    def close(self) -> None:
        """Release the store's lock. Idempotent; the writer writes nothing more."""
        self.closed = True
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StoreReader:
    """Reads a store. Opens the zarr group lazily, so the object can be pickled to DataLoader workers.

    Args:
        path: Store directory or URL (``location.store_location``).
    """

    def __init__(self, path: str | Location) -> None:
        self.path = store_location(path)
        if not self.path.exists():
            raise MmkdError(f"{self.path}: no such store")
        self._group: zarr.Group | None = None
        try:
            attrs = self.group.attrs.get("mmkd")
        except Exception as e:  # noqa: BLE001
            raise MmkdError(f"{self.path}: not a zarr store ({type(e).__name__})") from None
        if attrs is None:
            raise MmkdError(f"{self.path}: not an mmkd store (no 'mmkd' attribute)")
        self.attrs: dict[str, Any] = dict(attrs)
        self.storage: dict[str, Any] = self.attrs["storage"]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None}

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def __len__(self) -> int:
        return int(self.group["index"].shape[0])

    @property
    def views(self) -> int:
        return int(self.attrs["views"]["count"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def chunk_size(self) -> int:
        return int(self.storage["chunk_samples"])

    @property
    def shard_size(self) -> int:
        return int(self.storage["shard_samples"])

    def has(self, name: str) -> bool:
        return name in self.group

    @property
    def extra_names(self) -> tuple[str, ...]:
        """The store's further per-sample arrays (``Layout.extras``), read by default with the others."""
        return tuple(self.storage.get("extras") or ())

    def check(self, expected: dict[str, Any]) -> None:
        """Raise MmkdError naming the first field of ``expected`` (a partial provenance dict, e.g.
        ``{"teacher": ..., "recipe": ...}``) that differs from this store's."""
        stored = {k: self.attrs.get(k) for k in expected}
        diff = config_diff(stored, expected)
        if diff is not None:
            raise MmkdError(f"{self.path}: configuration differs — {_describe_diff(stored, expected, diff)}")

    def read(self, start: int, stop: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Samples [start, stop) as one contiguous read, dequantised to float32 where they are targets.

        Args:
            start: First sample.
            stop: One past the last sample.
            names: Arrays to read where present (``tokens`` means the dequantised targets); default all.
        """
        g = self.group
        names = names or ("tokens", "pooled", "lengths", "input_ids", "view_params", "index", *self.extra_names)
        names = tuple(n for n in names if n in g)
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name in ("tokens", "pooled"):
                out[name] = self._target(name, slice(start, stop))
            else:
                out[name] = g[name][start:stop]
        return out

    def _target(self, name: str, sel) -> np.ndarray:
        g = self.group
        if name not in g:
            raise MmkdError(f"{self.path}: this store has no {name!r} targets (recipe: {self.attrs['recipe']})")
        if self.storage["dtype"] == "int8":
            return quant.decode_int8(*(g[name + part][sel] for part in quant.INT8_PARTS))
        return quant.decode_float(g[name][sel], self.storage["dtype"])

    def tokens(self, i: int, view: int = 0) -> np.ndarray:
        """Sample i's per-token targets for one view: (L_i, D) float32, valid time steps only."""
        n = int(self.group["lengths"][i])
        return self._target("tokens", (slice(i, i + 1), slice(view, view + 1), slice(0, n)))[0, 0]

    def pooled(self, i: int, view: int = 0) -> np.ndarray:
        """Sample i's whole-sample target for one view: (E,) float32."""
        return self._target("pooled", (slice(i, i + 1), slice(view, view + 1)))[0, 0]

    def nbytes_stored(self) -> int:
        """Bytes on disk (or in the bucket)."""
        return location.size(self.path)

    def array_names(self) -> list[str]:
        """The store's arrays, in the order of the format's table (then any others, sorted)."""
        present = sorted(self.group.array_keys())
        table = [t + part for t in TARGETS for part in quant.INT8_PARTS] + [n for n in DIMS if n not in TARGETS]
        order = [n for n in table if n in present]
        return order + [n for n in present if n not in order]

    def dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of array ``name``: as stored, else the format's (stores written before they were)."""
        arr = self.group[name]
        stored = getattr(arr.metadata, "dimension_names", None)
        if stored and all(stored) and len(stored) == arr.ndim:
            return tuple(stored)
        known = dimension_names(name)
        if known is not None and len(known) == arr.ndim:
            return known
        return tuple(f"{name}_dim_{i}" for i in range(arr.ndim))

    def _encoded_parts(self) -> set[str]:
        if self.storage["dtype"] != "int8":
            return set()
        return {t + p for t in TARGETS if t in self.group for p in quant.INT8_PARTS[1:]}

    def to_dask(self) -> dict[str, Any]:
        """Every array of the store as a lazy dask array chunked as the store is (samples per chunk along the
        sample axis, whole along the others). ``tokens``/``pooled`` are the float32 targets, decoded lazily
        chunk by chunk exactly as ``read`` decodes them; int8's scale and outlier arrays are consumed by that
        and not listed. Nothing is read until computed; the arrays pickle to dask workers."""
        import dask.array as da
        from dask.base import tokenize

        g = self.group
        # dask keys name the data: a store rewritten in place (new zarr.json) or grown by shards gets new keys
        done = g["shards_done"][:].tobytes() if "shards_done" in g else b""
        stamp = (str(self.path.resolve()), location.stamp(self.path / "zarr.json"), done)
        raw: dict[str, Any] = {}
        for name in self.array_names():
            arr = g[name]
            source = _ZarrSource(self.path, name, arr.shape, arr.dtype)
            key = f"mmkd-{name}-" + tokenize(stamp, name, arr.shape, str(arr.dtype), arr.chunks)
            meta = np.empty((0,) * arr.ndim, arr.dtype)
            raw[name] = da.from_array(source, chunks=arr.chunks, name=key, asarray=True, fancy=False, meta=meta)
        parts = self._encoded_parts()
        out: dict[str, Any] = {}
        for name, x in raw.items():
            if name in parts:
                continue
            out[name] = self._dask_target(name, raw) if name in TARGETS else x
        return out

    def _dask_target(self, name: str, raw: dict[str, Any]) -> Any:
        import dask.array as da

        dtype = self.storage["dtype"]
        q = raw[name]
        meta = np.empty((0,) * q.ndim, np.float32)
        if dtype != "int8":
            return q.map_blocks(functools.partial(quant.decode_float, dtype=dtype), dtype=np.float32, meta=meta)
        ix = "abcdefghij"[: q.ndim]
        scale, idx, val = (raw[name + p] for p in quant.INT8_PARTS[1:])
        return da.blockwise(
            quant.decode_int8,
            ix,
            q,
            ix,
            scale,
            ix[:-1],
            idx,
            ix[:-1] + "k",
            val,
            ix[:-1] + "k",
            dtype=np.float32,
            concatenate=True,
            meta=meta,
        )

    def to_xarray(self) -> xr.Dataset:
        """The store as a lazy ``xarray.Dataset``: the arrays of ``to_dask`` (targets decoded to float32) on the
        store's dimension names, the provenance in ``attrs["mmkd"]``. Needs ``pip install 'mmkd[xarray]'``."""
        try:
            import xarray as xr
        except ImportError:
            raise MmkdError(
                "StoreReader.to_xarray needs xarray, which is not installed: pip install 'mmkd[xarray]'"
            ) from None
        variables = {}
        for name, x in self.to_dask().items():
            if name in TARGETS:
                attrs = {"mmkd_logical_dtype": self.storage["dtype"], "mmkd_decoded": "float32, as StoreReader.read"}
            else:
                attrs = dict(self.group[name].attrs)
            variables[name] = (self.dims(name), x, attrs)
        return xr.Dataset(variables, attrs={"mmkd": json.loads(json.dumps(self.attrs))})

    def __repr__(self) -> str:
        try:
            samples, views = len(self), self.views
            head = f"{samples} sample{'s' * (samples != 1)}, {views} view{'s' * (views != 1)}, {self.storage['dtype']}"
            if self.storage["dtype"] != quant.storage_dtype(self.storage["dtype"]):
                head += f" (stored as {quant.storage_dtype(self.storage['dtype'])})"
            if self.complete:
                head += ", complete"
            else:
                done = self.group["shards_done"][:] if "shards_done" in self.group else None
                head += ", incomplete" + (f" ({int(done.sum())}/{done.size} shards done)" if done is not None else "")
            teacher = (self.attrs.get("teacher") or {}).get("name")
            dataset = self.attrs.get("dataset") or {}
            source = ", ".join(
                f"{k} {v}" for k, v in (("teacher", teacher), ("dataset", dataset.get("name"))) if v is not None
            )
            names = self.array_names()
            width = max((len(name) for name in names), default=0)
            rows = [
                f"  {name:<{width}}  {self.group[name].shape} {self.group[name].dtype}  ({', '.join(self.dims(name))})"
                for name in names
            ]
        except Exception as e:  # noqa: BLE001 — a repr never raises
            return f"<StoreReader {self.path}: unreadable ({type(e).__name__}: {e})>"
        lines = [f"<StoreReader {self.path}: {head}" + (f"; {source}" if source else "")]
        return "\n".join([*lines, *rows]) + ">"


class _ZarrSource:
    """One array of a store, opened on first read: what dask reads from, picklable to workers."""

    def __init__(self, path: Location, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._array: zarr.Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, key) -> np.ndarray:
        if self._array is None:
            self._array = zarr.open_group(str(self.path), mode="r")[self.name]
        return self._array[key]


if os.environ.get(ZARRS_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    use_zarrs(True)


def open_store(path: str | Location) -> StoreReader:
    """Open a store for reading: a directory, or a URL fsspec reaches (``s3://bucket/x.zarr``)."""
    return StoreReader(path)


def layout_dict(layout: Layout) -> dict[str, Any]:
    return asdict(layout)
