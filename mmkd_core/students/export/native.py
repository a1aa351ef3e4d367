"""mmkd's own format, for students no outside library can build (multimodal, data2vec2): the whole student as
one safetensors state dict, its preprocessing in ``mmkd_student.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base import Student
from ..multimodal import MultimodalStudent
from .common import STATE_FILE, save_tensors, save_tokenizer, text_max_length, write_meta


def save_native(
    student: Student,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    preprocess: Any = None,
    max_seq_length: int | None = None,
) -> Path:
    """Write a student as one safetensors state dict with mmkd's metadata (``load_student`` rebuilds it).

    Args:
        student: The student (multimodal or data2vec2; any student loads back this way).
        directory: Created if needed.
        tokenizer: Saved alongside when given.
        preprocess: Image preprocessing, recorded in ``mmkd_student.json``.
        max_seq_length: Multimodal students: the longest caption the student should read, capped by its
            position table and the tokenizer; None: those alone.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(student.state_dict(), directory / STATE_FILE)
    extra = {}
    if isinstance(student, MultimodalStudent):
        extra["max_seq_length"] = text_max_length(student.config.max_position, tokenizer, max_seq_length)
    save_tokenizer(tokenizer, directory, extra.get("max_seq_length"))
    write_meta(student, directory, "mmkd", {"state": STATE_FILE}, preprocess, **extra)
    return directory
