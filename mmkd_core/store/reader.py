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

if TYPE_CHECKING:
    import xarray as xr


class StoreReader:
    """Reads a store. Opening it reads its provenance (and refuses what is not an mmkd store); the zarr group
    itself is not pickled with the reader, so a reader sent to DataLoader workers opens it again there.

    Args:
        path: Store directory or URL (``location.store_location``).

    Raises:
        MmkdError: nothing is at ``path``, or it is not an mmkd store.
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


def open_store(path: str | Location) -> StoreReader:
    """Open a store for reading: a directory, or a URL fsspec reaches (``s3://bucket/x.zarr``)."""
    return StoreReader(path)
