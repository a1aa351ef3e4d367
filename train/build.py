"""From a store's provenance and a TrainConfig to a student, its inputs and its loss inputs."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mmkd.data import PairImages, create_dataset
from mmkd_core.errors import MmkdError
from mmkd_core.registry import Registry
from mmkd_core.store import open_store
from mmkd_core.students import create_student, load_data2vec2
from mmkd_core.teachers import create_teacher
from mmkd_core.teachers.base import ImagePreprocess
from mmkd_core.views import ViewSpec, view_spec

from .config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_LOSS = {
    # the sentence embedding is what text students are used for: its direction (cosine) and its place among
    # the batch's teacher embeddings (contrastive KD); token targets carry nothing of it (zero mean over
    # tokens). WordNet ablation from blocks 0,4,5 (0.9492 at init), 300 steps of 128, MRPC mean: 0.9497 for this
    # pair, 0.9488 for token_mse + pooled_mse, 0.9487 for pooled_mse, 0.9394 for token_mse alone, which pulls
    # the last block toward the average of all the teacher's (README "Real text distillation")
    "text": "pooled_cosine=1,contrastive_kd=1",
    "vit": "token_mse=1",
    "beit": "token_mse=1",
    "data2vec2": "token_mse=1",
    # distillation of the teacher's caption embedding into both towers, plus image–text contrast between them
    "multimodal": "contrastive_kd=1,itc=1",
}
# a two-tower teacher's store has a target per tower: each student tower regresses its own (MSE + cosine, the
# best in the CLIP study), and the student's image–text similarities follow the teacher's
TWO_TOWER_LOSS = "mse_cosine=1,sim_kd=1"
# A CPU-sized multimodal student: 48 px images in 16 px patches (shapes' 3x3 cells, one patch each), 128 wide.
# 8 px patches at 48 px were four times slower per step and reached i2t R@1 0.14 in the time that 16 px
# patches reached 0.27; the README has the embedded default's measured R@1 and time.
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


# image teachers whose blocks a timm Beit student reproduces (the rest map onto a VisionTransformer)
BEIT_LIKE = ("beitv2", "beit", "data2vec-vision")
# --init names that are checkpoint files of a model no teacher wraps -> (student kind they seed, reader)
INIT_CHECKPOINTS: dict[str, tuple[str, Callable[[str], Any]]] = {"data2vec2": ("data2vec2", load_data2vec2)}


def student_kind(cfg: TrainConfig, attrs: dict[str, Any]) -> str:
    """The student kind for this store: cfg.student, or chosen from the teacher and the data — and, for image
    stores, from the model whose blocks seed the student (``--init NAME``, else the store's teacher)."""
    if cfg.student != "auto":
        return cfg.student
    if cfg.init in INIT_CHECKPOINTS:  # the checkpoint's blocks decide the kind: no other computes them
        return INIT_CHECKPOINTS[cfg.init][0]
    if attrs["dataset"].get("captions_group"):  # a pair store: images with their captions
        return "multimodal"
    teacher_modality = attrs["teacher"].get("modality")
    if teacher_modality == "image_text":  # a joint teacher (FLAVA) over image–caption pairs
        return "multimodal"
    if teacher_modality == "text":
        return "multimodal" if attrs["dataset"].get("modality") == "image_text" else "text"
    seed = cfg.init if cfg.init not in (None, "teacher", "random") else attrs["teacher"]["name"]
    return "beit" if seed in BEIT_LIKE else "vit"


def teacher_source(attrs: dict[str, Any]) -> tuple[str, str | None]:
    """(registry name, weights argument) that reloads the store's teacher."""
    t = attrs["teacher"]
    src = t["source"]
    if src == "random":
        raise MmkdError(f"the store's teacher {t['name']} had random weights: use --init random")
    if src.startswith("package:"):
        return t["name"], None
    if src.startswith("hf-hub:"):
        return t["name"], src.removeprefix("hf-hub:").split("@")[0]
    return t["name"], src


# why a teacher's blocks cannot seed a BERT-layout text tower (text and multimodal students)
_NOT_BERT = {"clip-text": "a causal, pre-norm CLIP text tower with quick_gelu"}


def _check_init_fits(kind: str, model: Any, flag: str) -> None:
    """Refuse, in one line naming an init that works, a seed whose blocks the student's would not reproduce."""
    if kind in ("text", "multimodal") and getattr(model, "modality", "") == "text":
        from mmkd_core.students.text import bert_like

        try:
            bert_like(model)
        except MmkdError:
            what = _NOT_BERT.get(model.name, f"{type(model.model).__name__}, not BERT-like")
            raise MmkdError(
                f"{flag}: the blocks of {model.name} ({what}) are not what the {kind} student's BERT blocks "
                "compute; use --init random"
            ) from None


def load_init_teacher(cfg: TrainConfig, attrs: dict[str, Any], kind: str | None = None):
    """The model whose blocks initialise the student (never run: only its weights are copied).

    ``--init data2vec2`` reads fairseq's checkpoint (``--init-weights``) into ``load_data2vec2``'s
    ``(state, info)`` pair instead.

    Raises:
        MmkdError: The store's teacher cannot be reloaded, or its blocks (or those of ``--init NAME``) would
            not compute in a ``kind`` student what they computed in the model (one line naming an init that
            works).
    """
    if cfg.init in INIT_CHECKPOINTS:
        seeds, read = INIT_CHECKPOINTS[cfg.init]
        if kind is not None and kind != seeds:
            raise MmkdError(
                f"--init {cfg.init} copies post-norm blocks, which a {kind} student's pre-norm blocks would not "
                f"compute; leave --student out (or --student {seeds})"
            )
        if not cfg.init_weights:
            raise MmkdError(f"--init {cfg.init} needs --init-weights FILE (fairseq's base_imagenet.pt)")
        return read(cfg.init_weights)
    if kind in INIT_CHECKPOINTS and cfg.init != "random":
        raise MmkdError(
            f"--init {cfg.init}: a {kind} student starts from a data2vec 2.0 checkpoint or at random; use "
            f"--init {kind} --init-weights FILE or --init random"
        )
    if cfg.init == "teacher":
        name, weights = teacher_source(attrs)
        # the registry entry and options the store's teacher was built with (architecture overrides, a tower)
        built = attrs.get("teacher_build") or {"name": name, "options": {}}
        teacher = create_teacher(built["name"], weights, **built["options"])
        if teacher.weights_sha256 != attrs["teacher"]["weights_sha256"]:
            raise MmkdError(
                f"teacher.weights_sha256: {weights or name} is not the checkpoint the store was extracted with"
            )
        flag = "--init teacher"
    else:
        teacher = create_teacher(cfg.init, cfg.init_weights)
        flag = f"--init {cfg.init}"
    if kind is not None:
        _check_init_fits(kind, teacher, flag)
    return teacher


def random_text_arch(model: Any) -> dict[str, Any]:
    """Text-student widths and vocabulary a randomly initialised student takes from the store's teacher: all
    of ``bert_arch`` for a BERT-like one, else what any transformers text encoder's config has."""
    from mmkd_core.students.text import bert_arch, bert_like

    try:
        return bert_arch(bert_like(model))
    except MmkdError:
        c = model.config
        return {
            "hidden_size": c.hidden_size,
            "num_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position": c.max_position_embeddings,
        }


@dataclass
class Built:
    """A student and what feeds it."""

    student: torch.nn.Module
    kind: str
    tokenizer: Any
    source: Any  # the source dataset, when the student reads images
    image_spec: ViewSpec | None  # how images are rendered for a student that reads images the teacher did not
    preprocess: ImagePreprocess | None
    loader_options: dict[str, Any] = field(default_factory=dict)  # further StoreBatches arguments
    default_loss: str | None = None  # this store's default loss, where it is not the student kind's


@dataclass
class Context:
    """What every student kind's builder reads: the run, the store, and the models around it."""

    cfg: TrainConfig
    reader: Any
    attrs: dict[str, Any]
    kind: str
    depth: int
    init_model: Any  # the model whose blocks seed the student (None: random init)
    arch_model: Any  # the model whose vocabulary and widths a random text student takes
    heads: dict[str, Any]

    @property
    def init(self) -> str:
        return "random" if self.cfg.init == "random" else "pretrained"


# student kind -> builder(Context) -> Built; each kind registers what it needs, as teachers and datasets do
BUILDERS: Registry[Callable[[Context], Built]] = Registry("student kind")


def build(cfg: TrainConfig, reader) -> Built:
    """The student for a store (a StoreReader) and what feeds it."""
    attrs = reader.attrs
    kind = student_kind(cfg, attrs)
    d_teacher = attrs["teacher"]["num_layers"]
    depth = cfg.depth or max(1, d_teacher // 2)
    init_model = None if cfg.init == "random" else load_init_teacher(cfg, attrs, kind)
    arch_model = init_model
    if cfg.init == "random" and attrs["teacher"]["modality"] == "text" and attrs["teacher"]["source"] != "random":
        # a random student still takes the teacher's vocabulary and widths, and its tokenizer
        name, weights = teacher_source(attrs)
        arch_model = create_teacher(name, weights)
    heads = {"target_dim": attrs["teacher"]["hidden_size"], "pooled_dim": int(reader.group["pooled"].shape[-1])}
    ctx = Context(
        cfg=cfg,
        reader=reader,
        attrs=attrs,
        kind=kind,
        depth=depth,
        init_model=init_model,
        arch_model=arch_model,
        heads=heads,
    )
    return BUILDERS.get(kind)(ctx)


def _token_heads(ctx: Context) -> dict[str, Any]:
    """Heads of students that regress per-token targets: predict them through the store's own recipe."""
    recipe, d_teacher = ctx.attrs["recipe"], ctx.attrs["teacher"]["num_layers"]
    n_recipe = len(recipe["layers"])
    return {
        **ctx.heads,
        "token_pred": ctx.cfg.token_pred,
        "instance_norm_layers": recipe["instance_norm"],
        "layer_norm_targets": recipe["layer_norm"],
        "recipe_layers": "all" if n_recipe >= d_teacher else f"last:{min(n_recipe, ctx.depth)}",
    }


@BUILDERS.register("text")
def _build_text(ctx: Context) -> Built:
    opts: dict[str, Any] = dict(ctx.cfg.student_options)
    if ctx.cfg.init == "random" and ctx.arch_model is not None:
        opts = {**random_text_arch(ctx.arch_model.model), **opts}
    if "pooled_head" not in opts and _text_width(ctx, opts) == ctx.heads["pooled_dim"]:
        # the distilled embedding is the encoder's own mean-pooled output, so every way a user loads the export
        # (AutoModel + mean pooling, sentence-transformers, mmkd) gives what was trained
        opts["pooled_head"] = "identity"
    if ctx.init_model is not None:
        # a shallow copy of a sentence encoder keeps its output space when it keeps the top block. WordNet
        # ablation, 3 of all-MiniLM-L6-v2's 6 blocks, MRPC mean at init: 0.9492 for 0,4,5 ("ends"), 0.9483
        # for 3,4,5, 0.9392 for 1,3,5 ("spread"), 0.9290 for the first three, the teacher 0.9484. After an
        # epoch of the default loss: 0.9484, 0.9473 (88 % of its gap) and 0.9432 (73 %). "ends" leaves no gap
        # to close, so on resampled halves of MRPC its share closed is noise (>= 75 % in 35 % of them);
        # "spread" keeps 99.9 % and closes >= 75 % in 83 % (README "Real text distillation")
        opts.setdefault("init_blocks", "spread")
    student = create_student(
        "text",
        depth=ctx.depth,
        init=ctx.init,
        init_from=ctx.init_model,
        freeze_embeddings=ctx.cfg.freeze_embeddings,
        pool="mean",
        **_token_heads(ctx),
        **opts,
    )
    return Built(
        student=student,
        kind="text",
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        source=None,
        image_spec=None,
        preprocess=None,
    )


def _text_width(ctx: Context, opts: dict[str, Any]) -> int:
    """The width the text student will have: given, the init model's, or the config's default."""
    from mmkd_core.students.text import TextStudentConfig, bert_arch, bert_like

    if "hidden_size" in opts:
        return int(opts["hidden_size"])
    if ctx.init_model is not None:
        return int(bert_arch(bert_like(ctx.init_model))["hidden_size"])
    return TextStudentConfig.hidden_size


def _view_preprocess(v: dict[str, Any]) -> ImagePreprocess:
    """The eval transform of a store's views (``views`` attribute): what an image student exports."""
    return ImagePreprocess(
        size=int(v["size"]),
        mean=tuple(v["mean"]),
        std=tuple(v["std"]),
        interpolation=v["interpolation"],
        crop_pct=v["crop_pct"],
        crop_mode=v.get("crop_mode", "center"),
    )


@BUILDERS.register("vit")
@BUILDERS.register("beit")
def _build_image(ctx: Context) -> Built:
    attrs = ctx.attrs
    # the student reads the stored views: their size, and the teacher's patch grid (T = grid² + CLS)
    size = int(attrs["views"]["size"])
    grid = math.isqrt(int(ctx.reader.group["lengths"][0]) - 1)
    opts = {"img_size": size, "patch_size": size // grid, **ctx.cfg.student_options}
    v = attrs["views"]
    preprocess = _view_preprocess(v)
    student = create_student(
        ctx.kind, depth=ctx.depth, init=ctx.init, init_from=ctx.init_model, **_token_heads(ctx), **opts
    )
    return Built(
        student=student,
        kind=ctx.kind,
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        source=_source(ctx.cfg, attrs),
        image_spec=None,
        preprocess=preprocess,
    )


@BUILDERS.register("data2vec2")
def _build_data2vec2(ctx: Context) -> Built:
    """A post-norm data2vec 2.0 student on the store's views; its patches must be the teacher's, so that its
    time steps are the targets' (BEiT v2 at 224 px: 196 patches of 16 px + CLS)."""
    attrs = ctx.attrs
    if attrs["teacher"].get("modality") != "image" or "views" not in attrs:
        raise MmkdError(
            f"{ctx.reader.path}: a data2vec2 student reads images; this store holds a text teacher's targets"
        )
    v = attrs["views"]
    size = int(v["size"])
    grid = math.isqrt(int(ctx.reader.group["lengths"][0]) - 1)
    opts = {"img_size": size, "patch_size": size // grid, **ctx.cfg.student_options}
    if ctx.init_model is not None and ctx.init_model[1]["patch_size"] != opts["patch_size"]:
        info = ctx.init_model[1]
        raise MmkdError(
            f"--init-weights {info['path']}: its patches are {info['patch_size']} px but the store's teacher saw "
            f"{size} px views in {opts['patch_size']} px patches; the student's time steps would not be the targets'"
        )
    preprocess = _view_preprocess(v)
    student = create_student(
        "data2vec2", depth=ctx.depth, init=ctx.init, init_from=ctx.init_model, **_token_heads(ctx), **opts
    )
    return Built(
        student=student,
        kind="data2vec2",
        tokenizer=None,
        source=_source(ctx.cfg, attrs),
        image_spec=None,
        preprocess=preprocess,
    )


@BUILDERS.register("multimodal")
def _build_multimodal(ctx: Context) -> Built:
    cfg, init_model = ctx.cfg, ctx.init_model
    if ctx.attrs["teacher"].get("modality") == "image_text":  # a joint teacher's store, for MSD
        from .msd import build_joint_student

        return build_joint_student(ctx)
    if ctx.attrs["dataset"].get("captions_group"):
        return _build_pair_student(ctx)
    if not ctx.reader.has("input_ids"):
        raise MmkdError(f"{ctx.reader.path}: a multimodal student needs caption targets from a text teacher")
    source = _source(cfg, ctx.attrs)
    opts = {**MULTIMODAL_DEFAULTS, **cfg.student_options}
    if init_model is not None:  # widths come from the init model unless given
        opts = {
            k: v
            for k, v in opts.items()
            if k not in ("width", "num_heads", "text_num_heads") or k in cfg.student_options
        }
    if cfg.depth:
        opts["image_depth"] = cfg.depth
    heads = {k: v for k, v in ctx.heads.items() if k != "target_dim"}
    text_init = init_model if init_model is not None and init_model.modality == "text" else None
    if cfg.init == "random" and ctx.arch_model is not None:
        from mmkd_core.students.multimodal import text_arch

        opts = {"vocab_size": text_arch(ctx.arch_model.model)["vocab_size"], **opts}
    student = create_student(
        "multimodal", init="random" if text_init is None else "pretrained", text_init_from=text_init, **heads, **opts
    )
    mean, std = IMAGE_MEAN_STD
    preprocess = ImagePreprocess(
        size=student.config.img_size, mean=mean, std=std, interpolation="bicubic", crop_pct=1.0, crop_mode="squash"
    )
    # derived from the same record evaluation reads back, so training and evaluation render alike
    return Built(
        student=student,
        kind="multimodal",
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        source=source,
        image_spec=view_spec(preprocess),
        preprocess=preprocess,
    )


def _build_pair_student(ctx: Context) -> Built:
    """A two-tower student for a pair store: the image tower reads the stored views (at its own size), the
    text tower one of the image's captions; targets are the image view's (and, from a two-tower teacher,
    the caption's own)."""
    cfg, attrs = ctx.cfg, ctx.attrs
    captions = open_store(ctx.reader.path / attrs["dataset"]["captions_group"])
    vocab = int(captions.attrs["preprocess"]["extra"]["vocab_size"])
    length = int(captions.group["input_ids"].shape[1])
    image_from = _tower_init(ctx, "image", cfg.init_image, cfg.init_image_weights)
    text_from = _tower_init(ctx, "text", cfg.init_text, cfg.init_text_weights)
    if text_from is not None and len(text_from.tokenizer) != vocab:
        raise MmkdError(
            f"--init-text {cfg.init_text}: its vocabulary ({len(text_from.tokenizer)}) is not the captions' "
            f"tokenizer's ({vocab}); extract with --text-tokenizer {cfg.init_text}"
        )
    given = cfg.student_options
    opts: dict[str, Any] = {**MULTIMODAL_DEFAULTS, "vocab_size": vocab, **given}
    opts["max_position"] = max(int(opts["max_position"]), length)
    if image_from is not None:  # widths and the patch size come from the init model unless given
        opts = {k: v for k, v in opts.items() if k not in ("width", "num_heads", "patch_size") or k in given}
    if text_from is not None:
        opts = {
            k: v
            for k, v in opts.items()
            if k not in ("width", "text_num_heads", "vocab_size", "max_position") or k in given
        }
    if cfg.depth:
        opts["image_depth"] = cfg.depth
    heads = {k: v for k, v in ctx.heads.items() if k != "target_dim"}
    student = create_student(
        "multimodal",
        init="random" if image_from is None and text_from is None else "pretrained",
        image_init_from=image_from,
        text_init_from=text_from,
        **heads,
        **opts,
    )
    mean, std = IMAGE_MEAN_STD
    preprocess = ImagePreprocess(
        size=student.config.img_size, mean=mean, std=std, interpolation="bicubic", crop_pct=1.0, crop_mode="squash"
    )
    # the stored views' crops and flips, rendered at the student's size and normalisation
    render_spec = dataclasses.replace(
        view_spec(attrs), size=preprocess.size, mean=preprocess.mean, std=preprocess.std, interpolation="bicubic"
    )
    from .loader import CaptionTable

    two_tower = captions.has("pooled")
    return Built(
        student=student,
        kind="multimodal",
        tokenizer=_caption_tokenizer(ctx.reader, captions),
        source=_source(cfg, attrs),
        image_spec=None,
        preprocess=preprocess,
        loader_options={"captions": CaptionTable(captions.path), "render_spec": render_spec},
        default_loss=TWO_TOWER_LOSS if two_tower else None,
    )


def _tower_init(ctx: Context, tower: str, name: str | None, weights: str | None):
    """The model seeding one tower of a pair store's student (None: random).

    ``name`` None falls back to ``--init``: ``teacher`` seeds the tower of the store teacher's modality.
    """
    if name is None:
        if ctx.init_model is None or getattr(ctx.init_model, "modality", None) != tower:
            return None
        return ctx.init_model
    if name == "random":
        return None
    model = load_init_teacher(dataclasses.replace(ctx.cfg, init=name, init_weights=weights), ctx.attrs)
    want = "image" if tower == "image" else "text"
    if model.modality != want:
        raise MmkdError(f"--init-{tower} {name}: that model reads {model.modality}; the {tower} tower needs {want}")
    return model


def _caption_tokenizer(reader, captions):
    """The tokenizer the captions were stored under (exported with the student)."""
    from transformers import AutoTokenizer

    path = reader.attrs.get("caption_tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MmkdError(
            f"{reader.path}: the captions' tokenizer at {path} cannot be loaded ({str(e).splitlines()[0]}); "
            "it is exported with the student"
        ) from None
    if len(tokenizer) != int(captions.attrs["preprocess"]["extra"]["vocab_size"]):
        raise MmkdError(f"{reader.path}: the tokenizer at {path} is not the one the captions were stored under")
    tokenizer.padding_side = "right"
    return tokenizer


def _source(cfg: TrainConfig, attrs: dict[str, Any]):
    """The source dataset the store indexes into, checked against the store's fingerprint."""
    d = attrs["dataset"]
    options = dict(d.get("options") or {})
    root = cfg.data_root or attrs.get("data_root")
    ds = create_dataset(d["name"], root=root, split=d["split"], **options)
    if d.get("unit") == "image":  # the store's samples are the dataset's distinct images
        ds = PairImages(ds)
    if ds.fingerprint() != d["fingerprint"]:
        raise MmkdError(
            f"dataset.fingerprint: the {d['name']} data at {root} is not the data the store was "
            "extracted from; pass --data-root to the right copy"
        )
    return ds


def loss_inputs(built: Built, model: torch.nn.Module, batch: dict[str, Any], device: str) -> dict[str, Any]:
    """Run the student (through ``model``, which may be its DDP wrapper) on a batch and pair its outputs
    with the batch's targets, as CombinedLoss reads them."""
    mv = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out: dict[str, Any] = {"mask": mv["mask"]}
    if "tokens" in mv:
        out["tokens_target"] = mv["tokens"]
    if "pooled" in mv:
        out["pooled_target"] = mv["pooled"]
    if "caption_pooled" in mv:  # a two-tower store: each student tower regresses its own teacher tower
        out["pooled_target"] = {"image": mv["pooled"], "text": mv["caption_pooled"]}
    if "bank" in mv:
        out["bank"] = mv["bank"]
    o = model(
        pixel_values=mv.get("pixel_values"), input_ids=mv.get("input_ids"), attention_mask=mv.get("attention_mask")
    )
    if built.kind == "multimodal":
        out["pooled"] = {"image": o.image.pooled, "text": o.text.pooled}
        out["caption_ids"] = mv["input_ids"]
    else:
        out["tokens"], out["pooled"] = o.tokens, o.pooled
    if hasattr(built, "msd_inputs"):  # a joint teacher's store: the joint and per-modality outputs of MSD
        out.update(built.msd_inputs(model, mv))
    return out
