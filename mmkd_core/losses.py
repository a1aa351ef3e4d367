"""Distillation losses as plain tensor functions, and a weighted sum of named terms for the training loop.

All math is float32 whatever the input dtype. Where there is a time axis the loss is taken over valid
steps only, by selecting them (not by multiplying with the mask), so padding never contributes, not even
as NaN. Pooled ("whole-sample") functions take (B, E); ``reduction="none"`` gives one value per sample.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import MmkdError
from .registry import Registry

Tensor = torch.Tensor


def _f32(*xs: Tensor) -> list[Tensor]:
    return [x.to(torch.float32) for x in xs]


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise MmkdError(f"reduction {reduction!r}: choose 'mean' or 'none'")
    # nothing to average (an all-padding batch): 0, still in the graph, like token_mse
    return per_sample.mean() if per_sample.numel() else per_sample.sum()


def token_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The data2vec loss: MSE over all valid time steps and features of the batch.

    Args:
        pred: (B, T, D) student predictions.
        target: (B, T, D) teacher targets.
        mask: (B, T) bool, True at valid steps.
    """
    pred, target = _f32(pred, target)
    mask = mask.to(torch.bool)
    if not mask.any():
        return pred[mask].sum()  # 0, still in the graph, so backward() works on an all-padding batch
    return F.mse_loss(pred[mask], target[mask])


def cls_mse(pred: Tensor, target: Tensor) -> Tensor:
    """MSE on time step 0 (CLS/BOS) of (B, T, D) predictions and targets."""
    pred, target = _f32(pred[:, 0], target[:, 0])
    return F.mse_loss(pred, target)


def pooled_mse(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """MSE between (B, E) embeddings, mean over features (then samples unless ``reduction="none"``)."""
    pred, target = _f32(pred, target)
    return _reduce(((pred - target) ** 2).mean(-1), reduction)


def pooled_cosine(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """1 − cosine similarity between (B, E) embeddings."""
    pred, target = _f32(pred, target)
    return _reduce(1.0 - F.cosine_similarity(pred, target, dim=-1), reduction)


def mse_cosine(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, cos_weight: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """MSE + ``cos_weight`` · (1 − cosine), per sample of (B, E) inputs or per valid step of (B, T, D) ones
    (``mask`` (B, T); None means all steps are valid). ``reduction="none"`` keeps one value per sample/step.
    """
    if pred.dim() == 3:
        mask = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device) if mask is None else mask.bool()
        pred, target = pred[mask], target[mask]
    return _reduce(pooled_mse(pred, target, "none") + cos_weight * pooled_cosine(pred, target, "none"), reduction)


def contrastive_kd(
    student: Tensor,
    teacher: Tensor | None,
    temperature: float = 0.05,
    bank: Tensor | None = None,
    positives: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """InfoNCE: each student embedding must pick its own teacher target among the candidates.

    Candidates are the batch's teacher targets followed by the bank's; logits are cosine / ``temperature``.
    Candidates identical to a sample's positive (the target of a repeated caption elsewhere in the batch,
    or a copy of it in the bank; equality as in ``identical_targets``) are left out of that sample's
    softmax: they are the same target, not negatives. Keeping them, as negatives or as soft positives
    (the same loss and gradient, since their logits equal the positive's), leaves a floor of ln(copies) and
    weakens the pull toward the target. The symmetric direction leaves out the students of the same target.

    Args:
        student: (B, E) student embeddings.
        teacher: (B, E) teacher targets of the same samples, or None to use the bank alone.
        temperature: Softmax temperature τ.
        bank: Optional (M, E) extra teacher targets, e.g. of other samples (``LossInputs.bank``).
        positives: (B,) index of each sample's positive among the candidates; default ``arange(B)``.
            Required when ``teacher`` is None (the bank then holds the positives).
        symmetric: Also let each teacher target pick its student among the batch (needs ``teacher``) and
            average the two directions.
    """
    (s,) = _f32(student)
    parts = [t.to(torch.float32) for t in (teacher, bank) if t is not None]
    if not parts:
        raise MmkdError("contrastive_kd: give teacher targets, a bank, or both")
    if teacher is None and positives is None:
        raise MmkdError("contrastive_kd: without batch teacher targets, pass positives (indices into the bank)")
    cand = F.normalize(torch.cat(parts), dim=-1)
    s = F.normalize(s, dim=-1)
    rows = torch.arange(len(s), device=s.device)
    labels = rows if positives is None else positives.to(s.device).long()
    copies = identical_targets(cand[labels], cand)
    copies[rows, labels] = False
    loss = F.cross_entropy((s @ cand.T / temperature).masked_fill(copies, float("-inf")), labels)
    if symmetric:
        if teacher is None:
            raise MmkdError("contrastive_kd: symmetric=True needs the batch's teacher targets")
        t = cand[: len(teacher)]
        twins = identical_targets(t, t)  # the students of a repeated caption: not negatives of its target
        twins.fill_diagonal_(False)
        loss = 0.5 * (loss + F.cross_entropy((t @ s.T / temperature).masked_fill(twins, float("-inf")), rows))
    return loss


def identical_targets(a: Tensor, b: Tensor) -> Tensor:
    """(len(a), len(b)) bool: True where row i of ``a`` and row j of ``b`` are the same target.

    Float targets are equal when their cosine is 1 (within 1e-6: the same caption extracted in two batches
    differs by rounding only); integer keys (token ids of captions) when every element is.
    """
    if not a.is_floating_point():
        return (a[:, None, :] == b[None, :, :]).all(-1)
    a, b = (F.normalize(x.detach().to(torch.float32), dim=-1) for x in (a, b))
    return a @ b.T > 1 - 1e-6


def same_target(targets: Tensor) -> Tensor:
    """(B, B) soft labels: row i spreads its mass evenly over the samples whose target equals target i.

    Batches of label captions or repeated sentences hold identical targets; counting those as negatives
    would push apart samples that the teacher says are the same. Equality as in ``identical_targets``.
    """
    same = identical_targets(targets, targets).to(torch.float32)
    same.fill_diagonal_(1.0)
    return same / same.sum(-1, keepdim=True)


def itc(
    img: Tensor,
    txt: Tensor,
    temperature: float = 0.07,
    logit_scale: Tensor | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """CLIP-style symmetric image–text contrastive loss between two student towers; pair i matches pair i.

    Args:
        img: (B, E) image-tower embeddings.
        txt: (B, E) text-tower embeddings.
        temperature: Fixed τ, used when ``logit_scale`` is None.
        logit_scale: Learnable log of the inverse temperature (CLIP's parameter, init ln(1/0.07)); its
            exponential is capped at 100 as in CLIP so training cannot blow the scale up.
        targets: Optional (B, E) teacher targets or (B, T) integer caption keys of the pairs: pairs with
            identical ones (the same caption) also count as matches (see ``same_target``).
    """
    img, txt = (F.normalize(x, dim=-1) for x in _f32(img, txt))
    scale = logit_scale.float().exp().clamp(max=100.0) if logit_scale is not None else 1.0 / temperature
    logits = scale * img @ txt.T
    labels = torch.arange(len(img), device=img.device) if targets is None else same_target(targets)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def similarity_kd(img: Tensor, txt: Tensor, t_img: Tensor, t_txt: Tensor, temperature: float = 0.05) -> Tensor:
    """KD on the image–text similarity matrix: the student's softmax over cosine similarities follows the
    teacher's, image→text rows and text→image columns, KL(teacher ‖ student) averaged over both.

    Args:
        img, txt: (B, E) student image and text embeddings of B pairs.
        t_img, t_txt: (B, E') the teacher's image and text embeddings of the same pairs.
        temperature: τ of both softmaxes.
    """
    img, txt, t_img, t_txt = (F.normalize(x, dim=-1) for x in _f32(img, txt, t_img, t_txt))
    s = img @ txt.T / temperature
    t = (t_img @ t_txt.T / temperature).detach()
    rows = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    cols = F.kl_div(F.log_softmax(s.T, -1), F.log_softmax(t.T, -1), log_target=True, reduction="batchmean")
    return 0.5 * (rows + cols)


def triplet(anchor: Tensor, positive: Tensor, negative: Tensor | None = None, margin: float = 0.2) -> Tensor:
    """Triplet loss on cosine distance: mean of max(0, d(a, p) − d(a, n) + margin).

    Args:
        anchor: (B, E).
        positive: (B, E), row i is anchor i's positive.
        negative: (B, E), or None for the hardest in-batch negative: the closest row of ``positive`` whose
            target differs from row i's (as VSE++; rows identical to row i, as in ``identical_targets``,
            are the same target, not negatives). An anchor without any such row contributes 0.
        margin: Required gap between the negative and the positive distance.
    """
    a, p = (F.normalize(x, dim=-1) for x in _f32(anchor, positive))
    d_pos = 1.0 - (a * p).sum(-1)
    if negative is None:
        if len(a) < 2:
            raise MmkdError("triplet: hardest in-batch negatives need a batch of at least 2")
        same = identical_targets(p, p)
        same.fill_diagonal_(True)
        best = (a @ p.T).masked_fill(same, float("-inf")).max(dim=1).values
        has_negative = torch.isfinite(best)
        hinge = F.relu(d_pos - (1.0 - best.masked_fill(~has_negative, 0.0)) + margin)
        return torch.where(has_negative, hinge, torch.zeros_like(hinge)).mean()
    d_neg = 1.0 - (a * F.normalize(negative.float(), dim=-1)).sum(-1)
    return F.relu(d_pos - d_neg + margin).mean()


# ---- MSD (modality-specific distillation) for embedding targets -------------------------------------

MSD_MODES = ("sample", "dataset", "fixed")


# the modalities MSD weighs, in the order of a joint store's ``saliency`` array (its ``modality`` axis)
SALIENCY_MODALITIES = ("image", "text")


def msd_saliency(t_full: Tensor, t_without: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Saliency of each modality m per sample: 1 − cos(t, t_¬m), how much the teacher's output changes
    when m is removed.

    Args:
        t_full: (B, E) teacher output on the full input.
        t_without: Modality name -> (B, E) teacher output with that modality removed.
    """
    t = t_full.float()
    return {m: (1.0 - F.cosine_similarity(t, x.float(), dim=-1)).detach() for m, x in t_without.items()}


def msd_weights(
    saliency: Mapping[str, Tensor], mode: str = "sample", fixed: Mapping[str, float] | None = None
) -> dict[str, Tensor]:
    """Per-sample weights of the modalities, summing to 1 over modalities.

    Args:
        saliency: Modality -> (B,) saliency (see ``msd_saliency``); in ``fixed`` mode only its keys and
            batch size are used.
        mode: ``sample`` normalises each sample's saliencies; ``dataset`` normalises the saliencies
            averaged over all given samples (pass the whole dataset's, or the batch's), so every sample gets
            the same weights; ``fixed`` normalises the user's ``fixed`` weights.
        fixed: Modality -> non-negative weight, for ``mode="fixed"``.

    Returns:
        Modality -> (B,) weights. Where all saliencies are zero the modalities get equal weights.
    """
    names = list(saliency)
    s = torch.stack([saliency[m].float() for m in names])  # (M, B)
    if mode == "dataset":
        s = s.mean(dim=1, keepdim=True).expand_as(s)
    elif mode == "fixed":
        if fixed is None or set(fixed) != set(names):
            raise MmkdError(f"--loss-option msd_fixed: fixed mode needs one weight for each of {', '.join(names)}")
        w = torch.tensor([float(fixed[m]) for m in names], device=s.device)
        if (w < 0).any() or w.sum() <= 0:
            raise MmkdError("--loss-option msd_fixed: fixed weights must be non-negative with a positive sum")
        s = w[:, None].expand_as(s)
    elif mode != "sample":
        raise MmkdError(f"--loss-option msd_mode={mode!r}: choose one of {', '.join(MSD_MODES)}")
    total = s.sum(dim=0, keepdim=True)
    w = torch.where(total > 0, s / total.clamp_min(1e-12), torch.full_like(s, 1.0 / len(names)))
    return {m: w[i] for i, m in enumerate(names)}


_MSD_BASES: dict[str, Callable[..., Tensor]] = {f.__name__: f for f in (pooled_mse, pooled_cosine, mse_cosine)}


def _msd_base(base: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    fn = _MSD_BASES.get(base) if isinstance(base, str) else base
    if fn is None:
        raise MmkdError(f"--loss-option msd_base={base!r}: choose one of {', '.join(_MSD_BASES)}")
    return fn


def msd_loss(
    student_by_modality: Mapping[str, Tensor],
    teacher_by_modality: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    base: str | Callable[..., Tensor] = "pooled_mse",
) -> Tensor:
    """Σ_m w_m · L(s_m, t_m) per sample, averaged over the batch.

    Args:
        student_by_modality: Modality m -> (B, E) student output given m alone.
        teacher_by_modality: Modality m -> (B, E) teacher output given m alone.
        weights: Modality m -> (B,) weights (see ``msd_weights``); treated as constants.
        base: ``pooled_mse``, ``pooled_cosine``, ``mse_cosine`` or a function accepting
            ``(pred, target, reduction="none")``.
    """
    if set(student_by_modality) != set(teacher_by_modality) or set(weights) != set(student_by_modality):
        raise MmkdError("msd: student outputs, teacher outputs and weights must name the same modalities")
    fn = _msd_base(base)
    per_sample = sum(
        weights[m].detach().float() * fn(student_by_modality[m], teacher_by_modality[m], reduction="none")
        for m in student_by_modality
    )
    return per_sample.mean()


# ---- named terms and their weighted sum -------------------------------------------------------------


@dataclass
class LossInputs:
    """What the loss terms read for one batch: the student's predictions paired with the teacher's targets.

    Every field but ``mask`` is optional; a term that needs a missing one is an MmkdError naming it.

    Attributes:
        mask: (B, T) bool, True at valid time steps.
        tokens: (B, T, D) the student's per-token prediction.
        tokens_target: (B, T, D) the teacher's per-token targets.
        pooled: The student's (B, E) embedding, or modality -> (B, E) for a multimodal student.
        pooled_target: The teacher's (B, E) whole-sample target, or (a two-tower teacher's store) modality ->
            (B, E), each student tower regressing its own.
        bank: (M, E) teacher targets of other samples: extra negatives for contrastive_kd.
        logit_scale: itc's learnable log inverse temperature.
        caption_ids: (B, T) integer ids of each pair's caption, for itc (pairs with the same caption match).
        teacher_by_modality: msd: modality m -> (B, E), the teacher given m alone.
        msd_weights: msd: modality m -> (B,) weights, used as given.
        msd_saliency: msd: modality m -> (B,) saliency, as a joint store holds it.
        teacher_without: msd: modality m -> (B, E), the teacher with m removed (saliency computed from it).
        msd_dataset_saliency: msd: modality m -> the whole store's mean saliency, for ``msd_mode=dataset``.
        joint: msd: (B, E) the student's output on the joint input, regressed on ``pooled_target``.
    """

    mask: Tensor | None = None
    tokens: Tensor | None = None
    tokens_target: Tensor | None = None
    pooled: Tensor | Mapping[str, Tensor] | None = None
    pooled_target: Tensor | Mapping[str, Tensor] | None = None
    bank: Tensor | None = None
    logit_scale: Tensor | None = None
    caption_ids: Tensor | None = None
    teacher_by_modality: Mapping[str, Tensor] | None = None
    msd_weights: Mapping[str, Tensor] | None = None
    msd_saliency: Mapping[str, Tensor] | None = None
    teacher_without: Mapping[str, Tensor] | None = None
    msd_dataset_saliency: Mapping[str, float] | None = None
    joint: Tensor | None = None

    @classmethod
    def of(cls, batch: LossInputs | Mapping[str, Any]) -> LossInputs:
        """``batch`` itself, or the LossInputs of a mapping with the same field names (unknown keys are an
        MmkdError)."""
        if isinstance(batch, LossInputs):
            return batch
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(batch) - known)
        if unknown:
            raise MmkdError(f"loss inputs: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**batch)


LOSSES: Registry[Callable[[LossInputs, Mapping[str, Any]], Tensor]] = Registry("loss")

# Options the terms read, with their defaults; build_loss(..., name=value) overrides them.
DEFAULT_OPTIONS: dict[str, Any] = {
    "temperature": 0.05,  # contrastive_kd
    "itc_temperature": 0.07,  # itc, when the batch has no learnable logit_scale
    "symmetric": False,  # contrastive_kd
    "margin": 0.2,  # triplet
    "cos_weight": 1.0,  # mse_cosine, and msd with msd_base=mse_cosine
    "sim_temperature": 0.05,  # sim_kd
    "msd_mode": "sample",  # msd weights: sample, dataset or fixed (see msd_weights)
    "msd_fixed": None,  # msd_mode=fixed: modality -> weight, e.g. {"image": 0.5, "text": 0.5}
    "msd_base": "pooled_mse",
    "msd_joint": 1.0,  # weight of msd's joint term L(s_joint, t) (0: the modality terms alone)
    # the pooled target L2-normalised before every term reads it: a sentence-transformers teacher's stored
    # ``teacher_mean`` then becomes its ``teacher_embed`` (the normalised embedding), from the same store
    "pooled_target_norm": False,
}


def _get(b: LossInputs, term: str, *keys: str) -> list[Any]:
    values = [getattr(b, k) for k in keys]
    missing = [k for k, v in zip(keys, values, strict=True) if v is None]
    if missing:
        raise MmkdError(f"--loss {term}: the batch lacks {', '.join(missing)}")
    return values


def _each_student(b: LossInputs, term: str, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Apply a pooled term to every student modality against its teacher target, and average: the one
    target, or (a two-tower teacher) the target of the same modality."""
    pooled, target = _get(b, term, "pooled", "pooled_target")
    students = pooled if isinstance(pooled, Mapping) else {"": pooled}
    if isinstance(target, Mapping):
        if b.bank is not None and term == "contrastive_kd":
            raise MmkdError("--loss contrastive_kd: a two-tower store has a target per tower; use --bank-size 0")
        return torch.stack([fn(s, target[m]) for m, s in students.items()]).mean()
    return torch.stack([fn(s, target) for s in students.values()]).mean()


def _sim_kd_term(b: LossInputs, o: Mapping[str, Any]) -> Tensor:
    pooled, target = _get(b, "sim_kd", "pooled", "pooled_target")
    if not isinstance(target, Mapping) or not isinstance(pooled, Mapping):
        raise MmkdError("--loss sim_kd: needs a two-tower teacher's store (--teacher clip --teacher-option tower=both)")
    return similarity_kd(pooled["image"], pooled["text"], target["image"], target["text"], o["sim_temperature"])


def _itc_term(b: LossInputs, o: Mapping[str, Any]) -> Tensor:
    (pooled,) = _get(b, "itc", "pooled")
    if not isinstance(pooled, Mapping) or not {"image", "text"} <= set(pooled):
        raise MmkdError("--loss itc: needs student embeddings for both 'image' and 'text'")
    # the same caption is recognised by its token ids, so a teacher-free (CLIP-style) run uses no teacher at all
    return itc(pooled["image"], pooled["text"], o["itc_temperature"], b.logit_scale, b.caption_ids)


# what the msd term needs and where it comes from, for the one-line error when it is missing
MSD_MISSING = (
    "--loss msd: the batch lacks teacher_by_modality (the teacher's output given each modality alone); "
    "only a joint teacher's store has it: mmkd-extract --teacher flava --pooled-only over image-caption data"
)


def _msd_batch_weights(b: LossInputs, o: Mapping[str, Any]) -> dict[str, Tensor]:
    """Weights by ``msd_mode``: from the batch's per-sample saliency (``msd_saliency``, else computed from
    ``teacher_without``); ``dataset`` uses ``msd_dataset_saliency`` (the whole store's mean) when given."""
    saliency = b.msd_saliency
    if saliency is None:
        t_full, t_without = _get(b, "msd", "pooled_target", "teacher_without")
        saliency = msd_saliency(t_full, t_without)
    overall = b.msd_dataset_saliency
    if o["msd_mode"] == "dataset" and overall is not None:
        n = len(next(iter(saliency.values())))
        saliency = {m: torch.as_tensor(overall[m], dtype=torch.float32).reshape(-1).expand(n) for m in saliency}
    return msd_weights(saliency, o["msd_mode"], o["msd_fixed"])


def _msd_term(b: LossInputs, o: Mapping[str, Any]) -> Tensor:
    """MSD's L(s_joint, t) + Σ_m w_m L(s_m, t_m), as the MSD paper adds its modality terms to the joint KD
    term; the joint term only when the batch has the student's ``joint`` output (joint teachers' stores)."""
    if b.teacher_by_modality is None:
        raise MmkdError(MSD_MISSING)
    pooled, teacher = _get(b, "msd", "pooled", "teacher_by_modality")
    weights = b.msd_weights
    if weights is None:
        weights = _msd_batch_weights(b, o)
    base = _msd_base(o["msd_base"])
    if o["msd_base"] == "mse_cosine":  # the same cos_weight as the mse_cosine term
        base = lambda p, t, reduction: mse_cosine(p, t, cos_weight=o["cos_weight"], reduction=reduction)  # noqa: E731
    loss = msd_loss(pooled, teacher, weights, base)
    if b.joint is not None and o["msd_joint"]:
        joint, target = _get(b, "msd", "joint", "pooled_target")
        loss = loss + float(o["msd_joint"]) * base(joint, target, reduction="none").mean()
    return loss


def _pooled(name: str, fn: Callable[[Tensor, Tensor, LossInputs, Mapping[str, Any]], Tensor]) -> Callable:
    return lambda b, o: _each_student(b, name, lambda s, t: fn(s, t, b, o))


# the terms that compare time step with time step (they need the student's tokens to be the teacher's)
TOKEN_TERMS = ("token_mse", "cls_mse")
LOSSES.register("token_mse", "d2v")(lambda b, o: token_mse(*_get(b, "token_mse", "tokens", "tokens_target", "mask")))
LOSSES.register("cls_mse")(lambda b, o: cls_mse(*_get(b, "cls_mse", "tokens", "tokens_target")))
LOSSES.register("pooled_mse", "mse")(_pooled("pooled_mse", lambda s, t, b, o: pooled_mse(s, t)))
LOSSES.register("pooled_cosine", "cosine")(_pooled("pooled_cosine", lambda s, t, b, o: pooled_cosine(s, t)))
LOSSES.register("mse_cosine")(_pooled("mse_cosine", lambda s, t, b, o: mse_cosine(s, t, cos_weight=o["cos_weight"])))
LOSSES.register("contrastive_kd", "ckd")(
    _pooled("contrastive_kd", lambda s, t, b, o: contrastive_kd(s, t, o["temperature"], b.bank, None, o["symmetric"]))
)
# triplet anchor: the student embedding; positive: its teacher target; negative: the hardest other target
LOSSES.register("triplet")(_pooled("triplet", lambda s, t, b, o: triplet(s, t, margin=o["margin"])))
LOSSES.register("itc")(_itc_term)
LOSSES.register("sim_kd", "similarity_kd")(_sim_kd_term)
LOSSES.register("msd")(_msd_term)


def _flag(value: Any) -> bool:
    """A boolean option given as a bool or as the text of ``--loss-option KEY=VALUE``."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise MmkdError(f"loss option value {value!r}: give true or false")
        return value.lower() in ("true", "1")
    return bool(value)


class CombinedLoss:
    """A weighted sum of named loss terms.

    Called with one batch's :class:`LossInputs` (or a mapping of its field names); each term reads the fields
    it needs (a missing one is an MmkdError):

    - ``tokens``, ``tokens_target`` and ``mask``: per-token terms (token_mse, cls_mse).
    - ``pooled`` and ``pooled_target``: pooled terms (pooled_mse, pooled_cosine, mse_cosine, contrastive_kd,
      triplet) compare every student modality with the target and average over modalities; itc needs
      ``pooled["image"]`` and ``pooled["text"]``.
    - optional ``bank`` for contrastive_kd, ``logit_scale`` and ``caption_ids`` for itc.
    - msd: ``teacher_by_modality`` and either ``msd_weights``, or ``msd_saliency`` or ``teacher_without`` to
      compute them by ``msd_mode``; ``msd_dataset_saliency`` for ``msd_mode=dataset`` (else the batch's
      mean); optional ``joint``, regressed on ``pooled_target`` with weight ``msd_joint`` (train/msd.py
      supplies all of these for a joint teacher's store).

    Args:
        weights: Term name (or alias) -> positive weight.
        **options: Overrides of ``DEFAULT_OPTIONS``.
    """

    def __init__(self, weights: Mapping[str, float], **options: Any) -> None:
        if not weights:
            raise MmkdError("--loss: give at least one term, e.g. token_mse=1,pooled_mse=1")
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise MmkdError(f"loss option {unknown[0]!r} is unknown; known: {', '.join(DEFAULT_OPTIONS)}")
        self.options = {**DEFAULT_OPTIONS, **options}
        self.options["pooled_target_norm"] = _flag(self.options["pooled_target_norm"])
        self.weights: dict[str, float] = {}
        for name, w in weights.items():
            if name not in LOSSES:
                raise MmkdError(f"--loss: unknown term {name!r}; known: {', '.join(LOSSES.names())}")
            key = LOSSES.canonical(name)
            if key in self.weights:
                raise MmkdError(f"--loss: term {key!r} is given twice")
            if not float(w) > 0:
                raise MmkdError(f"--loss {name}={w}: weights must be positive (leave the term out instead)")
            self.weights[key] = float(w)

    def __call__(self, batch: LossInputs | Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Returns the weighted total and each term's unweighted value as a float (for logging)."""
        total: Tensor | float = 0.0
        values: dict[str, float] = {}
        batch = LossInputs.of(batch)
        if self.options["pooled_target_norm"] and batch.pooled_target is not None:
            batch = dataclasses.replace(batch, pooled_target=F.normalize(batch.pooled_target.float(), dim=-1))
        for name, w in self.weights.items():
            value = LOSSES.get(name)(batch, self.options)
            total = total + w * value
            values[name] = float(value.detach())
        return total, values


def teachers_loss(
    loss: CombinedLoss, inputs: Mapping[str, LossInputs], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """A student against several teachers: Σ_t w_t · loss(inputs[t]), each teacher's terms on the student's
    heads for that teacher and that teacher's targets.

    A teacher of weight 0 is computed and logged but left out of the sum: its heads get no gradient, so AdamW
    leaves them untouched (weight decay included).

    Args:
        loss: The terms every teacher is trained with.
        inputs: Teacher name -> its LossInputs.
        weights: Teacher name -> its weight (0 or more; one for every teacher of ``inputs``).

    Returns:
        The weighted total, and per teacher its own total as ``"<teacher>/loss"`` and each term's unweighted
        value as ``"<teacher>/<term>"`` (for logging).
    """
    total: Tensor | float = 0.0
    values: dict[str, float] = {}
    for name, batch in inputs.items():
        w = float(weights[name])
        if not (math.isfinite(w) and w >= 0):
            raise MmkdError(f"teacher {name}: weight {w}: a teacher's weight is a finite number, 0 or more")
        value, terms = loss(batch)
        if w > 0:
            total = total + w * value
        values[f"{name}/loss"] = float(value.detach())
        values.update({f"{name}/{term}": v for term, v in terms.items()})
    if not torch.is_tensor(total):
        raise MmkdError(f"every teacher ({', '.join(inputs)}) has weight 0: nothing to train")
    return total, values


def parse_loss_spec(text: str) -> dict[str, float]:
    """Parse ``"token_mse=1,pooled_cosine=0.5"``; a bare name means weight 1."""
    spec: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name in spec:
            raise MmkdError(f"--loss: term {name!r} is given twice")
        try:
            spec[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise MmkdError(f"--loss {part!r}: the weight after '=' must be a number") from None
    return spec


def build_loss(spec: str | Mapping[str, float], **options: Any) -> CombinedLoss:
    """A ``CombinedLoss`` from a spec string or a name -> weight mapping (see ``CombinedLoss``)."""
    return CombinedLoss(parse_loss_spec(spec) if isinstance(spec, str) else spec, **options)
