"""An added image teacher reads the store's own views: ``ReplayImageFeeder``.

Each view's parameters (crop box and flip, in source pixels) are read from the store's ``view_params``, shard
by shard, as the loader asks for them; every view is first rendered as the store's teacher read it (its size
and interpolation) and checked against the stored ``view_checksum``, then rendered at the added teacher's
size and normalisation (the same pixels when the size and interpolation agree). A view that does not replay
stops the run, naming the sample and the view. The group's ``view_params`` are the store's bytes; its
``view_checksum`` is of its own teacher's input, as in any store.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmkd_core.errors import MmkdError
from mmkd_core.store import StoreReader
from mmkd_core.views import ViewSpec, normalize, render_pixels, render_versions, view_checksum, view_spec

from .feeders import ImageFeeder


class ReplayImageFeeder(ImageFeeder):
    """``ImageFeeder`` over the views stored in ``root``: the same samples, count, seed and crops; rendered at
    the teacher's own size, normalisation and interpolation.

    Args:
        dataset: The store's samples.
        teacher: The added image teacher.
        n: Samples.
        root: The store's first teacher (its ``view_params``, ``view_checksum`` and ``views`` record).
        workers: Image decoding processes.
    """

    def __init__(self, dataset, teacher, n: int, root: StoreReader, workers: int) -> None:
        self.root, self.root_spec = root, view_spec(root.attrs)
        rs = self.root_spec
        super().__init__(dataset, teacher, n, rs.count, rs.seed, rs.scale, workers)
        pre = teacher.preprocess
        # the views are drawn by the store's record (count, seed, eval crop, random crops); only the rendering is
        # this teacher's
        self.spec = dataclasses.replace(
            rs, size=pre.size, mean=tuple(pre.mean), std=tuple(pre.std), interpolation=pre.interpolation
        )
        self._views = _ReplayViews(dataset, self.root_spec, self.spec)

    def probe_batch(self) -> dict[str, Any]:
        params, stored = self.root.raw("view_params", 0, 1), self.root.raw("view_checksum", 0, 1)
        pixels, _, _, sums = self._views[(0, params[0])]
        self._check(0, stored, sums[None].numpy())
        return {
            "inputs": {"pixel_values": pixels[:1].to(self._device())},
            "positions": np.array([0]),
            "view_ids": np.array([0]),
        }

    def batches(self, shards: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """Batches of each (shard, lo, hi) in turn, their stored views read shard by shard (``_StoredViews``)."""
        sampler = _StoredViews(self.root, shards, max(1, batch_size // self.views))
        loader = DataLoader(self._views, batch_sampler=sampler, num_workers=self.workers)
        for pixels, params, idx, sums in loader:
            k, lo, stored = sampler.issued.popleft()  # the loader keeps the sampler's order
            self._check(lo, stored, sums.numpy())
            yield self.teacher_batch(k, pixels, params, idx)

    def extra_attrs(self) -> dict[str, Any]:
        """The rendering libraries (``ImageFeeder``) and whose views these are."""
        return {**super().extra_attrs(), "views_of": self.root.teacher_name}

    def _check(self, lo: int, stored: np.ndarray, replayed: np.ndarray) -> None:
        """Refuse rows [lo, lo + b) whose views, rendered as the store's teacher read them, differ from their
        stored checksums (``replayed`` are int64 views of the uint64 checksums)."""
        replayed = replayed.view(np.uint64)
        bad = np.argwhere(stored != replayed)
        if not len(bad):
            return
        row, view = (int(x) for x in bad[0])
        recorded = (self.root.attrs.get("view_render") or {}).get("versions") or {}
        now = render_versions()
        changed = [
            f"{k} {recorded.get(k)} then, {now.get(k)} now" for k in sorted(now) if recorded.get(k) != now.get(k)
        ]
        why = "; rendering versions differ: " + ", ".join(changed) if changed else "; the source image changed"
        raise MmkdError(
            f"{self.root.path}: sample {lo + row}, view {view} does not replay (checksum "
            f"{int(stored[row, view]):016x} stored, {int(replayed[row, view]):016x} now{why}): an added teacher "
            "must read the views the store's teacher read; give --data-root of the store's data"
        )


class _StoredViews:
    """The DataLoader's batch sampler: each shard's rows in batches, every row with its stored view parameters,
    read from the store shard by shard as the loader asks (memory: one shard's parameters). What it handed
    out waits in ``issued`` — (shard, first row, stored checksums) per batch — in the loader's order."""

    def __init__(self, root: StoreReader, shards: list[tuple[int, int, int]], per_batch: int) -> None:
        self.root, self.shards, self.per_batch = root, shards, per_batch
        self.issued: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()

    def __iter__(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        for k, lo, hi in self.shards:
            params = self.root.raw("view_params", lo, hi)
            stored = self.root.raw("view_checksum", lo, hi)
            for s in range(lo, hi, self.per_batch):
                e = min(s + self.per_batch, hi)
                self.issued.append((k, s, stored[s - lo : e - lo]))
                yield [(i, params[i - lo]) for i in range(s, e)]


class _ReplayViews(Dataset):
    """Renders one sample's stored views: as the store's teacher read them (their checksums) and as the added
    teacher reads them. Runs in DataLoader workers; items are ``(row, its views' parameters)``."""

    def __init__(self, dataset, root_spec: ViewSpec, spec: ViewSpec) -> None:
        self.dataset, self.root_spec, self.spec = dataset, root_spec, spec
        self.same_pixels = (root_spec.size, root_spec.interpolation) == (spec.size, spec.interpolation)

    def __getitem__(self, item: tuple[int, np.ndarray]):
        i, params = item
        image = self.dataset.image(i)
        theirs = np.stack([render_pixels(image, p, self.root_spec) for p in params])
        sums = view_checksum(normalize(theirs, self.root_spec), self.root_spec)
        mine = theirs if self.same_pixels else np.stack([render_pixels(image, p, self.spec) for p in params])
        return normalize(mine, self.spec), torch.from_numpy(np.array(params)), i, torch.from_numpy(sums.view(np.int64))

    def __len__(self) -> int:
        return len(self.dataset)
