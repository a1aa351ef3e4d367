"""Reading a store: contiguous runs of samples with the targets decoded to float32, single samples, and the
whole store as lazy dask arrays or an ``xarray.Dataset``."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .. import location, quant
from ..errors import MmkdError
from ..location import Location, store_location
from .layout import DIMS, TARGETS, dimension_names
from .provenance import config_diff, describe_diff
from .schema import SchemaError, check_arrays, validate_attrs
from .teachers import TEACHERS_GROUP, check_group_record, root_teacher_name, teacher_path

if TYPE_CHECKING:
    import xarray as xr


class StoreReader:
    """Reads a store. Opening it reads its provenance (and refuses what is not an mmkd store); the zarr group
    itself is not pickled with the reader, so a reader sent to DataLoader workers opens it again there.

    A store may hold several teachers (``teachers``): the reader reads the first (the root's arrays), and
    ``teacher(name)`` gives a reader of another, with this same API.

    Args:
        path: Store directory or URL (``location.store_location``).
        teachers: Open and check the store's further teacher groups (``mmkd_core.store.teachers``); False
            reads the root alone (``mmkd-verify`` checks each group apart).

    Raises:
        MmkdError: nothing is at ``path``, it is not an mmkd store, or a teacher group's attributes are
            damaged or disagree with the store's (sample count, views, data).
    """

    def __init__(self, path: str | Location, *, teachers: bool = True) -> None:
        self.path = store_location(path)
        if not self.path.exists():
            raise MmkdError(f"{self.path}: no such store")
        self._group: zarr.Group | None = None
        try:
            attrs = self.group.attrs.get("mmkd")
            zarr_format = self.group.metadata.zarr_format
        except Exception as e:  # noqa: BLE001
            raise MmkdError(f"{self.path}: not a zarr store ({type(e).__name__})") from None
        if attrs is None:
            raise MmkdError(f"{self.path}: not an mmkd store (no 'mmkd' attribute)")
        if zarr_format != 3:
            raise SchemaError(f"{self.path}: a zarr v{zarr_format} group; mmkd stores are zarr v3")
        self.attrs: dict[str, Any] = validate_attrs(attrs, str(self.path))
        self.storage: dict[str, Any] = self.attrs["storage"]
        check_arrays(self.attrs, self._array_specs(), str(self.path))
        self._checked_shards: set[tuple[str, int]] = set()
        self._done: np.ndarray | None = None
        self._teachers: dict[str, StoreReader] = self._open_teachers() if teachers else {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None}

    def _open_teachers(self) -> dict[str, StoreReader]:
        """The store's teacher groups, each opened and checked against the root (one line if one is not). Every
        directory in ``teachers`` is one, except one still being created (``shards_done`` is created last)."""
        groups = self.path / TEACHERS_GROUP
        names = sorted(e.name for e in groups.iterdir() if e.is_dir()) if groups.is_dir() else []
        out = {}
        for name in names:
            where = teacher_path(self.path, name)
            if not (where / "shards_done" / "zarr.json").exists():
                continue
            if name == self.teacher_name:
                raise SchemaError(f"{self.path}: teacher group {TEACHERS_GROUP}/{name} has the first teacher's name")
            reader = StoreReader(where, teachers=False)
            check_group_record(self.attrs, reader.attrs, name, len(reader), len(self), str(self.path))
            out[name] = reader
        return out

    @property
    def teacher_name(self) -> str:
        """The name of the teacher this reader reads: a group's own name, or the root teacher's."""
        group = self.attrs.get("teacher_group")
        return group if isinstance(group, str) else root_teacher_name(self.attrs)

    @property
    def teachers(self) -> list[str]:
        """The store's teachers: the first (the root's arrays), then the added ones, by name."""
        return [self.teacher_name, *self._teachers]

    def teacher(self, name: str | None = None) -> StoreReader:
        """A reader of teacher ``name``'s arrays (None or the first teacher's name: this reader).

        Raises:
            MmkdError: the store holds no teacher of that name (the message lists those it holds).
        """
        if name is None or name == self.teacher_name:
            return self
        if name not in self._teachers:
            raise MmkdError(f"{self.path}: no teacher {name!r} in this store; it holds {', '.join(self.teachers)}")
        return self._teachers[name]

    def _array_specs(self) -> dict[str, tuple[tuple[int, ...], str, int]]:
        try:
            arrays = dict(self.group.arrays())
        except Exception as e:  # noqa: BLE001 -- a damaged array's zarr.json
            raise SchemaError(f"{self.path}: an array's metadata cannot be read ({type(e).__name__}: {e})") from None
        return {name: (tuple(a.shape), str(a.dtype), int(a.chunks[0]) if a.chunks else 0) for name, a in arrays.items()}

    def raw(self, name: str, start: int, stop: int, rest: tuple[Any, ...] = ()) -> np.ndarray:
        """Samples [start, stop) of array ``name`` as stored (no decoding), checked: every chunk's checksum
        (zarr verifies it as it reads), and that the shards the store records as done are all there (a deleted
        or never-copied shard file would otherwise read as zeros).

        Args:
            rest: Selections along the array's further axes.

        Raises:
            MmkdError: the store is damaged there (one line naming the store, the array and the samples).
        """
        self._check_present(name, start, stop)
        try:
            return self.group[name][(slice(start, stop), *rest)]
        except MmkdError:
            raise
        except _READ_ERRORS as e:
            lo, hi = self._locate(name, start, stop, rest)
            raise DamagedStore(self._damage(name, lo, hi, f"{type(e).__name__}: {e}")) from None

    def _locate(self, name: str, start: int, stop: int, rest: tuple[Any, ...]) -> tuple[int, int]:
        """The first chunk's samples in [start, stop) whose read fails (the range itself when none does)."""
        step = self.chunk_size
        for lo in range(start - start % step, stop, step):
            a, b = max(lo, start), min(lo + step, stop)
            try:
                self.group[name][(slice(a, b), *rest)]
            except _READ_ERRORS:
                return lo, min(lo + step, len(self))
        return start, stop

    def _damage(self, name: str, start: int, stop: int, reason: str) -> str:
        reason = " ".join(reason.split())[:160]
        return (
            f"{self.path}: array {name}, samples {start}-{stop - 1}: damaged ({reason}); "
            f"mmkd-verify {self.path} --repair re-extracts the damaged shards"
        )

    def _check_present(self, name: str, start: int, stop: int) -> None:
        if name == "shards_done" or stop <= start:
            return
        if self._done is None:
            self._done = self.group["shards_done"][:] if "shards_done" in self.group else np.zeros(0, np.uint8)
        arr = None
        for k in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            if (name, k) in self._checked_shards or k >= len(self._done) or not self._done[k]:
                continue
            arr = arr if arr is not None else self.group[name]
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"
            if not _exists(self.group, key):
                lo, hi = k * self.shard_size, min((k + 1) * self.shard_size, len(self))
                raise DamagedStore(self._damage(name, lo, hi, f"shard {k} is marked done but its data is missing"))
            self._checked_shards.add((name, k))

    @property
    def group(self) -> zarr.Group:
        """The store's zarr group, opened read-only on first use in each process."""
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def __len__(self) -> int:
        """Samples in the store."""
        return int(self.group["index"].shape[0])

    @property
    def views(self) -> int:
        """Views stored per sample."""
        return int(self.attrs["views"]["count"])

    @property
    def complete(self) -> bool:
        """Whether every shard was written and the store marked complete."""
        return bool(self.attrs.get("complete"))

    @property
    def chunk_size(self) -> int:
        """Samples per chunk."""
        return int(self.storage["chunk_samples"])

    @property
    def shard_size(self) -> int:
        """Samples per shard."""
        return int(self.storage["shard_samples"])

    def has(self, name: str) -> bool:
        """Whether the store has an array (or group) ``name``."""
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
            raise MmkdError(f"{self.path}: configuration differs — {describe_diff(stored, expected, diff)}")

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
                out[name] = self._target(name, start, stop)
            else:
                out[name] = self.raw(name, start, stop)
        if "lengths" in out:
            self.check_lengths(out["lengths"], start)
        return out

    def check_lengths(self, lengths: np.ndarray, start: int) -> None:
        """Refuse stored lengths outside 1..T (T the store's time steps): a damaged ``lengths`` array would
        otherwise surface as a shape error deep in a loss."""
        steps = self.time_steps
        bad = np.flatnonzero((lengths < 1) | (lengths > steps)) if steps else np.zeros(0, np.int64)
        if bad.size:
            i = int(bad[0])
            raise DamagedStore(
                f"{self.path}: array lengths, sample {start + i}: length {int(lengths[i])} is outside 1-{steps}; "
                f"mmkd-verify {self.path} --repair re-extracts it"
            )

    @functools.cached_property
    def time_steps(self) -> int:
        """T: the time steps of per-token targets or token ids; 0 for a store of pooled targets only."""
        for name, axis in (("tokens", 2), ("input_ids", 1)):
            if name in self.group:
                return int(self.group[name].shape[axis])
        return 0

    def _target(self, name: str, start: int, stop: int, rest: tuple[Any, ...] = ()) -> np.ndarray:
        if name not in self.group:
            raise MmkdError(f"{self.path}: this store has no {name!r} targets (recipe: {self.attrs['recipe']})")
        if self.storage["dtype"] == "int8":
            # every part shares the target's leading axes (sample, view, time)
            return quant.decode_int8(*(self.raw(name + part, start, stop, rest) for part in quant.INT8_PARTS))
        return quant.decode_float(self.raw(name, start, stop, rest), self.storage["dtype"])

    def tokens(self, i: int, view: int = 0) -> np.ndarray:
        """Sample i's per-token targets for one view: (L_i, D) float32, valid time steps only."""
        lengths = self.raw("lengths", i, i + 1)
        self.check_lengths(lengths, i)
        return self._target("tokens", i, i + 1, (slice(view, view + 1), slice(0, int(lengths[0]))))[0, 0]

    def pooled(self, i: int, view: int = 0) -> np.ndarray:
        """Sample i's whole-sample target for one view: (E,) float32."""
        return self._target("pooled", i, i + 1, (slice(view, view + 1),))[0, 0]

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
            lazy = _ZarrSource(self.path, name, arr.shape, arr.dtype)
            key = f"mmkd-{name}-" + tokenize(stamp, name, arr.shape, str(arr.dtype), arr.chunks)
            meta = np.empty((0,) * arr.ndim, arr.dtype)
            raw[name] = da.from_array(lazy, chunks=arr.chunks, name=key, asarray=True, fancy=False, meta=meta)
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
            origin = ", ".join(
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
        lines = [f"<StoreReader {self.path}: {head}" + (f"; {origin}" if origin else "")]
        if getattr(self, "_teachers", None):
            rows.append(f"  teachers: {', '.join(self.teachers)} (reader.teacher(name))")
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
        try:
            return self._array[key]
        except (ValueError, RuntimeError, OSError, EOFError) as e:
            first = key[0] if isinstance(key, tuple) else key
            where = f"samples {first.start}-{first.stop - 1}" if isinstance(first, slice) else "a chunk"
            reason = " ".join(str(e).split())[:160]
            raise DamagedStore(
                f"{self.path}: array {self.name}, {where}: damaged ({type(e).__name__}: {reason}); "
                f"mmkd-verify {self.path} --repair re-extracts the damaged shards"
            ) from None


# what zarr and its codecs raise on bytes that are not what was written: a checksum mismatch (ValueError), a
# truncated or garbled chunk or index (ValueError, RuntimeError from blosc, IndexError), a vanished file
_READ_ERRORS = (ValueError, RuntimeError, OSError, KeyError, EOFError, IndexError)


class DamagedStore(MmkdError):
    """A store's bytes are not what was written: a checksum mismatch, a shard missing, a value out of range."""


def _exists(group: zarr.Group, key: str) -> bool:
    from zarr.core.sync import sync

    return bool(sync(group.store.exists(key)))


def open_store(path: str | Location, *, teachers: bool = True) -> StoreReader:
    """Open a store for reading: a directory, or a URL fsspec reaches (``s3://bucket/x.zarr``). Its first
    teacher's arrays are read; ``reader.teachers`` lists every teacher and ``reader.teacher(name)`` reads one.

    Args:
        teachers: Open and check the added teachers' groups too (False: the first teacher alone, e.g. when a
            group is damaged).
    """
    return StoreReader(path, teachers=teachers)
