"""data2vec-vision teacher on transformers ``Data2VecVisionModel``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MmkdError
from .base import TEACHERS, ImagePreprocess, Teacher, TeacherOutput
from .hf_common import DEFAULT_ATTN, checkpoint_dir, image_preprocess, load_config, load_model
from .weights import locate_weights, missing_weights_error

DEFAULT_REPO = "facebook/data2vec-vision-base"
# BeitImageProcessor's defaults: resize 256, centre-crop 224, bicubic, mean/std 0.5
DEFAULT_PREPROCESS = ImagePreprocess(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=224 / 256
)


class Data2VecVisionTeacher(Teacher):
    """Every layer's tokens of ``Data2VecVisionModel``, CLS at step 0."""

    modality = "image"

    def __init__(self, model: Any, preprocess: ImagePreprocess, source: str, sha256: str) -> None:
        super().__init__()
        self.name = "data2vec-vision"
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        self.preprocess = preprocess
        self.source = source
        self.weights_sha256 = sha256

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TeacherOutput:
        if pixel_values is None:
            raise MmkdError("data2vec-vision is an image teacher: call it with pixel_values")
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = list(out.hidden_states[1:])  # [0] is the embedding output
        mask = torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device)
        return TeacherOutput(hidden_states=hidden, mask=mask)


@TEACHERS.register("data2vec-vision")
def create_data2vec_vision(
    weights: str | None = None, *, random_init: bool = False, **options: Any
) -> Data2VecVisionTeacher:
    """transformers ``Data2VecVisionModel`` from a directory or the hub cache (``facebook/data2vec-vision-base``).

    Args:
        weights: Checkpoint directory (config.json + weights, optional preprocessor_config.json) or repo id.
        random_init: Random weights (tests only); a ``weights`` directory then gives only the config.
        **options: ``attn_implementation`` (default sdpa); any other option overrides a config attribute
            (``image_size``, ``patch_size``, ``hidden_size``, ``num_hidden_layers``, ...).
    """
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    attn = options.pop("attn_implementation", DEFAULT_ATTN)
    location = locate_weights(weights, DEFAULT_REPO)
    if location is None and not random_init:
        raise missing_weights_error("data2vec-vision", "a data2vec-vision checkpoint directory", DEFAULT_REPO)
    path = checkpoint_dir(location, "data2vec-vision") if location is not None else None
    config = load_config(path, Data2VecVisionConfig, options, "data2vec-vision", "data2vec-vision")
    model, sha = load_model(
        Data2VecVisionModel,
        config,
        None if random_init else path,
        teacher="data2vec-vision",
        attn=attn,
        init_kwargs={"add_pooling_layer": False},
    )
    preprocess = image_preprocess(path, config.image_size, DEFAULT_PREPROCESS)
    return Data2VecVisionTeacher(model, preprocess, "random" if random_init else location.source, sha)
