"""What a student kind declares (:class:`StudentKind`), what its builder reads (:class:`Context`) and returns
(:class:`Built`), and the helpers builders share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ...errors import MmkdError
from ...teachers.base import ImagePreprocess, Teacher
from ...views import ViewSpec
from ..base import Student
from ..data2vec2 import CheckpointPair


class BuildOptions(Protocol):
    """The run options a builder reads (``mmkd-train``'s TrainConfig has them all)."""

    init: str | None
    depth: int | None
    student_options: dict[str, Any]
    freeze_embeddings: bool
    token_pred: str
    loss: str | None
    init_image: str | None
    init_image_weights: str | None
    init_text: str | None
    init_text_weights: str | None


@dataclass
class Built:
    """A student and what feeds it.

    Attributes:
        student: The student, in train mode.
        kind: The student kind the run records (``StudentKind.student``).
        tokenizer: The tokenizer its text is fed through (exported with it), or None.
        source: The source dataset, when the student reads images.
        image_spec: How images are rendered for a student that reads images the teacher did not.
        preprocess: The image preprocessing an image-reading student exports.
        loader_options: Further StoreDataset arguments.
        default_loss: This store's default loss, where it is not the student kind's.
        max_seq_length: The longest text the student reads, where it is not the store's ``preprocess.max_length``
            (a student with its own tokenizer counts its own tokens).
        whole_sample_only: Why per-token loss terms do not apply to this student ("" where they do).
    """

    student: torch.nn.Module
    kind: str
    tokenizer: Any
    source: Any
    image_spec: ViewSpec | None
    preprocess: ImagePreprocess | None
    loader_options: dict[str, Any] = field(default_factory=dict)
    default_loss: str | None = None
    max_seq_length: int | None = None
    whole_sample_only: str = ""

    def extra_loss_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """LossInputs fields beyond the student's outputs and the stored targets (none here; the joint kind's
        MSD inputs are)."""
        return {}


@dataclass
class Context:
    """What every student kind's builder reads: the run, the store, the models around it, and what the
    training stage supplies (the builders live in the library, which never imports the stages).

    Attributes:
        cfg: The run's options.
        reader: The store's StoreReader.
        attrs: The store's provenance (``reader.attrs``).
        kind: The student kind.
        depth: The student's depth.
        init_model: What seeds the student: a Teacher, or (the data2vec2 kind) ``load_data2vec2``'s
            ``(state, info)`` pair; None: random init.
        arch_model: The Teacher whose vocabulary and widths a random text student takes, or None.
        heads: Head widths from the store (``target_dim``, ``pooled_dim``).
        dataset: The source dataset the store indexes into, checked against its fingerprint (read on call).
        load_init: ``(name, weights)`` -> the model ``--init name`` would seed a student with.
        caption_table: A pair store's captions group path -> the loader's caption table.
    """

    cfg: BuildOptions
    reader: Any
    attrs: dict[str, Any]
    kind: str
    depth: int
    init_model: Teacher | CheckpointPair | None
    arch_model: Teacher | None
    heads: dict[str, Any]
    dataset: Callable[[], Any]
    load_init: Callable[[str, str | None], Any]
    caption_table: Callable[[Path], Any]

    @property
    def init(self) -> str:
        return "random" if self.cfg.init == "random" else "pretrained"


@dataclass(frozen=True)
class StudentKind:
    """Everything about one student kind: what ``mmkd-train`` defaults to, how it builds and how it exports.

    Attributes:
        name: The registry name (``--student`` NAME, where ``selectable``).
        model: The Student class.
        config: Its config dataclass.
        defaults: TrainConfig values the kind fills where the run leaves them open (init, batch_size, lr,
            epochs).
        default_loss: The ``--loss`` spec when none is given.
        build: Context -> Built.
        export: ``(student, directory, *, tokenizer, preprocess, max_seq_length) -> directory``.
        init_blocks: The rule picking the init model's blocks (see ``base.resolve_blocks``); None where the
            kind takes no block list.
        init_checkpoint: Reads the checkpoint file ``--init NAME --init-weights FILE`` names, for a kind whose
            blocks no teacher computes (then ``--init NAME`` also selects this kind).
        check_init: ``(init model, flag)`` -> None, or a one-line MmkdError when its blocks would not compute
            in this kind what they computed in the model.
        records_as: The kind the run records (the joint kind builds a multimodal student); "": ``name``.
        selectable: Whether ``--student`` may name it (the joint kind is chosen by its store).
    """

    name: str
    model: type[Student]
    config: type
    defaults: Mapping[str, Any]
    default_loss: str
    build: Callable[[Context], Built]
    export: Callable[..., Path]
    init_blocks: str | None = None
    init_checkpoint: Callable[[str], CheckpointPair] | None = None
    check_init: Callable[[Any, str], None] | None = None
    records_as: str = ""
    selectable: bool = True

    def __post_init__(self) -> None:
        if not self.records_as:
            object.__setattr__(self, "records_as", self.name)


def token_heads(ctx: Context) -> dict[str, Any]:
    """Heads of students that regress per-token targets: predict them through the store's own recipe."""
    return {**ctx.heads, **recipe_heads(ctx.attrs, ctx.depth, ctx.cfg.token_pred)}


def recipe_heads(attrs: Mapping[str, Any], depth: int, token_pred: str) -> dict[str, Any]:
    """HeadConfig fields of a token head that predicts a store's per-token targets (``attrs``: the store's
    provenance) from a ``depth``-block student through the store's own recipe."""
    recipe, d_teacher = attrs["recipe"], attrs["teacher"]["num_layers"]
    n_recipe = len(recipe["layers"])
    return {
        "token_pred": token_pred,
        "instance_norm_layers": recipe["instance_norm"],
        "layer_norm_targets": recipe["layer_norm"],
        "recipe_layers": "all" if n_recipe >= d_teacher else f"last:{min(n_recipe, depth)}",
    }


def pooled_heads(ctx: Context) -> dict[str, Any]:
    """Heads of students that regress the pooled target alone (multimodal)."""
    return {k: v for k, v in ctx.heads.items() if k != "target_dim"}


def stored_patches(ctx: Context) -> dict[str, int]:
    """``img_size`` and ``patch_size`` of the stored views: their size, and the teacher's patch grid
    (T = grid² + CLS), so that an image student's time steps are the targets'."""
    size = int(ctx.attrs["views"]["size"])
    grid = math.isqrt(int(ctx.reader.group["lengths"][0]) - 1)
    return {"img_size": size, "patch_size": size // grid}


def view_preprocess(v: Mapping[str, Any]) -> ImagePreprocess:
    """The eval transform of a store's views (``views`` attribute): what an image student exports."""
    return ImagePreprocess(
        size=int(v["size"]),
        mean=tuple(v["mean"]),
        std=tuple(v["std"]),
        interpolation=v["interpolation"],
        crop_pct=v["crop_pct"],
        crop_mode=v.get("crop_mode", "center"),
    )


def teacher_source(attrs: Mapping[str, Any]) -> tuple[str, str | None]:
    """(registry name, weights argument) that reloads a store's teacher (``attrs``: the store's provenance)."""
    t = attrs["teacher"]
    src = t["source"]
    if src == "random":
        raise MmkdError(f"the store's teacher {t['name']} had random weights: use --init random")
    if src.startswith("package:"):
        return t["name"], None
    if src.startswith("hf-hub:"):
        return t["name"], src.removeprefix("hf-hub:").split("@")[0]
    return t["name"], src
