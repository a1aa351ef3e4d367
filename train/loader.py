"""The store's batch reader moved into the library: ``mmkd_core.dataset`` (StoreDataset, CaptionTable),
``mmkd_core.loader`` (store_loader, to_device) and ``mmkd_core.batch_order`` (the epoch's global order). The
old names are kept here, as adapters onto the new loader, for the modules that still import them."""

# SHIM: remove at integration
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmkd_core.batch_order import StepSpec, num_steps
from mmkd_core.dataset import CaptionTable, StoreDataset  # noqa: F401
from mmkd_core.errors import MmkdError
from mmkd_core.loader import StoreLoader


@dataclass(frozen=True)
class PlanSpec:
    """The old batch plan's fields (SHIM: remove at integration)."""

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
    def steps(self) -> StepSpec:
        return StepSpec(self.batch_size, self.world_size, "drop" if self.drop_last else "split")


def StoreBatches(store_path: Any, plan: PlanSpec, epoch: int = 0, start_batch: int = 0, **options: Any) -> StoreDataset:  # noqa: N802
    """The epoch's batches from ``start_batch`` on, targets decoded to float32 (SHIM: remove at integration)."""
    ds = StoreDataset(
        store_path,
        plan.batch_size,
        seed=plan.seed,
        rank=plan.rank,
        world_size=plan.world_size,
        remainder=plan.steps.remainder,
        by_length=plan.by_length,
        length_group=plan.batch_size,
        buffer_chunks=plan.run_chunks * plan.buffer_runs,
        targets="float32",
        **options,
    )
    ds.set_epoch(epoch)
    ds.consumed = min(start_batch * plan.batch_size * plan.world_size, plan.num_samples)
    return ds


def make_loader(batches: StoreDataset, workers: int = 0) -> StoreLoader:
    """SHIM: remove at integration."""
    return StoreLoader(batches, workers=workers, pin_memory=False)


def num_batches(plan: PlanSpec) -> int:
    """SHIM: remove at integration."""
    return num_steps(plan.num_samples, plan.steps)


def check_plan(plan: PlanSpec) -> None:
    """SHIM: remove at integration."""
    if num_batches(plan) == 0:
        raise MmkdError(
            f"--batch-size {plan.batch_size}: no full batch in a share of {plan.num_samples // plan.world_size} "
            "samples (contrastive losses train on full batches only); use a smaller batch"
        )
