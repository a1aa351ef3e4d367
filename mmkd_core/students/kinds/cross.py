"""A text student whose tokenizer is not the store's.

A student cut from another pretrained model than the store's teacher (``--init minilm-l6`` for an
``mpnet-base`` store) has its own vocabulary: the store's token ids mean nothing to it. It reads the store's
source texts (each sample's ``index`` into the dataset the store records, checked against its fingerprint)
through its own tokenizer, as ``mmkd-eval`` and sentence-transformers will feed its export, and learns the
whole-sentence targets only: the teacher's per-token targets belong to another tokenizer's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from ...errors import MmkdError
from ..export.common import StudentTokenizer
from .base import Context

logger = logging.getLogger(__name__)

# the loss terms that still apply when the student's tokens are not the teacher's
WHOLE_SAMPLE_TERMS = "pooled_cosine, pooled_mse, mse_cosine, contrastive_kd, triplet"


def tokenizer_record(preprocess: Any) -> dict[str, Any]:
    """What identifies a tokenizer in a text preprocessing record (a TextPreprocess, or a store's
    ``preprocess`` attribute): its class, vocabulary size and the sha256 of its files."""
    d = asdict(preprocess) if is_dataclass(preprocess) else dict(preprocess or {})
    extra = d.get("extra") or {}
    return {"tokenizer": d.get("tokenizer"), "vocab_size": extra.get("vocab_size"), "files": extra.get("files_sha256")}


def _name(r: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """A tokenizer as a user tells it from ``other``: class and vocabulary, and its files' hash where those agree."""
    same = (r["tokenizer"], r["vocab_size"]) == (other["tokenizer"], other["vocab_size"])
    files = f", files sha256 {str(r['files'])[:12]}" if same else ""
    return f"{r['tokenizer']}, vocab {r['vocab_size']}{files}"


def tokenizer_mismatch(own: Any, store_preprocess: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(the student's tokenizer, the store's)`` as one-line names when they differ, else None.

    Args:
        own: The student's TextPreprocess (its init model's ``preprocess``).
        store_preprocess: The store's (or caption store's) ``preprocess`` attribute.
    """
    mine, theirs = tokenizer_record(own), tokenizer_record(store_preprocess)
    return None if mine == theirs else (_name(mine, theirs), _name(theirs, mine))


def refuse_other_tokenizer(model: Any, stored: Mapping[str, Any], flag: str, whose: str) -> None:
    """A text tower of a caption or pair store reads the stored caption ids: refuse, in one line naming both, an
    init model whose tokenizer is not the one they were stored under.

    Args:
        model: The text init model (a Teacher with ``preprocess``).
        stored: The ``preprocess`` attribute the caption ids were stored under.
        flag: The option that named the model, for the message.
        whose: Whose ids they are, for the message ("the store's", "the captions'").
    """
    names = tokenizer_mismatch(model.preprocess, stored) if getattr(model, "preprocess", None) else None
    if names is not None:
        raise MmkdError(
            f"{flag}: its tokenizer ({names[0]}) is not {whose} ({names[1]}); its text tower would read the stored "
            "caption ids as words of another vocabulary: use a model with their tokenizer, extract the captions "
            "under this one, or use --init random"
        )


def own_tokenizer_fields(ctx: Context) -> dict[str, Any]:
    """Built fields of a text student: none beyond ``source=None`` when its init model's tokenizer is the
    store's; else the source dataset, a loader that retokenises its texts, the student's own length and why
    per-token terms do not apply.

    Raises:
        MmkdError: A pair store (its captions are stored under the teacher's tokenizer), or a source dataset
            that is missing or not the one the store was extracted from (one line naming it).
    """
    model = ctx.init_model
    if getattr(model, "tokenizer", None) is None or getattr(model, "preprocess", None) is None:
        return {"source": None}
    names = tokenizer_mismatch(model.preprocess, ctx.attrs["preprocess"])
    if names is None:
        return {"source": None}
    mine, theirs = names
    flag = f"--init {ctx.cfg.init}"
    if ctx.attrs["dataset"].get("modality") != "text":
        raise MmkdError(
            f"{flag}: its tokenizer ({mine}) is not the store's ({theirs}); a student with its own tokenizer "
            f"reads a text store's sentences, and {ctx.reader.path} holds {ctx.attrs['dataset'].get('modality')} "
            "samples: use --init teacher or --init random"
        )
    try:
        source = ctx.dataset()
    except MmkdError as e:
        raise MmkdError(f"{flag}: the student reads the store's source texts through its own tokenizer: {e}") from None
    length = int(model.max_length)
    logger.info(
        "%s: its tokenizer (%s) is not the store's (%s): the student reads the source texts of %s through its own "
        "(up to %d tokens) and learns the whole-sentence targets only",
        flag,
        mine,
        theirs,
        ctx.attrs["dataset"]["name"],
        length,
    )
    return {
        "source": source,
        "loader_options": {"retokenize": StudentTokenizer(model.tokenizer, length)},
        "max_seq_length": length,
        "whole_sample_only": (
            f"the student's tokenizer ({mine}) is not the store's ({theirs}), so its tokens are not the "
            f"teacher's: only whole-sentence terms apply ({WHOLE_SAMPLE_TERMS})"
        ),
    }
