"""All target math: the data2vec recipe and pooled targets, as pure tensor functions.

Everything here is per sample and masked, so a sample's targets do not depend on the batch it is
computed in or on how much padding surrounds it. Statistics are taken in float32 whatever the input dtype
(teachers may run under bf16 autocast). Students use the same functions to turn their own layer outputs
into predictions, so the two sides of the loss share one definition. Without autograd (a teacher's
targets, under ``torch.inference_mode``) temporaries are overwritten in place, with the same values;
with it (a student's predictions) every step makes a new tensor, as backward needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F

from .errors import MmkdError

EPS = 1e-5  # the eps of F.instance_norm / F.layer_norm, as fairseq's data2vec uses them

POOLS = ("cls", "mean", "teacher_cls", "teacher_mean", "teacher_embed")


def select_layers(spec: str | int | Sequence[int] | None, num_layers: int) -> list[int]:
    """Resolve a layer choice to sorted 0-based block indices.

    Args:
        spec: ``"all"`` (or None), ``"last:K"`` / ``"lastK"`` / an int K for the last K blocks, or
            explicit block indices: a comma-separated string of 0-based indices (what ``--layers`` takes),
            or a sequence, where negative indices count from the end.
        num_layers: How many blocks the teacher has.
    """
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, bool):
        raise MmkdError(f"--layers {spec!r}: use 'all', 'last:K' or block indices like '0,5,11'")
    if isinstance(spec, int):
        spec = f"last:{spec}"
    given = spec
    if isinstance(spec, str):
        s = spec.strip().lower().replace(" ", "")
        if s == "all":
            return list(range(num_layers))
        if s.startswith("last"):
            k_text = s[4:].removeprefix(":")
            if not (k_text.isascii() and k_text.isdigit()) or not 1 <= int(k_text) <= num_layers:
                raise MmkdError(
                    f"--layers {spec!r}: K in last:K must be 1..{num_layers} (the teacher has {num_layers} blocks)"
                )
            k = int(k_text)
            return list(range(num_layers - k, num_layers))
        parts = [p for p in s.split(",") if p]
        if not parts or not all(p.isascii() and p.isdigit() for p in parts):
            # negative indices are refused here: "--layers -1" reads as a typo more often than as "the last"
            raise MmkdError(
                f"--layers {spec!r}: use 'all', 'last:K' or 0-based block indices like '0,5,11' (0..{num_layers - 1})"
            )
        spec = [int(p) for p in parts]
    out = []
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise MmkdError(f"--layers {given!r}: block indices must be integers")
        j = int(i) + num_layers if i < 0 else int(i)
        if not 0 <= j < num_layers:
            raise MmkdError(
                f"--layers: block {i} is out of range for a teacher with {num_layers} blocks (0..{num_layers - 1})"
            )
        out.append(j)
    if not out or len(set(out)) != len(out):
        raise MmkdError(f"--layers {given!r}: give each block at most once, at least one block")
    return sorted(out)


def _weights(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask as float (B, T, 1) and the count of valid steps (B, 1, 1), at least 1."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return m, m.sum(dim=1, keepdim=True).clamp_min(1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid time steps: (B, T, D) -> (B, D)."""
    m, n = _weights(mask)
    return (x.to(torch.float32) * m).sum(dim=1) / n.squeeze(1)


def instance_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Normalise each channel over the valid time steps of each sample (biased variance, as
    ``F.instance_norm``); padding comes out as zero."""
    m, n = _weights(mask)
    x = x.to(torch.float32)
    mean = (x * m).sum(dim=1, keepdim=True) / n
    if torch.is_grad_enabled():  # a student's predictions: the textbook form, whose backward is the one trained
        var = (((x - mean) * m) ** 2).sum(dim=1, keepdim=True) / n
        return (x - mean) * torch.rsqrt(var + eps) * m
    # centred and masked once, then overwritten in place: ((x - mean) * m) * rsqrt(var) is bit for bit
    # (x - mean) * rsqrt(var) * m (m is 0 or 1), in 7 passes over (B, T, D) instead of 9 and one
    # temporary instead of six (on 2 shared cores every pass is also a wait for the other thread)
    xc = (x - mean).mul_(m)
    var = (xc * xc).sum(dim=1, keepdim=True) / n
    return xc.mul_(torch.rsqrt(var + eps))


def layer_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Parameter-less layer norm over the feature dimension; padding comes out as zero."""
    y = F.layer_norm(x.to(torch.float32), x.shape[-1:], eps=eps)
    m = mask.to(torch.float32).unsqueeze(-1)
    return y * m if torch.is_grad_enabled() else y.mul_(m)


def make_targets(
    hidden_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    layers: Sequence[int],
    *,
    instance_norm_layers: bool = True,
    layer_norm_targets: bool = True,
) -> torch.Tensor:
    """The data2vec recipe: instance-norm each chosen layer, average them, layer-norm the average.

    Args:
        hidden_states: One (B, T, D) tensor per block, block 0 first.
        mask: (B, T) bool, True at valid time steps.
        layers: 0-based block indices to average (see ``select_layers``).
        instance_norm_layers: Normalise each channel over time steps before averaging.
        layer_norm_targets: Apply a parameter-less layer norm over features after averaging.

    Returns:
        (B, T, D) float32 targets, zero at padding.
    """
    acc = None
    for i in layers:
        h = hidden_states[i]
        h = instance_norm(h, mask) if instance_norm_layers else h.to(torch.float32) * mask.unsqueeze(-1)
        acc = h if acc is None else acc + h if torch.is_grad_enabled() else acc.add_(h)
    y = acc / len(layers) if torch.is_grad_enabled() else acc.div_(len(layers))
    return layer_norm(y, mask) if layer_norm_targets else y


def pool_targets(
    pool: str,
    targets: torch.Tensor | None,
    hidden_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole-sample target.

    ``cls``/``mean``: time step 0 / masked mean of the recipe's targets. ``teacher_cls``/``teacher_mean``:
    the same of the teacher's raw last block output (no final norm). ``teacher_embed``: the model's own
    output embedding.

    Returns:
        (B, E) float32.
    """
    if pool == "cls":
        return targets[:, 0].to(torch.float32)
    if pool == "mean":
        return masked_mean(targets, mask)
    if pool == "teacher_cls":
        return hidden_states[-1][:, 0].to(torch.float32)
    if pool == "teacher_mean":
        return masked_mean(hidden_states[-1], mask)
    if pool == "teacher_embed":
        if embed is None:
            raise MmkdError("--pool teacher_embed: this teacher has no output embedding of its own")
        return embed.to(torch.float32)
    raise MmkdError(f"--pool {pool!r}: choose one of {', '.join(POOLS)}")


def recipe_targets(
    hidden_states: Sequence[torch.Tensor], mask: torch.Tensor, embed: torch.Tensor | None, recipe: dict
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-token and pooled targets of one teacher forward pass, as a store's ``recipe`` attribute says.

    Args:
        hidden_states: The teacher's block outputs.
        mask: (B, T) bool.
        embed: The teacher's own output embedding, or None.
        recipe: ``layers``, ``instance_norm``, ``layer_norm``, ``pool`` and ``tokens`` (False: pooled only).

    Returns:
        (tokens (B, T, D) or None, pooled (B, E)), float32.
    """
    targets = None
    if recipe.get("tokens", True) or recipe["pool"] in ("cls", "mean"):
        targets = make_targets(
            hidden_states,
            mask,
            recipe["layers"],
            instance_norm_layers=recipe["instance_norm"],
            layer_norm_targets=recipe["layer_norm"],
        )
    pooled = pool_targets(recipe["pool"], targets, hidden_states, mask, embed)
    return (targets if recipe.get("tokens", True) else None), pooled
