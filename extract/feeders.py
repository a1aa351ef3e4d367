"""Feeders: what gives a teacher its inputs for a range of samples (tokenized text, or rendered image views)
and turns its outputs into a shard's arrays. Every kind (text, image, joint, captions) has the ``Feeder``
protocol; the run, ``--plan`` and the cluster's workers use no other name of a feeder."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmkd_core.targets import recipe_targets
from mmkd_core.views import NUM_PARAMS, ViewSpec, draw_params, render_versions, render_views, view_checksum

from .dedupe import DistinctInputs, group_rows

TOKENIZE_CHUNK = 4096

# (name, trailing shape, dtype, dimension names): an array a feeder adds to the store (``Layout.extras``)
Extra = tuple[str, tuple[int, ...], str, tuple[str, ...]]


class Feeder(Protocol):
    """What feeds a teacher: the store's samples as teacher inputs, the teacher's outputs as shard arrays.

    A batch is a dict: ``inputs`` (the teacher's keyword arguments), ``positions`` (the store row each result
    goes to), ``view_ids`` (its view), ``shard``, and optionally ``take`` (row j gets result ``take[j]``).

    Attributes:
        views: Views per sample.
        view_params: Augmentation parameters per view (``view_params``' last axis; 0: none stored).
        distinct_inputs: Distinct teacher inputs among the samples, each computed once; None: every sample
            and view is computed (images).
    """

    views: int
    view_params: int

    @property
    def distinct_inputs(self) -> int | None: ...

    def probe_batch(self) -> dict[str, Any]:
        """The first sample's first view: the layout probe's input."""
        ...

    def batches(self, shards: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """The batches of each ``(shard, lo, hi)`` in turn; a batch never straddles two shards."""
        ...

    def sample_batches(self, ranges: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """``--plan``'s batches: each ``(j, lo, hi)`` as the rows the teacher would read (``shard`` is j)."""
        ...

    def targets(self, teacher, batch: dict[str, Any], recipe: dict, autocast: Callable) -> dict[str, Any]:
        """The batch's results: ``tokens`` (or None), ``pooled``, ``mask`` and any per-view extras."""
        ...

    def time_steps(self, probe: dict) -> int:
        """The store's T, from the probe's result."""
        ...

    def row_lengths(self, n: int, time_steps: int) -> np.ndarray:
        """(n,) every row's valid time steps (``--plan`` sizes the arrays with a time axis by them)."""
        ...

    def extras(self) -> tuple[Extra, ...]:
        """Arrays beside the targets: those whose second axis is ``view`` are scattered from ``targets``' outputs
        like ``pooled``; the others come from ``finish_shard``."""
        ...

    def describe_views(self) -> dict[str, Any]:
        """The store's ``views`` attribute."""
        ...

    def extra_attrs(self) -> dict[str, Any]:
        """Provenance recorded beside the compared fields."""
        ...

    def finish_shard(self, shard: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        """A computed shard with the arrays the feeder knows itself (lengths, ids, view parameters, index)."""
        ...


class TextFeeder:
    """Tokenizes the whole selection up front (it fixes the store's T) and batches by length.

    Rows with the same token ids are one teacher input, computed once per run and written to every row
    (``dedupe``); batches are sorted by length within a window of inputs, so short batches spend less
    time on padding.
    """

    views = 1
    view_params = 0

    def __init__(self, dataset, teacher, n: int) -> None:
        self.teacher = teacher
        ids: list[np.ndarray] = []
        for lo in range(0, n, TOKENIZE_CHUNK):
            texts = [dataset.text(i) for i in range(lo, min(n, lo + TOKENIZE_CHUNK))]
            enc = teacher.tokenize(texts)
            for row, m in zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), strict=True):
                ids.append(row[: int(m.sum())])
        self.lengths = np.array([len(r) for r in ids], dtype=np.int32)
        self.pad_id = teacher.pad_token_id
        self.input_ids = np.full((n, int(self.lengths.max())), self.pad_id, dtype=np.int32)
        for i, r in enumerate(ids):
            self.input_ids[i, : len(r)] = r
        self.distinct = DistinctInputs(group_rows(self.input_ids, self.lengths), self.lengths)

    def describe_views(self) -> dict[str, Any]:
        return {"count": 1}

    def extra_attrs(self) -> dict[str, Any]:
        """Provenance recorded beside the compared fields (nothing for text)."""
        return {}

    def time_steps(self, probe: dict) -> int:
        return self.input_ids.shape[1]

    def row_lengths(self, n: int, time_steps: int) -> np.ndarray:
        return self.lengths

    def extras(self) -> tuple[Extra, ...]:
        return ()

    @property
    def distinct_inputs(self) -> int:
        return self.distinct.count

    @property
    def teacher_inputs(self) -> int:
        return self.distinct.computed

    def rows_batch(self, rows: np.ndarray, shard: int = -1) -> dict[str, Any]:
        """The token ids of ``rows``, one teacher input each (no deduplication), padded to the longest."""
        t = int(self.lengths[rows].max())
        ids = torch.from_numpy(self.input_ids[rows, :t].astype(np.int64))
        mask = (torch.arange(t)[None] < torch.from_numpy(self.lengths[rows]).long()[:, None]).long()
        dev = _device(self.teacher)
        return {
            "inputs": {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)},
            "positions": rows,
            "view_ids": np.zeros(len(rows), dtype=np.int64),
            "shard": shard,
        }

    def _inputs(self, groups: np.ndarray) -> dict[str, Any]:
        return {"inputs": self.rows_batch(self.distinct.first[groups])["inputs"]}

    def probe_batch(self) -> dict[str, Any]:
        """Row 0's input, its canonical batch: its result is kept and placed like any other (no positions)."""
        return {**self._inputs(np.array([0])), "groups": np.array([0])}

    def batches(self, shards: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """Each (shard, lo, hi) in turn: the distinct inputs it needs (``DistinctInputs.batches``)."""
        return self.distinct.batches(shards, batch_size, self._inputs)

    def sample_batches(self, ranges: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """Each range's rows as one batch (``--plan`` needs representative rows, not the canonical batches)."""
        return (self.rows_batch(np.arange(lo, hi), j) for j, lo, hi in ranges)

    def targets(self, teacher, batch: dict[str, Any], recipe: dict, autocast: Callable) -> dict[str, Any]:
        """One result per distinct input of a batch of ``batches`` (kept from an earlier batch, or computed
        now); one per row of a batch of ``sample_batches``, which has no ``groups``."""
        if "groups" not in batch:
            return teacher_targets(teacher, batch, recipe, autocast)
        return self.distinct.targets(batch, lambda b: teacher_targets(teacher, b, recipe, autocast))

    def finish_shard(self, shard: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        return {
            **shard,
            "lengths": self.lengths[lo:hi],
            "input_ids": self.input_ids[lo:hi],
            "index": np.arange(lo, hi, dtype=np.int64),
        }


def teacher_targets(teacher, batch: dict[str, Any], recipe: dict, autocast: Callable) -> dict[str, Any]:
    """A batch through the teacher and the recipe: ``tokens``, ``pooled`` and ``mask``."""
    with autocast():  # the teacher only: the target statistics are taken in float32 outside autocast
        out = teacher(**batch["inputs"])
    with target_threads(out.mask):
        tokens, pooled = recipe_targets(out.hidden_states, out.mask, out.embed, recipe)
    return {"tokens": tokens, "pooled": pooled, "mask": out.mask}


@contextlib.contextmanager
def target_threads(on: torch.Tensor) -> Iterator[None]:
    """Half the intra-op threads (at least one) for the target math on the CPU, then all of them again.

    The target math is a few memory-bound passes over (B, T, D) per layer: they stop gaining from threads
    long before the matmuls do, and each pass waits for its slowest thread. On this project's 2 shared cores
    one thread was as fast as two at best, and 4x faster at the median under load (26 ms against 92-116 ms
    for a MiniLM batch), where two made the target math a quarter of the loop. The values are the same
    (reductions here do not split along the reduced axis; checked bit for bit at 1 and 2 threads).
    """
    n = torch.get_num_threads()
    if on.device.type != "cpu" or n < 2:
        yield
        return
    torch.set_num_threads(max(1, n // 2))
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _device(teacher) -> torch.device:
    """Where the teacher's inputs go (the CPU for a tokenizer that is never run)."""
    param = next(teacher.parameters(), None) if hasattr(teacher, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


class _Views(Dataset):
    """Renders every view of one sample; runs in DataLoader workers (holds the dataset, not open files)."""

    def __init__(self, dataset, spec: ViewSpec) -> None:
        self.dataset, self.spec = dataset, spec

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset.image(i)
        params = draw_params(*image.size, self.spec, i)
        return render_views(image, params, self.spec), torch.from_numpy(params), i


class ImageFeeder:
    """Renders K views per image (view 0 the eval transform) and records their parameters and the checksum
    of each view's teacher input (``view_checksum``), computed from the very batch tensor the teacher reads."""

    view_params = NUM_PARAMS
    distinct_inputs = None  # every sample and view is computed (see ``dedupe`` for why images are not grouped)

    def __init__(self, dataset, teacher, n: int, views: int, seed: int, crop_scale, workers: int) -> None:
        pre = teacher.preprocess
        self.dataset, self.teacher, self.workers = dataset, teacher, workers
        self.views = views
        self.spec = ViewSpec(
            count=views,
            size=pre.size,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
            interpolation=pre.interpolation,
            crop_pct=pre.crop_pct,
            crop_mode=getattr(pre, "crop_mode", "center"),
            scale=tuple(crop_scale),
            seed=seed,
        )
        self._params: dict[int, np.ndarray] = {}
        self._checksums: dict[int, np.ndarray] = {}

    def describe_views(self) -> dict[str, Any]:
        return self.spec.describe()

    def extra_attrs(self) -> dict[str, Any]:
        """The libraries that render the views, recorded but not compared: another Pillow must not refuse a
        resume or a reuse; the loader re-renders views and names these when a checksum differs."""
        return {"view_render": {"versions": render_versions()}}

    def time_steps(self, probe: dict) -> int:
        return int(probe["mask"].shape[1])

    def row_lengths(self, n: int, time_steps: int) -> np.ndarray:
        return np.full(n, time_steps)

    def extras(self) -> tuple[Extra, ...]:
        return ()

    def targets(self, teacher, batch: dict[str, Any], recipe: dict, autocast: Callable) -> dict[str, Any]:
        return teacher_targets(teacher, batch, recipe, autocast)

    def _device(self):
        return _device(self.teacher)

    def probe_batch(self) -> dict[str, Any]:
        pixels, _, _ = _Views(self.dataset, self.spec)[0]
        return {
            "inputs": {"pixel_values": pixels[:1].to(self._device())},
            "positions": np.array([0]),
            "view_ids": np.array([0]),
        }

    def batches(self, shards: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        """Batches of each (shard, lo, hi) in turn, from one DataLoader: workers start once per run, not per
        shard (an ImageNet run with several views has tens of thousands of shards)."""
        per_batch = max(1, batch_size // self.views)
        rows = [(k, list(range(s, min(s + per_batch, hi)))) for k, lo, hi in shards for s in range(lo, hi, per_batch)]
        loader = DataLoader(
            _Views(self.dataset, self.spec), batch_sampler=[b for _, b in rows], num_workers=self.workers
        )
        for (k, _), (pixels, params, idx) in zip(rows, loader, strict=True):
            yield self.teacher_batch(k, pixels, params, idx)

    def teacher_batch(self, k: int, pixels: torch.Tensor, params: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
        """Shard ``k``'s batch of rendered views (b, V, 3, H, W) as the teacher reads it; the views' parameters
        and the checksums of their teacher inputs are kept for ``finish_shard``."""
        b, v = pixels.shape[0], self.views
        checksums = view_checksum(pixels, self.spec)  # (b, V): of the tensor that goes to the teacher
        for i, p, c in zip(idx.tolist(), params.numpy(), checksums, strict=True):
            self._params[i] = p
            self._checksums[i] = c
        return {
            "inputs": {"pixel_values": pixels.reshape(b * v, *pixels.shape[2:]).to(self._device())},
            "positions": np.repeat(idx.numpy(), v),
            "view_ids": np.tile(np.arange(v), b),
            "shard": k,
        }

    def sample_batches(self, ranges: list[tuple[int, int, int]], batch_size: int) -> Iterator[dict[str, Any]]:
        return self.batches(ranges, batch_size)

    def finish_shard(self, shard: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        params = np.stack([self._params.pop(i) for i in range(lo, hi)])
        checksums = np.stack([self._checksums.pop(i) for i in range(lo, hi)])
        t = shard["tokens"].shape[2] if "tokens" in shard else 0
        return {
            **shard,
            "lengths": np.full(hi - lo, t, dtype=np.int32),
            "view_params": params,
            "view_checksum": checksums,
            "index": np.arange(lo, hi, dtype=np.int64),
        }
