"""A store as a dataset of batches for any training loop: the global order, this rank's share of it, the
targets as stored, exact and elastic resume.

``StoreDataset`` yields whole batches in the epoch's global order (``batch_order``): inputs (token ids and
mask, or the image rendered from the stored view's parameters), targets in their stored dtype (float16,
bfloat16, or int8 with its scale and outliers; ``targets="float32"`` decodes them on the host), the view
number and the sample index. Its state is three integers: ``{"epoch", "consumed", "seed"}``; loading it into
a dataset of another world size or batch size continues the same epoch, every sample once.

Reading is cut into pieces: a piece is the part of one rank's batch that lies in one buffer. ``pieces`` reads
the buffers given to one worker (worker w of K takes the epoch's buffers w, w+K, ...: disjoint byte ranges,
none read twice) and ``assemble`` puts the pieces back together in step order; ``mmkd_core.loader`` runs the
first in DataLoader workers and the second in the main process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import quant
from .batch_order import (
    OrderSpec,
    Piece,
    StepSpec,
    assemble_steps,
    buffer_order,
    buffer_ranges,
    chunk_starts,
    rank_pieces,
    step_cuts,
    worker_buffers,
)
from .errors import MmkdError
from .location import Location
from .store import StoreReader, open_store
from .views import ViewSpec, eval_params, normalize, render, render_pixels, view_spec

STATE_FORMAT = "mmkd-store-dataset/1"
TARGET_MODES = ("stored", "float32")
TARGET_NAMES = ("tokens", "pooled")


class StoreDataset(IterableDataset):
    """This rank's batches of one store, epoch by epoch, resumable from ``state_dict()``.

    Holds paths and small objects only; the store is opened on first use in each process.

    Args:
        store: The store.
        batch_size: Samples per rank per step.
        seed: Shuffle seed (with the epoch, it fixes the global order).
        rank: This process's rank; default: torch.distributed's, else 0.
        world_size: Ranks stepping together; default: torch.distributed's, else 1.
        remainder: The epoch's last samples: ``split``, ``drop`` or ``pad`` (``batch_order.StepSpec``).
        by_length: Order each buffer by sample length in groups of ``length_group`` (text).
        length_group: Samples per length group.
        buffer_chunks: Store chunks shuffled together.
        view: "random" for a random stored view per sample per epoch, or a view number.
        targets: "stored" keeps targets in their stored dtype (widen them with ``loader.to_device``);
            "float32" decodes them on the host.
        source: The source dataset, needed to render image views; None for text.
        render_spec: Render the stored views' parameters at this spec (the student's size and normalisation)
            instead of the store's.
        image_spec: For a student that reads images the teacher did not: the eval crop at this spec.
        image_cache: A dict to keep those rendered images in (uint8), shared across epochs.
        names: Store arrays to read (default all); leaving out ``tokens``/``pooled`` reads inputs only.
        captions: A pair store's ``CaptionTable``: each image comes with one of its captions, drawn per
            (seed, epoch, image), as ``input_ids``/``attention_mask``, its row ``caption`` and, for a two-tower
            store, its text target ``caption_pooled``.
        retokenize: Texts -> ``{"input_ids", "attention_mask"}``: each sample's ``input_ids`` come from its
            source text (``source.text(index)``) through this tokenizer instead of the store's ids (a student
            whose tokenizer is not the teacher's); ``mask`` and ``lengths`` stay the stored tokens'.
        in_memory: Read the whole store into memory first (benchmarks: the cost of streaming).
        teacher: Which of the store's teachers' targets to read (``StoreReader.teachers``); default the first.
        teachers: Further teachers whose targets are read for the same rows and views, as ``<name>/tokens``
            and ``<name>/pooled`` (int8 parts ``<name>/pooled_scale``, ...): a sequence of names reads both
            arrays of each, a mapping name -> arrays reads those (``{"b": ("pooled",)}``: its pooled targets
            only, for a teacher whose tokens are another tokenizer's). Their tokens must be the same tokens
            as ``teacher``'s (equal lengths, checked as read).
    """

    def __init__(
        self,
        store: str | Location,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: str = "split",
        by_length: bool = False,
        length_group: int = 64,
        buffer_chunks: int = 16,
        view: str | int = "random",
        targets: str = "stored",
        source: Any = None,
        render_spec: ViewSpec | None = None,
        image_spec: ViewSpec | None = None,
        image_cache: dict[int, np.ndarray] | None = None,
        names: tuple[str, ...] | None = None,
        captions: CaptionTable | None = None,
        retokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
        in_memory: bool = False,
        teacher: str | None = None,
        teachers: Sequence[str] | Mapping[str, Sequence[str]] = (),
    ) -> None:
        super().__init__()
        if targets not in TARGET_MODES:
            raise MmkdError(f"targets {targets!r}: choose one of {', '.join(TARGET_MODES)}")
        if retokenize is not None and source is None:
            raise MmkdError("StoreDataset(retokenize=...) reads the source texts: pass the store's source dataset")
        self.retokenize = retokenize
        self.store_path, self.seed, self.view, self.targets = store, seed, view, targets
        self.source, self.render_spec, self.image_spec, self.image_cache = source, render_spec, image_spec, image_cache
        self.names, self.captions, self.in_memory, self.teacher = names, captions, in_memory, teacher
        self._reader: StoreReader | None = None
        self.further = _further(teachers, self.reader.teacher_name)
        self._further_readers: dict[str, StoreReader] = {}
        for name in self.further:  # an unknown name is refused here, not in a worker
            self.teacher_reader(name)
        self.rank, world = _ranks(rank, world_size)
        self.steps = StepSpec(batch_size, world, remainder)
        self.order = OrderSpec(len(self.reader), self.reader.chunk_size, seed, buffer_chunks, by_length, length_group)
        if not 0 <= self.rank < world:
            raise MmkdError(f"rank {self.rank} is not one of the {world} ranks")
        self.epoch, self.consumed = 0, 0
        self._lengths: np.ndarray | None = None
        self._memory: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memory": None, "_further_readers": {}}  # workers read for themselves

    @property
    def reader(self) -> StoreReader:
        """The store (its teacher ``teacher``'s arrays), opened on first use in this process."""
        if self._reader is None:
            self._reader = open_store(self.store_path).teacher(self.teacher)
        return self._reader

    def teacher_reader(self, name: str) -> StoreReader:
        """Further teacher ``name``'s arrays, opened on first use in this process."""
        if name not in self._further_readers:
            self._further_readers[name] = open_store(self.store_path).teacher(name)
        return self._further_readers[name]

    # ------------------------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: ``{"format", "epoch", "consumed" (global samples), "seed"}``."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, with this dataset's world size and batch size.

        Raises:
            MmkdError: ``state`` is not this dataset's, or was taken with another seed (another order).
        """
        if state.get("format") != STATE_FORMAT:
            raise MmkdError(f"loader state {state!r} is not a {STATE_FORMAT} state")
        if int(state["seed"]) != self.seed:
            raise MmkdError(f"loader state has seed {state['seed']}, this loader {self.seed}: another order")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.order.num_samples:
            raise MmkdError(f"loader state consumed {consumed} of a {self.order.num_samples}-sample epoch")
        self.epoch, self.consumed = int(state["epoch"]), consumed

    def cuts(self) -> np.ndarray:
        """The rest of the epoch's global steps (``batch_order.step_cuts``)."""
        return step_cuts(self.order.num_samples, self.steps, self.consumed)

    def __len__(self) -> int:
        """Steps left in the current epoch: the same on every rank."""
        return len(self.cuts())

    # ---------------------------------------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise MmkdError(
                "StoreDataset yields whole batches itself: iterate it directly, or read it with workers through "
                "mmkd_core.store_loader(..., workers=K) (a DataLoader's own workers would each read every buffer)"
            )
        return self.assemble(self.pieces())

    def assemble(self, pieces: Iterable[tuple[Piece, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """Batches in step order from ``pieces`` (``pieces()``'s, from one process or from workers taken in
        turn), each padded to its longest sample; the state advances as each batch is handed out.

        Pieces of later steps wait until their step is whole: with K workers taking buffers in turn, that is
        at most about K buffers' worth of this rank's samples (plus one batch of padding)."""
        cuts, done = self.cuts(), 0
        for step, parts in assemble_steps(pieces):
            if step == len(cuts) - 1:
                self.epoch, self.consumed = self.epoch + 1, 0
            else:
                self.consumed = min(int(cuts[step, -1]), self.order.num_samples)
            done = step + 1
            yield join_pieces(parts)
        if done < len(cuts):
            raise RuntimeError(f"the store's pieces stopped at step {done} of {len(cuts)}")
        if len(cuts) == 0:  # nothing (left) to step on: the epoch is over at once
            self.epoch, self.consumed = self.epoch + 1, 0

    def pieces(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[Piece, dict[str, Any]]]:
        """This worker's pieces of the rest of the epoch: it reads buffers ``worker``, ``worker +
        num_workers``, ... of those the rank needs (in the order first needed), each once."""
        mine = worker_buffers(rank_pieces(self.cuts(), self.rank, self.order), worker, num_workers)
        starts = chunk_starts(self.order, self.epoch)
        if self.order.by_length and self._lengths is None:
            self._lengths = self.reader.raw("lengths", 0, self.order.num_samples)
        size = self.order.buffer_samples
        for k, pieces in mine.items():
            ranges = buffer_ranges(self.order, self.epoch, k, starts)
            data = _concat([self._read(lo, hi) for lo, hi in ranges])
            order = buffer_order(self.order, self.epoch, k, self._lengths, starts)
            los = np.array([lo for lo, _ in ranges])
            first_row = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in ranges])])
            for piece in pieces:
                idx = order[piece.lo - k * size : piece.hi - k * size]
                at = np.searchsorted(los, idx, side="right") - 1
                yield piece, self._piece(data, first_row[at] + idx - los[at], idx)

    # ---------------------------------------------------------------------------------------------- reading

    def _array_names(self) -> tuple[str, ...]:
        g = self.reader.group
        default = ("tokens", "pooled", "lengths", "input_ids", "view_params", "index", *self.reader.extra_names)
        names = self.names or default
        if self.retokenize is not None:  # the ids come from the source texts
            names = tuple(n for n in names if n != "input_ids")
        parts = quant.INT8_PARTS if self.reader.storage["dtype"] == "int8" else ("",)
        out = [n + p for n in names for p in (parts if n in ("tokens", "pooled") else ("",))]
        return tuple(n for n in out if n in g)

    def _read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Samples [lo, hi) as stored (targets not decoded), one contiguous checked read per array."""
        if self.in_memory:
            if self._memory is None:
                self._memory = self._read_arrays(0, self.order.num_samples)
            return {k: v[lo:hi] for k, v in self._memory.items()}
        return self._read_arrays(lo, hi)

    def _read_arrays(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        data = {n: self.reader.raw(n, lo, hi) for n in self._array_names()}
        if "lengths" in data:  # a length outside 1..T is damage, named by sample (not a shape error in a loss)
            self.reader.check_lengths(data["lengths"], lo)
        for teacher, arrays in self.further.items():
            reader = self.teacher_reader(teacher)
            for n in (*arrays, "lengths") if "tokens" in arrays else arrays:
                for p in quant.INT8_PARTS if reader.storage["dtype"] == "int8" and n != "lengths" else ("",):
                    data[f"{teacher}/{n}{p}"] = reader.raw(n + p, lo, hi)
        return data

    def _views_for(self, indices: np.ndarray) -> np.ndarray:
        v = self.reader.views
        if self.view != "random":
            if not 0 <= int(self.view) < v:
                raise MmkdError(f"view {self.view}: the store has {v} views")
            return np.full(len(indices), int(self.view))
        # one draw per (seed, epoch, sample): independent of batching, workers, ranks and resumption
        return np.array([np.random.default_rng([self.seed, self.epoch, int(i), 1]).integers(v) for i in indices])

    def _piece(self, data: dict[str, np.ndarray], rows: np.ndarray, indices: np.ndarray) -> dict[str, Any]:
        views = self._views_for(indices)
        lengths = data["lengths"][rows].astype(np.int64)
        t = int(lengths.max())
        out: dict[str, Any] = {
            "index": torch.from_numpy(data["index"][rows]),
            "view": torch.from_numpy(views),
            "lengths": torch.from_numpy(lengths),
        }
        out["mask"] = torch.arange(t)[None] < out["lengths"][:, None]
        for name in ("tokens", "pooled"):
            if name in data:
                out.update(self._targets(name, data, rows, views, t if name == "tokens" else None))
        for teacher, arrays in self.further.items():
            if "tokens" in arrays:
                self._same_tokens(teacher, lengths, data[f"{teacher}/lengths"][rows], out["index"])
            for name in arrays:
                t_name = t if name == "tokens" else None
                out.update(self._targets(name, data, rows, views, t_name, self.teacher_reader(teacher), f"{teacher}/"))
        for name in self.reader.extra_names:  # per view like the targets when the array has a view axis
            if name in data:
                per_view = self.reader.dims(name)[1:2] == ("view",)
                x = data[name][rows, views] if per_view else data[name][rows]
                out[name] = torch.from_numpy(np.ascontiguousarray(x))
        if self.retokenize is not None:
            out.update(self.retokenize([self.source.text(int(i)) for i in out["index"]]))
        elif "input_ids" in data:
            out["input_ids"] = torch.from_numpy(data["input_ids"][rows, :t].astype(np.int64))
            out["attention_mask"] = out["mask"].long()
        if self.captions is not None:
            out.update(self.captions.pick(out["index"].numpy(), self.seed, self.epoch))
        out.update(self._pixels(data, rows, views, out["index"]))
        return out

    def _same_tokens(self, teacher: str, lengths: np.ndarray, theirs: np.ndarray, index: torch.Tensor) -> None:
        """Refuse a further teacher's tokens that are not the first's (another tokenizer or length limit)."""
        differ = np.flatnonzero(theirs.astype(np.int64) != lengths)
        if differ.size:
            i = int(differ[0])
            raise MmkdError(
                f"{self.teacher_reader(teacher).path}: sample {int(index[i])} has {int(theirs[i])} tokens for teacher "
                f"{teacher}, {int(lengths[i])} for {self.reader.teacher_name}: its tokens are not the same tokens; "
                "read its pooled targets only"
            )

    def _targets(
        self, name: str, data, rows, views, t: int | None, reader: StoreReader | None = None, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """One target array's rows (and, for int8, its scale and outliers) as stored, or decoded to float32;
        of ``reader``'s teacher (default this dataset's), under keys ``prefix + name``."""
        dtype = (reader or self.reader).storage["dtype"]
        parts = quant.INT8_PARTS if dtype == "int8" else ("",)
        sel = {prefix + name + p: data[prefix + name + p][rows, views] for p in parts}
        name = prefix + name
        if t is not None:
            sel = {k: v[:, :t] for k, v in sel.items()}
        if self.targets == "float32":
            x = quant.decode_int8(*sel.values()) if dtype == "int8" else quant.decode_float(sel[name], dtype)
            return {name: torch.from_numpy(np.ascontiguousarray(x))}
        out = {}
        for k, v in sel.items():
            v = np.ascontiguousarray(v)
            if k == name and dtype == "bfloat16":  # the stored bits are a bfloat16's (quant.BFLOAT16_RULE)
                out[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
            elif v.dtype == np.uint16:  # outlier channel numbers
                out[k] = torch.from_numpy(v.astype(np.int32))
            else:
                out[k] = torch.from_numpy(v)
        return out

    def _pixels(self, data, rows, views, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if "view_params" in data and self.source is not None:
            spec = self.render_spec or view_spec(self.reader.attrs)
            params = data["view_params"][rows, views]
            images = [render(self.source.image(int(i)), p, spec) for i, p in zip(index, params, strict=True)]
            return {"pixel_values": torch.stack(images)}
        if self.image_spec is not None and self.source is not None:
            return {"pixel_values": normalize(np.stack([self._eval_pixels(int(i)) for i in index]), self.image_spec)}
        return {}

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


def _further(teachers: Sequence[str] | Mapping[str, Sequence[str]], first: str) -> dict[str, tuple[str, ...]]:
    """``StoreDataset(teachers=...)`` as name -> the target arrays read, checked."""
    further = dict(teachers) if isinstance(teachers, Mapping) else {n: TARGET_NAMES for n in teachers}
    if len(further) != len(teachers):
        raise MmkdError(f"StoreDataset(teachers={teachers!r}): a teacher is named twice")
    out = {}
    for name, arrays in further.items():
        arrays = (arrays,) if isinstance(arrays, str) else tuple(arrays)
        if name == first:
            raise MmkdError(
                f"StoreDataset(teachers=...): {name} is the dataset's own teacher (teacher=), not a further one"
            )
        if not arrays or not set(arrays) <= set(TARGET_NAMES):
            raise MmkdError(f"StoreDataset(teachers=...): {name}: {arrays!r}: name tokens, pooled or both")
        out[name] = arrays
    return out


def join_pieces(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch from its pieces in order: tensors concatenated along the sample axis, those with a time axis
    (tokens, masks, ids) zero-padded to the batch's longest first."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key in parts[0]:
        xs = [p[key] for p in parts]
        if xs[0].dim() > 1 and len({x.shape[1] for x in xs}) > 1:
            t = max(x.shape[1] for x in xs)
            xs = [torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, t - x.shape[1])) for x in xs]
        out[key] = torch.cat(xs)
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if dist else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else 1
    return int(rank), int(world_size)


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
