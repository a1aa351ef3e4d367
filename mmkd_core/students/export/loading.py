"""Loading saved students: the whole student (:func:`load_student`), an image student's timm model alone, and
a multimodal student with its preprocessing (:func:`load_multimodal`, as open_clip's
``create_model_and_transforms``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import MmkdError
from ..base import Student
from ..multimodal import MultimodalStudent
from ..text import TextStudent
from ..vision import TimmStudent
from .common import (
    HEADS_FILE,
    META_FILE,
    POOLED_PREFIX,
    READABLE_VERSIONS,
    STATE_FILE,
    TEACHERS_DIR,
    WEIGHTS_FILE,
    StudentTokenizer,
    load_tensors,
    text_max_length,
)


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MmkdError(f"{what}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``mmkd_student.json`` of a saved student, checked for a format version this mmkd reads."""
    meta_file = Path(directory) / META_FILE
    if not meta_file.is_file():
        raise MmkdError(f"{directory} is not a saved student: {META_FILE} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise MmkdError(
            f"{meta_file}: format_version {meta.get('format_version')!r}; this mmkd reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    from ..kinds import STUDENT_KINDS  # the kinds name their exporters, which import this package

    if meta.get("student") not in STUDENT_KINDS:
        raise MmkdError(f"{meta_file}: unknown student {meta.get('student')!r}")
    return meta


def _head_state(directory: Path, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every head parameter: ``mmkd_heads.safetensors`` plus, from format 2, the pooled projection where
    the library format keeps it (``state``: the timm weights, already read)."""
    files = meta.get("files", {})
    heads = load_tensors(directory / HEADS_FILE) if meta["format_version"] == 1 or "heads" in files else {}
    if meta["format_version"] == 1 or files.get("pooled_head") == HEADS_FILE:
        return heads
    if meta["student"] == "text":
        dense = load_tensors(directory / files["pooled_head"])
        return {**heads, POOLED_PREFIX + "weight": dense["linear.weight"], POOLED_PREFIX + "bias": dense["linear.bias"]}
    return {**heads, POOLED_PREFIX + "weight": state.pop("head.weight"), POOLED_PREFIX + "bias": state.pop("head.bias")}


def teacher_directory(directory: str | Path, teacher: str) -> Path:
    """The student directory of teacher ``teacher``'s heads in a saved student of several teachers: the
    directory itself for its first teacher, ``teachers/<name>`` for the others.

    Raises:
        MmkdError: The saved student has no heads for ``teacher`` (the message lists those it has).
    """
    directory = Path(directory)
    teachers = read_meta(directory).get("teachers") or []
    if teacher not in teachers:
        has = f"it has heads for {', '.join(teachers)}" if teachers else "it was trained against one teacher"
        raise MmkdError(f"{directory}: no heads for teacher {teacher!r}; {has}")
    return directory if teacher == teachers[0] else directory / TEACHERS_DIR / teacher


def load_student(directory: str | Path, teacher: str | None = None) -> Student:
    """Rebuild a student written by :func:`save_student` (or the format-specific savers), in eval mode,
    with all its prediction heads. Exports of format version 1 load too.

    Args:
        directory: The student directory.
        teacher: A student trained against several teachers: whose heads it predicts with (default: its first
            teacher's, the directory's own); the same as loading ``directory/teachers/<name>``.

    Raises:
        MmkdError: Not a student directory, an unknown format version or student, weights that do not fit, or
            no heads for ``teacher``.
    """
    directory = Path(directory) if teacher is None else teacher_directory(directory, teacher)
    meta = read_meta(directory)
    from ..kinds import STUDENT_KINDS

    kind = STUDENT_KINDS.get(meta["student"])
    student = kind.model(kind.config(**meta["config"]))
    student.init_info = meta.get("init", {})
    what = f"{directory}: saved {meta['student']} student"
    if isinstance(student, TextStudent):
        from transformers import AutoModel

        from ...teachers.hf_common import quiet_transformers_load

        with quiet_transformers_load():  # the strict load below reports any key that does not fit
            encoder = AutoModel.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")}
        _strict_load(student.bert, state, what)
        _strict_load(student.heads, _head_state(directory, meta, {}), what)
    elif isinstance(student, TimmStudent):
        state = load_tensors(directory / WEIGHTS_FILE)
        heads = _head_state(directory, meta, state)  # takes the timm classifier (the pooled head) out of state
        _strict_load(student.model, state, what)
        _strict_load(student.heads, heads, what)
    else:
        _strict_load(student, load_tensors(directory / STATE_FILE), what)
    return student.eval()


def load_exported_vit(directory: str | Path) -> nn.Module:
    """The timm model of an exported vit/beit student, built by timm alone (eval mode): the equivalent of
    ``timm.create_model(config["architecture"], pretrained=False, **config["model_args"])`` followed by
    ``load_state_dict`` of ``model.safetensors``. Its forward is the student's pooled prediction (unless the
    export was written as features only; ``mmkd_student.json`` says so in ``timm_head``)."""
    import timm

    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise MmkdError(f"{directory} is not an exported image student: config.json is missing")
    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


class ImageTransform:
    """PIL image -> (C, size, size) float32 tensor: the eval view (view 0 of :mod:`mmkd_core.views`) at the
    size, crop, interpolation, mean and std the student records, which ``mmkd-eval`` applies.

    Attributes:
        preprocess: The ImagePreprocess.
        spec: Its ViewSpec.
    """

    def __init__(self, preprocess: Any) -> None:
        from ...views import view_spec

        self.preprocess = preprocess
        self.spec = view_spec(preprocess)

    def __call__(self, image: Any) -> torch.Tensor:
        from ...views import eval_params, render

        spec = self.spec
        return render(image, eval_params(*image.size, spec.crop_pct, spec.crop_mode), spec)


def saved_max_length(directory: str | Path, student: Student, tokenizer: Any = None) -> int:
    """The text length limit of a saved student: what its export recorded, else (format 1) the smallest of
    its position table and the tokenizer's limit."""
    recorded = read_meta(directory).get("max_seq_length")
    return int(recorded) if recorded else text_max_length(student.config.max_position, tokenizer)


def saved_image_preprocess(directory: str | Path) -> Any:
    """The ImagePreprocess a saved multimodal student records (``save_student(preprocess=...)``), or None."""
    from ...teachers.base import ImagePreprocess

    record = read_meta(directory).get("preprocess")
    if record is None:
        return None
    return ImagePreprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def load_multimodal(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[MultimodalStudent, ImageTransform, StudentTokenizer]:
    """A saved multimodal student with its preprocessing, as open_clip's ``create_model_and_transforms``::

        model, transform, tokenizer = load_multimodal("runs/minilm-l6-shapes-train/student")
        image_emb = model.encode_image(torch.stack([transform(im) for im in images]), normalize=True)
        text_emb = model.encode_text(**tokenizer(["a red circle"]), normalize=True)

    With ``normalize=True`` these are the embeddings ``mmkd-eval`` compares (cosine similarity); without it,
    the raw pooled predictions in the teacher's space.

    Args:
        directory: The student directory (``<run>/student``).
        device: Where the model goes.

    Returns:
        ``(model, image_transform, tokenizer)``: the MultimodalStudent in eval mode, a PIL image -> tensor
        callable (:class:`ImageTransform`) and a texts -> ``{"input_ids", "attention_mask"}`` callable
        (:class:`StudentTokenizer`).

    Raises:
        MmkdError: Not a multimodal student, or no tokenizer / image preprocessing saved beside it.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["student"] != "multimodal":
        raise MmkdError(
            f"{directory} holds a {meta['student']} student, not a multimodal one: load it with load_student "
            "(or sentence-transformers / timm, see mmkd_core.students.export)"
        )
    preprocess = saved_image_preprocess(directory)
    if preprocess is None:
        raise MmkdError(
            f"{directory}: the saved student records no image preprocessing; save it with "
            "save_student(..., preprocess=ImagePreprocess(...))"
        )
    if not (directory / "tokenizer_config.json").is_file():
        raise MmkdError(
            f"{directory}: no tokenizer saved beside the student; save it with save_student(..., tokenizer=...)"
        )
    from ...teachers.hf_common import local_tokenizer

    tokenizer = local_tokenizer(directory, f"{directory}: cannot read the saved tokenizer ({{reason}})")
    student = load_student(directory).to(device)
    tokenize = StudentTokenizer(tokenizer, saved_max_length(directory, student, tokenizer))
    return student, ImageTransform(preprocess), tokenize
