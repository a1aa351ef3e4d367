"""Students: small trainable models that regress cached teacher targets.

``create_student(name, **config)`` is the one entry point; ``list_students()`` names what it knows. Every
student's ``forward(pixel_values=None, input_ids=None, attention_mask=None)`` returns a StudentOutput.

Saved students (``save_student``) load in their own ecosystem: a text student with
``SentenceTransformer(DIR)`` (or ``AutoModel`` for the encoder), a vit/beit student with
``timm.create_model("local-dir:DIR", pretrained=True)``, a multimodal student with
``load_multimodal(DIR) -> (model, image_transform, tokenizer)``; ``load_student(DIR)`` rebuilds any of them
(and the data2vec2 student, which no library has the post-norm ViT of) with all its prediction heads.
"""

from __future__ import annotations

from typing import Any

from . import data2vec2, multimodal, text, vision  # noqa: F401  (register the students)
from .base import STUDENTS, HeadConfig, PredictionHeads, Student, StudentOutput
from .data2vec2 import Data2Vec2Student, Data2Vec2StudentConfig, load_data2vec2
from .export import (
    ImageTransform,
    StudentTokenizer,
    load_exported_vit,
    load_multimodal,
    load_student,
    save_student,
    save_text_student,
    save_vit_student,
)
from .multimodal import MultimodalStudent, MultimodalStudentConfig
from .text import TextStudent, TextStudentConfig
from .vision import BeitStudent, BeitStudentConfig, TimmStudent, VitStudent, VitStudentConfig

__all__ = [
    "STUDENTS",
    "BeitStudent",
    "BeitStudentConfig",
    "Data2Vec2Student",
    "Data2Vec2StudentConfig",
    "HeadConfig",
    "ImageTransform",
    "MultimodalStudent",
    "MultimodalStudentConfig",
    "PredictionHeads",
    "Student",
    "StudentOutput",
    "StudentTokenizer",
    "TextStudent",
    "TextStudentConfig",
    "TimmStudent",
    "VitStudent",
    "VitStudentConfig",
    "create_student",
    "list_students",
    "load_data2vec2",
    "load_exported_vit",
    "load_multimodal",
    "load_student",
    "save_student",
    "save_text_student",
    "save_vit_student",
]


def create_student(name: str, **config: Any) -> Student:
    """Build a student in train mode.

    Args:
        name: A registered student (see :func:`list_students`): ``text``, ``vit``, ``beit``, ``data2vec2``,
            ``multimodal``.
        **config: The student's config fields plus its init options (``init``, ``init_from``, ... — see each
            factory's docstring).

    Raises:
        MmkdError: Unknown student or option, contradicting options, an init model that does not fit.
    """
    return STUDENTS.get(name)(**config)


def list_students(pattern: str = "*") -> list[str]:
    """Registered student names matching a glob pattern."""
    return STUDENTS.names(pattern)
