"""Student kinds: one entry per kind, all of its facts in its own module (timm's rule).

A :class:`StudentKind` holds the kind's training defaults, default loss, init rules, builder (store and run
options -> student and what feeds it) and exporter. ``STUDENT_KINDS.get(name)`` looks one up:

- ``text`` (:mod:`.text`), ``vit`` and ``beit`` (:mod:`.image`), ``data2vec2`` (:mod:`.data2vec2`),
  ``multimodal`` (:mod:`.multimodal`) are registered here;
- ``joint``, the multimodal student of a joint teacher's store trained with MSD, is registered by the training
  stage (``mmkd.train.msd``), whose loss inputs it needs.
"""

from __future__ import annotations

from ...registry import Registry
from .base import BuildOptions, Built, Context, StudentKind
from .data2vec2 import DATA2VEC2
from .image import BEIT, VIT
from .multimodal import MULTIMODAL
from .text import TEXT

STUDENT_KINDS: Registry[StudentKind] = Registry("student kind")
_LISTED = (TEXT, VIT, BEIT, DATA2VEC2, MULTIMODAL)  # the order --help lists them in
for _kind in _LISTED:
    STUDENT_KINDS.register(_kind.name)(_kind)


def kind_names() -> list[str]:
    """The kinds ``--student`` may name, in the order --help lists them."""
    return [k.name for k in _LISTED if k.selectable]


__all__ = ["STUDENT_KINDS", "BuildOptions", "Built", "Context", "StudentKind", "kind_names"]
