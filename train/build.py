"""From a store's provenance and a TrainConfig to a student, its inputs and its loss inputs.

Which kind of student a store trains, and what seeds it, is decided here; each kind's own facts (defaults,
default loss, init rules, builder, exporter) live in its entry of ``mmkd_core.students.kinds``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmkd.data import PairImages, create_dataset
from mmkd_core.errors import MmkdError
from mmkd_core.losses import LossInputs
from mmkd_core.students.kinds import STUDENT_KINDS, Built, Context, StudentKind
from mmkd_core.students.kinds.base import teacher_source
from mmkd_core.students.kinds.image import BEIT_LIKE
from mmkd_core.teachers import create_teacher

from .config import TrainConfig
from .msd import JOINT, is_joint_store

log = logging.getLogger(__name__)


def default_loss(kind: str) -> str:
    """The loss a student of ``kind`` trains with when the run names none (the kind's own file says it)."""
    return STUDENT_KINDS.get(kind).default_loss


def init_checkpoint_kind(init: str | None) -> StudentKind | None:
    """The kind whose checkpoint file ``--init init`` names (its blocks no teacher computes), or None."""
    if init is None or init not in STUDENT_KINDS:
        return None
    kind = STUDENT_KINDS.get(init)
    return kind if kind.init_checkpoint is not None else None


def student_kind(cfg: TrainConfig, attrs: dict[str, Any]) -> str:
    """The student kind for this store: cfg.student, or chosen from the teacher and the data — and, for image
    stores, from the model whose blocks seed the student (``--init NAME``, else the store's teacher)."""
    if cfg.student != "auto":
        return cfg.student
    seeded = init_checkpoint_kind(cfg.init)
    if seeded is not None:  # the checkpoint's blocks decide the kind: no other computes them
        return seeded.name
    if attrs["dataset"].get("captions_group"):  # a pair store: images with their captions
        return "multimodal"
    teacher_modality = attrs["teacher"].get("modality")
    if teacher_modality == "image_text":  # a joint teacher (FLAVA) over image–caption pairs
        return "multimodal"
    if teacher_modality == "text":
        return "multimodal" if attrs["dataset"].get("modality") == "image_text" else "text"
    seed = cfg.init if cfg.init not in (None, "teacher", "random") else attrs["teacher"]["name"]
    return "beit" if seed in BEIT_LIKE else "vit"


def load_init_teacher(cfg: TrainConfig, attrs: dict[str, Any], kind: str | None = None) -> Any:
    """The model whose blocks initialise the student (never run: only its weights are copied).

    ``--init data2vec2`` reads fairseq's checkpoint (``--init-weights``) into ``load_data2vec2``'s
    ``(state, info)`` pair instead (the kind's ``init_checkpoint``).

    Raises:
        MmkdError: The store's teacher cannot be reloaded, or its blocks (or those of ``--init NAME``) would
            not compute in a ``kind`` student what they computed in the model (one line naming an init that
            works).
    """
    seeded = init_checkpoint_kind(cfg.init)
    if seeded is not None:
        if kind is not None and kind != seeded.name:
            raise MmkdError(
                f"--init {cfg.init} copies post-norm blocks, which a {kind} student's pre-norm blocks would not "
                f"compute; leave --student out (or --student {seeded.name})"
            )
        if not cfg.init_weights:
            raise MmkdError(f"--init {cfg.init} needs --init-weights FILE (fairseq's base_imagenet.pt)")
        return seeded.init_checkpoint(cfg.init_weights)
    if init_checkpoint_kind(kind) is not None and cfg.init != "random":
        raise MmkdError(
            f"--init {cfg.init}: a {kind} student starts from a data2vec 2.0 checkpoint or at random; use "
            f"--init {kind} --init-weights FILE or --init random"
        )
    if cfg.init == "teacher":
        teacher, flag = _store_teacher(attrs), "--init teacher"
    else:
        teacher, flag = create_teacher(cfg.init, cfg.init_weights), f"--init {cfg.init}"
    check = STUDENT_KINDS.get(kind).check_init if kind is not None else None
    if check is not None:
        check(teacher, flag)
    return teacher


def _store_teacher(attrs: dict[str, Any]) -> Any:
    """The store's teacher, rebuilt as it was extracted, checked against the store's weights hash."""
    name, weights = teacher_source(attrs)
    # the registry entry and options the store's teacher was built with (architecture overrides, a tower)
    built = attrs.get("teacher_build") or {"name": name, "options": {}}
    teacher = create_teacher(built["name"], weights, **built["options"])
    if teacher.weights_sha256 != attrs["teacher"]["weights_sha256"]:
        raise MmkdError(f"teacher.weights_sha256: {weights or name} is not the checkpoint the store was extracted with")
    return teacher


def build(cfg: TrainConfig, reader) -> Built:
    """The student for a store (a StoreReader) and what feeds it."""
    attrs = reader.attrs
    kind = student_kind(cfg, attrs)
    d_teacher = attrs["teacher"]["num_layers"]
    init_model = None if cfg.init == "random" else load_init_teacher(cfg, attrs, kind)
    arch_model = init_model
    if cfg.init == "random" and attrs["teacher"]["modality"] == "text" and attrs["teacher"]["source"] != "random":
        # a random student still takes the teacher's vocabulary and widths, and its tokenizer
        name, weights = teacher_source(attrs)
        arch_model = create_teacher(name, weights)
    ctx = Context(
        cfg=cfg,
        reader=reader,
        attrs=attrs,
        kind=kind,
        depth=cfg.depth or max(1, d_teacher // 2),
        init_model=init_model,
        arch_model=arch_model,
        heads={"target_dim": attrs["teacher"]["hidden_size"], "pooled_dim": int(reader.group["pooled"].shape[-1])},
        dataset=lambda: source_dataset(cfg, attrs),
        load_init=lambda name, weights: load_init_teacher(
            dataclasses.replace(cfg, init=name, init_weights=weights), attrs
        ),
        caption_table=_caption_table,
    )
    entry = JOINT if kind == "multimodal" and is_joint_store(attrs) else STUDENT_KINDS.get(kind)
    return entry.build(ctx)


def _caption_table(path: Path) -> Any:
    from mmkd_core.loader import CaptionTable

    return CaptionTable(path)


def source_dataset(cfg: TrainConfig, attrs: dict[str, Any]) -> Any:
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


def loss_inputs(built: Built, model: torch.nn.Module, batch: dict[str, Any], device: str) -> LossInputs:
    """Run the student (through ``model``, which may be its DDP wrapper) on a batch and pair its outputs
    with the batch's targets, as CombinedLoss reads them."""
    return run_student(built, model, batch, device)[0]


def teachers_inputs(
    built: Built, model: torch.nn.Module, batch: dict[str, Any], device: str, names: Sequence[str]
) -> dict[str, LossInputs]:
    """One forward of the student, paired with each teacher's targets: the first teacher's as
    :func:`loss_inputs` pairs them, each further teacher's (the batch's ``<name>/tokens``, ``<name>/pooled``)
    with the student's heads for it."""
    first, o = run_student(built, model, batch, device)
    out = {names[0]: first}
    for name in names[1:]:
        tokens, pooled = o.teachers[name]
        target = batch.get(f"{name}/tokens")
        out[name] = LossInputs(
            mask=first.mask,
            tokens=tokens,
            tokens_target=None if target is None else target.to(device),
            pooled=pooled,
            pooled_target=batch[f"{name}/pooled"].to(device),
        )
    return out


def run_student(built: Built, model: torch.nn.Module, batch: dict[str, Any], device: str) -> tuple[LossInputs, Any]:
    """(the first teacher's LossInputs, the student's output) of one forward on ``batch``."""
    mv = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    pooled_target = mv.get("pooled")
    if "caption_pooled" in mv:  # a two-tower store: each student tower regresses its own teacher tower
        pooled_target = {"image": mv["pooled"], "text": mv["caption_pooled"]}
    o = model(
        pixel_values=mv.get("pixel_values"), input_ids=mv.get("input_ids"), attention_mask=mv.get("attention_mask")
    )
    out = LossInputs(mask=mv["mask"], tokens_target=mv.get("tokens"), pooled_target=pooled_target, bank=mv.get("bank"))
    if built.kind == "multimodal":
        out.pooled = {"image": o.image.pooled, "text": o.text.pooled}
        out.caption_ids = mv["input_ids"]
    else:
        out.tokens, out.pooled = o.tokens, o.pooled
    # a joint teacher's store: the joint and per-modality outputs of MSD
    return dataclasses.replace(out, **built.extra_loss_inputs(model, mv)), o
