"""Streaming batches from a store, for any training loop: contiguous reads, shuffled within a bounded buffer,
exactly resumable.

``StoreBatches`` is an IterableDataset of whole batches (inputs and dequantised targets) in the order
``batch_order`` gives: a pure function of the seed and the epoch, so training resumes at any batch.

DataLoader workers take batches round-robin (worker w yields the epoch's batches k+w, k+w+W, ...), so the
DataLoader hands them out in the epoch's order. Each worker reads the buffers its batches need, so W workers
read the store up to W times; reading is cheap next to image rendering, the reason to use workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch_order import OrderSpec, epoch_batches
from .errors import MmkdError
from .location import Location
from .store import StoreReader, open_store
from .views import ViewSpec, eval_params, normalize, render, render_pixels, view_spec


class StoreBatches(IterableDataset):
    """Batches of inputs and dequantised targets from one store.

    Holds paths and small objects only; the store is opened on first use in each process.

    Args:
        store_path: The store.
        order: What fixes the epoch's batches and their order (``OrderSpec``).
        source: The source dataset, needed to replay image views (image stores); None for text.
        epoch: Epoch to produce.
        start_batch: Skip the epoch's first batches (resumption).
        view: "random" for a random stored view per sample per epoch, or a view number.
        in_memory: Read the whole store into memory first (benchmarks: measuring the cost of streaming).
        image_spec: How to render source images for a student that reads images the teacher did not
            (an image–caption store extracted by a text teacher): the eval crop at this spec.
        image_cache: A dict to keep those rendered images in (uint8), shared across epochs: rendering
            and resizing a source image every epoch costs as much as a small student's step.
        names: Store arrays to read (default all); leaving out ``tokens``/``pooled`` reads inputs only.
        captions: A pair store's caption store (see ``CaptionTable``): each sample (an image) comes with one
            of its captions, drawn per (seed, epoch, image), as ``input_ids``/``attention_mask``, its row
            ``caption``, and for a two-tower store its text target ``caption_pooled``.
        render_spec: Render the stored views' parameters at this spec (the student's size and
            normalisation: the same crops at another resolution) instead of the store's.
    """

    def __init__(
        self,
        store_path: str | Location,
        order: OrderSpec,
        source: Any = None,
        epoch: int = 0,
        start_batch: int = 0,
        view: str | int = "random",
        in_memory: bool = False,
        image_spec: ViewSpec | None = None,
        image_cache: dict[int, np.ndarray] | None = None,
        names: tuple[str, ...] | None = None,
        captions: CaptionTable | None = None,
        render_spec: ViewSpec | None = None,
    ) -> None:
        super().__init__()
        self.store_path, self.order, self.source = store_path, order, source
        self.epoch, self.start_batch, self.view, self.in_memory = epoch, start_batch, view, in_memory
        self.image_spec = image_spec
        self.image_cache = image_cache
        self.names = names
        self.captions, self.render_spec = captions, render_spec
        self._reader: StoreReader | None = None
        self._memory: dict[str, np.ndarray] | None = None

    @property
    def reader(self) -> StoreReader:
        """The store, opened on first use in this process."""
        if self._reader is None:
            self._reader = open_store(self.store_path)
        return self._reader

    def _read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        if self.in_memory:
            if self._memory is None:
                self._memory = self.reader.read(0, len(self.reader), self.names)
            return {k: v[lo:hi] for k, v in self._memory.items()}
        return self.reader.read(lo, hi, self.names)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        lengths = self.reader.raw("lengths", 0, len(self.reader)) if self.order.by_length else None
        current, buffer, pos = None, None, None
        for runs, b in epoch_batches(self.order, self.epoch, lengths, self.start_batch, wid, nw):
            if runs is not current:
                data = [self._read(lo, hi) for lo, hi in runs]
                buffer = {k: np.concatenate([d[k] for d in data]) for k in data[0]}
                offsets = np.concatenate([np.arange(lo, hi) for lo, hi in runs])
                pos = {int(s): j for j, s in enumerate(offsets)}
                current = runs
            yield self._batch(buffer, np.array([pos[int(i)] for i in b]), b)

    def _views_for(self, indices: np.ndarray) -> np.ndarray:
        v = self.reader.views
        if self.view != "random":
            if not 0 <= int(self.view) < v:
                raise MmkdError(f"view {self.view}: the store has {v} views")
            return np.full(len(indices), int(self.view))
        # one draw per (seed, epoch, sample): independent of batching, workers and resumption
        return np.array([np.random.default_rng([self.order.seed, self.epoch, int(i), 1]).integers(v) for i in indices])

    def _batch(self, buffer: dict[str, np.ndarray], rows: np.ndarray, indices: np.ndarray) -> dict[str, Any]:
        views = self._views_for(indices)
        lengths = buffer["lengths"][rows].astype(np.int64)
        t = int(lengths.max())
        out: dict[str, Any] = {
            "index": torch.from_numpy(buffer["index"][rows]),
            "view": torch.from_numpy(views),
            "lengths": torch.from_numpy(lengths),
        }
        out["mask"] = torch.arange(t)[None] < out["lengths"][:, None]
        if "tokens" in buffer:
            out["tokens"] = torch.from_numpy(np.ascontiguousarray(buffer["tokens"][rows, views, :t]))
        if "pooled" in buffer:
            out["pooled"] = torch.from_numpy(np.ascontiguousarray(buffer["pooled"][rows, views]))
        for name in self.reader.extra_names:  # per view like the targets when the array has a view axis
            if name in buffer:
                per_view = self.reader.dims(name)[1:2] == ("view",)
                x = buffer[name][rows, views] if per_view else buffer[name][rows]
                out[name] = torch.from_numpy(np.ascontiguousarray(x))
        if "input_ids" in buffer:
            out["input_ids"] = torch.from_numpy(buffer["input_ids"][rows, :t].astype(np.int64))
            out["attention_mask"] = out["mask"].long()
        if self.captions is not None:
            out.update(self.captions.pick(out["index"].numpy(), self.order.seed, self.epoch))
        if "view_params" in buffer and self.source is not None:
            spec = self.render_spec or view_spec(self.reader.attrs)
            params = buffer["view_params"][rows, views]
            out["pixel_values"] = torch.stack(
                [render(self.source.image(int(i)), p, spec) for i, p in zip(out["index"], params, strict=True)]
            )
        elif self.image_spec is not None and self.source is not None:
            out["pixel_values"] = normalize(
                np.stack([self._eval_pixels(int(i)) for i in out["index"]]), self.image_spec
            )
        return out

    def _eval_pixels(self, i: int) -> np.ndarray:
        cache = self.image_cache
        if cache is not None and i in cache:
            return cache[i]
        image = self.source.image(i)
        spec = self.image_spec
        pixels = render_pixels(image, eval_params(*image.size, spec.crop_pct, spec.crop_mode), spec)
        if cache is not None:
            cache[i] = pixels
        return pixels


class CaptionTable:
    """A pair store's captions in memory (ids, lengths, image rows, text targets): a few bytes per caption.

    Args:
        path: The caption store (``<pair store>/captions``).
    """

    def __init__(self, path: str | Location) -> None:
        self.path = path
        self._data: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_data": None}  # each worker reads its own copy

    def _load(self) -> dict[str, np.ndarray]:
        if self._data is None:
            reader = open_store(self.path)
            data = reader.read(0, len(reader), ("input_ids", "lengths", "image", "pooled"))
            order = np.argsort(data["image"], kind="stable")  # captions of image j: order[start[j]:start[j+1]]
            counts = np.bincount(data["image"])
            data["order"], data["start"] = order, np.concatenate([[0], np.cumsum(counts)])
            if len(counts) and (counts == 0).any():
                raise MmkdError(f"{self.path}: image {int(np.flatnonzero(counts == 0)[0])} has no caption")
            self._data = data
        return self._data

    def pick(self, images: np.ndarray, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        """One caption of each image, drawn per (seed, epoch, image): independent of batching and resumption."""
        d = self._load()
        rows = np.empty(len(images), dtype=np.int64)
        for k, j in enumerate(images.tolist()):
            lo, hi = int(d["start"][j]), int(d["start"][j + 1])
            rows[k] = d["order"][lo + np.random.default_rng([seed, epoch, j, 2]).integers(hi - lo)]
        lengths = d["lengths"][rows].astype(np.int64)
        t = int(lengths.max())
        mask = torch.arange(t)[None] < torch.from_numpy(lengths)[:, None]
        out = {
            "caption": torch.from_numpy(rows),
            "input_ids": torch.from_numpy(d["input_ids"][rows, :t].astype(np.int64)),
            "attention_mask": mask.long(),
        }
        if "pooled" in d:
            out["caption_pooled"] = torch.from_numpy(np.ascontiguousarray(d["pooled"][rows, 0]))
        return out


def make_loader(batches: StoreBatches, workers: int = 0) -> DataLoader:
    """A DataLoader over already-batched items, in the epoch's order.

    It gets its own generator: a DataLoader otherwise draws its base seed from the global RNG each time it
    starts, and a resumed run would then see different dropout masks from an uninterrupted one.
    """
    generator = torch.Generator().manual_seed(batches.order.seed * 1_000_003 + batches.epoch)
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=generator,
    )
