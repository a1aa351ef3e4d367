"""Zero-shot paraphrase retrieval (``--task paraphrase``): the positive pairs of each split, the first 25,000
at most; sentence 1 queries all sentence 2s by cosine similarity and the reverse; recall@1 and @5. On
QQP and MRPC, train and dev, that is 16 numbers; their mean is the headline."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmkd.data import DATASETS, create_dataset
from mmkd.data import PARAPHRASE_FORMATS as FORMATS
from mmkd_core.errors import MmkdError
from mmkd_core.metrics import paraphrase_retrieval, summarize

from ..encoders import Encoder
from .base import EVAL_TASKS

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

MAX_PAIRS = 25000  # the protocol's cap on positive pairs per split
DEFAULT_DATASET = "mrpc"


def _paraphrase_format(dataset: str) -> str:
    name = DATASETS.canonical(dataset)
    if name not in FORMATS:
        raise MmkdError(f"paraphrase retrieval reads {' or '.join(FORMATS)}, not {dataset!r}")
    return name


def available_paraphrase_splits(dataset: str, root: str | Path) -> list[str]:
    """The splits evaluated by default: train and the held-out split, dev — or test when there is no dev
    (the original MRPC release has none; GLUE's test files have no labels) — among those whose file exists.

    Raises:
        MmkdError: ``root`` does not exist, or holds none of the dataset's files.
    """
    name = _paraphrase_format(dataset)
    root = Path(root).expanduser()
    if not root.exists():
        raise MmkdError(f"dataset {dataset!r}: {root} does not exist")
    fmt = FORMATS[name]
    if root.is_file():
        split = next((s for s, files in fmt.files.items() if root.name in files), "train")
        return [split]
    found = {s: [root / d / f for d in fmt.dirs for f in files] for s, files in fmt.files.items()}
    have = [s for s, paths in found.items() if any(p.is_file() for p in paths)]
    held_out = "dev" if "dev" in have else "test"
    splits = [s for s in ("train", held_out) if s in have]
    for s in ("train", held_out):
        if s not in have:
            logger.warning(
                "%s: no %s split under %s (no %s there or in %s); skipped",
                dataset,
                s,
                root,
                " or ".join(fmt.files[s]),
                ", ".join(f"{d}/" for d in fmt.dirs if d),
            )
    if not splits:
        names = sorted({f for files in fmt.files.values() for f in files})
        raise MmkdError(f"dataset {dataset!r}: {root} holds none of {', '.join(names)}")
    return splits


def _paraphrase_results(
    encoder: Encoder,
    dataset: str,
    root: str | None,
    splits: Sequence[str] | None,
    batch_size: int,
    limit: int | None,
    count_duplicates: bool,
) -> dict[str, dict[str, float]]:
    encoder.require("text", "paraphrase retrieval")
    _paraphrase_format(dataset)
    if root is None:
        raise MmkdError(f"paraphrase retrieval on {dataset!r} needs its data: pass --data-root")
    if limit is not None and limit < 1:
        raise MmkdError(f"--limit {limit}: give a positive number of pairs")
    splits = list(splits) if splits else available_paraphrase_splits(dataset, root)
    max_pairs = min(limit or MAX_PAIRS, MAX_PAIRS)
    results = {}
    for split in splits:
        ds = create_dataset(dataset, root, split, max_pairs=max_pairs)
        pairs = ds.pairs()
        s1, s2 = [a for a, _ in pairs], [b for _, b in pairs]
        emb = encoder.encode_text(s1 + s2, batch_size)
        n = len(pairs)
        texts = (s1, s2) if count_duplicates else (None, None)
        results[f"{dataset}/{ds.split}"] = paraphrase_retrieval(emb[:n], emb[n:], *texts)
        logger.info("%s/%s: %d positive pairs", dataset, ds.split, n)
    return results


def eval_paraphrase(
    encoder: Encoder,
    dataset: str = DEFAULT_DATASET,
    root: str | None = None,
    splits: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    count_duplicates: bool = True,
) -> dict[str, float]:
    """Zero-shot paraphrase retrieval: the positive pairs of each split, the first
    25,000 at most; sentence 1 queries all sentence 2s by cosine similarity and the reverse; recall@1 and @5.

    Args:
        encoder: The model.
        dataset: ``mrpc`` or ``qqp``.
        root: The dataset's directory (or one file).
        splits: Splits to evaluate; None: see :func:`available_paraphrase_splits`.
        batch_size: Texts per forward pass.
        limit: Use at most this many pairs per split (below the protocol's 25,000).
        count_duplicates: A gallery sentence whose text equals the true partner's is a hit too: otherwise
            a sentence repeated in the corpus (common in QQP) ties with its partner and always misses.

    Returns:
        ``{dataset}/{split}/s1_to_s2_r1`` (and ``_r5``, ``s2_to_s1_r1``, ``_r5``) per split, and ``mean``.
    """
    return summarize(_paraphrase_results(encoder, dataset, root, splits, batch_size, limit, count_duplicates))


def eval_paraphrase_many(
    encoder: Encoder,
    datasets: Sequence[tuple[str, str | None]],
    splits: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    count_duplicates: bool = True,
) -> dict[str, float]:
    """:func:`eval_paraphrase` over several datasets (e.g. ``[("qqp", root), ("mrpc", root)]``: the
    16-number protocol); ``mean`` is over all of their numbers."""
    if len({name for name, _ in datasets}) != len(datasets):
        raise MmkdError("paraphrase retrieval: a dataset is listed twice")
    results: dict[str, dict[str, float]] = {}
    for name, root in datasets:
        results.update(_paraphrase_results(encoder, name, root, splits, batch_size, limit, count_duplicates))
    return summarize(results)


@EVAL_TASKS.register("paraphrase")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """Every dataset of ``cfg`` together (one ``mean``), on its splits."""
    if cfg.dataset_options:
        raise MmkdError("paraphrase retrieval takes no dataset options (use --limit to use fewer pairs)")
    datasets = cfg.dataset_roots(DEFAULT_DATASET)
    return eval_paraphrase_many(encoder, datasets, cfg.splits, batch_size=cfg.batch_size, limit=cfg.limit)
