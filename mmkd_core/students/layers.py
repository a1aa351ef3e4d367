"""Transformer blocks of the multimodal student: pre-norm (ViT/BEiT layout), post-norm (BERT layout) and
mixture-of-modality-experts (VLMo/BEiT-3). Parameter names follow timm's ViT blocks so source blocks map
onto them key by key. Attention is ``F.scaled_dot_product_attention`` with an optional key padding mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool valid-step mask -> the (B, 1, 1, T) boolean ``attn_mask`` SDPA broadcasts over heads and
    queries; None (no padding) stays None so SDPA can take its fastest path."""
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v stacked in that order)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's Mlp; BERT's intermediate/output dense with "gelu")."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (timm's ``ls1``/``ls2``, BEiT's ``gamma_1``/``gamma_2``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_scale(dim: int, init_values: float | None) -> nn.Module:
    return nn.Identity() if init_values is None else LayerScale(dim, init_values)


class Block(nn.Module):
    """A transformer block, pre-norm (ViT: ``x + ls(f(norm(x)))``) or post-norm (BERT: ``norm(x + f(x))``).

    Args:
        dim: Width.
        num_heads: Attention heads.
        mlp_hidden: Feed-forward width.
        pre_norm: Pre-norm layout; False gives the post-norm BERT layer.
        eps: Layer-norm epsilon.
        init_values: Layer-scale init (pre-norm only); None = no layer scale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        pre_norm: bool = True,
        eps: float = 1e-6,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = layer_scale(dim, init_values if pre_norm else None)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = layer_scale(dim, init_values if pre_norm else None)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.ls1(self.attn(self.norm1(x), attn_mask))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.attn(x, attn_mask))
        return self.norm2(x + self.mlp(x))


class Expert(nn.Module):
    """One feed-forward expert of a MoME block: its own norm, MLP and layer scale (as VLMo's norm2_*/mlp_*)."""

    def __init__(self, dim: int, mlp_hidden: int, eps: float, init_values: float | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls = layer_scale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls(self.mlp(self.norm(x)))


class MoMEBlock(nn.Module):
    """Pre-norm block with shared self-attention and one feed-forward expert per route.

    A modality block has experts ``"image"`` and ``"text"`` and routes each input to its modality's expert.
    A vision-language block has the one expert ``"vl"`` that every input goes through: the last blocks of
    the student are then fully shared, which the research needs (one representation from either modality).
    VLMo/BEiT-3 also keep modality experts in those blocks for unimodal inputs and use their VL expert only
    for fused image-text input, which this dual-encoder student never builds.

    Args:
        dim: Width.
        num_heads: Attention heads.
        mlp_hidden: Feed-forward width per expert name (``{"image": ..., "text": ...}`` or ``{"vl": ...}``).
        eps: Layer-norm epsilon.
        init_values: Layer-scale init; None = no layer scale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: dict[str, int],
        *,
        eps: float = 1e-6,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = layer_scale(dim, init_values)
        self.experts = nn.ModuleDict({k: Expert(dim, h, eps, init_values) for k, h in mlp_hidden.items()})

    def route(self, modality: str) -> str:
        """The expert name an input of ``modality`` ("image" or "text") goes through."""
        return "vl" if "vl" in self.experts else modality

    def forward(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask))
        return self.experts[self.route(modality)](x)
