"""CLIP teachers: one tower of a transformers ``CLIPModel``, or both (``tower=both``: the image tower with the
text tower beside it, for two-tower pair stores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import MmkdError
from .base import TEACHERS, ImagePreprocess, Teacher, TeacherOutput
from .hf_common import (
    DEFAULT_ATTN,
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

DEFAULT_REPO = "openai/clip-vit-base-patch32"
# CLIPImageProcessor's defaults: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std
DEFAULT_PREPROCESS = ImagePreprocess(
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    interpolation="bicubic",
    crop_pct=1.0,
)
_TOWERS = {"vision": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}


class ClipTeacher(Teacher):
    """One CLIP tower: every encoder layer's output and the projected embedding (``get_*_features``).

    Vision: CLS at step 0, embed = ``visual_projection(post_layernorm(CLS))``. Text: mask = attention_mask,
    embed = ``text_projection(final_layer_norm(EOS token))``.
    """

    def __init__(
        self,
        tower: str,
        model: Any,
        tokenizer: Any,
        path: Path | None,
        preprocess: Any,
        source: str,
        sha256: str,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        module, projection = _TOWERS[tower]
        self.name = f"clip-{tower}"
        self.modality = "image" if tower == "vision" else "text"
        # keep only this tower (CLIPVisionModel or CLIPTextModel): the other one would be dead weight
        self.model = getattr(model, module)
        self.projection = getattr(model, projection)
        config = self.model.config
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.tokenizer = tokenizer
        self.source = source
        self.weights_sha256 = sha256
        if tower == "text":
            limits = [n for n in (config.max_position_embeddings, tokenizer.model_max_length) if n]
            self.max_length = text_max_length(max_length, min(limits), "clip")
            preprocess = text_preprocess(tokenizer, path, self.max_length)
        self.preprocess = preprocess

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        # tower=both: the text tower of the same checkpoint is a submodule (not a class attribute: nn.Module
        # keeps submodules in _modules, where a class attribute of the same name would hide it)
        text_tower = getattr(self, "text_tower", None)
        if text_tower is not None:
            out["towers"] = {"image": self.name, "text": text_tower.name}
        return out

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise MmkdError(f"{self.name} is an image teacher: it has no tokenizer")
        return tokenize(self.tokenizer, texts, self.max_length)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TeacherOutput:
        if self.modality == "image":
            if pixel_values is None:
                raise MmkdError(f"{self.name} is an image teacher: call it with pixel_values")
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            hidden = list(out.hidden_states[1:])  # [0] is the (pre-layernormed) embedding output
            mask = torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device)
        else:
            if input_ids is None:
                raise MmkdError(f"{self.name} is a text teacher: call it with input_ids (and attention_mask)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = list(out.hidden_states[1:])
            mask = attention_mask.bool()
        return TeacherOutput(hidden_states=hidden, mask=mask, embed=self.projection(out.pooler_output))


def _create_clip(tower: str, weights: str | None, random_init: bool, options: dict[str, Any]) -> ClipTeacher:
    from transformers import CLIPConfig, CLIPModel

    if tower not in (*_TOWERS, "both"):
        raise MmkdError(f"clip: option tower must be 'vision', 'text' or 'both', not {tower!r}")
    max_length = options.pop("max_length", None)
    attn = options.pop("attn_implementation", DEFAULT_ATTN)
    location = locate_weights(weights, DEFAULT_REPO)
    if location is None and not (random_init and tower == "vision"):
        if tower == "both" and random_init:
            raise MmkdError(
                "clip tower=both: random_init=True still needs a tokenizer: pass weights=DIR (only its "
                "config and tokenizer are read)"
            )
        if random_init:
            raise MmkdError(
                "clip-text: random_init=True still needs a tokenizer: pass weights=DIR (only its "
                "config and tokenizer are read)"
            )
        raise missing_weights_error(f"clip-{tower}", "a CLIP checkpoint directory", DEFAULT_REPO)
    path = checkpoint_dir(location, f"clip-{tower}") if location is not None else None
    config = load_config(path, CLIPConfig, options, f"clip-{tower}", "clip")
    other = () if tower == "both" else _TOWERS["text" if tower == "vision" else "vision"]
    model, sha = load_model(
        CLIPModel,
        config,
        None if random_init else path,
        teacher=f"clip-{tower}",
        attn=attn,
        ignore_missing=(*(f"{part}.*" for part in other), "logit_scale"),
    )
    source = "random" if random_init else location.source
    if tower == "both":
        image = ClipTeacher("vision", model, None, path, None, source, sha)
        image.preprocess = image_preprocess(path, config.vision_config.image_size, DEFAULT_PREPROCESS)
        image.name = "clip"
        tokenizer = load_tokenizer(path, "clip-text")
        image.text_tower = ClipTeacher("text", model, tokenizer, path, None, source, sha, max_length)
        return image
    if tower == "vision":
        preprocess = image_preprocess(path, config.vision_config.image_size, DEFAULT_PREPROCESS)
        return ClipTeacher(tower, model, None, path, preprocess, source, sha)
    return ClipTeacher(tower, model, load_tokenizer(path, "clip-text"), path, None, source, sha, max_length)


@TEACHERS.register("clip")
def create_clip(weights: str | None = None, *, random_init: bool = False, **options: Any) -> ClipTeacher:
    """One tower of a transformers ``CLIPModel`` (default repo ``openai/clip-vit-base-patch32``).

    Args:
        weights: CLIP checkpoint directory (with tokenizer / preprocessor_config.json) or repo id.
        random_init: Random weights (tests only); a ``weights`` directory then gives config and tokenizer.
        **options: ``tower`` ("vision", "text" or "both", required; "both" is the image tower with the text
            tower as ``text_tower``, sharing one checkpoint, for two-tower pair stores), ``max_length`` (text;
            default 77 from the position table), ``attn_implementation`` (default sdpa); others override
            CLIPConfig attributes (``vision_config={...}``, ``text_config={...}``, ``projection_dim``).
    """
    if "tower" not in options:
        raise MmkdError("clip: set option tower='vision', 'text' or 'both' (or use clip-vision / clip-text)")
    return _create_clip(options.pop("tower"), weights, random_init, options)


@TEACHERS.register("clip-vision")
def create_clip_vision(weights: str | None = None, *, random_init: bool = False, **options: Any) -> ClipTeacher:
    """CLIP's vision tower; options as ``clip``."""
    return _create_clip("vision", weights, random_init, options)


@TEACHERS.register("clip-text")
def create_clip_text(weights: str | None = None, *, random_init: bool = False, **options: Any) -> ClipTeacher:
    """CLIP's text tower; options as ``clip``."""
    return _create_clip("text", weights, random_init, options)
