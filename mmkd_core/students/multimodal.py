"""The multimodal student: an image tower (ViT patch embedding + pre-norm blocks) and a text tower (BERT-style
embeddings + post-norm blocks) feeding the same shared blocks, with a norm, pooling and projection per
modality. With ``mome=True`` the shared blocks are mixture-of-modality-experts blocks (VLMo/BEiT-3), which
can be initialised from a unimodal image model and a unimodal text model at once."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmkdError
from ..targets import masked_mean
from .base import (
    STUDENT_POOLS,
    STUDENTS,
    HeadConfig,
    PredictionHeads,
    Student,
    StudentOutput,
    build_config,
    check_init,
    copy_state,
    describe_init,
    fill_from_init,
    resolve_init,
    unwrap_init,
)
from .layers import Block, MoMEBlock, key_padding_mask
from .text import bert_like, position_offset

logger = logging.getLogger(__name__)

IMAGE_EPS = 1e-6  # timm ViT/BEiT


def vit_block(dim: int, num_heads: int, hidden: int, *, eps: float, init_values: float | None) -> nn.Module:
    """A pre-norm block: timm's own ViT ``Block`` (the keys of ``layers.Block``, plus drop-path)."""
    from functools import partial

    from timm.models.vision_transformer import Block as TimmBlock

    block = TimmBlock(
        dim,
        num_heads,
        mlp_ratio=hidden / dim,
        qkv_bias=True,
        init_values=init_values,
        norm_layer=partial(nn.LayerNorm, eps=eps),
    )
    if block.mlp.fc1.out_features != hidden:
        raise MmkdError(f"multimodal student: feed-forward width {hidden} is not a multiple timm can build of {dim}")
    return block


@dataclass
class MultimodalStudentConfig(HeadConfig):
    """Architecture of the multimodal student plus its heads (see HeadConfig; each modality has its own
    heads, both of widths ``target_dim`` / ``pooled_dim``).

    Attributes:
        text_pool: Pooling of the text tower; None = ``pool``.
        img_size: Input size in pixels (square).
        patch_size: Patch size in pixels.
        in_chans: Input channels.
        width: Width of every block (both towers and the shared blocks).
        num_heads: Attention heads of image and shared blocks.
        mlp_ratio: Feed-forward width over ``width`` of image and shared blocks and the image/VL experts.
        text_num_heads: Attention heads of text blocks; None = ``num_heads``.
        text_mlp_ratio: Feed-forward width ratio of text blocks and the text experts; None = ``mlp_ratio``.
        image_depth: Image-only blocks.
        text_depth: Text-only blocks.
        shared_depth: Blocks both modalities go through (at least one).
        vocab_size: Token vocabulary.
        max_position: Length of the text position table.
        text_eps: Layer-norm epsilon of the text embeddings and text blocks (BERT's 1e-12).
        init_values: Layer-scale init of pre-norm blocks and experts; None = no layer scale.
        mome: Mixture-of-modality-experts shared blocks: shared attention, an image and a text FFN expert.
        vl_depth: With ``mome``, the last ``vl_depth`` shared blocks have one vision-language FFN expert that
            both modalities go through.
    """

    token_pred: str = "none"
    text_pool: str | None = None
    img_size: int = 48
    patch_size: int = 8
    in_chans: int = 3
    width: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    text_num_heads: int | None = None
    text_mlp_ratio: float | None = None
    image_depth: int = 2
    text_depth: int = 2
    shared_depth: int = 1
    vocab_size: int = 30522
    max_position: int = 64
    text_eps: float = 1e-12
    init_values: float | None = None
    mome: bool = False
    vl_depth: int = 0

    def __post_init__(self) -> None:
        self.check_heads()
        if self.text_pool is not None and self.text_pool not in STUDENT_POOLS:
            raise MmkdError(
                f"multimodal student text_pool {self.text_pool!r}: choose one of {', '.join(STUDENT_POOLS)}"
            )
        if min(self.shared_depth, self.image_depth, self.text_depth) < 0:
            raise MmkdError("multimodal student: shared_depth, image_depth and text_depth must be >= 0")
        if min(self.image_depth, self.text_depth) + self.shared_depth < 1:
            # shared_depth 0 is a plain two-tower student (the CLIP study); each tower needs a block
            raise MmkdError("multimodal student: each tower needs at least one block (its own or shared)")
        if self.vl_depth and not self.mome:
            raise MmkdError("multimodal student: vl_depth needs mome=True (VL experts live in MoME blocks)")
        if not 0 <= self.vl_depth <= self.shared_depth:
            raise MmkdError(
                f"multimodal student vl_depth={self.vl_depth}: must be 0..shared_depth ({self.shared_depth})"
            )
        for heads in (self.num_heads, self.text_heads):
            if self.width % heads:
                raise MmkdError(f"multimodal student width={self.width} is not divisible by {heads} heads")
        if self.img_size % self.patch_size:
            raise MmkdError(
                f"multimodal student img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def text_heads(self) -> int:
        return self.text_num_heads or self.num_heads

    @property
    def image_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def text_hidden(self) -> int:
        return int(self.width * (self.text_mlp_ratio or self.mlp_ratio))


class MultimodalStudent(Student):
    """Two towers and shared blocks; each modality is encoded on its own (a dual encoder).

    Attributes:
        patch_embed, cls_token, pos_embed, image_blocks, image_norm: The image tower and its final norm.
        word_embeddings, position_embeddings, text_embed_norm, text_blocks, text_norm: The text tower.
        shared_blocks: ``Block`` (pre-norm) or ``MoMEBlock`` list.
        image_heads, text_heads: PredictionHeads per modality (``pooled`` is the projected embedding).
    """

    name = "multimodal"
    modality = "multimodal"

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention): the learnt CLS token and position table."""
        return {"cls_token", "pos_embed"}

    def __init__(self, config: MultimodalStudentConfig) -> None:
        super().__init__()
        from timm.layers import PatchEmbed

        c = config
        self.config = c
        self.width = c.width
        # the towers differ: image outputs have image_depth + shared_depth blocks, text text_depth + shared_depth
        self.num_layers = c.shared_depth
        w = c.width
        self.patch_embed = PatchEmbed(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, w))
        self.image_blocks = nn.ModuleList(
            vit_block(w, c.num_heads, c.image_hidden, eps=IMAGE_EPS, init_values=c.init_values)
            for _ in range(c.image_depth)
        )
        self.word_embeddings = nn.Embedding(c.vocab_size, w)
        # BERT's token-type embedding is folded in here: this student always uses type 0
        self.position_embeddings = nn.Embedding(c.max_position, w)
        self.text_embed_norm = nn.LayerNorm(w, eps=c.text_eps)
        self.text_blocks = nn.ModuleList(
            Block(w, c.text_heads, c.text_hidden, pre_norm=False, eps=c.text_eps) for _ in range(c.text_depth)
        )
        blocks: list[nn.Module] = []
        for i in range(c.shared_depth):
            if not c.mome:
                blocks.append(vit_block(w, c.num_heads, c.image_hidden, eps=IMAGE_EPS, init_values=c.init_values))
                continue
            vl = i >= c.shared_depth - c.vl_depth
            hidden = {"vl": c.image_hidden} if vl else {"image": c.image_hidden, "text": c.text_hidden}
            blocks.append(MoMEBlock(w, c.num_heads, hidden, eps=IMAGE_EPS, init_values=c.init_values))
        self.shared_blocks = nn.ModuleList(blocks)
        self.image_norm = nn.LayerNorm(w, eps=IMAGE_EPS)
        self.text_norm = nn.LayerNorm(w, eps=IMAGE_EPS)
        self.image_heads = PredictionHeads(w, c.image_depth + c.shared_depth, c)
        self.text_heads = PredictionHeads(w, c.text_depth + c.shared_depth, c, pool=c.text_pool or c.pool)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _shared(
        self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None, hidden: list[torch.Tensor]
    ) -> torch.Tensor:
        for blk in self.shared_blocks:
            x = blk(x, modality, attn_mask) if isinstance(blk, MoMEBlock) else blk(x, attn_mask)
            hidden.append(x)
        return x

    def forward_image(self, pixel_values: torch.Tensor) -> StudentOutput:
        """The image tower + shared blocks on (B, C, H, W) pixels."""
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        hidden: list[torch.Tensor] = []
        for blk in self.image_blocks:
            x = blk(x)
            hidden.append(x)
        last = self.image_norm(self._shared(x, "image", None, hidden))
        mask = torch.ones(last.shape[:2], dtype=torch.bool, device=last.device)
        tokens, pooled = self.image_heads(hidden, last, mask)
        return StudentOutput(
            hidden_states=hidden, mask=mask, last_hidden_state=last, tokens=tokens, pooled=pooled, modality="image"
        )

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> StudentOutput:
        """The text tower + shared blocks on right-padded (B, T) ids; padding never changes a sample's
        outputs (keys at padding are masked; pooling is masked)."""
        length = input_ids.shape[1]
        if length > self.config.max_position:
            raise MmkdError(
                f"multimodal student: text of {length} tokens is longer than max_position={self.config.max_position}"
            )
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.text_embed_norm(self.word_embeddings(input_ids) + self.position_embeddings.weight[:length])
        # without padding SDPA can take its unmasked (faster) path
        attn_mask = None if bool(mask.all()) else key_padding_mask(mask)
        hidden: list[torch.Tensor] = []
        for blk in self.text_blocks:
            x = blk(x, attn_mask)
            hidden.append(x)
        last = self.text_norm(self._shared(x, "text", attn_mask, hidden))
        tokens, pooled = self.text_heads(hidden, last, mask)
        return StudentOutput(
            hidden_states=hidden, mask=mask, last_hidden_state=last, tokens=tokens, pooled=pooled, modality="text"
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        """Encode images, text or both (each on its own).

        Returns:
            ``image`` / ``text`` hold each given modality's output; the top-level fields repeat ``image``
            when images were given, else ``text``.
        """
        if pixel_values is None and input_ids is None:
            raise MmkdError("the multimodal student needs pixel_values, input_ids or both")
        image = self.forward_image(pixel_values) if pixel_values is not None else None
        text = self.forward_text(input_ids, attention_mask) if input_ids is not None else None
        return dataclasses.replace(image or text, image=image, text=text)

    def forward_joint(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> StudentOutput:
        """Image and caption together (a joint teacher's input, for MSD): the image tower's tokens and the text
        tower's tokens, concatenated, go through the shared blocks (the caption's padding masked as a key),
        then ``image_norm`` and the image heads' pooling and pooled head (the image CLS by default), so the
        joint output lives where the image-only output does. No parameters of its own.

        Returns:
            ``hidden_states``: the shared blocks' outputs over the joint sequence (image CLS, patches, caption
            tokens); ``mask`` its valid steps; ``tokens`` None; ``pooled`` the joint embedding;
            ``modality`` ``"image_text"``.
        """
        if not len(self.shared_blocks):
            raise MmkdError("multimodal student: forward_joint needs a shared block to fuse image and text")
        if input_ids.shape[1] > self.config.max_position:
            raise MmkdError(
                f"multimodal student: text of {input_ids.shape[1]} tokens is longer than "
                f"max_position={self.config.max_position}"
            )
        x = self.patch_embed(pixel_values)
        image = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.image_blocks:
            image = blk(image)
        text_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        text = self.text_embed_norm(self.word_embeddings(input_ids) + positions)
        text_attn = None if bool(text_mask.all()) else key_padding_mask(text_mask)
        for blk in self.text_blocks:
            text = blk(text, text_attn)
        p = image.shape[1]
        mask = torch.cat([torch.ones(image.shape[:2], dtype=torch.bool, device=image.device), text_mask], dim=1)
        attn_mask = None if bool(mask.all()) else key_padding_mask(mask)
        x = torch.cat([image, text], dim=1)
        hidden: list[torch.Tensor] = []
        for blk in self.shared_blocks:
            if isinstance(blk, MoMEBlock):  # shared attention over both; each token to its modality's expert
                x = x + blk.ls1(blk.attn(blk.norm1(x), attn_mask))
                x = torch.cat([blk.experts[blk.route("image")](x[:, :p]), blk.experts[blk.route("text")](x[:, p:])], 1)
            else:
                x = blk(x, attn_mask)
            hidden.append(x)
        last = self.image_norm(x)
        heads = self.image_heads
        summary = last[:, 0] if heads.pool == "cls" else masked_mean(last, mask)
        pooled = heads.pooled_head(summary.to(last.dtype))
        return StudentOutput(
            hidden_states=hidden, mask=mask, last_hidden_state=last, tokens=None, pooled=pooled, modality="image_text"
        )

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, pooled_dim) image embeddings (the pooled prediction, in the teacher's space).

        Args:
            pixel_values: (B, C, H, W), preprocessed as ``load_multimodal``'s image transform does.
            normalize: L2-normalise each row (what ``mmkd-eval`` compares by cosine similarity).
        """
        emb = self.forward_image(pixel_values).pooled
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """(B, pooled_dim) text embeddings (the pooled prediction, in the teacher's space).

        Args:
            input_ids: (B, T) right-padded token ids, as ``load_multimodal``'s tokenizer returns them.
            attention_mask: (B, T), 1 at real tokens; None = no padding.
            normalize: L2-normalise each row (what ``mmkd-eval`` compares by cosine similarity).
        """
        emb = self.forward_text(input_ids, attention_mask).pooled
        return F.normalize(emb, dim=-1) if normalize else emb


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# ---------------------------------------------------------------------------------------------------------
# initialisation from unimodal models


def _image_model(init_model: Any) -> nn.Module:
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    model = unwrap_init(init_model)
    if not isinstance(model, VisionTransformer | Beit):
        raise MmkdError(
            f"multimodal student: image init model {type(model).__name__} is not a timm VisionTransformer or Beit"
        )
    if isinstance(model, VisionTransformer) and (
        model.cls_token is None or not isinstance(model.norm_pre, nn.Identity)
    ):
        raise MmkdError("multimodal student: the image init model needs a CLS token and no pre-norm")
    return model


def image_arch(model: nn.Module) -> dict[str, Any]:
    """Config values read off a timm image model."""
    blk = model.blocks[0]
    scaled = getattr(blk, "gamma_1", None) is not None or hasattr(getattr(blk, "ls1", None), "gamma")
    return {
        "width": model.embed_dim,
        "num_heads": blk.attn.num_heads,
        "patch_size": model.patch_embed.patch_size[0],
        "in_chans": model.patch_embed.proj.in_channels,
        "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
        "init_values": 0.1 if scaled else None,
        "img_size": model.patch_embed.img_size[0],
    }


def text_arch(model: nn.Module) -> dict[str, Any]:
    """Config values read off a BERT-like model."""
    cfg = model.config
    if cfg.hidden_act != "gelu":
        raise MmkdError(f"multimodal student: text init model uses {cfg.hidden_act!r}; text blocks use exact gelu")
    return {
        "width": cfg.hidden_size,
        "text_num_heads": cfg.num_attention_heads,
        "text_mlp_ratio": cfg.intermediate_size / cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position": cfg.max_position_embeddings - position_offset(model),
        "text_eps": cfg.layer_norm_eps,
    }


def image_block_state(blk: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ViT or BEiT block as a pre-norm ``Block`` state dict. BEiT's q/v biases become the qkv bias
    (k has none); its gammas become ``ls1``/``ls2``; a per-block relative position table is dropped."""
    sd = {k: v for k, v in blk.state_dict().items() if "relative_position" not in k}
    if hasattr(blk, "gamma_1"):  # timm beit.Block
        attn = blk.attn
        if attn.relative_position_bias_table is not None:
            logger.warning("multimodal student: dropped a BEiT block's relative position table (not representable)")
        weight = sd.pop("attn.qkv.weight")
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if attn.q_bias is not None:
            bias = torch.cat([sd.pop("attn.q_bias"), torch.zeros_like(attn.v_bias), sd.pop("attn.v_bias")])
        sd["attn.qkv.weight"], sd["attn.qkv.bias"] = weight, bias
        if "gamma_1" in sd:
            sd["ls1.gamma"], sd["ls2.gamma"] = sd.pop("gamma_1"), sd.pop("gamma_2")
    elif "attn.qkv.bias" not in sd:
        sd["attn.qkv.bias"] = torch.zeros(sd["attn.qkv.weight"].shape[0])
    return sd


def bert_layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A BERT layer as a post-norm ``Block`` state dict (q, k, v stacked into qkv)."""
    a = layer.attention
    return {
        "norm1.weight": a.output.LayerNorm.weight,
        "norm1.bias": a.output.LayerNorm.bias,
        "attn.qkv.weight": torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]),
        "attn.qkv.bias": torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias]),
        "attn.proj.weight": a.output.dense.weight,
        "attn.proj.bias": a.output.dense.bias,
        "norm2.weight": layer.output.LayerNorm.weight,
        "norm2.bias": layer.output.LayerNorm.bias,
        "mlp.fc1.weight": layer.intermediate.dense.weight,
        "mlp.fc1.bias": layer.intermediate.dense.bias,
        "mlp.fc2.weight": layer.output.dense.weight,
        "mlp.fc2.bias": layer.output.dense.bias,
    }


def _expert_state(block: dict[str, torch.Tensor], norm: str, with_scale: bool) -> dict[str, torch.Tensor]:
    """The FFN half of a block state dict, renamed to an ``Expert``; ``norm`` names the norm feeding it."""
    out = {f"mlp.{k[4:]}": v for k, v in block.items() if k.startswith("mlp.")}
    out["norm.weight"], out["norm.bias"] = block[f"{norm}.weight"], block[f"{norm}.bias"]
    if with_scale:
        out["ls.gamma"] = block.get("ls2.gamma", torch.ones_like(block[f"{norm}.weight"]))
    return out


def init_multimodal(
    student: MultimodalStudent, image_from: Any = None, text_from: Any = None, vl_from: str = "image"
) -> dict[str, Any]:
    """Initialise ``student`` from unimodal models.

    Image model (timm ViT or BEiT): patch embedding, CLS token, position embedding (resampled to the
    student's grid; zero when the model has none, as BEiT v2, whose relative position bias cannot be held),
    image blocks from its blocks 0..image_depth-1, ``image_norm`` from its final norm, and shared block s from
    its block image_depth+s (with ``mome``: the shared self-attention and the image expert).
    Text model (BERT-like): word and position embeddings (token type 0 added to the positions), embedding
    norm, text blocks from its layers 0..text_depth-1, and with ``mome`` the text expert of shared block s
    from its layer text_depth+s (intermediate/output dense; the norm feeding BERT's FFN,
    ``attention.output.LayerNorm``, becomes the expert's pre-norm). VL experts copy the FFN of the image
    block (``vl_from="image"``) or text layer (``"text"``) at the same depth.

    Returns:
        What was copied from where (recorded as ``init_info``).
    """
    c = student.config
    info: dict[str, Any] = {"init": "pretrained", "vl_from": vl_from if c.vl_depth else None}
    img = _image_model(image_from) if image_from is not None else None
    txt = bert_like(text_from, "multimodal student") if text_from is not None else None
    if c.mome and c.vl_depth and (img if vl_from == "image" else txt) is None:
        raise MmkdError(f"multimodal student: vl_from={vl_from!r} needs that model (image_init_from / text_init_from)")
    if img is not None:
        _init_image_tower(student, img)
        info["image"] = describe_init(image_from)
    if txt is not None:
        _init_text_tower(student, txt, vl_from)
        info["text"] = describe_init(text_from)
    for s, blk in enumerate(student.shared_blocks):
        _init_shared_block(student, s, blk, img, txt, vl_from)
    return info


def _init_image_tower(student: MultimodalStudent, img: nn.Module) -> None:
    """Patch embedding, CLS, position embedding (resampled), image blocks and final norm from ``img``."""
    from timm.layers import resample_abs_pos_embed

    c = student.config
    need = c.image_depth + c.shared_depth
    if len(img.blocks) < need:
        raise MmkdError(f"multimodal student: image init model has {len(img.blocks)} blocks; needs {need}")
    copy_state(student.patch_embed, img.patch_embed.state_dict(), "multimodal student patch embedding")
    with torch.no_grad():
        student.cls_token.copy_(img.cls_token)
        if img.pos_embed is None:
            logger.warning(
                "multimodal student: the image init model has no absolute position embedding; "
                "pos_embed starts at zero (relative position bias is not carried over)"
            )
            student.pos_embed.zero_()
        else:
            pos = img.pos_embed
            if getattr(img, "no_embed_class", False):
                pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
            student.pos_embed.copy_(
                resample_abs_pos_embed(pos, new_size=list(student.patch_embed.grid_size), num_prefix_tokens=1)
            )
        if isinstance(img.norm, nn.LayerNorm):
            student.image_norm.load_state_dict(img.norm.state_dict())
    for i in range(c.image_depth):
        copy_state(student.image_blocks[i], image_block_state(img.blocks[i]), f"image block {i}")


def _init_text_tower(student: MultimodalStudent, txt: nn.Module, vl_from: str) -> None:
    """Word and position embeddings (token type 0 folded in), embedding norm and text blocks from ``txt``."""
    c = student.config
    text_shared = c.shared_depth if c.vl_depth and vl_from == "text" else c.shared_depth - c.vl_depth
    need = c.text_depth + (text_shared if c.mome else 0)
    if len(txt.encoder.layer) < need:
        raise MmkdError(f"multimodal student: text init model has {len(txt.encoder.layer)} layers; needs {need}")
    emb, off = txt.embeddings, position_offset(txt)
    with torch.no_grad():
        student.word_embeddings.weight.copy_(emb.word_embeddings.weight)
        student.position_embeddings.weight.copy_(
            emb.position_embeddings.weight[off : off + c.max_position] + emb.token_type_embeddings.weight[0]
        )
        student.text_embed_norm.load_state_dict(emb.LayerNorm.state_dict())
    for i in range(c.text_depth):
        copy_state(student.text_blocks[i], bert_layer_state(txt.encoder.layer[i]), f"text block {i}")


def _init_shared_block(
    student: MultimodalStudent, s: int, blk: nn.Module, img: nn.Module | None, txt: nn.Module | None, vl_from: str
) -> None:
    """Shared block ``s``: the image model's next block; with MoME its attention and image expert from it,
    the text expert from the text model's next layer, the VL expert from ``vl_from``."""
    c = student.config
    image_state = image_block_state(img.blocks[c.image_depth + s]) if img is not None else None
    if not c.mome:
        if image_state is not None:
            copy_state(blk, image_state, f"shared block {s}")
        return
    if image_state is not None:
        shared = {k: v for k, v in image_state.items() if k.startswith(("norm1.", "attn.", "ls1."))}
        copy_state(
            nn.ModuleDict({"norm1": blk.norm1, "attn": blk.attn, "ls1": blk.ls1}), shared, f"shared block {s} attention"
        )
    scaled = c.init_values is not None
    for name, expert in blk.experts.items():
        origin = vl_from if name == "vl" else name
        if origin == "image" and image_state is not None:
            copy_state(expert, _expert_state(image_state, "norm2", scaled), f"shared block {s} {name} expert")
        elif origin == "text" and txt is not None:
            layer = bert_layer_state(txt.encoder.layer[c.text_depth + s])
            copy_state(expert, _expert_state(layer, "norm1", scaled), f"shared block {s} {name} expert")


@STUDENTS.register("multimodal", "mome")
def create_multimodal_student(
    *,
    init: str = "random",
    image_init_from: Any = None,
    text_init_from: Any = None,
    image_init_weights: str | None = None,
    text_init_weights: str | None = None,
    vl_from: str = "image",
    **config: Any,
) -> MultimodalStudent:
    """A two-tower student with shared (optionally mixture-of-modality-experts) blocks.

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy from the unimodal models below
            (see :func:`init_multimodal` for what goes where). Parts without an init model stay random.
        image_init_from: A timm VisionTransformer or Beit, an image Teacher wrapping one, or its registered
            name. Width, heads, MLP ratio, layer scale, patch size, channels and img_size are read off it
            unless given (and must agree, except img_size: the position embedding is resampled).
        text_init_from: A BERT-like transformers model, a text Teacher or its registered name. Width, text
            heads, text MLP ratio, vocabulary, eps and position length (may be shorter) are read off it likewise.
        image_init_weights: Checkpoint for an image teacher given by name.
        text_init_weights: Checkpoint for a text teacher given by name.
        vl_from: Which model's FFN initialises the VL experts: ``"image"`` or ``"text"``.
        **config: MultimodalStudentConfig fields.
    """
    if vl_from not in ("image", "text"):
        raise MmkdError(f"multimodal student vl_from {vl_from!r}: choose 'image' or 'text'")
    inits = [s for s in (image_init_from, text_init_from) if s is not None]
    pretrained = check_init("multimodal", init, inits[0] if inits else None)
    image_init_from = resolve_init(image_init_from, image_init_weights)
    text_init_from = resolve_init(text_init_from, text_init_weights)
    if pretrained:
        if image_init_from is not None:
            config = fill_from_init(
                "multimodal", config, image_arch(_image_model(image_init_from)), may_differ=("img_size",)
            )
        if text_init_from is not None:
            config = fill_from_init(
                "multimodal", config, text_arch(bert_like(text_init_from)), may_differ=("max_position",)
            )
    student = MultimodalStudent(build_config(MultimodalStudentConfig, "multimodal", config))
    if pretrained:
        student.init_info = init_multimodal(student, image_init_from, text_init_from, vl_from)
    return student
