"""The joint student kind: MSD (modality-specific distillation) from a joint teacher's store
(``mmkd-extract --teacher flava``).

Such a store holds, per pair and view, the teacher's joint output (``pooled``), its output given the image
alone (``pooled_without_text``), given the caption alone (``pooled_without_image``) and each modality's
``saliency``. The multimodal student then produces the three matching outputs: ``forward_joint`` on the
pair, its image tower on the image, its text tower on the caption. The ``msd`` loss term regresses all
three: L(s_joint, t) + Σ_m w_m · L(s_m, t_m), the weights w_m by ``msd_mode`` (per sample from the stored
saliency, the whole store's mean saliency, or fixed).

The student reads the stored views (``view_params``) as the teacher saw them: at the teacher's image size
and normalisation, so its targets and its inputs are of the same crop. It is registered as the ``joint`` kind
(``mmkd_core.students.kinds``); runs record it as the multimodal student it builds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.losses import LOSSES, SALIENCY_MODALITIES, parse_loss_spec
from mmkd_core.students.export.native import save_native
from mmkd_core.students.kinds import STUDENT_KINDS, Built, Context, StudentKind
from mmkd_core.students.kinds.base import pooled_heads, teacher_source, view_preprocess
from mmkd_core.students.kinds.multimodal import MULTIMODAL, MULTIMODAL_DEFAULTS
from mmkd_core.students.multimodal import create_multimodal_student
from mmkd_core.teachers.hf_common import checkpoint_dir, load_tokenizer, text_preprocess
from mmkd_core.teachers.weights import locate_weights
from mmkd_core.views import view_spec

log = logging.getLogger(__name__)

# the saliency array's last axis, as extract/joint.py writes it


def is_joint_store(attrs: dict[str, Any]) -> bool:
    """Whether a store holds a joint teacher's outputs (the joint kind trains its multimodal student)."""
    return attrs["teacher"].get("modality") == "image_text"


@dataclass
class JointBuilt(Built):
    """A multimodal student for a joint teacher's store, with what its MSD loss inputs need.

    Attributes:
        msd: The run's loss has an ``msd`` term (else the joint pass is skipped).
        modalities: The modalities along the store's ``saliency`` axis.
        dataset_saliency: Modality -> mean saliency over every sample and view of the store, for
            ``msd_mode=dataset`` (computed once, when the student is built).
    """

    msd: bool = False
    modalities: tuple[str, ...] = SALIENCY_MODALITIES
    dataset_saliency: dict[str, float] = field(default_factory=dict)

    def extra_loss_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The student's joint output and the teacher's per-modality outputs and saliencies of a batch on the
        device, as the ``msd`` term reads them (LossInputs fields); nothing when the loss has no msd term.

        Args:
            model: The student, or its DDP wrapper (the joint pass runs on the wrapped student; its parameters
                are the same, so their gradients are reduced with the others).
            batch: The loader's batch, on the device.
        """
        if not self.msd:
            return {}
        student = getattr(model, "module", model)
        joint = student.forward_joint(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        saliency = batch["saliency"].float()
        return {
            "joint": joint.pooled,
            # the student's image tower sees the image alone: its teacher is the teacher with the text removed
            "teacher_by_modality": {"image": batch["pooled_without_text"], "text": batch["pooled_without_image"]},
            "msd_saliency": {m: saliency[:, i] for i, m in enumerate(self.modalities)},
            "msd_dataset_saliency": self.dataset_saliency,
        }


def dataset_saliency(reader, modalities: tuple[str, ...] = SALIENCY_MODALITIES) -> dict[str, float]:
    """Mean saliency of each modality over every sample and view of a joint store, read shard by shard."""
    total, count = np.zeros(len(modalities), np.float64), 0
    for lo in range(0, len(reader), reader.shard_size):
        s = reader.read(lo, min(lo + reader.shard_size, len(reader)), ("saliency",))["saliency"]
        s = s.reshape(-1, len(modalities))
        total += s.sum(axis=0, dtype=np.float64)
        count += len(s)
    return {m: float(v) for m, v in zip(modalities, total / max(count, 1), strict=True)}


def _has_msd(loss: str | None) -> bool:
    return bool(loss) and any(n in LOSSES and LOSSES.canonical(n) == "msd" for n in parse_loss_spec(loss))


def _tokenizer(attrs: dict[str, Any]) -> Any:
    """The store's teacher's tokenizer (exported with the student), checked against the store's record."""
    if attrs["teacher"]["source"] == "random":
        log.warning(
            "the store's teacher %s had random weights: where its tokenizer lives is not recorded, so the "
            "student is exported without one",
            attrs["teacher"]["name"],
        )
        return None
    name, weights = teacher_source(attrs)
    location = locate_weights(weights, None)
    if location is None:
        raise MmkdError(f"teacher.source: cannot find {name}'s checkpoint {weights!r} for its tokenizer")
    path = checkpoint_dir(location, name)
    tokenizer = load_tokenizer(path, name)
    text = attrs["preprocess"]["text"]
    got = text_preprocess(tokenizer, path, text["max_length"]).extra.get("files_sha256")
    if got != text["extra"].get("files_sha256"):
        raise MmkdError(f"preprocess.text: the tokenizer in {path} is not the one the store was extracted with")
    return tokenizer


def _joint_options(ctx: Context) -> dict[str, Any]:
    """The student reads the stored views at the teacher's image size and the teacher's token ids
    (``vocab_size``, ``max_position`` follow them); the rest as for any multimodal student."""
    attrs, init_model = ctx.attrs, ctx.init_model
    opts = {
        **MULTIMODAL_DEFAULTS,
        "img_size": int(attrs["views"]["size"]),
        "max_position": max(MULTIMODAL_DEFAULTS["max_position"], int(ctx.reader.group["input_ids"].shape[1])),
    }
    if init_model is None:
        opts["vocab_size"] = int(attrs["preprocess"]["text"]["extra"]["vocab_size"])
    else:  # widths and vocabulary come from the init model unless given
        opts = {k: v for k, v in opts.items() if k not in ("width", "num_heads", "text_num_heads")}
    opts.update(ctx.cfg.student_options)
    if ctx.cfg.depth:
        opts["image_depth"] = ctx.cfg.depth
    return opts


def build_joint_student(ctx: Context) -> JointBuilt:
    """The multimodal student for a joint teacher's store (``MULTIMODAL_DEFAULTS``, ``--student-option``,
    the stored views' size and the teacher's token ids)."""
    cfg, attrs, reader = ctx.cfg, ctx.attrs, ctx.reader
    if not reader.has("saliency"):
        raise MmkdError(f"{reader.path}: a joint teacher's store without saliency; extract it again")
    init_model = ctx.init_model
    if init_model is not None and init_model.modality != "text":
        raise MmkdError(
            f"--init {cfg.init}: a joint teacher cannot seed the multimodal student's towers; use --init random, "
            "or a text teacher's name (with --init-weights) for the text tower"
        )
    student = create_multimodal_student(
        init="random" if init_model is None else "pretrained",
        text_init_from=init_model,
        **pooled_heads(ctx),
        **_joint_options(ctx),
    )
    preprocess = view_preprocess(attrs["views"])
    modalities = tuple((attrs.get("msd") or {}).get("saliency") or SALIENCY_MODALITIES)
    return JointBuilt(
        student=student,
        kind="multimodal",
        tokenizer=_tokenizer(attrs),
        source=ctx.dataset(),
        image_spec=view_spec(preprocess),
        preprocess=preprocess,
        msd=_has_msd(cfg.loss),
        modalities=modalities,
        dataset_saliency=dataset_saliency(reader, modalities),
    )


JOINT = StudentKind(
    name="joint",
    model=MULTIMODAL.model,
    config=MULTIMODAL.config,
    defaults=MULTIMODAL.defaults,
    default_loss=MULTIMODAL.default_loss,
    build=build_joint_student,
    export=save_native,
    check_init=MULTIMODAL.check_init,
    records_as="multimodal",
    selectable=False,
)
STUDENT_KINDS.register(JOINT.name)(JOINT)
