"""The ``data2vec2`` kind: a post-norm data2vec 2.0 student on the store's views, cut from fairseq's checkpoint
(``--init data2vec2 --init-weights base_imagenet.pt``) or random, exported in mmkd's own format."""

from __future__ import annotations

from ...errors import MmkdError
from ..data2vec2 import Data2Vec2Student, Data2Vec2StudentConfig, create_data2vec2_student, load_data2vec2
from ..export.native import save_native
from .base import Built, Context, StudentKind, stored_patches, token_heads, view_preprocess

INIT_BLOCKS = "first"  # in run order: the image prenet's blocks, then the rest
DEFAULT_LOSS = "token_mse=1"
# no teacher has its post-norm blocks: by default it asks for the checkpoint (--init-weights)
DEFAULTS = {"init": "data2vec2", "batch_size": 64, "lr": 5e-4, "epochs": 1.0}


def build_data2vec2(ctx: Context) -> Built:
    """A post-norm data2vec 2.0 student on the store's views; its patches must be the teacher's, so that its
    time steps are the targets' (BEiT v2 at 224 px: 196 patches of 16 px + CLS)."""
    attrs = ctx.attrs
    if attrs["teacher"].get("modality") != "image" or "views" not in attrs:
        raise MmkdError(
            f"{ctx.reader.path}: a data2vec2 student reads images; this store holds a text teacher's targets"
        )
    opts = {**stored_patches(ctx), **ctx.cfg.student_options}
    if ctx.init_model is not None:
        _check_patches(ctx.init_model[1], int(attrs["views"]["size"]), opts["patch_size"])
        opts.setdefault("init_blocks", INIT_BLOCKS)
    preprocess = view_preprocess(attrs["views"])
    student = create_data2vec2_student(
        depth=ctx.depth, init=ctx.init, init_from=ctx.init_model, **token_heads(ctx), **opts
    )
    return Built(
        student=student,
        kind="data2vec2",
        tokenizer=None,
        source=ctx.dataset(),
        image_spec=None,
        preprocess=preprocess,
    )


def _check_patches(info: dict, size: int, patch_size: int) -> None:
    if info["patch_size"] != patch_size:
        raise MmkdError(
            f"--init-weights {info['path']}: its patches are {info['patch_size']} px but the store's teacher saw "
            f"{size} px views in {patch_size} px patches; the student's time steps would not be the targets'"
        )


DATA2VEC2 = StudentKind(
    name="data2vec2",
    model=Data2Vec2Student,
    config=Data2Vec2StudentConfig,
    defaults=DEFAULTS,
    default_loss=DEFAULT_LOSS,
    build=build_data2vec2,
    export=save_native,
    init_blocks=INIT_BLOCKS,
    init_checkpoint=load_data2vec2,
)
