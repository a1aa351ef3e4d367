"""The teacher's compute dtype of a run: ``--autocast auto`` resolved to what the store records, and the
autocast context the teacher runs in."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from mmkd_core.store import read_attrs

from .config import ExtractConfig
from .hardware import Choice, auto_autocast, emulation_warning

log = logging.getLogger(__name__)


def resolve_autocast(cfg: ExtractConfig, teacher) -> tuple[ExtractConfig, Choice]:
    """``cfg`` with a concrete ``autocast`` (what the store records), and why it was chosen.

    ``auto`` on a store being resumed takes the dtype the store recorded: a resume continues the same run,
    and a probe that now comes out otherwise (another machine, a busier one) must not make it refuse the
    store or mix two dtypes in one. Otherwise ``auto`` asks the hardware (``hardware``). A forced bfloat16 or
    float16 that the device would emulate is run, with a one-line warning.
    """
    if cfg.autocast != "auto":
        warning = emulation_warning(cfg.autocast, cfg.device)
        if warning:
            log.warning(warning)
        return cfg, Choice(cfg.autocast, "forced")
    recorded = _recorded_autocast(cfg)
    if recorded is not None:
        choice = Choice(recorded, "auto: recorded in the store, resumed")
    else:
        choice = auto_autocast(str(cfg.device), int(teacher.hidden_size or 64))
    return dataclasses.replace(cfg, autocast=choice.autocast), choice


def _recorded_autocast(cfg: ExtractConfig) -> str | None:
    """``recipe.autocast`` of the store at ``cfg.target`` when this run resumes it (not ``--overwrite``)."""
    if cfg.overwrite or not cfg.target.exists():
        return None
    recipe = (read_attrs(cfg.target) or {}).get("recipe")
    value = recipe.get("autocast") if isinstance(recipe, dict) else None
    return value if value in ("none", "bfloat16", "float16") else None


def autocast_context(cfg: ExtractConfig) -> contextlib.AbstractContextManager:
    """The context the teacher's forward pass runs in: ``cfg.autocast`` (resolved) on ``cfg.device``."""
    if cfg.autocast == "auto":
        raise RuntimeError("ExtractConfig.autocast 'auto' must be resolved first (resolve_autocast)")
    if cfg.autocast == "none":
        return contextlib.nullcontext()
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=getattr(torch, cfg.autocast))
