"""Agreement with a reference model (``--task agreement``): on the texts of a dataset (held-out sentences, say),
how closely the model's embeddings reproduce the reference's (``--teacher``): their cosine, and whether each
text's nearest neighbours among the others are the same under both."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mmkd_core.errors import MmkdError
from mmkd_core.metrics import embedding_agreement

from ..encoders import Encoder, load_encoder
from .base import EVAL_TASKS, open_dataset, spread

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "text"
DEFAULT_LIMIT = 5000  # texts per split: n² similarities, 100 MB of them at 5,000


def eval_agreement(encoder: Encoder, reference: Encoder, texts: list[str], *, batch_size: int = 64) -> dict[str, float]:
    """:func:`mmkd_core.metrics.embedding_agreement` of ``encoder`` to ``reference`` on ``texts``."""
    encoder.require("text", "agreement")
    reference.require("text", "agreement reference")
    return embedding_agreement(encoder.encode_text(texts, batch_size), reference.encode_text(texts, batch_size))


def dataset_texts(name: str, root: str | None, split: str, options: dict | None, limit: int | None) -> list[str]:
    """``limit`` texts (default 5,000) spread evenly over a dataset's split (one that has none: one line)."""
    ds = open_dataset(name, root, split, options)
    return [ds.text(i) for i in spread(len(ds), limit or DEFAULT_LIMIT)]


@EVAL_TASKS.register("agreement")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """Each dataset of ``cfg`` (default: ``text`` over ``--data-root``), evenly spread ``--limit`` texts (default
    5,000), against ``--teacher``."""
    if not cfg.teacher:
        raise MmkdError("--task agreement needs the reference model: pass --teacher NAME|DIR")
    reference = load_encoder(cfg.teacher, cfg.teacher_weights, device=cfg.device)
    reference.show_progress = cfg.show_progress
    results = {}
    for name, root in cfg.dataset_roots(DEFAULT_DATASET):
        for split in cfg.splits or ["train"]:
            texts = dataset_texts(name, root, split, cfg.dataset_options, cfg.limit)
            logger.info("agreement on %s/%s: %d texts", name, split, len(texts))
            part = eval_agreement(encoder, reference, texts, batch_size=cfg.batch_size)
            results.update({f"agreement/{name}/{split}/{k}": v for k, v in part.items()})
    return results
