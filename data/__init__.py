"""Datasets: a registry of adapters over real file formats, plus the built-in `shapes` generator."""

# The adapter modules are imported for their registrations.
from . import captions, cifar, idx, imagefolder, labelled, paraphrase, shapes, stl10, text  # noqa: F401
from .base import (
    DATASETS,
    MODALITIES,
    BaseDataset,
    create_dataset,
    list_datasets,
)
from .pairs import PairImages, caption_images
from .paraphrase import FORMATS as PARAPHRASE_FORMATS

__all__ = [
    "DATASETS",
    "MODALITIES",
    "PARAPHRASE_FORMATS",
    "BaseDataset",
    "PairImages",
    "caption_images",
    "create_dataset",
    "list_datasets",
]
