"""Teachers: frozen pretrained models that return every block's output.

``create_teacher(name, weights)`` is the one entry point; ``list_teachers()`` names what it knows.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from . import beit, clip, flava, hf_text, hf_vision, mpnet  # noqa: F401  (register the teachers)
from .base import TEACHERS, ImagePreprocess, Teacher, TeacherOutput, TextPreprocess
from .hf_common import attention_used

__all__ = [
    "TEACHERS",
    "ImagePreprocess",
    "Teacher",
    "TeacherOutput",
    "TextPreprocess",
    "create_teacher",
    "list_teachers",
    "teacher_runtime",
]

logger = logging.getLogger(__name__)


def _state_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def create_teacher(
    name: str, weights: str | None = None, *, random_init: bool = False, device: str = "cpu", **options: Any
) -> Teacher:
    """Build a frozen teacher: eval mode, ``requires_grad`` off, float32, on ``device``.

    Args:
        name: A registered teacher (see :func:`list_teachers`).
        weights: Checkpoint file or directory, or a repo id in the local HF hub cache. None: the teacher's
            default (its repo in the hub cache, or the package that carries its weights).
        random_init: Random weights (seeded); only for tests. Logged as a warning; provenance says
            ``source: random`` and ``weights_sha256: random:<sha256 of the weights>``.
        device: Torch device.
        **options: Teacher-specific options (see each teacher's factory docstring).

    Raises:
        MmkdError: Unknown teacher or option, missing or mismatching weights.
    """
    if random_init:
        # seeded, so that re-running an interrupted extraction meets the same teacher; the record names
        # these weights (not just "random"), so a store is never finished by other random weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            teacher = TEACHERS.get(name)(weights, random_init=random_init, **options)
        teacher.weights_sha256 = "random:" + _state_sha256(teacher)
        logger.warning("teacher %s has RANDOM weights (random_init=True): its targets mean nothing", teacher.name)
    else:
        teacher = TEACHERS.get(name)(weights, random_init=random_init, **options)
    teacher.to(device=device, dtype=torch.float32)
    teacher.requires_grad_(False)
    return teacher.eval()


def list_teachers(pattern: str = "*") -> list[str]:
    """Registered teacher names matching a glob pattern."""
    return TEACHERS.names(pattern)


def teacher_runtime(teacher: Teacher) -> dict[str, Any]:
    """How ``teacher`` computes, as opposed to what: recorded beside a store's ``teacher`` record, not compared
    on resume (the targets do not depend on it within float tolerance, and stores written before it was
    recorded must still resume).

    Returns:
        ``{"attn_implementation": ...}`` for a teacher on a transformers model (the outermost one's, e.g.
        ``"sdpa"`` or ``"eager"``); ``{}`` for others (timm).
    """
    for module in teacher.modules():
        attn = attention_used(module)
        if attn is not None:
            return {"attn_implementation": attn}
    return {}
