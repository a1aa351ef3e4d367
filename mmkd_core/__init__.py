"""mmkd's library: what every stage agrees on, and what users call.

    from mmkd_core import open_store, create_teacher, create_student, load_student, create_dataset
    from mmkd_core import StoreDataset, store_loader, to_device  # a store's batches for any training loop

Names resolve on first use, so ``import mmkd_core`` stays light (torch, transformers and timm load with
the first teacher or student) and the dataset registry (``mmkd.data``, which itself imports this library)
is reached without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_store": "mmkd_core.store",
    "StoreReader": "mmkd_core.store",
    "StoreDataset": "mmkd_core.dataset",
    "store_loader": "mmkd_core.loader",
    "to_device": "mmkd_core.loader",
    "create_teacher": "mmkd_core.teachers",
    "list_teachers": "mmkd_core.teachers",
    "create_student": "mmkd_core.students",
    "list_students": "mmkd_core.students",
    "load_student": "mmkd_core.students",
    "load_multimodal": "mmkd_core.students",
    "save_student": "mmkd_core.students",
    "create_dataset": "mmkd.data",
    "list_datasets": "mmkd.data",
    "make_targets": "mmkd_core.targets",
    "pool_targets": "mmkd_core.targets",
    "recipe_targets": "mmkd_core.targets",
    "build_loss": "mmkd_core.losses",
    "view_spec": "mmkd_core.views",
    "MmkdError": "mmkd_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmkd_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
