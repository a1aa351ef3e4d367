"""The target store: a zarr v3 group, chunked and sharded along the sample axis only.

Layout (the public contract, see DESIGN.md): ``tokens`` (N, V, T, D), ``pooled`` (N, V, E), for int8
``tokens_scale`` (N, V, T), ``pooled_scale`` (N, V) and their outlier arrays (see ``quant``), ``lengths``
(N,), ``input_ids`` (N, T), ``view_params`` (N, V, P), ``index`` (N,), and ``shards_done`` (num_shards,)
uint8 — one chunk per shard, so writers of different shards never touch the same file. Group
attribute ``mmkd`` holds the provenance and ``complete``.

A shard is the unit of work: it is written whole, then marked done. Resume skips done shards.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from . import quant
from .errors import MmkdError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# provenance fields that must agree for a store to be resumed or reused; `versions` is recorded, not compared
CONFIG_FIELDS = ("format_version", "teacher", "recipe", "preprocess", "views", "dataset", "storage")
TARGET_CHUNK_BYTES = 4 << 20
CHUNKS_PER_SHARD = 16


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
            raise MmkdError(
                f"--shard-size {self.shard_size} must be a multiple of the chunk size {self.chunk_size}"
            )
        self.shard_size = min(self.shard_size, math.ceil(self.num_samples / self.chunk_size) * self.chunk_size)

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
        }
        if self.dtype == "int8":
            out["int8_outliers"] = {"tokens": quant.outliers_for(self.dim),
                                    "pooled": quant.outliers_for(self.pooled_dim)}
            out["dequantize"] = quant.INT8_RULE
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
        return out


def _codecs(dtype: str):
    # byte-shuffled zstd: float mantissas compress poorly, exponents and padding zeros well
    size = np.dtype(dtype).itemsize
    shuffle = BloscShuffle.shuffle if size > 1 else BloscShuffle.noshuffle
    return [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=size)]


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


class StoreWriter:
    """Creates or resumes a store and writes it shard by shard."""

    def __init__(self, path: Path, layout: Layout, group: zarr.Group) -> None:
        self.path, self.layout, self.group = path, layout, group
        self._arrays = {name: group[name] for name in layout.arrays()}
        self._done = group["shards_done"]

    @classmethod
    def open(cls, path: str | Path, layout: Layout, config: dict[str, Any], versions: dict[str, str],
             overwrite: bool = False, extra: dict[str, Any] | None = None) -> StoreWriter:
        """Create a new store, or resume one whose configuration equals ``config``.

        Args:
            path: Store directory.
            layout: Shapes and storage.
            config: Provenance fields in CONFIG_FIELDS except ``storage`` and ``format_version``.
            versions: Library versions, recorded.
            overwrite: Replace an existing store whose configuration differs.
            extra: Further attributes recorded but not compared (e.g. where the source data was read).
        """
        path = Path(path)
        full = {"format_version": FORMAT_VERSION, **config, "storage": layout.storage_attrs()}
        if path.exists():
            diff = None
            try:
                existing = zarr.open_group(str(path), mode="r").attrs.get("mmkd")
            except Exception:  # noqa: BLE001 - anything unreadable is "not our store"
                existing = None
            if existing is None:
                if not overwrite:
                    raise MmkdError(f"{path} exists and is not an mmkd store; pass --overwrite to replace it")
            else:
                stored = {k: existing.get(k) for k in CONFIG_FIELDS}
                diff = config_diff(stored, full)
                if diff is None and not overwrite:
                    log.info("resuming %s", path)
                    return cls(path, layout, zarr.open_group(str(path), mode="r+"))
                if diff is not None and not overwrite:
                    raise MmkdError(
                        f"{path} holds a store with another configuration ({_describe_diff(stored, full, diff)}); "
                        "pass --overwrite to replace it or choose another --out"
                    )
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        for name, (shape, dtype) in layout.arrays().items():
            chunks = (layout.chunk_size, *shape[1:])
            shards = (layout.shard_size, *shape[1:])
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                               compressors=_codecs(dtype), fill_value=0)
        group.create_array("shards_done", shape=(layout.num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=None)
        group.attrs["mmkd"] = {**full, **(extra or {}), "versions": versions, "complete": False}
        return cls(path, layout, group)

    def done_shards(self) -> set[int]:
        return {int(i) for i in np.flatnonzero(self._done[:])}

    def write_shard(self, k: int, data: dict[str, np.ndarray]) -> None:
        """Write shard k whole, then mark it done.

        Args:
            k: Shard number.
            data: ``tokens`` (n, V, T, D) float32 (omitted for pooled-only stores), ``pooled`` (n, V, E)
                float32, ``lengths``, ``index`` and, as the layout has them, ``input_ids``, ``view_params``.
        """
        lo, hi = self.layout.shard_range(k)
        enc = dict(data)
        for name in ("tokens", "pooled"):
            if name not in self._arrays:
                continue
            if self.layout.dtype == "int8":
                x = enc.pop(name)
                enc.update(quant.encode_int8(x, quant.outliers_for(x.shape[-1]), name))
            else:
                enc[name] = quant.encode_float(enc[name], self.layout.dtype)
        for name, arr in self._arrays.items():
            value = enc[name]
            if value.shape[0] != hi - lo:
                raise ValueError(f"shard {k}: {name} has {value.shape[0]} samples, expected {hi - lo}")
            arr[lo:hi] = value.astype(arr.dtype, copy=False)
        self._done[k] = 1

    def finish(self) -> bool:
        """Mark the store complete when every shard is done; returns whether it is."""
        complete = len(self.done_shards()) == self.layout.num_shards
        attrs = dict(self.group.attrs["mmkd"])
        if complete and not attrs.get("complete"):
            attrs["complete"] = True
            self.group.attrs["mmkd"] = attrs
        return complete


class StoreReader:
    """Reads a store. Opens the zarr group lazily, so the object can be pickled to DataLoader workers.

    Args:
        path: Store directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
        names = names or ("tokens", "pooled", "lengths", "input_ids", "view_params", "index")
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
        """Bytes on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def open_store(path: str | Path) -> StoreReader:
    """Open a store for reading."""
    return StoreReader(path)


def layout_dict(layout: Layout) -> dict[str, Any]:
    return asdict(layout)
