"""A student trained against several teachers of one store (RADIO-style adaptor heads).

The student's own ``heads`` predict the first teacher's targets; each further teacher gets prediction heads of
its own on the same blocks (``student.teacher_heads[name]``): a pooled head from the student's width to that
teacher's pooled width and, where that teacher's tokens are the student's, a token head to its token width.
Every head sees the same forward pass; ``StudentOutput.teachers`` carries the further heads' predictions.

:func:`with_teacher_head` gives the student as one teacher's: the same blocks with that teacher's heads as its
``heads``, which is what is exported for that teacher (``save_student`` writes one directory per teacher).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

from torch import nn

from ..errors import MmkdError
from .base import HeadConfig, PredictionHeads, Student


def add_teacher_heads(student: Student, heads: Mapping[str, HeadConfig]) -> None:
    """Give ``student`` prediction heads for each further teacher (``heads``: name -> their settings).

    Raises:
        MmkdError: The student has no place for further heads (only text students have one).
    """
    own = getattr(student, "teacher_heads", None)
    if not isinstance(own, nn.ModuleDict):
        raise MmkdError(
            f"a {student.name} student cannot be trained against several teachers (only text students have "
            "heads for further teachers)"
        )
    for name, config in heads.items():
        if name in own:
            raise MmkdError(f"the student already has heads for teacher {name!r}")
        config.check_heads()
        own[name] = PredictionHeads(student.width, student.num_layers, config)


def teacher_head_names(student: Student) -> list[str]:
    """The further teachers ``student`` has heads for (none: a student of one teacher)."""
    own = getattr(student, "teacher_heads", None)
    return list(own) if isinstance(own, nn.ModuleDict) else []


def with_teacher_head(student: Student, name: str) -> Student:
    """``student`` as teacher ``name``'s: the same modules, shared, not copied, with that teacher's heads as
    its ``heads`` and their settings in its config, and no further heads. Its forward's ``pooled`` is the
    prediction of that teacher's pooled target; saving it writes a student of that teacher alone.

    Raises:
        MmkdError: The student has no heads for ``name`` (the message lists those it has).
    """
    names = teacher_head_names(student)
    if name not in names:
        raise MmkdError(f"the student has no heads for teacher {name!r}; it has further heads for: {', '.join(names)}")
    heads = student.teacher_heads[name]
    view = copy.copy(student)  # a new module object; its _modules is replaced below, never shared in place
    view._modules = {**student._modules, "heads": heads, "teacher_heads": nn.ModuleDict()}
    view.config = dataclasses.replace(student.config, **dataclasses.asdict(heads.settings))
    return view
