"""BEiT v2 teacher on timm's ``Beit``: the self-supervised release file, timm checkpoints, timm hub dirs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import MmkdError
from .base import TEACHERS, ImagePreprocess, Teacher, TeacherOutput
from .weights import (
    LoadReport,
    hf_weight_files,
    load_state_dict_file,
    load_state_dict_into,
    locate_weights,
    missing_weights_error,
    sha256_of,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "beitv2_base_patch16_224"
# Pretraining-only parts of beitv2_*_pt1k.pth: the masked-image-modelling head and the CLS-pretraining
# head blocks (plus their own norm/head when not shared). A fine-tuned file's classifier is unused too.
DROP = ("mask_token", "lm_head.*", "cls_pt_*", "head.*")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def layout_from_keys(keys: set[str]) -> dict[str, Any]:
    """timm ``Beit`` constructor flags that reproduce a checkpoint's key layout.

    The pt1k release has one shared relative-position table (``rel_pos_bias.*``) and a final ``norm``;
    timm's fine-tuned files have per-block tables and ``fc_norm``.
    """
    layout: dict[str, Any] = {
        "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in keys,
        "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in keys,
        "use_abs_pos_emb": "pos_embed" in keys,
        "qkv_bias": "blocks.0.attn.q_bias" in keys,
        "global_pool": "avg" if "fc_norm.weight" in keys else "token",
    }
    # only None-ness matters: the loaded gamma_1/gamma_2 overwrite the init value
    layout["init_values"] = 0.1 if "blocks.0.gamma_1" in keys else None
    return layout


class BeitTeacher(Teacher):
    """A timm ``Beit`` returning every block's tokens, CLS at step 0."""

    modality = "image"

    def __init__(self, model: torch.nn.Module, preprocess: ImagePreprocess, source: str, sha256: str) -> None:
        super().__init__()
        self.model = model
        self.name = "beitv2"
        self.num_layers = len(model.blocks)
        self.hidden_size = model.embed_dim
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
            raise MmkdError("beitv2 is an image teacher: call it with pixel_values")
        # timm splits off the CLS token unless asked for it; put it back at time step 0
        pairs = self.model.forward_intermediates(
            pixel_values,
            indices=self.num_layers,
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )
        hidden = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in pairs]
        mask = torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device)
        return TeacherOutput(hidden_states=hidden, mask=mask)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[Path], dict[str, Any]]:
    """State dict, files read and timm hub config (empty for a bare file) of a file or directory."""
    config: dict[str, Any] = {}
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if "architecture" not in config:
                kind = config.get("model_type", "unknown")
                raise MmkdError(
                    f"{config_file} is not a timm config (model_type {kind!r}); beitv2 reads timm "
                    "checkpoints or the original BEiT v2 .pth: point --weights at one"
                )
            files = hf_weight_files(path)
        else:
            files = sorted(p for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
            if len(files) != 1:
                raise MmkdError(f"{path} holds {len(files)} checkpoint files; point --weights at one of them")
    else:
        files = [path]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict_file(f))
    return state, files, config


def _build(model_name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm
    from timm.models.beit import Beit

    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise MmkdError(f"beitv2: cannot build timm model {model_name!r} with {kwargs}: {e}") from None
    if not isinstance(model, Beit):
        raise MmkdError(
            f"beitv2: model_name {model_name!r} is a {type(model).__name__}, not a timm Beit; pick a beit/beitv2 model"
        )
    return model


def _preprocess(model: torch.nn.Module, model_name: str, hub_cfg: dict[str, Any]) -> ImagePreprocess:
    """The eval preprocessing timm resolves for the model (a hub directory's own config first); the input
    size is the model's, which architecture options may have changed."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=dict(hub_cfg) or None, model=model)
    return ImagePreprocess(
        size=int(model.patch_embed.img_size[0]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        interpolation=data["interpolation"],
        crop_pct=float(data["crop_pct"]),
        crop_mode=data["crop_mode"],
    )


def _check_position_index(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """timm regenerates ``relative_position_index`` (a non-persistent buffer); refuse a file whose index differs."""
    for key in [k for k in state if k.endswith("relative_position_index")]:
        value = state.pop(key)
        try:
            own = model.get_submodule(key.rsplit(".", 1)[0]).relative_position_index
        except AttributeError:
            continue
        if own is not None and (own.shape != value.shape or not torch.equal(own, value.to(own.dtype))):
            raise MmkdError(
                f"{file}: {key} differs from the index timm builds for this model; "
                "set img_size/patch_size to the checkpoint's"
            )


def _check_depth(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if indices and max(indices) + 1 > len(model.blocks):
        raise MmkdError(
            f"{file} has {max(indices) + 1} blocks but the model has depth {len(model.blocks)}; "
            "set depth (or model_name) to match the checkpoint"
        )


@TEACHERS.register("beitv2", "beit")
def create_beitv2(weights: str | None = None, *, random_init: bool = False, **options: Any) -> BeitTeacher:
    """BEiT v2 (timm ``Beit``).

    Args:
        weights: ``beitv2_base_patch16_224_pt1k.pth`` (BEiT v2 release), a timm ``.safetensors``/``.pth``, a
            timm hub directory (``config.json`` with ``architecture`` + weights), or a repo id in the HF hub
            cache. None: the model's timm hub repo in the cache.
        random_init: Random weights (tests only); a timm hub directory in ``weights`` then gives the config.
        **options: ``model_name`` (a timm beit model, default ``beitv2_base_patch16_224``); anything else
            (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ...) goes to the timm
            constructor and overrides what the checkpoint implies.
    """
    import timm

    model_name = options.pop("model_name", None)
    name_for_repo = model_name or DEFAULT_MODEL
    default_cfg = timm.models.get_pretrained_cfg(name_for_repo)
    default_repo = default_cfg.hf_hub_id if default_cfg is not None and default_cfg.hf_hub_id else None
    location = locate_weights(weights, default_repo)
    if random_init:
        hub_config: dict[str, Any] = {}
        if location is not None:
            if not (location.path / "config.json").is_file():
                raise MmkdError(
                    "beitv2: random_init=True reads only a timm config.json from weights; "
                    f"{location.path} has none (drop weights or point it at a timm hub directory)"
                )
            hub_config = json.loads((location.path / "config.json").read_text())
        model_name = model_name or hub_config.get("architecture", DEFAULT_MODEL)
        kwargs = {**hub_config.get("model_args", {}), "global_pool": "token", "num_classes": 0, **options}
        model = _build(model_name, kwargs)
        return BeitTeacher(
            model, _preprocess(model, model_name, hub_config.get("pretrained_cfg", {})), "random", "random"
        )
    if location is None:
        raise missing_weights_error("beitv2", "beitv2_base_patch16_224_pt1k.pth or a timm checkpoint", default_repo)

    state, files, hub_config = _read_checkpoint(location.path)
    model_name = model_name or hub_config.get("architecture", DEFAULT_MODEL)
    kwargs = {**hub_config.get("model_args", {}), **layout_from_keys(set(state)), "num_classes": 0, **options}
    model = _build(model_name, kwargs)
    file = files[0] if len(files) == 1 else location.path
    _check_position_index(model, state, file)
    _check_depth(model, state, file)
    report: LoadReport = load_state_dict_into(model, state, file=file, drop=DROP)
    logger.info("beitv2: loaded %s (%s) from %s; %d keys dropped", model_name, kwargs, file, len(report.dropped))
    return BeitTeacher(
        model, _preprocess(model, model_name, hub_config.get("pretrained_cfg", {})), location.source, sha256_of(files)
    )
