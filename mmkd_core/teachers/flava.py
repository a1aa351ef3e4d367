"""FLAVA: a joint image–text teacher on transformers ``FlavaModel`` (image, text and multimodal encoders).

A joint teacher reads an image and its caption together; its output is the multimodal encoder's. MSD needs
the same teacher's output with one modality removed, so the teacher also says how a modality is removed
(``without_image``, ``without_text``) and records that convention in its provenance.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MmkdError
from .base import TEACHERS, ImagePreprocess, Teacher, TeacherOutput, TextPreprocess
from .hf_common import (
    checkpoint_dir,
    image_preprocess,
    load_config,
    load_model,
    load_tokenizer,
    text_max_length,
    text_preprocess,
    tokenize,
)
from .weights import locate_weights, missing_weights_error

logger = logging.getLogger(__name__)

DEFAULT_REPO = "facebook/flava-full"
# FLAVA has no SDPA attention in transformers; eager keeps a sample's outputs independent of padding
DEFAULT_ATTN = "eager"
# FlavaImageProcessor's defaults: resize to 224x224 (aspect not kept), centre crop 224, bicubic, CLIP mean/std
DEFAULT_PREPROCESS = ImagePreprocess(
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    interpolation="bicubic",
    crop_pct=1.0,
    crop_mode="squash",
)
# How a modality is removed (recorded in the store's provenance: outputs made by another rule differ)
REMOVAL = {
    "image": "a blank image: pixel_values all zero after normalisation, i.e. the normalisation's mean colour",
    "text": "the empty caption: the tokenizer's encoding of '' ([CLS] [SEP] for FLAVA's BERT tokenizer)",
}
# FlavaModel parts the teacher never runs; FLAVA's pretraining checkpoints may lack them
UNUSED = ("image_projection.*", "text_projection.*", "logit_scale", "*.pooler.*")


@dataclass
class JointPreprocess(ImagePreprocess):
    """Image preprocessing (the ImagePreprocess fields: views are rendered by them) plus the tokenization.

    Attributes:
        max_length: Longest caption in tokens (as ``TextPreprocess.max_length``).
        text: How captions are tokenized.
    """

    max_length: int = 0
    text: TextPreprocess = field(default_factory=TextPreprocess)


class FlavaTeacher(Teacher):
    """FLAVA's multimodal encoder on an image–caption pair: every multimodal layer's output and its mask.

    The multimodal sequence is FLAVA's: the multimodal CLS, then the image encoder's tokens (its CLS and
    patches), then the text encoder's tokens, each tower's last layer output (before its final norm)
    projected to the multimodal width, exactly as ``FlavaModel.forward`` builds it. ``teacher_cls`` pooling
    therefore takes the multimodal CLS. ``embed`` is None (FLAVA has no projection of the joint output).

    Removing a modality (FLAVA's multimodal encoder needs both; ``FlavaModel`` skips it when one is missing,
    so its unimodal outputs live in other spaces): the image is replaced by a blank image, all-zero pixel
    values after normalisation (the mean colour); the text by the empty caption, the tokenizer's encoding of
    ``""`` ([CLS] [SEP]). Both are recorded in ``describe()["removal"]``.
    """

    name = "flava"
    modality = "image_text"

    def __init__(
        self, model: Any, tokenizer: Any, path: Path, preprocess: ImagePreprocess, source: str, sha256: str, max_length
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.num_layers = config.multimodal_config.num_hidden_layers
        self.hidden_size = config.multimodal_config.hidden_size
        limit = min(config.text_config.max_position_embeddings, tokenizer.model_max_length)
        self.max_length = text_max_length(max_length, limit, "flava")
        text = text_preprocess(tokenizer, path, self.max_length)
        self.preprocess = JointPreprocess(**dataclasses.asdict(preprocess), max_length=self.max_length, text=text)
        self.source = source
        self.weights_sha256 = sha256
        empty = tokenize(tokenizer, [""], self.max_length)
        # not in the state dict: the weights hash stays the weights'
        self.register_buffer("empty_text_ids", empty["input_ids"], persistent=False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.max_length)

    def without_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image removed: a blank image of the normalisation's mean colour (zeros after normalisation)."""
        return torch.zeros_like(pixel_values)

    def without_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """The text removed: the empty caption ([CLS] [SEP]) for every row, as ``input_ids``/``attention_mask``."""
        ids = self.empty_text_ids.to(input_ids.device).expand(input_ids.shape[0], -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.image_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        return self.model.image_to_mm_projection(out.hidden_states[-1])  # before the final norm, as FlavaModel

    def _text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True
        )
        return self.model.text_to_mm_projection(out.hidden_states[-1])

    def _fuse(self, image: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor) -> TeacherOutput:
        b, p = image.shape[:2]
        # the multimodal CLS and the image tokens are always valid; the caption's padding is not
        mask = torch.cat([torch.ones(b, 1 + p, dtype=torch.bool, device=image.device), attention_mask.bool()], dim=1)
        out = self.model.multimodal_model(
            torch.cat([image, text], dim=1), attention_mask=mask.long(), output_hidden_states=True, return_dict=True
        )
        return TeacherOutput(hidden_states=list(out.hidden_states[1:]), mask=mask)  # [0]: the encoder's input

    def _inputs(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        if pixel_values is None or input_ids is None:
            raise MmkdError(
                "flava is a joint teacher: call it with pixel_values and input_ids (remove a modality with "
                "without_image / without_text)"
            )
        return torch.ones_like(input_ids) if attention_mask is None else attention_mask

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TeacherOutput:
        attention_mask = self._inputs(pixel_values, input_ids, attention_mask)
        return self._fuse(self._image(pixel_values), self._text(input_ids, attention_mask), attention_mask)

    def forward_removed(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, TeacherOutput]:
        """The joint output and the outputs with each modality removed, sharing the towers' work.

        Returns:
            ``joint``: ``self(pixel_values, input_ids, attention_mask)``; ``without_image``: the same with
            ``without_image(pixel_values)``; ``without_text``: with ``without_text(input_ids)``. The blank
            image and the empty caption are encoded once (they are the same for every pair).
        """
        attention_mask = self._inputs(pixel_values, input_ids, attention_mask)
        b = pixel_values.shape[0]
        image, text = self._image(pixel_values), self._text(input_ids, attention_mask)
        blank = self._image(self.without_image(pixel_values[:1])).expand(b, -1, -1)
        empty = self.without_text(input_ids[:1])
        no_text = self._text(**empty).expand(b, -1, -1)
        return {
            "joint": self._fuse(image, text, attention_mask),
            "without_image": self._fuse(blank, text, attention_mask),
            "without_text": self._fuse(image, no_text, empty["attention_mask"].expand(b, -1)),
        }

    def describe(self) -> dict[str, Any]:
        c = self.model.config
        return {
            **super().describe(),
            "image_layers": c.image_config.num_hidden_layers,
            "text_layers": c.text_config.num_hidden_layers,
            "removal": dict(REMOVAL),
        }


def _squashes(path: Path | None) -> bool:
    """Whether the checkpoint's image processor resizes to height x width (FLAVA's), not the shorter side."""
    file = path / "preprocessor_config.json" if path is not None else None
    if file is None or not file.is_file():
        return True
    size = json.loads(file.read_text()).get("size")
    return isinstance(size, dict) and "height" in size and "shortest_edge" not in size


@TEACHERS.register("flava")
def create_flava(weights: str | None = None, *, random_init: bool = False, **options: Any) -> FlavaTeacher:
    """transformers ``FlavaModel`` (default repo ``facebook/flava-full``), a joint image–text teacher.

    Args:
        weights: FLAVA checkpoint directory (``save_pretrained``: config.json + weights, the tokenizer,
            optionally preprocessor_config.json) or a repo id in the local hub cache.
        random_init: Random weights (tests only); a ``weights`` directory then gives config and tokenizer.
        **options: ``max_length`` (default: the text position table or the tokenizer's limit, the smaller),
            ``attn_implementation`` (default eager: transformers has no SDPA FLAVA); others override
            FlavaConfig attributes (``image_config={...}``, ``text_config={...}``, ``multimodal_config={...}``).
    """
    from transformers import FlavaConfig, FlavaModel

    max_length = options.pop("max_length", None)
    attn = options.pop("attn_implementation", DEFAULT_ATTN)
    location = locate_weights(weights, DEFAULT_REPO)
    if location is None:
        if random_init:
            raise MmkdError(
                "flava: random_init=True still needs a tokenizer: pass weights=DIR (only its config and "
                "tokenizer are read)"
            )
        raise missing_weights_error("flava", "a FLAVA checkpoint directory with its tokenizer", DEFAULT_REPO)
    path = checkpoint_dir(location, "flava")
    config = load_config(path, FlavaConfig, options, "flava", "flava")
    model, sha = load_model(
        FlavaModel, config, None if random_init else path, teacher="flava", attn=attn, ignore_missing=UNUSED
    )
    preprocess = image_preprocess(path, config.image_config.image_size, DEFAULT_PREPROCESS)
    if _squashes(path):
        if preprocess.crop_pct < 1.0:  # resize to R x R then crop C < R: not one of the view renderer's modes
            logger.warning("%s: resize-then-crop is rendered as a centre crop of the shorter side", path)
        else:
            preprocess = dataclasses.replace(preprocess, crop_mode="squash")
    source = "random" if random_init else location.source
    return FlavaTeacher(model, load_tokenizer(path, "flava"), path, preprocess, source, sha, max_length)
