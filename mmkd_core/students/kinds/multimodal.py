"""The ``multimodal`` kind: a two-tower student with shared blocks, for stores of captions (a text teacher over
image–caption data) and pair stores (an image teacher's views with their captions), exported in mmkd's own
format (``load_multimodal``). A joint teacher's store trains this student too, by the joint kind (MSD)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ...errors import MmkdError
from ...store import open_store
from ...teachers.base import ImagePreprocess
from ...teachers.hf_common import local_tokenizer
from ...views import view_spec
from ..export.native import save_native
from ..multimodal import MultimodalStudent, MultimodalStudentConfig, create_multimodal_student, text_arch
from .base import Built, Context, StudentKind, pooled_heads
from .cross import refuse_other_tokenizer
from .text import check_bert_init

# distillation of the teacher's caption embedding into both towers, plus image–text contrast between them
DEFAULT_LOSS = "contrastive_kd=1,itc=1"
# a two-tower teacher's store has a target per tower: each student tower regresses its own (MSE + cosine, the
# best in the CLIP study), and the student's image–text similarities follow the teacher's
TWO_TOWER_LOSS = "mse_cosine=1,sim_kd=1"
# The multimodal defaults train the embedded default (a 128-wide student on 10,000 shapes captions): held-out i2t
# R@1 rose with epochs, 0.826 at 12, 0.905-0.931 at 16 (two runs), 0.962 at 24; 20 leaves a margin above 0.90 and
# keeps the README's first command (install, extraction, training, evaluation) within 10 minutes on two quiet CPU
# cores (417 s at 16 epochs). docs/results.md has the measured times. Random init: the caption teacher is wider than a
# CPU-sized student.
DEFAULTS = {"init": "random", "batch_size": 128, "lr": 1e-3, "epochs": 20.0}
# A CPU-sized multimodal student: 48 px images in 16 px patches (shapes' 3x3 cells, one patch each), 128 wide.
# 8 px patches at 48 px were four times slower per step and reached i2t R@1 0.14 in the time that 16 px
# patches reached 0.27; docs/results.md has the embedded default's measured R@1 and time.
MULTIMODAL_DEFAULTS = {
    "img_size": 48,
    "patch_size": 16,
    "width": 128,
    "num_heads": 4,
    "text_num_heads": 4,
    "image_depth": 4,
    "text_depth": 1,
    "shared_depth": 1,
    "max_position": 64,
}
IMAGE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# the options an init model fixes unless given: widths (and the patch size) of the image tower, widths and
# vocabulary of the text tower
IMAGE_INIT_FIXES = ("width", "num_heads", "patch_size")
TEXT_INIT_FIXES = ("width", "text_num_heads", "vocab_size", "max_position")


def student_preprocess(student: MultimodalStudent) -> ImagePreprocess:
    """How the student's images are rendered: squashed to its size, normalised to [-1, 1]."""
    mean, std = IMAGE_MEAN_STD
    return ImagePreprocess(
        size=student.config.img_size, mean=mean, std=std, interpolation="bicubic", crop_pct=1.0, crop_mode="squash"
    )


def build_multimodal(ctx: Context) -> Built:
    """A multimodal student for a store of caption targets (a text teacher over image–caption data): images
    are rendered from the source dataset at the student's size; a pair store goes to :func:`build_pair`."""
    cfg, init_model = ctx.cfg, ctx.init_model
    if ctx.attrs["dataset"].get("captions_group"):
        return build_pair(ctx)
    if not ctx.reader.has("input_ids"):
        raise MmkdError(f"{ctx.reader.path}: a multimodal student needs caption targets from a text teacher")
    source = ctx.dataset()
    opts = {**MULTIMODAL_DEFAULTS, **cfg.student_options}
    if init_model is not None:  # widths come from the init model unless given
        opts = {
            k: v
            for k, v in opts.items()
            if k not in ("width", "num_heads", "text_num_heads") or k in cfg.student_options
        }
    if cfg.depth:
        opts["image_depth"] = cfg.depth
    text_init = init_model if init_model is not None and init_model.modality == "text" else None
    if text_init is not None:
        refuse_other_tokenizer(text_init, ctx.attrs["preprocess"], f"--init {cfg.init}", "the store's")
    if cfg.init == "random" and ctx.arch_model is not None:
        opts = {"vocab_size": text_arch(ctx.arch_model.model)["vocab_size"], **opts}
    student = create_multimodal_student(
        init="random" if text_init is None else "pretrained", text_init_from=text_init, **pooled_heads(ctx), **opts
    )
    preprocess = student_preprocess(student)
    # derived from the same record evaluation reads back, so training and evaluation render alike
    return Built(
        student=student,
        kind="multimodal",
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        source=source,
        image_spec=view_spec(preprocess),
        preprocess=preprocess,
    )


def build_pair(ctx: Context) -> Built:
    """A two-tower student for a pair store: the image tower reads the stored views (at its own size), the
    text tower one of the image's captions; targets are the image view's (and, from a two-tower teacher,
    the caption's own)."""
    cfg, attrs = ctx.cfg, ctx.attrs
    captions = open_store(ctx.reader.path / attrs["dataset"]["captions_group"])
    image_from = tower_init(ctx, "image", cfg.init_image, cfg.init_image_weights)
    text_from = tower_init(ctx, "text", cfg.init_text, cfg.init_text_weights)
    opts = _pair_options(ctx, captions, image_from, text_from)
    student = create_multimodal_student(
        init="random" if image_from is None and text_from is None else "pretrained",
        image_init_from=image_from,
        text_init_from=text_from,
        **pooled_heads(ctx),
        **opts,
    )
    preprocess = student_preprocess(student)
    # the stored views' crops and flips, rendered at the student's size and normalisation
    render_spec = dataclasses.replace(
        view_spec(attrs), size=preprocess.size, mean=preprocess.mean, std=preprocess.std, interpolation="bicubic"
    )
    two_tower = captions.has("pooled")
    return Built(
        student=student,
        kind="multimodal",
        tokenizer=caption_tokenizer(ctx.reader, captions),
        source=ctx.dataset(),
        image_spec=None,
        preprocess=preprocess,
        loader_options={"captions": ctx.caption_table(captions.path), "render_spec": render_spec},
        default_loss=TWO_TOWER_LOSS if two_tower else None,
    )


def _pair_options(ctx: Context, captions: Any, image_from: Any, text_from: Any) -> dict[str, Any]:
    """The pair student's options: the defaults, the captions' vocabulary and length, then what the tower
    init models fix, then the run's own."""
    cfg = ctx.cfg
    vocab = int(captions.attrs["preprocess"]["extra"]["vocab_size"])
    length = int(captions.group["input_ids"].shape[1])
    if text_from is not None:
        flag = f"--init-text {cfg.init_text}" if cfg.init_text else f"--init {cfg.init}"
        refuse_other_tokenizer(text_from, captions.attrs["preprocess"], flag, "the captions'")
    given = cfg.student_options
    opts: dict[str, Any] = {**MULTIMODAL_DEFAULTS, "vocab_size": vocab, **given}
    opts["max_position"] = max(int(opts["max_position"]), length)
    if image_from is not None:  # widths and the patch size come from the init model unless given
        opts = {k: v for k, v in opts.items() if k not in IMAGE_INIT_FIXES or k in given}
    if text_from is not None:
        opts = {k: v for k, v in opts.items() if k not in TEXT_INIT_FIXES or k in given}
    if cfg.depth:
        opts["image_depth"] = cfg.depth
    return opts


def tower_init(ctx: Context, tower: str, name: str | None, weights: str | None) -> Any:
    """The model seeding one tower of a pair store's student (None: random).

    ``name`` None falls back to ``--init``: ``teacher`` seeds the tower of the store teacher's modality.
    """
    if name is None:
        if ctx.init_model is None or getattr(ctx.init_model, "modality", None) != tower:
            return None
        return ctx.init_model
    if name == "random":
        return None
    model = ctx.load_init(name, weights)
    if model.modality != tower:
        raise MmkdError(f"--init-{tower} {name}: that model reads {model.modality}; the {tower} tower needs {tower}")
    return model


def caption_tokenizer(reader: Any, captions: Any) -> Any:
    """The tokenizer the captions were stored under (exported with the student)."""
    path = reader.attrs.get("caption_tokenizer")
    tokenizer = local_tokenizer(
        path,
        f"{reader.path}: the captions' tokenizer at {path} cannot be loaded ({{reason}}); it is exported with the "
        "student",
    )
    if len(tokenizer) != int(captions.attrs["preprocess"]["extra"]["vocab_size"]):
        raise MmkdError(f"{reader.path}: the tokenizer at {path} is not the one the captions were stored under")
    return tokenizer


MULTIMODAL = StudentKind(
    name="multimodal",
    model=MultimodalStudent,
    config=MultimodalStudentConfig,
    defaults=DEFAULTS,
    default_loss=DEFAULT_LOSS,
    build=build_multimodal,
    export=save_native,
    check_init=functools.partial(check_bert_init, kind="multimodal"),
)
