"""Saving and loading students.

An exported student gives the embedding ``mmkd-eval`` scores when its own ecosystem's library loads it,
without mmkd:

- **text**: a sentence-transformers directory around the student's transformers encoder (``BertModel``,
  ``MPNetModel``, ... the architecture it was cut from): Transformer -> Pooling
  (the student's ``mean`` or ``cls``) -> Dense (the trained pooled projection, identity activation) ->
  Normalize. ``SentenceTransformer(DIR).encode(texts)`` is the (unit-length) embedding mmkd evaluates;
  ``AutoModel.from_pretrained(DIR)`` loads the encoder alone (``last_hidden_state``).
- **vit / beit**: a timm directory whose classifier head *is* the pooled projection:
  ``timm.create_model("local-dir:DIR", pretrained=True)(x)`` is the student's pooled prediction (teacher
  space, not normalised) and after ``reset_classifier(0)`` the pooled features. Settings timm cannot
  reproduce exactly (a beit student with ``pool="mean"``: timm's Beit averages the patch tokens without
  CLS; a final norm timm applies after pooling) are exported as features only (``num_classes=0``), with a
  warning; the pooled projection then stays in ``mmkd_heads.safetensors``.
- **multimodal**: no outside format; :func:`load_multimodal` returns ``(model, image_transform, tokenizer)``
  as open_clip's ``create_model_and_transforms`` does.
- **data2vec2**: no outside format either (timm and transformers have no post-norm ViT): the whole student
  as one safetensors state dict, its preprocessing in ``mmkd_student.json``; :func:`load_student` rebuilds it.

Beside the library files go ``mmkd_student.json`` (name, resolved config, init provenance, versions, where
each part lives) and, when there is one, ``mmkd_heads.safetensors`` with the heads the library format has no
place for (the token head). ``load_student`` reads them to rebuild the whole student. Directories of
format version 1 (every head in ``mmkd_heads.safetensors``) still load.

Modules, one per target library: :mod:`.sentence_transformers` (text), :mod:`.timm` (vit, beit), :mod:`.native`
(mmkd's own: multimodal, data2vec2) and :mod:`.loading`; :mod:`.common` holds what they share. Which format a
kind is saved in is the kind's own fact (``mmkd_core.students.kinds``).
"""

from __future__ import annotations

from .common import HEADS_FILE, META_FILE, STATE_FILE, text_max_length
from .loading import (
    ImageTransform,
    StudentTokenizer,
    load_exported_vit,
    load_multimodal,
    load_student,
    read_meta,
    saved_image_preprocess,
    saved_max_length,
)
from .native import save_native
from .save import save_student
from .sentence_transformers import save_text_student
from .timm import save_vit_student, timm_architecture

__all__ = [
    "HEADS_FILE",
    "META_FILE",
    "STATE_FILE",
    "ImageTransform",
    "StudentTokenizer",
    "load_exported_vit",
    "load_multimodal",
    "load_student",
    "read_meta",
    "save_native",
    "save_student",
    "save_text_student",
    "save_vit_student",
    "saved_image_preprocess",
    "saved_max_length",
    "text_max_length",
    "timm_architecture",
]
