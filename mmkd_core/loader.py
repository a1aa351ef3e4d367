"""The store's loader for any training loop: ``store_loader`` reads a ``StoreDataset`` with DataLoader workers
that add speed, and ``to_device`` widens the targets where the step runs.

With K workers, worker w reads the epoch's buffers w, w+K, ... (disjoint byte ranges, none read twice) and
yields pieces of batches tagged with their step; the main process reads nothing and puts the pieces back
together in the epoch's order (``StoreDataset.assemble``). Targets travel in their stored dtype (half of
float32's bytes for a float16 store, about a quarter for int8) through the workers and pinned memory;
``to_device`` moves a batch with ``non_blocking`` copies and decodes the targets on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import quant
from .dataset import CaptionTable, StoreDataset
from .location import Location

__all__ = ["CaptionTable", "StoreDataset", "StoreLoader", "decode_targets", "store_loader", "to_device"]

TARGETS = ("tokens", "pooled")


class StoreLoader:
    """Batches of a ``StoreDataset``, read by ``workers`` processes; stateful like the dataset it reads.

    ``accelerator.prepare`` (Hugging Face Accelerate) hands it back unchanged: it is not a DataLoader to be
    re-sharded, it shards by rank itself.

    Args:
        dataset: What to read.
        workers: Reading processes (0: read in this process).
        pin_memory: Pin each batch's memory (default: when CUDA is available).
        prefetch_factor: Pieces each worker reads ahead.
    """

    def __init__(
        self, dataset: StoreDataset, workers: int = 0, pin_memory: bool | None = None, prefetch_factor: int = 4
    ) -> None:
        self.dataset, self.workers, self.prefetch_factor = dataset, workers, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        if self.workers == 0:
            pieces = ds.pieces()
        else:
            # its own generator: a DataLoader otherwise draws a base seed from the global RNG each time it
            # starts, and a resumed run would then see other dropout masks than an uninterrupted one
            generator = torch.Generator().manual_seed(ds.seed * 1_000_003 + ds.epoch)
            pieces = DataLoader(
                _Pieces(ds),
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=self.prefetch_factor,
                generator=generator,
                multiprocessing_context=_worker_start(),
            )
        for batch in ds.assemble(pieces):
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """``StoreDataset.state_dict``: the epoch, the samples it has consumed (globally) and the seed."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (taken with any world size, worker count or batch size)."""
        self.dataset.load_state_dict(state)


def _worker_start() -> str | None:
    """How workers start: forked (torch's default on Linux), except under zarrs' Rust codec pipeline, whose
    threads a fork copies mid-lock (workers hung, reading nothing): spawned fresh then."""
    import zarr

    from .store.codecs import ZARRS_PIPELINE

    return "spawn" if zarr.config.get("codec_pipeline.path") == ZARRS_PIPELINE else None


class _Pieces(IterableDataset):
    """What a DataLoader worker reads: its share of the buffers, as pieces."""

    def __init__(self, dataset: StoreDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        info = get_worker_info()
        return self.dataset.pieces(info.id, info.num_workers) if info else self.dataset.pieces()


def store_loader(
    store: str | Location,
    batch_size: int,
    *,
    workers: int = 0,
    pin_memory: bool | None = None,
    **options: Any,
) -> StoreLoader:
    """A store's batches for any training loop: this rank's share of the epoch's global order.

    Args:
        store: The store.
        batch_size: Samples per rank per step.
        workers: Reading processes.
        pin_memory: Pin batches (default: when CUDA is available).
        **options: ``StoreDataset`` options: seed, rank, world_size, remainder, by_length, view, targets,
            source, render_spec, captions, teacher (which of the store's teachers; default the first), ...

    Returns:
        A ``StoreLoader``: iterate it once per epoch; ``state_dict()``/``load_state_dict()`` resume it.
    """
    return StoreLoader(StoreDataset(store, batch_size, **options), workers=workers, pin_memory=pin_memory)


def to_device(batch: dict[str, Any], device: str | torch.device, non_blocking: bool = True) -> dict[str, Any]:
    """Move a batch to ``device`` and decode its targets there to float32 (``decode_targets``)."""
    moved = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
    return decode_targets(moved)


def decode_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with ``tokens``/``pooled`` (and further teachers' ``<name>/tokens``, ``<name>/pooled``) as
    float32, wherever they are: float16 and bfloat16 widened (bfloat16 is exactly ``quant.BFLOAT16_RULE``),
    int8 by ``quant.INT8_RULE`` (its scale and outlier entries consumed); the same values, bit for bit, as
    ``quant.decode_int8``/``decode_float`` give."""
    out = dict(batch)
    further = [k for k in batch if "/" in k and k.rpartition("/")[2] in TARGETS]
    for name in (*TARGETS, *further):
        if name not in out:
            continue
        if name + "_scale" in out:
            parts = [out.pop(name + p) if p else out[name] for p in quant.INT8_PARTS]
            out[name] = quant.decode_int8_tensor(*parts)
        elif out[name].dtype in (torch.float16, torch.bfloat16):
            out[name] = out[name].float()
    return out
