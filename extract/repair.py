"""Repairing a damaged store: the shards ``verify`` found damaged are marked not done and extracted again
with the configuration the store records, so the result equals the undamaged store (the extraction is
deterministic per shard, and resuming a store checks every compared field against the run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from mmkd_core.errors import MmkdError
from mmkd_core.location import Location
from mmkd_core.store import StoreLock, codec_name, lock_path, read_attrs
from mmkd_core.store.verify import Report

from .config import ExtractConfig
from .run import ExtractSummary, extract

log = logging.getLogger(__name__)


def config_from_store(
    path: Location, attrs: dict[str, Any], weights: str | None = None, device: str = "cpu"
) -> ExtractConfig:
    """The ExtractConfig that wrote the store at ``path``, from its recorded provenance.

    Args:
        weights: The teacher's weights when they are no longer where the store says (``teacher.source``).
    """
    build, teacher = attrs.get("teacher_build") or {}, attrs["teacher"]
    dataset, views, recipe, storage = attrs["dataset"], attrs["views"], attrs["recipe"], attrs["storage"]
    if "name" not in build or "name" not in dataset:
        raise MmkdError(f"{path}: the store does not record how it was extracted (teacher_build, dataset.name)")
    source = str(teacher.get("source") or "")
    random = source == "random"
    if weights is None and not random and not source.startswith(("package:", "hub:")) and Path(source).exists():
        weights = source
    return ExtractConfig(
        teacher=build["name"],
        teacher_options=dict(build.get("options") or {}),
        weights=weights,
        random_weights=random,
        dataset=dataset["name"],
        split=dataset.get("split", "train"),
        dataset_options=dict(dataset.get("options") or {}),
        data_root=attrs.get("data_root"),
        limit=dataset.get("limit"),
        out=path,
        views=int(views["count"]),
        seed=int(views.get("seed", 0)),
        crop_scale=tuple(views.get("scale", (0.08, 1.0))),
        layers=",".join(str(i) for i in recipe["layers"]),
        pool=recipe.get("pool"),
        instance_norm=bool(recipe.get("instance_norm", True)),
        layer_norm=bool(recipe.get("layer_norm", True)),
        pooled_only=not storage["tokens"],
        autocast=recipe.get("autocast") or "none",
        dtype=storage["dtype"],
        codec=codec_name(storage["codec"]) if storage.get("codec") else None,
        chunk_size=int(storage["chunk_samples"]),
        shard_size=int(storage["shard_samples"]),
        device=device,
    )


def repair(
    report: Report, weights: str | None = None, device: str = "cpu", show_progress: bool = True
) -> ExtractSummary:
    """Extract the damaged shards of ``report`` again, in place.

    Raises:
        MmkdError: the store is not repairable (its attributes or layout are damaged), or the recorded
            configuration no longer reproduces it (the resume check names the field).
    """
    path = report.path
    if not report.repairable:
        raise MmkdError(f"{path}: its attributes or layout are damaged, which re-extracting shards cannot mend")
    attrs = read_attrs(path)
    if attrs is None:
        raise MmkdError(f"{path}: not an mmkd store")
    cfg = config_from_store(path, attrs, weights, device)
    _mark_not_done(path, report.damaged_shards)
    log.warning("%s: extracting shards %s again", path, ", ".join(map(str, report.damaged_shards)))
    return extract(cfg, show_progress=show_progress)


def _mark_not_done(path: Location, shards: list[int]) -> None:
    """Under the store's lock: the shards not done, their files deleted (a shard's damaged index would be read
    back when it is written again), the store not complete."""
    lock = StoreLock(lock_path(path))
    lock.acquire(path)
    try:
        group = zarr.open_group(str(path), mode="r+")
        done = group["shards_done"]
        for k in shards:
            done[k] = 0
        for name, arr in group.arrays():
            if name == "shards_done":
                continue
            for k in shards:
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"
                sync(group.store.delete(key))
        attrs = dict(group.attrs["mmkd"])
        attrs["complete"] = False
        group.attrs["mmkd"] = attrs
    finally:
        lock.release()
