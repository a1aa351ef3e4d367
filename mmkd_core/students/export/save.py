"""Saving any student in the format its kind declares (``StudentKind.export``), with a directory per further
teacher for a student trained against several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import MmkdError
from ..base import Student
from ..teacher_heads import teacher_head_names, with_teacher_head
from .common import META_FILE, TEACHERS_DIR, write_json


def save_student(
    student: Student,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    preprocess: Any = None,
    max_seq_length: int | None = None,
    teacher: str | None = None,
) -> Path:
    """Write any student: text and vit/beit students in their library's format (see
    :mod:`mmkd_core.students.export`), multimodal and data2vec2 students as one safetensors state dict.

    A student trained against several teachers is written with its first teacher's heads in ``directory``
    (loaded as a student of that teacher alone is) and, for each further teacher, a complete student directory
    ``directory/teachers/<name>`` with that teacher's heads (the encoder's weights copied into each: every
    one loads on its own, ``SentenceTransformer(directory/teachers/<name>)`` too). ``mmkd_student.json``
    lists the teachers, the first being the directory's own (``load_student(directory, teacher=NAME)``).

    Args:
        student: The student.
        directory: Created if needed.
        tokenizer: Saved alongside when given (text and multimodal students).
        preprocess: Image preprocessing: in the timm config for vit/beit students (see
            :func:`~mmkd_core.students.export.timm.save_vit_student`), in ``mmkd_student.json`` for multimodal
            and data2vec2 students.
        max_seq_length: Text: the longest input the student should read (e.g. the store's
            ``preprocess.max_length``), capped by its position table and the tokenizer; None: those alone.
        teacher: The name of the teacher the student's own heads predict; needed (and recorded) when the
            student has heads for further teachers.

    Returns:
        The directory.
    """
    from ..kinds import STUDENT_KINDS  # the kinds name their exporters, which live beside this module

    kind = STUDENT_KINDS.get(student.name)
    further = teacher_head_names(student)
    if further and teacher is None:
        raise MmkdError("save_student: the student has heads for further teachers; name its first one (teacher=)")
    options = {"tokenizer": tokenizer, "preprocess": preprocess, "max_seq_length": max_seq_length}
    out = kind.export(student, directory, **options)
    if teacher is None:
        return out
    for name in further:
        head_dir = kind.export(with_teacher_head(student, name), Path(out) / TEACHERS_DIR / name, **options)
        _record_teachers(head_dir, [name])
    _record_teachers(Path(out), [teacher, *further])
    return out


def _record_teachers(directory: Path, teachers: list[str]) -> None:
    """Add the teachers to a saved student's ``mmkd_student.json`` (the first: the directory's own heads)."""
    path = directory / META_FILE
    write_json(path, {**json.loads(path.read_text()), "teacher": teachers[0], "teachers": teachers})
