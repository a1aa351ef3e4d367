"""Repairing a damaged store: the shards ``verify`` found damaged are marked not done and extracted again
with the configuration the store records, so the result equals the undamaged store (the extraction is
deterministic per shard, and resuming a store checks every compared field against the run). An added
teacher's damaged shards are extracted again the same way, as ``--add-teacher`` with its group's record."""

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
    """The ExtractConfig that wrote the store at ``path``, from its recorded provenance (a teacher group's:
    the ``--add-teacher`` run that wrote it into the store it lies in).

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
    group = attrs.get("teacher_group")
    added = {"add_teacher": build["name"], "teacher_name": group} if group else {}
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
        out=path.parent.parent if group else path,  # a teacher group lies in teachers/ of its store
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
        **added,
    )


def repair(
    report: Report, weights: str | None = None, device: str = "cpu", show_progress: bool = True
) -> list[ExtractSummary]:
    """Extract the damaged shards of ``report`` again, in place: the store's, then each added teacher's.

    Args:
        weights: The weights of the teacher whose shards are damaged, when no longer where its record says
            (with several teachers damaged, each is found where its record says).

    Raises:
        MmkdError: the store is not repairable (attributes or layout damaged, its own or a teacher's), or the
            recorded configuration no longer reproduces it (the resume check names the field).
    """
    if not report.repairable:
        raise MmkdError(f"{report.path}: attributes or layout are damaged, which re-extracting shards cannot mend")
    damaged = [r for r in (report, *report.teachers.values()) if r.damaged_shards]
    return [_repair_one(r, weights if len(damaged) == 1 else None, device, show_progress) for r in damaged]


def _repair_one(report: Report, weights: str | None, device: str, show_progress: bool) -> ExtractSummary:
    path = report.path
    attrs = read_attrs(path)
    if attrs is None:
        raise MmkdError(f"{path}: not an mmkd store")
    cfg = config_from_store(path, attrs, weights, device)
    _mark_not_done(path, report.damaged_shards, cfg.out)
    log.warning("%s: extracting shards %s again", path, ", ".join(map(str, report.damaged_shards)))
    return extract(cfg, show_progress=show_progress)


def _mark_not_done(path: Location, shards: list[int], store: Location) -> None:
    """Under the lock of ``store`` (the store ``path`` is, or lies in): the shards not done, their files deleted
    (a shard's damaged index would be read back when it is written again), the store not complete."""
    lock = StoreLock(lock_path(store))
    lock.acquire(store)
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
