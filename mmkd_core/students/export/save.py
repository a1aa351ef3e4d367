"""Saving any student in the format its kind declares (``StudentKind.export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base import Student


def save_student(
    student: Student,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    preprocess: Any = None,
    max_seq_length: int | None = None,
) -> Path:
    """Write any student: text and vit/beit students in their library's format (see
    :mod:`mmkd_core.students.export`), multimodal and data2vec2 students as one safetensors state dict.

    Args:
        student: The student.
        directory: Created if needed.
        tokenizer: Saved alongside when given (text and multimodal students).
        preprocess: Image preprocessing: in the timm config for vit/beit students (see
            :func:`~mmkd_core.students.export.timm.save_vit_student`), in ``mmkd_student.json`` for multimodal
            and data2vec2 students.
        max_seq_length: Text: the longest input the student should read (e.g. the store's
            ``preprocess.max_length``), capped by its position table and the tokenizer; None: those alone.

    Returns:
        The directory.
    """
    from ..kinds import STUDENT_KINDS  # the kinds name their exporters, which live beside this module

    kind = STUDENT_KINDS.get(student.name)
    return kind.export(student, directory, tokenizer=tokenizer, preprocess=preprocess, max_seq_length=max_seq_length)
