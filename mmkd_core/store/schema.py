"""The schema of a store's ``mmkd`` attributes, checked whenever a store is opened: a store's attributes are
read from disk, and a damaged or hostile value must end as one line naming the field, never as a
traceback deep in a reader or as a run that trains on nonsense.

Checked: types, ranges and relations (positive chunk and shard sizes, shards whole chunks, views >= 1,
recipe layers within the teacher, a known dtype with the arrays it needs, a ``format_version`` this code
reads) and, given the arrays, that every array has the shape, dtype and chunking the attributes describe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MmkdError
from ..quant import DTYPES, INT8_PARTS, storage_dtype
from ..targets import POOLS
from .provenance import READABLE_VERSIONS

_LARGEST = 2**40  # samples, time steps or features: beyond any real store, and the sizes a reader allocates


class SchemaError(MmkdError):
    """A store's attributes or arrays are not what a store written by mmkd-extract holds."""


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:55] + "..." + text[-2:]


def _fail(where: str, field: str, value: Any, expected: str) -> SchemaError:
    return SchemaError(f"{where}: attribute {field} is {_excerpt(value)}: expected {expected}")


def _get(attrs: Mapping[str, Any], dotted: str, where: str, kind: type | tuple[type, ...], expected: str) -> Any:
    value: Any = attrs
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise SchemaError(f"{where}: attribute {dotted} is missing")
        value = value[part]
    # bool is an int in Python: a count given as true is as wrong as one given as "abc"
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise _fail(where, dotted, value, expected)
    return value


def _present(attrs: Mapping[str, Any], dotted: str) -> bool:
    value: Any = attrs
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _count(attrs: Mapping[str, Any], dotted: str, where: str, low: int = 1) -> int:
    value = _get(attrs, dotted, where, int, f"an integer >= {low}")
    if not low <= value <= _LARGEST:
        raise _fail(where, dotted, value, f"an integer from {low} to {_LARGEST:,}")
    return value


def validate_attrs(attrs: Any, where: str) -> dict[str, Any]:
    """Check a store's ``mmkd`` attributes; returns them. Any violation is one SchemaError naming the field.

    Args:
        attrs: The group's ``mmkd`` attribute as read.
        where: The store, for the message.
    """
    if not isinstance(attrs, Mapping):
        raise _fail(where, "mmkd", attrs, "a mapping of the store's provenance")
    version = _get(attrs, "format_version", where, int, "an integer")
    if version not in READABLE_VERSIONS:
        raise SchemaError(
            f"{where}: format_version {_excerpt(version)} is not one this mmkd reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}); use the mmkd that wrote it, or extract again"
        )
    for section in ("teacher", "recipe", "preprocess", "views", "dataset", "storage"):
        _get(attrs, section, where, dict, "a mapping")
    _get(attrs, "complete", where, bool, "true or false")
    _check_teacher(attrs, where)
    _count(attrs, "views.count", where)
    # what mmkd-extract records and other writers may leave out: checked when present
    if _present(attrs, "dataset.num_samples"):
        _count(attrs, "dataset.num_samples", where)
    if _present(attrs, "dataset.fingerprint"):
        _get(attrs, "dataset.fingerprint", where, str, "a string")
    _check_storage(attrs, where)
    return dict(attrs)


def _check_teacher(attrs: Mapping[str, Any], where: str) -> None:
    name = _get(attrs, "teacher.name", where, str, "a teacher's name")
    if not name.strip():
        raise _fail(where, "teacher.name", name, "a teacher's name")
    layers = _count(attrs, "teacher.num_layers", where) if _present(attrs, "teacher.num_layers") else _LARGEST
    if _present(attrs, "teacher.hidden_size"):
        _count(attrs, "teacher.hidden_size", where)
    if _present(attrs, "recipe.layers"):
        used = _get(attrs, "recipe.layers", where, list, "a list of block indices")
        if not used or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in used):
            raise _fail(where, "recipe.layers", used, f"block indices from 0 to {layers - 1}")
    for flag in ("instance_norm", "layer_norm"):
        if _present(attrs, f"recipe.{flag}"):
            _get(attrs, f"recipe.{flag}", where, bool, "true or false")
    pool = attrs["recipe"].get("pool")
    if pool is not None and pool not in POOLS:
        raise _fail(where, "recipe.pool", pool, f"one of {', '.join(POOLS)}")


def _check_storage(attrs: Mapping[str, Any], where: str) -> None:
    dtype = _get(attrs, "storage.dtype", where, str, f"one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise _fail(where, "storage.dtype", dtype, f"one of {', '.join(DTYPES)}")
    zarr_dtype = attrs["storage"].get("zarr_dtype", storage_dtype(dtype))
    if zarr_dtype != storage_dtype(dtype):
        raise _fail(where, "storage.zarr_dtype", zarr_dtype, f"{storage_dtype(dtype)} for a {dtype} store")
    chunk = _count(attrs, "storage.chunk_samples", where)
    shard = _count(attrs, "storage.shard_samples", where)
    if shard % chunk:
        raise _fail(where, "storage.shard_samples", shard, f"a multiple of storage.chunk_samples ({chunk})")
    _get(attrs, "storage.tokens", where, bool, "true or false")


def expected_arrays(attrs: Mapping[str, Any]) -> dict[str, str]:
    """name -> zarr dtype of the target arrays the attributes say the store holds (validated attributes)."""
    storage = attrs["storage"]
    names = (["tokens"] if storage["tokens"] else []) + ["pooled"]
    out = {name: storage_dtype(storage["dtype"]) for name in names}
    if storage["dtype"] == "int8":
        kinds = {"_scale": "float32", "_outlier_idx": "uint16", "_outlier_val": "float16"}
        for name in names:
            for part in INT8_PARTS[1:]:
                out[name + part] = kinds[part]
    out["lengths"] = "int32"
    out["index"] = "int64"
    return out


def check_arrays(attrs: Mapping[str, Any], arrays: Mapping[str, tuple[tuple[int, ...], str, int]], where: str) -> None:
    """Check the arrays against validated attributes: each array the attributes need is present with the
    store's sample count first, the dtype they name, chunks of ``storage.chunk_samples`` samples, and views
    and time steps that agree across arrays.

    Args:
        arrays: name -> (shape, zarr dtype, samples per chunk) of every array in the store.
    """
    chunk = attrs["storage"]["chunk_samples"]
    n = attrs["dataset"].get("num_samples")
    if n is None:  # the store's own sample count: the index's
        n = arrays["index"][0][0] if "index" in arrays and arrays["index"][0] else 0
    for name, dtype in expected_arrays(attrs).items():
        if name not in arrays and (name != "pooled" or "pooled_scale" in arrays):
            raise SchemaError(f"{where}: array {name} is missing (storage.dtype {attrs['storage']['dtype']!r})")
        if name not in arrays:
            continue
        actual = arrays[name][1]
        if actual != dtype:
            raise SchemaError(f"{where}: array {name} is {actual}, but storage.dtype says {dtype}")
    for name, (shape, _, chunks) in arrays.items():
        if name == "shards_done":
            continue
        if not shape or shape[0] != n:
            raise SchemaError(
                f"{where}: array {name} has {shape[0] if shape else 0} samples, not the store's {n} "
                "(dataset.num_samples, the index)"
            )
        if chunks != chunk:
            raise SchemaError(f"{where}: array {name} has chunks of {chunks} samples, storage.chunk_samples {chunk}")
    shard = attrs["storage"]["shard_samples"]
    if "shards_done" in arrays and arrays["shards_done"][0] != (-(-n // shard),):
        raise SchemaError(
            f"{where}: array shards_done has {arrays['shards_done'][0]} entries, not one per shard of "
            f"{shard} samples ({-(-n // shard)})"
        )
    views = attrs["views"]["count"]
    for name in ("tokens", "pooled", "view_params"):
        if name in arrays and (len(arrays[name][0]) < 2 or arrays[name][0][1] != views):
            raise SchemaError(f"{where}: array {name} holds {arrays[name][0][1:2]} views, views.count {views}")
    steps = {arrays[name][0][2 if name == "tokens" else 1] for name in ("tokens", "input_ids") if name in arrays}
    if len(steps) > 1:
        raise SchemaError(f"{where}: arrays tokens and input_ids disagree on the number of time steps ({steps})")
