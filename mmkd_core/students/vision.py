"""Image students on timm models: ``vit`` (a ``VisionTransformer``) and ``beit`` (a ``Beit``, which alone can
hold BEiT's relative position bias). Both are built with ``timm.create_model`` so the export is a plain timm
checkpoint, and both can start from the first blocks of a timm model of the same family — or of a transformers
model timm has an equivalent of (CLIP's vision tower -> a CLIP-flavoured ``VisionTransformer``; BEiT and
data2vec-vision -> ``Beit``), whose weights :func:`timm_equivalent` converts first."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import MmkdError
from .base import (
    STUDENTS,
    HeadConfig,
    PredictionHeads,
    Student,
    StudentOutput,
    build_config,
    check_init,
    describe_init,
    fill_from_init,
    resolve_blocks,
    resolve_init,
    unwrap_init,
)

logger = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
# May stay freshly initialised when the init model has none (e.g. a BEiT that pools with fc_norm).
_OPTIONAL_KEYS = ("norm.weight", "norm.bias")


@dataclass
class VitStudentConfig(HeadConfig):
    """Architecture of a timm ``VisionTransformer`` student (CLS token, token pooling, no classifier).

    Attributes:
        arch: The timm entrypoint the student is built with. Every size argument is overridden; what it fixes
            beyond them is the norm layer and activation: ``vit_base_patch16_224`` (timm's LayerNorm, eps 1e-6,
            GELU), ``vit_base_patch16_clip_quickgelu_224`` / ``vit_base_patch16_clip_224`` (eps 1e-5, pre-norm,
            QuickGELU / GELU: CLIP's vision tower).
        depth: Number of blocks.
        img_size: Input size in pixels (square).
        patch_size: Patch size in pixels.
        embed_dim: Width.
        num_heads: Attention heads.
        mlp_ratio: Feed-forward width over ``embed_dim``.
        qkv_bias: Bias on the q, k, v projections.
        init_values: Layer-scale init; None = no layer scale.
        in_chans: Input channels.
        drop_path_rate: Stochastic depth (training only; not exported).
        timm_args: Further ``timm.create_model`` arguments (JSON values), e.g. ``{"pre_norm": True}``.
    """

    family: ClassVar[str] = "vit_"  # what every entrypoint ``arch`` may name starts with
    arch: str = "vit_base_patch16_224"
    depth: int = 6
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    in_chans: int = 3
    drop_path_rate: float = 0.0
    timm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_heads()
        if not self.arch.startswith(self.family):
            raise MmkdError(f"image student arch={self.arch!r}: name a timm entrypoint starting with {self.family!r}")
        if self.depth < 1:
            raise MmkdError(f"image student depth={self.depth}: give at least 1 block")
        if self.embed_dim % self.num_heads:
            raise MmkdError(f"image student embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise MmkdError(f"image student img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    def model_args(self) -> dict[str, Any]:
        """Arguments of ``timm.create_model(self.arch, pretrained=False, **args)``."""
        args = dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            init_values=self.init_values,
            in_chans=self.in_chans,
            drop_path_rate=self.drop_path_rate,
            num_classes=0,
            global_pool="token",
            class_token=True,
        )
        args.update(self.timm_args)
        return args


@dataclass
class BeitStudentConfig(VitStudentConfig):
    """Architecture of a timm ``Beit`` student; defaults follow the BEiT v2 self-supervised release (one
    relative position table shared by all blocks, no absolute position embedding, layer scale).

    Attributes:
        arch: The timm entrypoint (a beit one); every argument it fixes is overridden.
        use_abs_pos_emb: Absolute position embedding.
        use_rel_pos_bias: A relative position table per block.
        use_shared_rel_pos_bias: One relative position table shared by all blocks.
    """

    family: ClassVar[str] = "beit"
    arch: str = "beitv2_base_patch16_224"
    init_values: float | None = 0.1
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = False
    use_shared_rel_pos_bias: bool = True

    def model_args(self) -> dict[str, Any]:
        args = super().model_args()
        del args["class_token"]  # Beit always has one
        args.update(
            use_abs_pos_emb=self.use_abs_pos_emb,
            use_rel_pos_bias=self.use_rel_pos_bias,
            use_shared_rel_pos_bias=self.use_shared_rel_pos_bias,
        )
        args.update(self.timm_args)
        return args


class TimmStudent(Student):
    """A timm vision transformer with prediction heads.

    Attributes:
        model: The timm model; ``save_vit_student`` writes exactly this model.
        heads: The PredictionHeads.
    """

    modality = "image"

    def __init__(self, config: VitStudentConfig) -> None:
        super().__init__()
        import timm

        self.config = config
        self.width = config.embed_dim
        self.num_layers = config.depth
        try:
            self.model = timm.create_model(config.arch, pretrained=False, **config.model_args())
        except (TypeError, ValueError, AssertionError) as e:
            raise MmkdError(
                f"{self.name} student: timm cannot build {config.arch} with {config.model_args()}: {e}"
            ) from None
        self.heads = PredictionHeads(config.embed_dim, config.depth, config)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        """Encode images.

        Args:
            pixel_values: (B, C, H, W) preprocessed as for the teacher.
            input_ids: Unused; an error if given.
            attention_mask: Unused.
        """
        if pixel_values is None or input_ids is not None:
            raise MmkdError(f"the {self.name} student reads images only: call it with pixel_values")
        # timm drops the prefix (CLS) tokens from intermediates unless asked; put CLS back at step 0
        last, pairs = self.model.forward_intermediates(
            pixel_values, indices=self.num_layers, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        hidden = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in pairs]
        mask = torch.ones(last.shape[:2], dtype=torch.bool, device=last.device)
        tokens, pooled = self.heads(hidden, last, mask)
        return StudentOutput(
            hidden_states=hidden, mask=mask, last_hidden_state=last, tokens=tokens, pooled=pooled, modality="image"
        )


class VitStudent(TimmStudent):
    """A timm ``VisionTransformer`` student."""

    name = "vit"


class BeitStudent(TimmStudent):
    """A timm ``Beit`` student."""

    name = "beit"


def _patch_args(model: nn.Module) -> dict[str, Any]:
    pe = model.patch_embed
    if pe.patch_size[0] != pe.patch_size[1] or pe.img_size is None or pe.img_size[0] != pe.img_size[1]:
        raise MmkdError("image student: the init model has non-square patches or images")
    return {
        "patch_size": pe.patch_size[0],
        "img_size": pe.img_size[0],
        "in_chans": pe.proj.in_channels,
        "embed_dim": model.embed_dim,
    }


# (layer-norm eps, activation) of a timm VisionTransformer -> the entrypoint that builds that pair from JSON args
_VIT_ENTRYPOINTS = {
    (1e-6, "GELU"): "vit_base_patch16_224",
    (1e-5, "QuickGELU"): "vit_base_patch16_clip_quickgelu_224",
    (1e-5, "GELU"): "vit_base_patch16_clip_224",
}


def vit_arch(model: nn.Module) -> dict[str, Any]:
    """VitStudentConfig values read off a timm ``VisionTransformer`` (the entrypoint too: it fixes the norm
    eps and the activation, which the student must share to compute what the copied blocks compute)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise MmkdError(f"vit student: init model {type(model).__name__} is not a timm VisionTransformer")
    if model.cls_token is None:
        raise MmkdError("vit student: the init model has no CLS token; the student needs one at step 0")
    blk = model.blocks[0]
    flavour = (float(getattr(blk.norm1, "eps", 0.0)), type(blk.mlp.act).__name__)
    if flavour not in _VIT_ENTRYPOINTS:
        raise MmkdError(
            f"vit student: the init model's layer norm eps {flavour[0]} with {flavour[1]} is no timm entrypoint "
            f"the student can be built from (known: {', '.join(map(str, _VIT_ENTRYPOINTS))}); use init='random'"
        )
    args = _patch_args(model)
    # only None-ness of init_values matters: the copied gammas overwrite it
    args.update(
        arch=_VIT_ENTRYPOINTS[flavour],
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None,
        init_values=1e-5 if hasattr(blk.ls1, "gamma") else None,
    )
    extra = {}
    if not isinstance(model.norm_pre, nn.Identity):
        extra["pre_norm"] = True
    if model.no_embed_class:
        extra["no_embed_class"] = True
    args["timm_args"] = extra
    return args


def beit_arch(model: nn.Module) -> dict[str, Any]:
    """BeitStudentConfig values read off a timm ``Beit``."""
    from timm.models.beit import Beit

    if not isinstance(model, Beit):
        raise MmkdError(f"beit student: init model {type(model).__name__} is not a timm Beit")
    blk = model.blocks[0]
    args = _patch_args(model)
    args.update(
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk.attn.q_bias is not None,
        init_values=0.1 if blk.gamma_1 is not None else None,
        use_abs_pos_emb=model.pos_embed is not None,
        use_rel_pos_bias=blk.attn.relative_position_bias_table is not None,
        use_shared_rel_pos_bias=model.rel_pos_bias is not None,
        timm_args={},
    )
    return args


def init_from_timm(student: TimmStudent, init_model: Any, blocks: str | Sequence[int] | None = None) -> list[int]:
    """Copy patch embedding, CLS token, position embedding or shared relative position table, the chosen
    blocks and the final norm of a timm model of the student's family into ``student``.

    An absolute position embedding is resampled (timm ``resample_abs_pos_embed``) when image sizes differ.

    Args:
        student: A vit or beit student whose architecture matches the init model.
        init_model: A timm VisionTransformer / Beit, or an image Teacher wrapping one.
        blocks: Init-model blocks copied into student blocks 0..depth-1, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).

    Returns:
        The init model's block indices copied.
    """
    from timm.layers import resample_abs_pos_embed

    model = unwrap_init(init_model)
    layers = resolve_blocks(student.name, blocks, student.num_layers, len(model.blocks))
    src = model.state_dict()
    dst = student.model.state_dict()
    missing, state = [], {}
    for key, own in dst.items():
        m = _BLOCK_KEY.match(key)
        skey = f"blocks.{layers[int(m.group(1))]}.{m.group(2)}" if m else key
        if skey not in src:
            missing.append(key)
            continue
        value = src[skey]
        if key == "pos_embed" and value.shape != own.shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else 1
            value = resample_abs_pos_embed(
                value, new_size=list(student.model.patch_embed.grid_size), num_prefix_tokens=prefix
            )
        if value.shape != own.shape:
            raise MmkdError(
                f"{student.name} student: {key} has shape {tuple(own.shape)} but the init model's "
                f"{skey} has {tuple(value.shape)}"
                + (" (use the init model's img_size)" if "relative_position" in key else "")
            )
        state[key] = value
    hard = [k for k in missing if k not in _OPTIONAL_KEYS]
    if hard:
        raise MmkdError(
            f"{student.name} student: the init model lacks {hard[:4]}; it is not of the student's architecture"
        )
    if missing:
        logger.warning("%s student: init model has no %s; kept its fresh init", student.name, missing)
    with torch.no_grad():
        for key, value in state.items():
            dst[key].copy_(value)
    return layers


# ---------------------------------------------------------------------------------------------------------
# transformers models with a timm equivalent: their weights converted key by key, checked by the tests
# against the transformers forward


def timm_equivalent(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a timm model, else the timm model that computes what it computes:

    - CLIP's vision tower (``CLIPVisionModel``: pre-norm ViT, ``pre_layrnorm``, eps 1e-5, QuickGELU or GELU)
      -> timm's CLIP ``VisionTransformer`` (``vit_base_patch16_clip[_quickgelu]_224`` entrypoint, sizes
      overridden); its ``post_layernorm`` becomes the final ``norm``.
    - BEiT / data2vec-vision (``BeitModel``, ``Data2VecVisionModel``) -> timm ``Beit``. transformers' port uses
      layer-norm eps 1e-12 where the original BEiT and data2vec code (and timm) use 1e-6: block outputs agree
      to about 1e-6, which the tests check. Without a final layer norm (``use_mean_pooling``) the student's
      ``norm`` keeps its fresh init.

    Raises:
        MmkdError: A transformers configuration timm has no equivalent of (another activation, CLIP eps).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("clip_vision_model", "clip"):
        return _timm_from_clip_vision(model)
    if model_type in ("data2vec-vision", "beit"):
        return _timm_from_hf_beit(model)
    return model


def _build_timm(arch: str, what: str, **kwargs: Any) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; the caller's stream must not move
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token", **kwargs)
        except (TypeError, ValueError, AssertionError) as e:
            raise MmkdError(f"{what}: timm cannot build {arch} with {kwargs}: {e}") from None


def _load_converted(model: nn.Module, state: dict[str, torch.Tensor], what: str, optional: Sequence[str] = ()) -> None:
    """Load converted weights strictly (only keys in ``optional`` may stay at their init)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in optional]
    if missing or result.unexpected_keys:
        raise MmkdError(
            f"{what}: converted weights do not fit: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}"
        )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _timm_from_clip_vision(model: nn.Module) -> nn.Module:
    cfg = getattr(model.config, "vision_config", model.config)
    what = "vit student from CLIP's vision tower"
    act = {"quick_gelu": "vit_base_patch16_clip_quickgelu_224", "gelu": "vit_base_patch16_clip_224"}
    if cfg.hidden_act not in act or cfg.layer_norm_eps != 1e-5:
        raise MmkdError(
            f"{what}: hidden_act {cfg.hidden_act!r} with layer_norm_eps {cfg.layer_norm_eps} has no timm "
            "equivalent (quick_gelu or gelu with eps 1e-5 have); use init='random'"
        )
    out = _build_timm(
        act[cfg.hidden_act],
        what,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.num_channels,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
    )
    src = _strip(model.state_dict(), "vision_model.")
    state = {
        "cls_token": src["embeddings.class_embedding"].reshape(1, 1, -1),
        "patch_embed.proj.weight": src["embeddings.patch_embedding.weight"],
        "pos_embed": src["embeddings.position_embedding.weight"].unsqueeze(0),
        "norm_pre.weight": src["pre_layrnorm.weight"],
        "norm_pre.bias": src["pre_layrnorm.bias"],
        "norm.weight": src["post_layernorm.weight"],
        "norm.bias": src["post_layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        p, q = f"encoder.layers.{i}.", f"blocks.{i}."
        attn = [f"{p}self_attn.{n}_proj" for n in ("q", "k", "v")]
        state[q + "attn.qkv.weight"] = torch.cat([src[a + ".weight"] for a in attn])
        state[q + "attn.qkv.bias"] = torch.cat([src[a + ".bias"] for a in attn])
        for theirs, ours in (
            ("layer_norm1", "norm1"),
            ("self_attn.out_proj", "attn.proj"),
            ("layer_norm2", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for leaf in ("weight", "bias"):
                state[f"{q}{ours}.{leaf}"] = src[f"{p}{theirs}.{leaf}"]
    _load_converted(out, state, what)
    return out


def _timm_from_hf_beit(model: nn.Module) -> nn.Module:
    cfg = model.config
    what = f"beit student from {type(model).__name__}"
    if cfg.hidden_act != "gelu":
        raise MmkdError(f"{what}: hidden_act {cfg.hidden_act!r}: timm's Beit uses exact gelu; use init='random'")
    src = model.state_dict()
    shared = "encoder.relative_position_bias.relative_position_bias_table" in src
    per_block = "encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table" in src
    scale = "encoder.layer.0.lambda_1" in src
    out = _build_timm(
        "beitv2_base_patch16_224",
        what,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.num_channels,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        init_values=0.1 if scale else None,
        use_abs_pos_emb="embeddings.position_embeddings" in src,
        use_rel_pos_bias=per_block,
        use_shared_rel_pos_bias=shared,
    )
    state = {
        "cls_token": src["embeddings.cls_token"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
    }
    if "embeddings.position_embeddings" in src:
        state["pos_embed"] = src["embeddings.position_embeddings"]
    if shared:
        state["rel_pos_bias.relative_position_bias_table"] = src[
            "encoder.relative_position_bias.relative_position_bias_table"
        ]
    if "layernorm.weight" in src:
        state["norm.weight"], state["norm.bias"] = src["layernorm.weight"], src["layernorm.bias"]
    else:
        logger.info("%s: the init model has no final layer norm (use_mean_pooling); the student's starts fresh", what)
    for i in range(cfg.num_hidden_layers):
        state.update(_hf_beit_block(src, i, per_block, scale))
    _load_converted(out, state, what, optional=("norm.weight", "norm.bias"))
    return out


def _hf_beit_block(src: dict[str, torch.Tensor], i: int, per_block: bool, scale: bool) -> dict[str, torch.Tensor]:
    """Block ``i`` of a transformers BEiT under timm's Beit keys (``per_block``: its own relative position
    table; ``scale``: layer scale)."""
    p, q = f"encoder.layer.{i}.", f"blocks.{i}."
    a = p + "attention.attention."
    state = {
        q + "attn.qkv.weight": torch.cat([src[a + n + ".weight"] for n in ("query", "key", "value")]),
        q + "attn.q_bias": src[a + "query.bias"],
        q + "attn.v_bias": src[a + "value.bias"],
    }
    if per_block:
        state[q + "attn.relative_position_bias_table"] = src[a + "relative_position_bias.relative_position_bias_table"]
    if scale:
        state[q + "gamma_1"], state[q + "gamma_2"] = src[p + "lambda_1"], src[p + "lambda_2"]
    for theirs, ours in (
        ("layernorm_before", "norm1"),
        ("attention.output.dense", "attn.proj"),
        ("layernorm_after", "norm2"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ):
        for leaf in ("weight", "bias"):
            state[f"{q}{ours}.{leaf}"] = src[f"{p}{theirs}.{leaf}"]
    return state


def _create(
    cls: type[TimmStudent],
    config_cls: type[VitStudentConfig],
    arch_of: Any,
    init: str,
    init_from: Any,
    init_weights: str | None,
    init_blocks: str | Sequence[int] | None,
    config: dict[str, Any],
) -> TimmStudent:
    name = cls.name
    pretrained = check_init(name, init, init_from)
    init_from = resolve_init(init_from, init_weights)
    if pretrained:
        model = timm_equivalent(unwrap_init(init_from))
        init_args = arch_of(model)
        # the init model's extra timm arguments are needed for its keys to fit; the caller's are added on top
        config = dict(config, timm_args={**init_args.pop("timm_args"), **config.get("timm_args", {})})
        config = fill_from_init(name, config, init_args, may_differ=("img_size",) if name == "vit" else ())
    student = cls(build_config(config_cls, name, config))
    if pretrained:
        layers = init_from_timm(student, model, init_blocks)
        student.init_info = {"init": "pretrained", "source": describe_init(init_from), "blocks": layers}
        logger.info("%s student: copied blocks %s", name, layers)
    return student


@STUDENTS.register("vit")
def create_vit_student(
    *,
    init: str = "random",
    init_from: Any = None,
    init_weights: str | None = None,
    init_blocks: str | Sequence[int] | None = None,
    **config: Any,
) -> VitStudent:
    """A timm ``VisionTransformer`` student.

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy from ``init_from``.
        init_from: A timm VisionTransformer (or a Teacher wrapping one, or such a teacher's registered name).
            Architecture values are read off it unless given (and must then agree; ``img_size`` may differ:
            the position embedding is resampled).
        init_weights: Checkpoint for a teacher given by name.
        init_blocks: Which init-model blocks to copy, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).
        **config: VitStudentConfig fields.
    """
    return _create(VitStudent, VitStudentConfig, vit_arch, init, init_from, init_weights, init_blocks, config)


@STUDENTS.register("beit", "beitv2")
def create_beit_student(
    *,
    init: str = "random",
    init_from: Any = None,
    init_weights: str | None = None,
    init_blocks: str | Sequence[int] | None = None,
    **config: Any,
) -> BeitStudent:
    """A timm ``Beit`` student; from a BEiT v2 teacher it copies the shared relative position table too.

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy from ``init_from``.
        init_from: A timm Beit, the beitv2 Teacher, or ``"beitv2"`` (built by ``create_teacher("beitv2",
            init_weights)``, e.g. from the BEiT v2 release file). Architecture values, including the position
            scheme, are read off it unless given (and must then agree; img_size too, as the tables depend on it).
        init_weights: Checkpoint for a teacher given by name.
        init_blocks: Which init-model blocks to copy, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).
        **config: BeitStudentConfig fields.
    """
    return _create(BeitStudent, BeitStudentConfig, beit_arch, init, init_from, init_weights, init_blocks, config)
