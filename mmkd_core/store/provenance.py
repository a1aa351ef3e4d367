"""A store's provenance: the group attribute ``mmkd`` (teacher, recipe, preprocessing, views, dataset, storage,
versions, completion), how a new store's record is made, and how a recorded one is compared with what a run
expects (resume, reuse) and read without opening the store with zarr."""

from __future__ import annotations

import json
from typing import Any

import zarr

from ..location import Location
from .codecs import recorded_codec

# 2: every chunk carries a crc32c checksum (format 1 had them on the shard index only); stores of format 1
# are still read, without the check
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# provenance fields that must agree for a store to be resumed or reused; `versions` is recorded, not compared
CONFIG_FIELDS = ("format_version", "teacher", "recipe", "preprocess", "views", "dataset", "storage")
# keys of ``storage`` that describe the dtype's decoding and were added after format 1 was first written: a
# store recorded without them is compared (on resume) as if they were absent from the expected record too
LATER_STORAGE_KEYS = ("decode",)


def read_attrs(path: Location) -> dict[str, Any] | None:
    """The ``mmkd`` attribute of the zarr v3 group at ``path``, read from its zarr.json alone.

    Returns:
        The provenance; None when ``path`` is not a zarr group or has no ``mmkd`` attribute.
    """
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = (meta.get("attributes") or {}).get("mmkd")
    return attrs if isinstance(attrs, dict) else None


def expected_record(config: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
    """The compared fields (CONFIG_FIELDS) of a store written with ``config`` and ``storage``."""
    return {"format_version": FORMAT_VERSION, **config, "storage": storage}


def new_record(expected: dict[str, Any], extra: dict[str, Any] | None, versions: dict[str, str]) -> dict[str, Any]:
    """The ``mmkd`` attribute of a new store: its compared fields, ``extra`` (recorded, not compared), the
    library ``versions`` and ``complete`` false."""
    return {**expected, **(extra or {}), "versions": versions, "complete": False}


def mark_complete(group: zarr.Group) -> None:
    """Record in the store's attribute that every shard is done (once; a complete store is left as it is)."""
    attrs = dict(group.attrs["mmkd"])
    if not attrs.get("complete"):
        attrs["complete"] = True
        group.attrs["mmkd"] = attrs


def compare_recorded(
    existing: dict[str, Any], expected: dict[str, Any], codec_given: bool
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Compare an existing store's record with the one a run expects, as a resume compares them.

    A store recorded before its codec was holds zstd-3, and the LATER_STORAGE_KEYS it was written without are
    left out of the expected record; without a codec given (``--codec``), the store's own is expected.

    Args:
        existing: The store's ``mmkd`` attribute.
        expected: The run's record (``expected_record``).
        codec_given: Whether the run names its codec.

    Returns:
        (stored, expected) as compared, and the first field that differs (``config_diff``) or None.
    """
    stored = {k: existing.get(k) for k in CONFIG_FIELDS}
    if isinstance(stored["storage"], dict):  # recorded before the codec was: zstd-3
        stored["storage"] = {**stored["storage"], "codec": recorded_codec(stored["storage"])}
    expected = as_recorded(expected, stored)
    if not codec_given and isinstance(stored["storage"], dict):  # no --codec: the store's own
        expected = {**expected, "storage": {**expected["storage"], "codec": stored["storage"]["codec"]}}
    return stored, expected, config_diff(stored, expected)


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
        elif _json_form(a) != _json_form(b):
            return name
    return None


def as_recorded(full: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """``full`` without the LATER_STORAGE_KEYS that ``stored`` was written without (an older store resumes)."""
    st, sst = full.get("storage"), stored.get("storage")
    if not isinstance(st, dict) or not isinstance(sst, dict):
        return full
    return {**full, "storage": {k: v for k, v in st.items() if k in sst or k not in LATER_STORAGE_KEYS}}


def _json_form(v: Any) -> Any:
    """``v`` as JSON gives it back: tuples come back from JSON as lists."""
    return json.loads(json.dumps(v, default=str))


def describe_diff(stored: dict, expected: dict, field: str) -> str:
    """``field: store has X, expected Y`` for a dotted field name (``config_diff``'s)."""

    def get(d: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return "<absent>"
            d = d[part]
        return d

    return f"{field}: store has {get(stored, field)!r}, expected {get(expected, field)!r}"
