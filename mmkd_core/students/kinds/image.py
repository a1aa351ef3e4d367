"""The ``vit`` and ``beit`` kinds: timm image students on the store's views, cut from the first blocks of an
image teacher (or random), exported as timm directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export.timm import save_vit_student
from ..vision import (
    BeitStudent,
    BeitStudentConfig,
    TimmStudent,
    VitStudent,
    VitStudentConfig,
    create_beit_student,
    create_vit_student,
)
from .base import Built, Context, StudentKind, stored_patches, token_heads, view_preprocess

# image teachers whose blocks a timm Beit student reproduces (the rest map onto a VisionTransformer)
BEIT_LIKE = ("beitv2", "beit", "data2vec-vision")
# token targets average the teacher's blocks: the first ones beat every second one
INIT_BLOCKS = "first"
DEFAULT_LOSS = "token_mse=1"
DEFAULTS = {"init": "teacher", "batch_size": 64, "lr": 5e-4, "epochs": 1.0}
_CREATE = {"vit": create_vit_student, "beit": create_beit_student}


def build_image(ctx: Context) -> Built:
    """A vit or beit student reading the stored views at their size, in the teacher's patches."""
    opts = {**stored_patches(ctx), **ctx.cfg.student_options}
    if ctx.init_model is not None:
        opts.setdefault("init_blocks", INIT_BLOCKS)
    preprocess = view_preprocess(ctx.attrs["views"])
    student = _CREATE[ctx.kind](depth=ctx.depth, init=ctx.init, init_from=ctx.init_model, **token_heads(ctx), **opts)
    return Built(
        student=student,
        kind=ctx.kind,
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        source=ctx.dataset(),
        image_spec=None,
        preprocess=preprocess,
    )


def export_image(
    student: TimmStudent, directory: str | Path, *, tokenizer: Any, preprocess: Any, max_seq_length: int | None
) -> Path:
    """A timm directory (``tokenizer`` and ``max_seq_length`` are not used: image students read no text)."""
    return save_vit_student(student, directory, preprocess)


VIT = StudentKind(
    name="vit",
    model=VitStudent,
    config=VitStudentConfig,
    defaults=DEFAULTS,
    default_loss=DEFAULT_LOSS,
    build=build_image,
    export=export_image,
    init_blocks=INIT_BLOCKS,
)
BEIT = StudentKind(
    name="beit",
    model=BeitStudent,
    config=BeitStudentConfig,
    defaults=DEFAULTS,
    default_loss=DEFAULT_LOSS,
    build=build_image,
    export=export_image,
    init_blocks=INIT_BLOCKS,
)
