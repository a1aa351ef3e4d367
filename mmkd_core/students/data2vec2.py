"""The ``data2vec2`` student: the post-norm ViT of fairseq's data2vec 2.0 image model, randomly initialised or
cut from the first blocks of a released checkpoint (``base_imagenet.pt``).

data2vec 2.0 computes (``layer_norm_first`` off, the released image models):

    x = conv16x16(image) + sincos_2d        # fixed positions, patches only
    x = norm_pre(cat(cls, x))               # the CLS ("extra token") is added after the positions
    x = norm2(r + mlp(r)), r = norm1(x + attn(x))   # every block, post-norm; no norm after the last one

fairseq keeps the first blocks in the image encoder (``modality_encoders.IMAGE.context_encoder.blocks``, the
"prenet") and the rest at the top (``blocks``); they run in that order, and so the student's block i is the
i-th of prenet-then-blocks. timm and transformers have no post-norm ViT, so this one is written here; its
export is mmkd's own (``load_student``), and its pre-norm cousins (vit, beit) cannot take these blocks.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    copy_state,
    fill_from_init,
    resolve_blocks,
)
from .layers import Block

logger = logging.getLogger(__name__)

# load_data2vec2's result: the weights under the student's keys, and what the file says about them
CheckpointPair = tuple[dict[str, torch.Tensor], dict[str, Any]]

IMAGE = "modality_encoders.IMAGE."
PRENET = IMAGE + "context_encoder.blocks."
# every parameter of one post-norm block, fairseq's names (AltBlock) and the student's alike
BLOCK_KEYS = tuple(
    f"{m}.{leaf}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for leaf in ("weight", "bias")
)
# fairseq key (under the image encoder) -> the student model's
EMBED_KEYS = {
    "local_encoder.proj.weight": "patch_embed.weight",
    "local_encoder.proj.bias": "patch_embed.bias",
    "extra_tokens": "cls_token",
    "fixed_positional_encoder.positions": "pos_embed",
    "context_encoder.norm.weight": "norm_pre.weight",
    "context_encoder.norm.bias": "norm_pre.bias",
}
_BLOCK = re.compile(r"^(?P<where>" + re.escape(PRENET) + r"|blocks\.)(?P<i>\d+)\.(?P<rest>.+)$")


def _pretraining_only(key: str) -> bool:
    """Parts only pretraining uses: the EMA teacher, the decoders and the reconstruction head."""
    local = key.removeprefix(IMAGE)
    return "_ema" in key or local.startswith(("decoder.", "shared_decoder.", "recon_proj."))


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed 2-D sin-cos positions, as fairseq's (MAE's) ``get_2d_sincos_pos_embed(dim, grid)``:
    the first half of the channels encodes the column, the second the row (numpy's ``meshgrid(w, h)`` puts
    the column first), each as sin then cos of ``pos / 10000**(2k/half)``; computed in float64, as there."""
    if dim % 4:
        raise MmkdError(f"data2vec2 student: embed_dim={dim} must be a multiple of 4 for 2-D sin-cos positions")
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        half = dim // 2
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


@dataclass
class Data2Vec2StudentConfig(HeadConfig):
    """Architecture of the data2vec 2.0 image encoder (post-norm blocks) plus the heads (see HeadConfig).

    Attributes:
        depth: Number of blocks (prenet blocks count too: base has 2 + 10).
        img_size: Input size in pixels (square).
        patch_size: Patch size in pixels.
        embed_dim: Width (a multiple of 4: the sin-cos positions split it four ways).
        num_heads: Attention heads.
        mlp_ratio: Feed-forward width over ``embed_dim``.
        in_chans: Input channels.
        norm_eps: Layer-norm epsilon (fairseq's ``norm_eps``).
    """

    depth: int = 6
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    in_chans: int = 3
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.check_heads()
        if self.depth < 1:
            raise MmkdError(f"data2vec2 student depth={self.depth}: give at least 1 block")
        if self.embed_dim % self.num_heads:
            raise MmkdError(
                f"data2vec2 student embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.embed_dim % 4:
            raise MmkdError(
                f"data2vec2 student embed_dim={self.embed_dim}: must be a multiple of 4 (sin-cos positions)"
            )
        if self.img_size % self.patch_size:
            raise MmkdError(
                f"data2vec2 student img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


class PostNormViT(nn.Module):
    """data2vec 2.0's image encoder without its pretraining parts; ``forward`` returns every block's output.

    Attributes:
        patch_embed: The patch convolution (with bias).
        cls_token: (1, 1, D), added after the positions.
        pos_embed: (1, grid², D) fixed sin-cos positions of the patches (a buffer: never trained).
        norm_pre: The layer norm over CLS and patches before the first block.
        blocks: Post-norm blocks (:class:`~mmkd_core.students.layers.Block` with ``pre_norm=False``).
    """

    def __init__(self, c: Data2Vec2StudentConfig) -> None:
        super().__init__()
        d = c.embed_dim
        self.patch_embed = nn.Conv2d(c.in_chans, d, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_positions(d, c.grid).unsqueeze(0))
        self.norm_pre = nn.LayerNorm(d, eps=c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(d, c.num_heads, c.mlp_hidden, pre_norm=False, eps=c.norm_eps) for _ in range(c.depth)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # fairseq's: xavier-uniform patch kernel, a normal CLS token; BERT-style linear layers
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise MmkdError(
                f"data2vec2 student: {tuple(pixel_values.shape[-2:])} px images give {x.shape[1]} patches; "
                f"it was built for {self.pos_embed.shape[1]}"
            )
        x = x + self.pos_embed
        x = self.norm_pre(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return hidden


class Data2Vec2Student(Student):
    """A :class:`PostNormViT` with prediction heads; trains from an image store as the vit student does.

    Attributes:
        model: The encoder.
        heads: The PredictionHeads.
    """

    name = "data2vec2"
    modality = "image"

    def __init__(self, config: Data2Vec2StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.embed_dim
        self.num_layers = config.depth
        self.model = PostNormViT(config)
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
            raise MmkdError("the data2vec2 student reads images only: call it with pixel_values")
        hidden = self.model(pixel_values)
        last = hidden[-1]  # no norm after the last block
        mask = torch.ones(last.shape[:2], dtype=torch.bool, device=last.device)
        tokens, pooled = self.heads(hidden, last, mask)
        return StudentOutput(
            hidden_states=hidden, mask=mask, last_hidden_state=last, tokens=tokens, pooled=pooled, modality="image"
        )


# ---------------------------------------------------------------------------------------------------------
# fairseq's checkpoint


def _model_cfg(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The model section of a fairseq checkpoint's ``cfg`` (omegaconf or dict) or its legacy ``args``
    (argparse Namespace); empty when the file has neither."""
    cfg = obj.get("cfg")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        return dict(cfg["model"])
    args = obj.get("args")
    if args is not None and hasattr(args, "__dict__"):
        return dict(vars(args))
    return {}


def _image_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    modalities = model_cfg.get("modalities")
    image = modalities.get("image") if isinstance(modalities, Mapping) else None
    return dict(image) if isinstance(image, Mapping) else {}


def load_data2vec2(path: str | os.PathLike) -> CheckpointPair:
    """Read fairseq's data2vec 2.0 image checkpoint (``base_imagenet.pt``) safely (``torch.load`` with
    ``weights_only=True`` and only config classes allowed) into the student's key layout.

    The EMA teacher, decoders and reconstruction head are dropped (logged); any other key the student has
    no place for is reported as unexpected.

    Returns:
        ``(state, info)``: ``state`` holds the embedding keys of :class:`PostNormViT` and ``blocks.i.*`` for
        every block in run order (prenet first); ``info`` the architecture (``embed_dim``, ``num_heads`` —
        None when the file records no config —, ``mlp_ratio``, ``patch_size``, ``img_size``, ``in_chans``,
        ``norm_eps``, ``num_blocks``, ``prenet_depth``), whether the stored positions are the sin-cos table
        (``sincos_positions``), ``path`` and ``sha256``.

    Raises:
        MmkdError: A file that is no data2vec 2.0 image checkpoint, needs a global outside the allow-list,
            computes something the student does not (pre-norm, ALiBi, several extra tokens), or lacks a
            weight (named).
    """
    path = Path(path)
    state, cfg, image_cfg, dropped = _read_checkpoint(path)
    out = _take_embeddings(path, state)
    prenet_depth, num_blocks = _take_blocks(path, state, cfg, image_cfg, out)
    if dropped:
        logger.info("%s: dropped %d pretraining-only keys (EMA teacher, decoders): %s", path, len(dropped), dropped[:6])
    if state:
        logger.warning("%s: ignored %d keys the student has no place for: %s", path, len(state), sorted(state)[:6])
    info = _checkpoint_info(path, out, cfg, num_blocks, prenet_depth)
    logger.info(
        "%s: data2vec 2.0 image encoder, %d blocks (%d prenet), width %d",
        path,
        num_blocks,
        prenet_depth,
        info["embed_dim"],
    )
    return out, info


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], list[str]]:
    """``(state, model cfg, image cfg, dropped keys)`` of a fairseq checkpoint, refused unless its image
    encoder computes what the student does."""
    from ..teachers.weights import safe_torch_load

    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        raise MmkdError(f"{path}: not a fairseq checkpoint (no 'model' entry with the state dict)")
    raw = obj["model"]
    dropped = sorted(k for k in raw if _pretraining_only(k))
    state = {k: v for k, v in raw.items() if not _pretraining_only(k)}
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise MmkdError(f"{path}: model entries {non_tensors[:4]} are not tensors")
    cfg = _model_cfg(obj)
    image_cfg = _image_cfg(cfg)
    if not any(k.startswith(IMAGE) for k in state):
        raise MmkdError(f"{path}: no image encoder ({IMAGE}*); is it a data2vec 2.0 image checkpoint?")
    if cfg.get("layer_norm_first") or "norm.weight" in state:
        raise MmkdError(f"{path}: a pre-norm data2vec 2.0 model (layer_norm_first); the data2vec2 student is post-norm")
    if IMAGE + "alibi_scale" in state or image_cfg.get("use_alibi_encoder"):
        raise MmkdError(f"{path}: the image encoder uses ALiBi position biases, which the data2vec2 student has not")
    if IMAGE + "local_encoder.0.proj.weight" in state:
        raise MmkdError(f"{path}: the patch embedding is followed by a projection, which the data2vec2 student has not")
    return state, cfg, image_cfg, dropped


def _take_embeddings(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding weights, under the student's keys, taken out of ``state``."""
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in EMBED_KEYS.items():
        if IMAGE + theirs not in state:
            raise MmkdError(f"{path}: missing weights {IMAGE + theirs}; not a data2vec 2.0 image checkpoint")
        out[ours] = state.pop(IMAGE + theirs)
    if out["cls_token"].ndim != 3 or out["cls_token"].shape[1] != 1:
        raise MmkdError(
            f"{path}: {IMAGE}extra_tokens has shape {tuple(out['cls_token'].shape)}; the student has one CLS token"
        )
    return out


def _take_blocks(
    path: Path,
    state: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    image_cfg: dict[str, Any],
    out: dict[str, torch.Tensor],
) -> tuple[int, int]:
    """Move every block's weights out of ``state`` into ``out`` as ``blocks.i.*`` in run order (prenet first).

    Returns:
        ``(prenet depth, number of blocks)``.
    """
    found: dict[str, set[int]] = {PRENET: set(), "blocks.": set()}
    for key in state:
        if m := _BLOCK.match(key):
            found[m["where"]].add(int(m["i"]))
    # the file's own depths where it records them, else what its keys show
    counts = {
        PRENET: int(image_cfg.get("prenet_depth", max(found[PRENET], default=-1) + 1)),
        "blocks.": int(cfg.get("depth", max(found["blocks."], default=-1) + 1)),
    }
    order = [(where, i) for where in (PRENET, "blocks.") for i in range(counts[where])]
    for n, (where, i) in enumerate(order):
        for leaf in BLOCK_KEYS:
            key = f"{where}{i}.{leaf}"
            if key not in state:
                raise MmkdError(f"{path}: missing weights {key}; the checkpoint is incomplete")
            out[f"blocks.{n}.{leaf}"] = state.pop(key)
    extra_block = sorted(k for k in state if _BLOCK.match(k))
    if extra_block:
        raise MmkdError(
            f"{path}: block weights {extra_block[:3]} are not part of the post-norm block the student builds "
            "(another attention or more blocks than the file's config says)"
        )
    return counts[PRENET], len(order)


def _checkpoint_info(
    path: Path, out: dict[str, torch.Tensor], cfg: dict[str, Any], num_blocks: int, prenet_depth: int
) -> dict[str, Any]:
    """``load_data2vec2``'s ``info``: the architecture read off the weights and the file's config."""
    from ..teachers.weights import sha256_of

    conv, pos = out["patch_embed.weight"], out["pos_embed"]
    d, grid = conv.shape[0], math.isqrt(pos.shape[1])
    if conv.shape[2] != conv.shape[3] or grid * grid != pos.shape[1] or pos.shape[-1] != d:
        raise MmkdError(f"{path}: non-square patches or position grid ({tuple(conv.shape)}, {tuple(pos.shape)})")
    sincos = d % 4 == 0 and torch.allclose(pos[0].float(), sincos_positions(d, grid), atol=1e-5)
    num_heads = cfg.get("num_heads")
    return {
        "embed_dim": d,
        "num_heads": int(num_heads) if num_heads is not None else None,
        "mlp_ratio": out["blocks.0.mlp.fc1.weight"].shape[0] / d,
        "patch_size": int(conv.shape[2]),
        "img_size": int(conv.shape[2]) * grid,
        "in_chans": int(conv.shape[1]),
        "norm_eps": float(cfg.get("norm_eps", 1e-6)),
        "num_blocks": num_blocks,
        "prenet_depth": prenet_depth,
        "sincos_positions": bool(sincos),
        "path": str(path.resolve()),
        "sha256": sha256_of(path),
    }


def _init_checkpoint(init_from: Any, init_weights: str | None) -> CheckpointPair:
    if isinstance(init_from, tuple) and len(init_from) == 2 and isinstance(init_from[1], Mapping):
        return init_from
    if init_from == "data2vec2" and init_weights is not None:
        return load_data2vec2(init_weights)
    if isinstance(init_from, (str, os.PathLike)) and init_weights is None:
        return load_data2vec2(init_from)
    raise MmkdError(
        f"data2vec2 student: init_from {type(init_from).__name__} is no data2vec 2.0 checkpoint; its blocks are "
        "post-norm, so only that file's fit: init_from='base_imagenet.pt' (or init_from='data2vec2', "
        "init_weights=FILE, or load_data2vec2's pair), or init='random'"
    )


@STUDENTS.register("data2vec2")
def create_data2vec2_student(
    *,
    init: str = "random",
    init_from: Any = None,
    init_weights: str | None = None,
    init_blocks: str | Sequence[int] | None = None,
    **config: Any,
) -> Data2Vec2Student:
    """A data2vec 2.0 image student (post-norm ViT).

    A different ``img_size`` than the checkpoint's (the store's views) gets the sin-cos positions recomputed
    for its patch grid, as fairseq computes them — they are fixed, not learned; a checkpoint whose stored
    positions are not that table is refused instead. The patch size must be the checkpoint's.

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy from ``init_from``.
        init_from: fairseq's checkpoint file (``base_imagenet.pt``), ``"data2vec2"`` with ``init_weights``,
            or the ``(state, info)`` pair of :func:`load_data2vec2`. Architecture values are read off it
            unless given (and must then agree; ``img_size`` may differ).
        init_weights: The checkpoint file when ``init_from="data2vec2"``.
        init_blocks: Which blocks (in run order, prenet first) to copy, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).
        **config: Data2Vec2StudentConfig fields.

    Raises:
        MmkdError: Unknown option, contradicting options, or an init model that does not fit.
    """
    pretrained = check_init("data2vec2", init, init_from)
    if not pretrained:
        return Data2Vec2Student(build_config(Data2Vec2StudentConfig, "data2vec2", config))
    state, info = _init_checkpoint(init_from, init_weights)
    config = fill_from_init("data2vec2", config, _checkpoint_arch(info, config), may_differ=("img_size",))
    student = Data2Vec2Student(build_config(Data2Vec2StudentConfig, "data2vec2", config))
    layers = resolve_blocks("data2vec2", init_blocks, student.num_layers, info["num_blocks"])
    _copy_checkpoint(student, state, info, layers)
    provenance = {k: info[k] for k in ("path", "sha256", "num_blocks", "prenet_depth")}
    student.init_info = {"init": "pretrained", "source": {"data2vec2": provenance}, "blocks": layers}
    logger.info("data2vec2 student: copied blocks %s of %s", layers, info["path"])
    return student


def _checkpoint_arch(info: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The config values a checkpoint fixes (``num_heads`` only where the file records it)."""
    arch = {k: info[k] for k in ("embed_dim", "mlp_ratio", "patch_size", "img_size", "in_chans", "norm_eps")}
    if info["num_heads"] is not None:
        arch["num_heads"] = info["num_heads"]
    elif "num_heads" not in config:
        raise MmkdError(
            f"{info['path']} records no num_heads (no cfg/args beside the weights): pass num_heads=N "
            "(--student-option num_heads=N)"
        )
    return arch


def _copy_checkpoint(
    student: Data2Vec2Student, state: dict[str, torch.Tensor], info: dict[str, Any], layers: list[int]
) -> None:
    """Copy the embeddings and the chosen blocks; sin-cos positions are recomputed for another image size."""
    own = student.model.state_dict()
    copy = {k: state[k] for k in EMBED_KEYS.values()}
    for i, j in enumerate(layers):
        copy.update({f"blocks.{i}.{leaf}": state[f"blocks.{j}.{leaf}"] for leaf in BLOCK_KEYS})
    if copy["pos_embed"].shape != own["pos_embed"].shape:
        if not info["sincos_positions"]:
            raise MmkdError(
                f"{info['path']}: its positions are not the fixed sin-cos table, so they cannot be recomputed "
                f"for {student.config.img_size} px images; use img_size={info['img_size']}"
            )
        logger.info(
            "data2vec2 student: sin-cos positions recomputed for a %dx%d grid (checkpoint: %d px images)",
            student.config.grid,
            student.config.grid,
            info["img_size"],
        )
        copy["pos_embed"] = own["pos_embed"]
    copy_state(student.model, copy, "the data2vec2 student")
