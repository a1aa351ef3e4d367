"""What a store holds: its arrays' names, shapes, dtypes and dimension names, how they are chunked and sharded
(``Layout``), and the attributes that say how each target array decodes. The format is described in
docs/store.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import quant
from ..errors import MmkdError
from .codecs import DEFAULT_CODEC

TARGET_CHUNK_BYTES = 4 << 20
CHUNKS_PER_SHARD = 16
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
        """Shards in the store (the last may be shorter)."""
        return math.ceil(self.num_samples / self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Samples [lo, hi) of shard ``k``."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)

    def storage_attrs(self) -> dict[str, Any]:
        """The provenance's ``storage`` record: dtype, chunking, codec and, as the dtype needs, its decoding."""
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
