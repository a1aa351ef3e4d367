"""Evaluation tasks on an :class:`~mmkd.evaluate.encoders.Encoder`: paraphrase retrieval, image–text retrieval,
zero-shot classification, linear probe and the gender–profession bias probe.

Each task reads a dataset, embeds it and hands the embeddings to :mod:`mmkd_core.metrics` (which holds all
the metric math), and returns a flat ``{key: float}`` dict. Keys are ``{dataset}/{split}/{metric}``
(``mrpc/train/s1_to_s2_r1``, ``shapes/test/i2t_r5``, ``cifar10/test/zero_shot_top1``,
``cifar10/test/linear_probe_top1``); paraphrase results add ``mean``, the headline of that protocol; bias
numbers are ``bias/{profession}/{group or diff}`` and ``bias/{statistic}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.data import DATASETS, SourceDataset, create_dataset
from mmkd.data import PARAPHRASE_FORMATS as FORMATS
from mmkd_core.errors import MmkdError
from mmkd_core.metrics import (
    DEFAULT_TEMPLATES,
    bias_probe,
    compare_bias,
    image_text_retrieval,
    linear_probe,
    paraphrase_retrieval,
    plot_bias,
    prompt_embeddings,
    summarize,
    zero_shot,
)
from mmkd_core.versions import library_versions

from .encoders import Encoder, load_encoder

logger = logging.getLogger(__name__)

MAX_PAIRS = 25000  # the protocol's cap on positive pairs per split
BIAS_PLOT = "bias.png"


class LazyImages(Sequence):
    """Images of chosen samples of a dataset, decoded only when indexed (one batch at a time)."""

    def __init__(self, dataset: SourceDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset.image(self.indices[i])


def _open(name: str, root: str | None, split: str, options: dict[str, Any] | None) -> SourceDataset:
    return create_dataset(name, root, split, **(options or {}))


def _spread(n: int, limit: int | None) -> list[int]:
    """``limit`` sample indices spread evenly over 0..n-1 (all when no limit): folder-ordered datasets
    keep every class in a subset."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise MmkdError(f"--limit {limit}: give a positive number of samples")
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


# paraphrase retrieval ----------------------------------------------------------------------------------------


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
    dataset: str = "mrpc",
    root: str | None = None,
    splits: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    count_duplicates: bool = True,
) -> dict[str, float]:
    """Zero-shot paraphrase retrieval (the DESIGN protocol): the positive pairs of each split, the first
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
    sources: Sequence[tuple[str, str | None]],
    splits: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    count_duplicates: bool = True,
) -> dict[str, float]:
    """:func:`eval_paraphrase` over several datasets (e.g. ``[("qqp", root), ("mrpc", root)]``: the
    16-number protocol); ``mean`` is over all of their numbers."""
    if len({name for name, _ in sources}) != len(sources):
        raise MmkdError("paraphrase retrieval: a dataset is listed twice")
    results: dict[str, dict[str, float]] = {}
    for name, root in sources:
        results.update(_paraphrase_results(encoder, name, root, splits, batch_size, limit, count_duplicates))
    return summarize(results)


# image–text retrieval ----------------------------------------------------------------------------------------


def eval_image_text(
    encoder: Encoder,
    dataset: str = "shapes",
    root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    *,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Image→text and text→image retrieval, R@1/5/10.

    Caption sets (COCO, Flickr30k: several captions per image) count any caption of the query image as an
    image→text hit. Datasets with one caption per sample (``shapes``) count any caption whose *text* equals
    the true one, since identical scenes get identical captions; text→image stays strict (the caption's
    own image).

    Args:
        encoder: A model that embeds both images and text.
        dataset: An image–caption dataset.
        root: Its file or directory (``shapes`` needs none).
        split: Split to evaluate.
        limit: Use only the first this many images (with all their captions).
        batch_size: Inputs per forward pass.
        dataset_options: Extra dataset options (e.g. ``{"count": 1000}`` for shapes).

    Returns:
        ``{dataset}/{split}/i2t_r{k}`` and ``t2i_r{k}`` for k in 1, 5, 10.
    """
    encoder.require("image", "image-text retrieval")
    encoder.require("text", "image-text retrieval")
    ds = _open(dataset, root, split, dataset_options)
    if ds.modality != "image_text":
        raise MmkdError(f"image-text retrieval needs an image–caption dataset; {dataset!r} has {ds.modality} samples")
    if limit is not None and limit < 1:
        raise MmkdError(f"--limit {limit}: give a positive number of images")
    if hasattr(ds, "image_id"):
        keep = [i for i in range(len(ds)) if limit is None or ds.image_id(i) < limit]
        first: dict[int, int] = {}
        for i in keep:
            first.setdefault(ds.image_id(i), i)
        position = {image: k for k, image in enumerate(sorted(first))}
        image_samples = [first[image] for image in sorted(first)]
        owner = np.array([position[ds.image_id(i)] for i in keep])
        captions = [ds.text(i) for i in keep]
        caption_texts = None
    else:
        image_samples = list(range(min(len(ds), limit or len(ds))))
        owner = np.arange(len(image_samples))
        captions = caption_texts = [ds.text(i) for i in image_samples]
    img = encoder.encode_image(LazyImages(ds, image_samples), batch_size)
    txt = encoder.encode_text(captions, batch_size)
    logger.info("%s/%s: %d images, %d captions", dataset, ds.split, len(img), len(txt))
    out = image_text_retrieval(img, txt, owner, caption_texts=caption_texts)
    return {f"{dataset}/{ds.split}/{k}": v for k, v in out.items()}


# classification ------------------------------------------------------------------------------------------------


def _labelled(ds: SourceDataset, indices: Sequence[int], dataset: str) -> np.ndarray:
    labels = [ds.label(i) for i in indices]
    if ds.classes is None or any(y is None for y in labels):
        raise MmkdError(f"dataset {dataset!r} ({ds.split}) has no class labels to evaluate against")
    return np.array(labels, dtype=np.int64)


def eval_zero_shot(
    encoder: Encoder,
    dataset: str = "shapes",
    root: str | None = None,
    split: str = "test",
    templates: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Zero-shot classification: each class is the mean embedding of its prompts (class names from
    ``classes``, underscores as spaces); an image's prediction is the most similar class.

    Args:
        encoder: A model that embeds both images and text.
        dataset: A labelled image dataset.
        root: Its file or directory.
        split: Split to evaluate.
        templates: Prompt templates with one ``{}``; default ``metrics.DEFAULT_TEMPLATES``.
        limit: Use this many samples, spread evenly over the split.
        batch_size: Inputs per forward pass.
        dataset_options: Extra dataset options.

    Returns:
        ``{dataset}/{split}/zero_shot_top1`` and ``zero_shot_top5``.
    """
    encoder.require("image", "zero-shot classification")
    encoder.require("text", "zero-shot classification")
    templates = list(templates or DEFAULT_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise MmkdError(f"zero-shot template {bad[0]!r}: needs exactly one {{}} for the class name")
    ds = _open(dataset, root, split, dataset_options)
    indices = _spread(len(ds), limit)
    labels = _labelled(ds, indices, dataset)
    names = [c.replace("_", " ") for c in ds.classes]
    prompts = [t.format(c) for c in names for t in templates]
    # encode every prompt in one call (batched), then let prompt_embeddings average them per class
    table = dict(zip(prompts, encoder.encode_text(prompts, batch_size), strict=True))
    class_emb = prompt_embeddings(lambda texts: np.stack([table[t] for t in texts]), names, templates)
    img = encoder.encode_image(LazyImages(ds, indices), batch_size)
    out = zero_shot(img, class_emb, labels)
    return {f"{dataset}/{ds.split}/zero_shot_{k}": v for k, v in out.items()}


def eval_linear_probe(
    encoder: Encoder,
    dataset: str = "shapes",
    root: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    limit: int | None = None,
    *,
    batch_size: int = 64,
    dataset_options: dict[str, Any] | None = None,
    epochs: int = 100,
) -> dict[str, float]:
    """Linear probe: logistic regression on frozen image embeddings of ``train_split``, accuracy on
    ``test_split``.

    Args:
        encoder: A model that embeds images.
        dataset: A labelled image dataset.
        root: Its file or directory.
        train_split: Split the probe is fitted on.
        test_split: Split it is scored on.
        limit: Use this many samples of each split, spread evenly over it.
        batch_size: Images per forward pass.
        dataset_options: Extra dataset options.
        epochs: L-BFGS iterations.

    Returns:
        ``{dataset}/{test_split}/linear_probe_top1``.
    """
    encoder.require("image", "linear probe")
    feats, labels, splits = [], [], []
    for split in (train_split, test_split):
        ds = _open(dataset, root, split, dataset_options)
        indices = _spread(len(ds), limit)
        labels.append(_labelled(ds, indices, dataset))
        feats.append(encoder.encode_image(LazyImages(ds, indices), batch_size))
        splits.append(ds.split)
    if splits[0] == splits[1]:
        raise MmkdError(f"linear probe: train and test split are both {splits[0]!r}; pick two different splits")
    acc = linear_probe(feats[0], labels[0], feats[1], labels[1], epochs=epochs)
    return {f"{dataset}/{splits[1]}/linear_probe_top1": acc}


# bias probe ----------------------------------------------------------------------------------------------------


def _bias_numbers(prefix: str, table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{p}/{col}": v for p, row in table.items() for col, v in row.items()}


def eval_bias(
    encoder: Encoder, teacher_encoder: Encoder | None = None, out_dir: str | Path | None = None, *, batch_size: int = 64
) -> dict[str, float]:
    """Bias probe: mean cosine similarity of each profession to male and female terms
    (``metrics.bias_probe`` defaults), and with a teacher, how closely the model reproduces its bias.

    Args:
        encoder: The model (it must embed text).
        teacher_encoder: The reference model (usually the teacher the student was distilled from).
        out_dir: Where to write ``bias.png`` (teacher and model side by side; needs ``teacher_encoder``).
        batch_size: Texts per forward pass.

    Returns:
        ``bias/{profession}/{male,female,diff}`` and ``bias/mean_abs_diff``; with a teacher also
        ``bias_teacher/{profession}/...`` and ``bias/diff_correlation``, ``bias/mean_abs_diff_teacher``,
        ``bias/mean_abs_diff_student``.
    """
    encoder.require("text", "bias probe")
    table = bias_probe(lambda texts: encoder.encode_text(texts, batch_size))
    out = _bias_numbers("bias", table)
    out["bias/mean_abs_diff"] = float(np.mean([abs(row["diff"]) for row in table.values()]))
    if teacher_encoder is None:
        if out_dir is not None:
            logger.warning("bias probe: no plot without a reference model (--teacher)")
        return out
    teacher_encoder.require("text", "bias probe reference")
    teacher_table = bias_probe(lambda texts: teacher_encoder.encode_text(texts, batch_size))
    out.update(_bias_numbers("bias_teacher", teacher_table))
    out.update({f"bias/{k}": v for k, v in compare_bias(teacher_table, table).items()})
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        try:
            logger.info("bias plot: %s", plot_bias(teacher_table, table, str(path / BIAS_PLOT)))
        except ImportError:
            logger.warning(
                "bias probe: matplotlib cannot be imported (a dependency of mmkd: pip install matplotlib); "
                "no plot written"
            )
    return out


def finite_or_none(results: dict[str, float]) -> dict[str, float | None]:
    """Results with NaN/inf as None, so they serialise as valid JSON (``null``)."""
    return {k: (v if math.isfinite(v) else None) for k, v in results.items()}


# the whole command ---------------------------------------------------------------------------------------------

TASKS = ("paraphrase", "image-text", "zero-shot", "linear-probe", "bias")
DEFAULT_DATASET = {"paraphrase": "mrpc", "image-text": "shapes", "zero-shot": "shapes", "linear-probe": "shapes"}


@dataclass
class EvalConfig:
    """What ``mmkd-eval`` runs (written next to the results).

    Attributes:
        model: Teacher name, training run directory or student directory (see ``load_encoder``).
        tasks: Any of TASKS; empty: by what the model embeds (text: paraphrase; images: linear-probe;
            both: image-text and zero-shot).
        weights: Teacher checkpoint.
        random_weights: Random teacher weights (tests only).
        teacher_options: Teacher options.
        tokenizer: Tokenizer directory for a student saved without one.
        preprocess: ImagePreprocess fields overriding a student's recorded image preprocessing.
        datasets: Datasets of the dataset tasks; None: each task's default (mrpc; shapes). Paraphrase
            evaluates all of them together (one ``mean``), the other tasks each in turn.
        data_roots: One root for every dataset (a GLUE directory holds MRPC/ and QQP/), or one per dataset.
        splits: Splits to evaluate (the test splits of linear-probe); None: paraphrase's available ones, else
            ``test``.
        train_split: Split the linear probe is fitted on.
        limit: Pairs (paraphrase), images (image-text) or samples per split (classification) to use.
        batch_size: Inputs per forward pass.
        templates: Zero-shot prompt templates; None: ``metrics.DEFAULT_TEMPLATES``.
        dataset_options: Extra dataset options (e.g. ``{"count": 1000}`` for shapes).
        teacher: Reference model of the bias probe (teacher name or student/run directory).
        teacher_weights: Its checkpoint.
        device: Torch device.
        out: Directory for ``eval-<tasks>.json`` and plots; None: the run directory when ``model`` is one,
            else nothing is written.
        show_progress: Progress bars on stderr.
    """

    model: str
    tasks: list[str] = field(default_factory=list)
    weights: str | None = None
    random_weights: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None
    data_roots: list[str] | None = None
    splits: list[str] | None = None
    train_split: str = "train"
    limit: int | None = None
    batch_size: int = 64
    templates: list[str] | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    teacher_weights: str | None = None
    device: str = "cpu"
    out: Path | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise MmkdError(f"--task {unknown[0]!r}: choose from {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise MmkdError("--task: a task is listed twice")
        if self.batch_size < 1:
            raise MmkdError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MmkdError(f"--limit {self.limit}: must be at least 1")
        roots, datasets = self.data_roots or [], self.datasets or []
        if len(roots) > 1 and len(roots) != len(datasets):
            raise MmkdError(
                f"{len(roots)} --data-root for {len(datasets)} --dataset: give one root for all "
                "datasets or one per dataset, in the same order"
            )
        if self.teacher_weights and not self.teacher:
            raise MmkdError("--teacher-weights without --teacher")

    def sources(self, task: str) -> list[tuple[str, str | None]]:
        """(dataset, root) pairs a dataset task runs on."""
        datasets = self.datasets or [DEFAULT_DATASET[task]]
        roots = self.data_roots or [None]
        return [(d, roots[0] if len(roots) == 1 else roots[i]) for i, d in enumerate(datasets)]


@dataclass
class EvalReport:
    """What :func:`run_evaluation` returns.

    Attributes:
        results: Every number, flat; ``mean`` is the mean of all scores (bias statistics excluded), for
            paraphrase alone the protocol's headline.
        seconds: Wall time per task.
        out_file: The JSON written, or None.
        model: The evaluated model's provenance.
    """

    results: dict[str, float]
    seconds: dict[str, float]
    out_file: Path | None
    model: dict[str, Any]


def _is_score(key: str) -> bool:
    return key != "mean" and not key.startswith(("bias/", "bias_teacher/"))


def default_tasks(encoder: Encoder) -> list[str]:
    """Tasks run when none are asked for, by what the model embeds."""
    if encoder.modalities == {"text"}:
        return ["paraphrase"]
    if encoder.modalities == {"image"}:
        return ["linear-probe"]
    return ["image-text", "zero-shot"]


def run_task(task: str, encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """One task of ``cfg`` on ``encoder``: every dataset and split it asks for."""
    b, opts = cfg.batch_size, cfg.dataset_options
    if task == "paraphrase":
        if opts:
            raise MmkdError("paraphrase retrieval takes no dataset options (use --limit to use fewer pairs)")
        return eval_paraphrase_many(encoder, cfg.sources(task), cfg.splits, batch_size=b, limit=cfg.limit)
    if task == "bias":
        ref = None
        if cfg.teacher:
            ref = load_encoder(cfg.teacher, cfg.teacher_weights, device=cfg.device)
            ref.show_progress = cfg.show_progress
        return eval_bias(encoder, ref, out_dir, batch_size=b)
    out: dict[str, float] = {}
    for name, root in cfg.sources(task):
        for split in cfg.splits or ["test"]:
            if task == "image-text":
                part = eval_image_text(encoder, name, root, split, cfg.limit, batch_size=b, dataset_options=opts)
            elif task == "zero-shot":
                part = eval_zero_shot(
                    encoder, name, root, split, cfg.templates, limit=cfg.limit, batch_size=b, dataset_options=opts
                )
            else:
                part = eval_linear_probe(
                    encoder, name, root, cfg.train_split, split, cfg.limit, batch_size=b, dataset_options=opts
                )
            out.update(part)
    return out


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """Load the model, run every task, add ``mean`` and write ``eval-<tasks>.json`` (config, model
    provenance, times and results) to the output directory when there is one."""
    encoder = load_encoder(
        cfg.model,
        cfg.weights,
        random_weights=cfg.random_weights,
        device=cfg.device,
        tokenizer=cfg.tokenizer,
        preprocess=cfg.preprocess,
        **cfg.teacher_options,
    )
    encoder.show_progress = cfg.show_progress
    tasks = cfg.tasks or default_tasks(encoder)
    out_dir = cfg.out if cfg.out is not None else encoder.run_dir
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        start = time.perf_counter()
        part = run_task(task, encoder, cfg, out_dir)
        seconds[task] = time.perf_counter() - start
        logger.info("%s: %.1f s", task, seconds[task])
        part.pop("mean", None)  # recomputed over every task's scores below
        clash = sorted(set(part) & set(results))
        if clash:
            raise MmkdError(f"--task {task}: result {clash[0]!r} was already produced by another task")
        results.update(part)
    scores = [v for k, v in results.items() if _is_score(k)]
    if scores:
        results["mean"] = float(np.mean(scores))
    out_file = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_file = out_dir / f"eval-{'+'.join(tasks)}.json"
        record = {
            "config": asdict(cfg) | {"tasks": tasks},
            "model": encoder.describe(),
            "seconds": seconds,
            "versions": library_versions(),
            "results": finite_or_none(results),
        }
        out_file.write_text(json.dumps(record, indent=2, default=str) + "\n")
        logger.info("results written to %s", out_file)
    return EvalReport(results=results, seconds=seconds, out_file=out_file, model=encoder.describe())
