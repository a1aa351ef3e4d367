"""What an extraction run needs before the teacher writes a shard: ``prepare(cfg)``.

The dataset, the teacher, the samples it runs over, the feeder that gives it their inputs (``feeders``), the
target recipe, and the store's layout from a probe: one forward pass on the first sample, whose result is
kept and written, not computed again. The single-process run, ``--plan``, ``--shards`` commands and the
cluster's workers all start here; ``fill.fill`` then writes shards through a writer from ``open_writer``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mmkd.data import PairImages, create_dataset
from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, parse_codec
from mmkd_core.targets import select_layers
from mmkd_core.teachers import create_teacher, teacher_runtime
from mmkd_core.versions import library_versions

from .added import Root, check_data, check_teacher, open_root, settle
from .autocast import autocast_context, resolve_autocast
from .config import ExtractConfig
from .feeders import Feeder, ImageFeeder, TextFeeder
from .hardware import Choice
from .pairs import PairCaptions, caption_writer, is_pair_store
from .replay import ReplayImageFeeder


@dataclass
class Prepared:
    """What a run needs to open its store (``open_writer``) and write its shards (``fill.fill``).

    Attributes:
        cfg: The run's configuration, its ``autocast`` resolved.
        dataset: The dataset (``mmkd.data``).
        teacher: The teacher.
        samples: What the store's rows are: the dataset, its distinct images (``PairImages``), or a pair
            store's captions.
        num_samples: Rows of the store (``--limit`` applied).
        feeder: The teacher's inputs and what becomes of its outputs (``feeders.Feeder``).
        recipe: The target recipe, as the store records it.
        layout: The store's layout.
        probe: The probe's result, its input under ``batch``: ``fill`` places it when it meets that input;
            None where another process places it (a cluster worker without shard 0).
        compute: The compute dtype and why (``resolve_autocast``); None where another process resolved it.
        captions: A pair store's captions (``pairs.PairCaptions``); None otherwise.
        root: With ``--add-teacher``, the store the teacher is added to (``added.Root``); None otherwise.
    """

    cfg: ExtractConfig
    dataset: Any
    teacher: Any
    samples: Any
    num_samples: int
    feeder: Feeder
    recipe: dict[str, Any]
    layout: Layout | None = None
    probe: dict[str, Any] | None = None
    compute: Choice | None = None
    captions: PairCaptions | None = None
    root: Root | None = None

    def targets(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A batch's results through the feeder, the teacher in the run's autocast."""
        return self.feeder.targets(self.teacher, batch, self.recipe, lambda: autocast_context(self.cfg))


def prepare(cfg: ExtractConfig, layout: Layout | None = None) -> Prepared:
    """Everything the run ``cfg`` needs: the dataset read, the teacher loaded, the compute dtype resolved, the
    feeder built (text tokenized), the recipe and the store's layout.

    Args:
        cfg: The run's configuration.
        layout: The store's layout when another process probed it (a cluster worker): no probe is run, the
            compute dtype is taken as ``cfg`` gives it, and a pair store's captions (the client writes them)
            are left out.
    """
    root = None
    if cfg.add_teacher:  # the store's record first: its refusals come before the teacher loads
        cfg = settle(cfg)
        root = open_root(cfg)
    dataset, teacher, samples, n, pairs = _load(cfg, root)
    if root is not None:
        check_data(root, dataset_record(cfg, samples, n), cfg)
    compute = None
    if layout is None:
        cfg, compute = resolve_autocast(cfg, teacher)
    captions = PairCaptions(dataset, samples, n, teacher, cfg.text_tokenizer) if pairs and layout is None else None
    feeder = feeder_for(cfg, samples, teacher, n, root)
    recipe = target_recipe(cfg, teacher, pairs)
    prepared = Prepared(cfg, dataset, teacher, samples, n, feeder, recipe, layout, None, compute, captions, root)
    if layout is None:
        prepared.layout, prepared.probe = _probe_layout(prepared)
    return prepared


def _load(cfg: ExtractConfig, root: Root | None = None) -> tuple[Any, Any, Any, int, bool]:
    """The dataset, the teacher, the samples it runs over, their number and whether they make a pair store
    (a teacher added to the store ``root``: first checked against the store's modality)."""
    dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, **cfg.dataset_options)
    teacher = create_teacher(
        cfg.teacher, cfg.weights, random_init=cfg.random_weights, device=cfg.device, **cfg.teacher_options
    )
    if root is not None:
        check_teacher(root, teacher, cfg)
    _check_modalities(cfg, teacher, dataset)
    pairs = is_pair_store(teacher, dataset, cfg.text_tokenizer)
    if cfg.text_tokenizer and not pairs:
        raise MmkdError("--text-tokenizer: only an image teacher over image–caption data stores captions")
    # an image teacher runs once per image: a dataset with several captions per image gives its images
    samples = (
        PairImages(dataset) if pairs or (teacher.modality == "image" and hasattr(dataset, "image_id")) else dataset
    )
    return dataset, teacher, samples, min(len(samples), cfg.limit or len(samples)), pairs


def _check_modalities(cfg: ExtractConfig, teacher, dataset) -> None:
    if teacher.modality == "text" and dataset.modality not in ("text", "image_text"):
        raise MmkdError(f"--teacher {cfg.teacher} reads text but dataset {cfg.dataset!r} has none")
    if teacher.modality == "image" and dataset.modality not in ("image", "image_text"):
        raise MmkdError(f"--teacher {cfg.teacher} reads images but dataset {cfg.dataset!r} has none")
    if teacher.modality == "image_text" and dataset.modality != "image_text":
        raise MmkdError(f"--teacher {cfg.teacher} reads image-text pairs but dataset {cfg.dataset!r} has none")
    if teacher.modality == "text" and cfg.views != 1:
        raise MmkdError(f"--views {cfg.views}: text has one view")


def feeder_for(cfg: ExtractConfig, samples, teacher, n: int, root: Root | None = None) -> Feeder:
    """What feeds the teacher the first ``n`` samples: tokenized text, rendered image views (a teacher added to
    the store ``root``: its stored views), or both."""
    if teacher.modality == "text":
        return TextFeeder(samples, teacher, n)
    if teacher.modality == "image_text":  # a joint teacher (FLAVA, ViLT): one sample per pair
        from .joint import JointFeeder

        return JointFeeder(samples, teacher, n, cfg.views, cfg.seed, cfg.crop_scale, cfg.workers)
    if root is not None:
        return ReplayImageFeeder(samples, teacher, n, root.reader, cfg.workers)
    return ImageFeeder(samples, teacher, n, cfg.views, cfg.seed, cfg.crop_scale, cfg.workers)


def target_recipe(cfg: ExtractConfig, teacher, pairs: bool = False) -> dict[str, Any]:
    """The target recipe the store records: layers, normalisation, the pooled target, tokens or not, autocast."""
    if getattr(teacher, "text_tower", None) is not None:
        pool = cfg.pool or "teacher_embed"  # a two-tower teacher's own image and text embeddings
    else:
        pool = cfg.pool or ("teacher_mean" if teacher.modality == "text" else "teacher_cls")
    # a pair store's student regresses the whole sample's representation: pooled only unless asked
    pooled_only = cfg.pooled_only if cfg.pooled_only is not None else pairs
    return {
        "layers": select_layers(cfg.layers, teacher.num_layers),
        "instance_norm": cfg.instance_norm,
        "layer_norm": cfg.layer_norm,
        "pool": pool,
        "tokens": not pooled_only,
        "autocast": cfg.autocast,
    }


def _probe(prepared: Prepared) -> dict[str, Any]:
    """The first sample's first view through the teacher, its input kept under ``batch``."""
    batch = prepared.feeder.probe_batch()
    with torch.inference_mode():
        return {**prepared.targets(batch), "batch": batch}


def _probe_layout(p: Prepared) -> tuple[Layout, dict[str, Any]]:
    """The store's layout, and the probe: it gives T (images), D and the pooled width E."""
    cfg, feeder = p.cfg, p.feeder
    probe = _probe(p)
    layout = Layout(
        num_samples=p.num_samples,
        views=feeder.views,
        time_steps=feeder.time_steps(probe),
        dim=p.teacher.hidden_size,
        pooled_dim=probe["pooled"].shape[-1],
        dtype=cfg.dtype,
        store_tokens=p.recipe["tokens"],
        input_ids=p.teacher.modality in ("text", "image_text"),
        view_params=feeder.view_params,
        chunk_size=cfg.chunk_size,
        shard_size=cfg.shard_size,
        extras=tuple(feeder.extras()),
        codec=parse_codec(cfg.codec) if cfg.codec else None,  # None: the default, or a resumed store's own
    )
    return layout, probe


def prepare_captions(prepared: Prepared) -> Prepared:
    """A pair store's caption store as a run of its own: its tokenizer (or the teacher's text tower) over the
    captions of the pair store's images, one view, pooled only."""
    captions = prepared.captions
    if captions is None:
        raise RuntimeError("prepare_captions: the run is not a pair store's")
    cfg, feeder = prepared.cfg, captions.feeder
    caps = Prepared(
        cfg=cfg,
        dataset=prepared.dataset,
        teacher=captions.teacher,
        samples=captions.texts,
        num_samples=len(captions),
        feeder=feeder,
        recipe={**prepared.recipe, "tokens": False},
        compute=prepared.compute,
    )
    caps.probe = _probe(caps)
    caps.layout = Layout(
        num_samples=caps.num_samples,
        views=1,
        time_steps=feeder.time_steps(caps.probe),
        dim=max(1, int(caps.probe["pooled"].shape[-1])),
        pooled_dim=int(caps.probe["pooled"].shape[-1]),
        dtype=cfg.dtype,
        store_tokens=False,
        input_ids=True,
        extras=tuple(feeder.extras()),
    )
    return caps


def _preprocess_attrs(teacher) -> dict[str, Any]:
    """The teacher's preprocessing (a dataclass or a mapping) as the dict the store records."""
    pre = teacher.preprocess
    return asdict(pre) if is_dataclass(pre) else dict(pre)


def dataset_record(cfg: ExtractConfig, samples, n: int, captions: PairCaptions | None = None) -> dict[str, Any]:
    """The store's ``dataset`` record: the samples' description, modality, fingerprint, count and limit."""
    return {
        "options": cfg.dataset_options,
        **samples.describe(),
        "modality": samples.modality,
        "fingerprint": samples.fingerprint(),
        "num_samples": n,
        "limit": cfg.limit,
        "source_size": len(samples),
        **(captions.describe() if captions is not None else {}),
    }


def open_writer(prepared: Prepared, locked: bool = True) -> StoreWriter:
    """Create the store ``prepared.cfg.target`` or resume it (its configuration verified): the store ``--out``,
    or with ``--add-teacher`` the teacher's group inside it, under the store's lock.

    Args:
        prepared: The run.
        locked: Hold the store lock until the writer closes; False leaves the lock to the caller.
    """
    cfg, samples, captions = prepared.cfg, prepared.samples, prepared.captions
    config = {
        "teacher": prepared.teacher.describe(),
        "recipe": prepared.recipe,
        "preprocess": _preprocess_attrs(prepared.teacher),
        "views": prepared.feeder.describe_views(),
        "dataset": dataset_record(cfg, samples, prepared.num_samples, captions),
    }
    # where the data was read is recorded for the loader, not compared: moving the data is fine
    data_root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    extra = {
        "data_root": data_root,
        # what rebuilds the teacher (a student's --init teacher): the registry entry and its options
        "teacher_build": {"name": cfg.teacher, "options": cfg.teacher_options},
        # how it computed (the attention implementation chosen for its architecture): recorded, not compared
        "teacher_runtime": teacher_runtime(prepared.teacher),
        **prepared.feeder.extra_attrs(),
        **(captions.extra_attrs() if captions else {}),
        **({"teacher_group": cfg.teacher_name} if cfg.add_teacher else {}),
    }
    return StoreWriter.open(
        cfg.target,
        prepared.layout,
        config,
        library_versions(),
        overwrite=cfg.overwrite,
        locked=locked,
        extra=extra,
        inside=cfg.out if cfg.add_teacher else None,
    )


def open_caption_writer(caps: Prepared) -> StoreWriter:
    """The caption store's writer (``prepare_captions``), under the pair store's lock, which its writer holds."""
    config = {
        "teacher": caps.teacher.describe(),
        "recipe": caps.recipe,
        "preprocess": _preprocess_attrs(caps.teacher),
        "views": {"count": 1},
        "dataset": {"captions_of": caps.cfg.dataset, "num_samples": caps.num_samples},
    }
    return caption_writer(caps.cfg.out, caps.layout, config, library_versions())
