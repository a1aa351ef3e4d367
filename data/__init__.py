"""Source datasets: a registry of adapters over real file formats, plus the built-in `shapes` generator."""

from .base import DATASETS, MODALITIES, SourceDataset, create_dataset, list_datasets

__all__ = ["DATASETS", "MODALITIES", "SourceDataset", "create_dataset", "list_datasets"]
