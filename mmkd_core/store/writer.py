"""Writing a store: created or resumed under its lock, then written shard by shard — each shard checked whole,
written, then marked done — and marked complete when every shard is done."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .. import location, quant
from ..errors import MmkdError
from ..location import Location, store_location
from .codecs import DEFAULT_CODEC, compressors
from .encode import check_encoded, check_finite, check_storable
from .layout import DIMS, Layout, array_attrs
from .lock import StoreLock, lock_path, refuse_readers
from .provenance import compare_recorded, describe_diff, expected_record, mark_complete, new_record, read_attrs

log = logging.getLogger(__name__)


class StoreWriter:
    """Creates or resumes a store and writes it shard by shard, holding the store's lock (``lock_path``)
    from ``open`` until ``close`` (``finish`` closes too; so does leaving a ``with`` block).

    A store nested in another (a teacher group, ``teachers``) is locked by the outer store's lock: ``lock_of``
    is the store whose lock guards this one's writes.
    """

    def __init__(
        self,
        path: Location,
        layout: Layout,
        group: zarr.Group,
        lock: StoreLock | None = None,
        lock_of: Location | None = None,
    ) -> None:
        self.path, self.layout, self.group = path, layout, group
        self.lock_of = lock_of if lock_of is not None else path
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
        inside: str | Location | None = None,
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
            locked: Take the store's lock. False only where the caller holds it (a pair store's captions,
                whose pair store's writer holds it; a ``--shards`` slice).
            inside: The store that ``path`` lies in (a teacher group's): its lock is the one taken, and the
                groups between the two are created (as plain zarr groups) when absent.

        Raises:
            MmkdError: another writer holds the lock (or left a stale one), the path is not a store, or the
                configuration differs without ``overwrite``.
        """
        path = store_location(path)
        count = (config.get("views") or {}).get("count")
        if count != layout.views:  # a store's record agrees with its arrays (readers check that it does)
            raise MmkdError(f"{path}: the configuration records {count!r} views, the layout has {layout.views}")
        outer = store_location(inside) if inside is not None else None

        def opened(lock: StoreLock | None) -> StoreWriter:
            if outer is not None:
                _make_parents(outer, path)
            return cls(path, layout, _open_group(path, layout, config, versions, overwrite, extra), lock, outer)

        if not locked:
            return opened(None)
        lock = StoreLock(lock_path(outer if outer is not None else path))
        lock.acquire(outer if outer is not None else path)
        try:
            return opened(lock)
        except BaseException:
            lock.release()
            raise

    def done_shards(self) -> set[int]:
        """The shards written whole (marked done), this writer's and earlier runs'."""
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
                check_encoded(name, enc[name], self.layout.dtype, lo, index)
            else:  # float32 (np.ascontiguousarray copies only what is not float32 and contiguous)
                x[name] = np.ascontiguousarray(data[name], dtype=np.float32)
                check_finite(name, x[name], lo, index)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, naming the value
            for name in x:
                if self.layout.dtype == "int8":
                    del enc[name]
                    enc.update(quant.encode_int8(x[name], quant.outliers_for(x[name].shape[-1]), name))
                else:
                    enc[name] = quant.encode_float(x[name], self.layout.dtype)
        for name in x:
            check_storable(name, x[name], enc, self.layout.dtype, lo, index)
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
            if complete:
                mark_complete(self.group)
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


def _make_parents(outer: Location, path: Location) -> None:
    """The zarr groups between the store ``outer`` and the store ``path`` inside it, created where absent (each
    a ``zarr.json`` of its own: nothing of ``outer``'s own is written)."""
    inner = str(path.resolve())
    base = str(outer.resolve()).rstrip("/")
    if not inner.startswith(base + "/"):
        raise ValueError(f"{path} is not inside {outer}")
    node = outer
    for part in inner[len(base) + 1 :].split("/")[:-1]:
        node = node / part
        if not (node / "zarr.json").exists():
            zarr.open_group(str(node), mode="a")  # a plain group, created only where none is


def _open_group(
    path: Location,
    layout: Layout,
    config: dict[str, Any],
    versions: dict[str, str],
    overwrite: bool,
    extra: dict[str, Any] | None,
) -> zarr.Group:
    """The store's group at ``path``: resumed when its configuration equals ``config``, else created (replacing
    an mmkd store only with ``overwrite``). Sets ``layout.codec`` to the codec the store is written with."""
    full = expected_record(config, layout.storage_attrs())
    if path.is_symlink() and not path.exists():
        raise MmkdError(f"{path} is a symbolic link to nothing; choose another --out")
    if path.exists():
        group = _resume(path, layout, full, overwrite)
        if group is not None:
            return group
    layout.codec = dict(layout.codec or DEFAULT_CODEC)
    # the attribute comes first: a creation cut short still reads as ours, so --overwrite may replace it
    return _create_group(path, layout, new_record(full, extra, versions))


def _resume(path: Location, layout: Layout, full: dict[str, Any], overwrite: bool) -> zarr.Group | None:
    """The existing store at ``path`` when it is resumed; None when a store is to be created there (the path
    is an empty directory, or the mmkd store in it was removed: ``overwrite``, or its creation was cut short).

    Raises:
        MmkdError: the path is not a directory, holds something other than an mmkd store, or holds one of
            another configuration without ``overwrite``.
    """
    if not path.is_dir():
        raise MmkdError(
            f"{path} exists and is not a directory; mmkd will not replace it, even with "
            "--overwrite: choose another --out"
        )
    existing = read_attrs(path)
    if existing is None:
        if any(path.iterdir()):
            raise MmkdError(
                f"{path} exists and is not an mmkd store (no zarr.json with an 'mmkd' "
                "attribute); mmkd never deletes it, even with --overwrite: choose another --out"
            )
        return None  # an empty directory: nothing to lose, the store is created in it
    stored, expected, diff = compare_recorded(existing, full, codec_given=layout.codec is not None)
    if diff is None and not overwrite:
        group = zarr.open_group(str(path), mode="r+")
        if "shards_done" in group:
            log.info("resuming %s", path)
            layout.codec = stored["storage"]["codec"]
            return group
        # shards_done is created last: without it the creation was cut short and no work exists
        log.warning("%s: its creation was interrupted before any shard was written; creating it again", path)
    if diff is not None and not overwrite:
        raise MmkdError(
            f"{path} holds a store with another configuration "
            f"({describe_diff(stored, expected, diff)}); pass --overwrite to replace it or choose "
            "another --out"
        )
    _remove_store(path)
    return None


def _create_group(path: Location, layout: Layout, attrs: dict[str, Any]) -> zarr.Group:
    """A new store at ``path`` with provenance ``attrs``: every array of ``layout``, then ``shards_done``."""
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
            compressors=compressors(dtype, layout.codec),
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
        compressors=[Crc32cCodec()],
        dimension_names=DIMS["shards_done"],
    )
    return group


def _remove_store(path: Location) -> None:
    """Delete the mmkd store at ``path`` and refuse anything else: its top-level zarr.json must carry the
    ``mmkd`` attribute and every other top-level entry must be a zarr node (a directory with a zarr.json)."""
    if path.is_symlink():
        raise MmkdError(
            f"{path} is a symbolic link; --overwrite does not delete through links: pass the store's "
            f"own path {path.resolve()}"
        )
    if read_attrs(path) is None:
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
    refuse_readers(path, "--overwrite")
    log.warning("--overwrite: deleting the store %s", path)
    location.remove(path)
