"""Streaming batches from a store: contiguous reads, shuffled within a bounded buffer, exactly resumable.

The epoch plan is a pure function of (store size, chunk size, batch size, seed, epoch, rank, world size):
the store's samples are cut into runs of whole chunks; the runs are shuffled and laid end to end; each
rank takes a contiguous share of that stream; each share is cut into buffers of a fixed number of
samples; samples are shuffled within a buffer and cut into batches. Every read is a contiguous range,
memory is bounded by one buffer, the number of batches is the same in every epoch and on every rank,
and the plan can be replayed from any batch, which is what makes resumption exact.

DataLoader workers take batches round-robin (worker w yields plan batches k+w, k+w+W, ...), so the
DataLoader hands them out in plan order. Each worker reads the buffers its batches need, so W workers
read the store up to W times; reading is cheap next to image rendering, the reason to use workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store
from mmkd_core.views import ViewSpec, eval_params, normalize, render, render_pixels, view_spec


@dataclass(frozen=True)
class PlanSpec:
    """What fixes an epoch's batches.

    Attributes:
        num_samples: Samples in the store.
        chunk_size: Store chunk size; runs are whole chunks.
        batch_size: Samples per batch (the last batch of a buffer may be smaller).
        seed: Shuffle seed.
        run_chunks: Chunks per contiguous read.
        buffer_runs: Runs shuffled together.
        rank: This process's rank.
        world_size: Number of ranks.
        by_length: Within each buffer, batch samples of similar length together (then shuffle the batches):
            text batches are padded to their longest sample, so random batches of short and long sentences
            spend most of their compute on padding.
        drop_last: Yield full batches only (contrastive losses: a short batch has fewer negatives, and its
            loss shows as a spike every epoch); the few samples left over change with the epoch's order.
    """

    num_samples: int
    chunk_size: int
    batch_size: int
    seed: int = 0
    run_chunks: int = 1
    buffer_runs: int = 16
    rank: int = 0
    world_size: int = 1
    by_length: bool = False
    drop_last: bool = False

    @property
    def buffer_samples(self) -> int:
        """Samples shuffled together (memory is bounded by one buffer)."""
        return self.chunk_size * self.run_chunks * self.buffer_runs


def rank_range(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's share of an epoch's sample stream, as positions [lo, hi): sizes differ by at most one."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def num_batches(spec: PlanSpec) -> int:
    """Batches per epoch: the same for every epoch and every rank (DDP ranks step together).

    The largest rank share is cut into buffers of ``buffer_samples`` samples and each buffer into batches;
    a share one sample shorter that would come out one batch short splits its largest batch in two.
    """
    if spec.drop_last:  # full batches only: the smallest share sets the count
        n, b, k = spec.num_samples // spec.world_size, spec.buffer_samples, spec.batch_size
        return (n // b) * (b // k) + (n % b) // k
    return _count(-(-spec.num_samples // spec.world_size), spec.buffer_samples, spec.batch_size)


def _count(n: int, buffer: int, batch: int) -> int:
    return (n // buffer) * -(-buffer // batch) + -(-(n % buffer) // batch)


def check_plan(spec: PlanSpec) -> None:
    """Refuse plans in which the ranks cannot take the same number of steps with every sample once."""
    if spec.num_samples < spec.world_size:
        raise MmkdError(f"the store has {spec.num_samples} samples, fewer than the {spec.world_size} ranks")
    if spec.drop_last and num_batches(spec) == 0:
        raise MmkdError(
            f"--batch-size {spec.batch_size}: no full batch in a share of {spec.num_samples // spec.world_size} "
            "samples (contrastive losses train on full batches only); use a smaller batch"
        )
    if not spec.drop_last and min(spec.batch_size, spec.buffer_samples) == 1 and spec.num_samples % spec.world_size:
        # batches of one sample cannot be split to even out shares that differ by one sample
        raise MmkdError(
            f"--batch-size {spec.batch_size} with {spec.world_size} ranks needs a store size divisible "
            f"by {spec.world_size} ({spec.num_samples} samples): use a larger batch"
        )


def _pieces(starts: np.ndarray, run_len: int, num_samples: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sample ranges covering stream positions [lo, hi) of runs laid end to end in the order ``starts``."""
    lens = np.minimum(starts + run_len, num_samples) - starts
    ends = np.cumsum(lens)
    out = []
    for j in range(int(np.searchsorted(ends, lo, side="right")), len(starts)):
        begin = int(ends[j] - lens[j])
        if begin >= hi:
            break
        a, b = max(lo, begin) - begin, min(hi, int(ends[j])) - begin
        out.append((int(starts[j]) + a, int(starts[j]) + b))
    return out


def epoch_plan(
    spec: PlanSpec, epoch: int, lengths: np.ndarray | None = None
) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
    """This rank's batches of an epoch, grouped by buffer: ``[(runs, batches_of_indices), ...]``.

    The store's runs of whole chunks are shuffled and laid end to end (the short last run, if any, at the
    end); each rank takes a contiguous share of that stream (so every sample is in exactly one rank's
    share), cuts it into buffers of ``buffer_samples`` and shuffles each buffer. With one rank every buffer
    is whole runs; with several, a buffer may begin or end inside a chunk (that chunk is read twice).
    Every count depends only on (N, batch size, buffer, world size), never on the epoch's order:
    ``num_batches`` holds for every epoch and rank.

    Args:
        spec: The plan.
        epoch: Epoch number (seeds the order).
        lengths: Every sample's length, needed with ``spec.by_length``.

    Returns:
        A list of (contiguous sample ranges to read, sample indices of each batch) per buffer.
    """
    check_plan(spec)
    run_len = spec.chunk_size * spec.run_chunks
    full = spec.num_samples // run_len
    # the one short run goes last, so buffers of a single rank's share are whole runs in every epoch
    starts = np.concatenate(
        [
            np.random.default_rng([spec.seed, epoch]).permutation(full) * run_len,
            np.arange(full * run_len, spec.num_samples, run_len),
        ]
    ).astype(np.int64)
    lo, hi = rank_range(spec.num_samples, spec.world_size, spec.rank)
    out = []
    for b, a in enumerate(range(lo, hi, spec.buffer_samples)):
        rng = np.random.default_rng([spec.seed, epoch, spec.rank, b])
        runs = sorted(_pieces(starts, run_len, spec.num_samples, a, min(a + spec.buffer_samples, hi)))
        idx = np.concatenate([np.arange(r0, r1) for r0, r1 in runs])
        idx = idx[rng.permutation(len(idx))]
        if spec.by_length:
            idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches = [idx[i : i + spec.batch_size] for i in range(0, len(idx), spec.batch_size)]
        if spec.drop_last and batches and len(batches[-1]) < spec.batch_size:
            batches.pop()
        if spec.by_length:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        out.append((runs, batches))
    if spec.drop_last:  # a longer share may hold one full batch more than the count: leave its last out
        extra = sum(len(bs) for _, bs in out) - num_batches(spec)
        for _, bs in reversed(out):
            take = min(extra, len(bs))
            del bs[len(bs) - take :]
            extra -= take
    elif sum(len(bs) for _, bs in out) < num_batches(spec):  # a share one sample short: split its largest batch
        bs = out[-1][1]
        j = int(np.argmax([len(x) for x in bs]))
        half = (len(bs[j]) + 1) // 2
        bs[j : j + 1] = [bs[j][:half], bs[j][half:]]
    return out


def plan_batches(
    spec: PlanSpec,
    epoch: int,
    lengths: np.ndarray | None = None,
    start_batch: int = 0,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """(buffer ranges, batch) for the epoch's batches from ``start_batch`` on that are this worker's
    (round-robin: worker w takes the w-th, (w + num_workers)-th, ... of them)."""
    g = 0  # plan position of the buffer's first batch
    for runs, batches in epoch_plan(spec, epoch, lengths):
        for j, b in enumerate(batches):
            if g + j >= start_batch and (g + j - start_batch) % num_workers == worker:
                yield runs, b
        g += len(batches)


class StoreBatches(IterableDataset):
    """Batches of inputs and dequantised targets from one store.

    Holds paths and small objects only; the store is opened lazily in each process.

    Args:
        store_path: The store.
        plan: Batching plan (see PlanSpec).
        source: The source dataset, needed to replay image views (image stores); None for text.
        epoch: Epoch to produce.
        start_batch: Skip the epoch's first batches (resumption).
        view: "random" for a random stored view per sample per epoch, or a view number.
        in_memory: Read the whole store into memory first (for measuring the cost of streaming).
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
        store_path,
        plan: PlanSpec,
        source=None,
        epoch: int = 0,
        start_batch: int = 0,
        view: str | int = "random",
        in_memory: bool = False,
        image_spec: ViewSpec | None = None,
        image_cache: dict[int, np.ndarray] | None = None,
        names: tuple[str, ...] | None = None,
        captions=None,
        render_spec: ViewSpec | None = None,
    ) -> None:
        super().__init__()
        self.store_path, self.plan, self.source = store_path, plan, source
        self.epoch, self.start_batch, self.view, self.in_memory = epoch, start_batch, view, in_memory
        self.image_spec = image_spec
        self.image_cache = image_cache
        self.names = names
        self.captions, self.render_spec = captions, render_spec
        self._reader = None
        self._memory: dict[str, np.ndarray] | None = None

    @property
    def reader(self):
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
        lengths = self.reader.group["lengths"][:] if self.plan.by_length else None
        current, buffer, pos = None, None, None
        for runs, b in plan_batches(self.plan, self.epoch, lengths, self.start_batch, wid, nw):
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
        return np.array([np.random.default_rng([self.plan.seed, self.epoch, int(i), 1]).integers(v) for i in indices])

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
            out.update(self.captions.pick(out["index"].numpy(), self.plan.seed, self.epoch))
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

    def __init__(self, path) -> None:
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
    """A DataLoader over already-batched items, in plan order.

    It gets its own generator: a DataLoader otherwise draws its base seed from the global RNG each time it
    starts, and a resumed run would then see different dropout masks from an uninterrupted one.
    """
    generator = torch.Generator().manual_seed(batches.plan.seed * 1_000_003 + batches.epoch)
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=generator,
    )
