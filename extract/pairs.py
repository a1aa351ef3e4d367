"""Pair stores: an image teacher over image–caption data.

The teacher runs once per image and view (the store's samples are the distinct images, ``PairImages``);
beside the image targets, the group ``captions`` is a store of its own with one sample per caption: its
token ids under the text tokenizer named at extraction (``--text-tokenizer``), the row of the image it shows
(``image``) and, for a two-tower teacher (``--teacher clip --teacher-option tower=both``), the teacher's
text embedding (``pooled``). A caption store is written inside the pair store's lock, before the images,
so a complete pair store always has complete captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.data import PairImages
from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, open_store
from mmkd_core.teachers import create_teacher, list_teachers
from mmkd_core.teachers.base import TextPreprocess

from .feeders import Extra, TextFeeder

CAPTIONS = "captions"  # the caption store's group inside a pair store
# captions are short: a longer limit only pads (the student's text tower holds max_position tokens)
TOKENIZER_MAX_LENGTH = 77


def is_pair_store(teacher, dataset, text_tokenizer: str | None) -> bool:
    """An image teacher over image–caption pairs writes a pair store when the captions have a tokenizer: a
    two-tower teacher's own, or ``--text-tokenizer``. Without one the store holds the images only."""
    if teacher.modality != "image" or dataset.modality != "image_text":
        return False
    return bool(text_tokenizer) or getattr(teacher, "text_tower", None) is not None


class CaptionTokenizer:
    """The text tokenizer a pair store's captions are stored under; it tokenizes and is never run.

    Args:
        spec: A registered text teacher (its tokenizer; its weights are not read past loading) or a
            checkpoint directory holding a tokenizer (``tokenizer.save_pretrained``).
    """

    modality = "text"

    def __init__(self, spec: str) -> None:
        from mmkd_core.teachers.hf_common import load_tokenizer, text_preprocess

        path = Path(spec).expanduser()
        if path.is_dir():
            self.tokenizer = load_tokenizer(path, "--text-tokenizer")
            self.max_length = min(int(self.tokenizer.model_max_length or TOKENIZER_MAX_LENGTH), TOKENIZER_MAX_LENGTH)
            self.preprocess: TextPreprocess = text_preprocess(self.tokenizer, path, self.max_length)
            self.name, self.source = "tokenizer", str(path.resolve())
        elif spec in list_teachers():
            teacher = create_teacher(spec)
            if teacher.modality != "text":
                raise MmkdError(f"--text-tokenizer {spec}: that teacher reads {teacher.modality}, not text")
            self.tokenizer, self.preprocess = teacher.tokenizer, teacher.preprocess
            self.max_length = min(int(teacher.preprocess.max_length), TOKENIZER_MAX_LENGTH)
            self.name, self.source = spec, teacher.source
        else:
            raise MmkdError(
                f"--text-tokenizer {spec}: neither a directory nor a registered text teacher "
                f"({', '.join(list_teachers())})"
            )

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from mmkd_core.teachers.hf_common import tokenize

        return tokenize(self.tokenizer, texts, self.max_length)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "modality": "text", "tokenizer_only": True}


class _Captions:
    """The captions of the first ``n`` images, in pair order (the text a TextFeeder tokenizes)."""

    def __init__(self, pairs, positions: np.ndarray) -> None:
        self.pairs, self.positions = pairs, positions

    def __len__(self) -> int:
        return len(self.positions)

    def text(self, k: int) -> str:
        return self.pairs.text(int(self.positions[k]))


class CaptionFeeder(TextFeeder):
    """Captions tokenized, with the image row each shows; the teacher's text tower embeds them."""

    def __init__(self, captions: _Captions, teacher, image_rows: np.ndarray) -> None:
        super().__init__(captions, teacher, len(captions))
        self.positions, self.image_rows = captions.positions, image_rows

    def extras(self) -> tuple[Extra, ...]:
        return (("image", (), "int64", ("sample",)),)

    def finish_shard(self, shard: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        out = super().finish_shard(shard, lo, hi)
        return {**out, "index": self.positions[lo:hi], "image": self.image_rows[lo:hi]}


class TokenizedCaptionFeeder(CaptionFeeder):
    """Captions tokenized only (no text teacher): the store holds their ids, no caption targets."""

    def targets(self, teacher, batch: dict, recipe: dict, autocast) -> dict[str, Any]:
        mask = batch["inputs"]["attention_mask"].bool()  # one row per distinct caption of the batch
        return {"tokens": None, "pooled": torch.zeros(len(mask), 0), "mask": mask}


class PairCaptions:
    """What a pair store keeps of its captions, and how they are written.

    Args:
        pairs: The image–caption dataset.
        images: Its images (the pair store's samples).
        n: Images in the store (the first n); their captions are kept.
        teacher: The image teacher; a two-tower one (``text_tower``) embeds the captions too.
        text_tokenizer: ``--text-tokenizer`` (a tokenizer-only store); refused with a two-tower teacher,
            which tokenizes its own captions.
    """

    def __init__(self, pairs, images: PairImages, n: int, teacher, text_tokenizer: str | None) -> None:
        text_tower = getattr(teacher, "text_tower", None)
        if text_tower is not None and text_tokenizer:
            raise MmkdError("--text-tokenizer: the two-tower teacher tokenizes its captions itself; leave it out")
        self.teacher = text_tower if text_tower is not None else CaptionTokenizer(text_tokenizer)
        keep = np.flatnonzero(images.image_of_caption < n)
        kind = CaptionFeeder if text_tower is not None else TokenizedCaptionFeeder
        self.texts = _Captions(pairs, keep)
        self.feeder = kind(self.texts, self.teacher, images.image_of_caption[keep])

    def __len__(self) -> int:
        return len(self.feeder.positions)

    def extra_attrs(self) -> dict[str, Any]:
        """Recorded, not compared: where the captions' tokenizer was read (the student exports it)."""
        return {"caption_tokenizer": str(Path(self.teacher.tokenizer.name_or_path).resolve())}

    def describe(self) -> dict[str, Any]:
        """Recorded in the pair store's ``dataset``: the captions and what tokenized (and embedded) them."""
        return {"num_captions": len(self), "text_tokenizer": self.teacher.describe(), "captions_group": CAPTIONS}


def caption_store(path: str | Path):
    """The caption store of a pair store (a StoreReader), or None when ``path`` is not a pair store."""
    reader = open_store(path)
    return open_store(reader.path / CAPTIONS) if reader.attrs["dataset"].get("unit") == "image" else None


def caption_writer(out: Path, layout: Layout, config: dict[str, Any], versions: dict[str, str]) -> StoreWriter:
    """The caption store's writer, under the pair store's lock (held by the pair store's writer)."""
    return StoreWriter.open(out / CAPTIONS, layout, config, versions, locked=False)
