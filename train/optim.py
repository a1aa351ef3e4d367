"""The optimiser and its schedule: AdamW with timm's weight-decay groups, linear warmup then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by timm's rule: no decay on biases, norms, and what any submodule's
    ``no_weight_decay()`` names (CLS tokens, position tables, BEiT's relative-position bias)."""
    from timm.optim import param_groups_weight_decay

    skip: set[str] = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, total: int, warmup: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s parameters and its warmup-then-cosine schedule over ``total`` steps."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))
