"""Stage 1: dataset x teacher -> store, shard by shard, resumable."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmkd.data import PairImages, create_dataset
from mmkd_core.errors import MmkdError
from mmkd_core.hardware import Choice, auto_autocast, emulation_warning
from mmkd_core.progress import progress_bar
from mmkd_core.store import (
    Layout,
    StoreWriter,
    _mmkd_attrs,
    codec_name,
    encode_targets,
    open_store,
    parse_codec,
)
from mmkd_core.targets import select_layers
from mmkd_core.teachers import create_teacher
from mmkd_core.versions import library_versions

from .config import ExtractConfig
from .distributed import fill_on_cluster, open_run_writer, shards_of
from .pairs import PairCaptions, caption_writer, is_pair_store
from .sources import ImageSource, TextSource, teacher_targets

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What an extraction run did."""

    path: str
    samples: int
    views: int
    shards_written: int
    shards_total: int
    samples_written: int
    seconds: float
    bytes_on_disk: int
    complete: bool
    # distinct teacher inputs among the samples, each computed once (``dedupe``); None: not deduplicated (images)
    distinct_inputs: int | None = None
    # the teacher's compute dtype, as recorded in recipe.autocast, and why (``resolve_autocast``)
    autocast: Choice | None = None
    # the store's compressor (``store.codec_name``): the default, --codec, or a resumed store's own
    codec: str | None = None

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_on_disk / max(self.samples, 1)

    @property
    def samples_per_second(self) -> float:
        """Throughput of this run (samples written now over its wall time)."""
        return self.samples_written / max(self.seconds, 1e-9)


def resolve_autocast(cfg: ExtractConfig, teacher) -> tuple[ExtractConfig, Choice]:
    """``cfg`` with a concrete ``autocast`` (what the store records), and why it was chosen.

    ``auto`` on a store being resumed takes the dtype the store recorded: a resume continues the same run,
    and a probe that now comes out otherwise (another machine, a busier one) must not make it refuse the
    store or mix two dtypes in one. Otherwise ``auto`` asks the hardware (``mmkd_core.hardware``). A forced
    bfloat16 or float16 that the device would emulate is run, with a one-line warning.
    """
    if cfg.autocast != "auto":
        warning = emulation_warning(cfg.autocast, cfg.device)
        if warning:
            log.warning(warning)
        return cfg, Choice(cfg.autocast, "forced")
    recorded = _recorded_autocast(cfg)
    if recorded is not None:
        choice = Choice(recorded, "auto: recorded in the store, resumed")
    else:
        choice = auto_autocast(str(cfg.device), int(teacher.hidden_size or 64))
    return dataclasses.replace(cfg, autocast=choice.autocast), choice


def _recorded_autocast(cfg: ExtractConfig) -> str | None:
    """``recipe.autocast`` of the store at ``cfg.out`` when this run resumes it (not ``--overwrite``)."""
    if cfg.overwrite or not cfg.out.exists():
        return None
    recipe = (_mmkd_attrs(cfg.out) or {}).get("recipe")
    value = recipe.get("autocast") if isinstance(recipe, dict) else None
    return value if value in ("none", "bfloat16", "float16") else None


def _autocast(cfg: ExtractConfig):
    if cfg.autocast == "auto":
        raise RuntimeError("ExtractConfig.autocast 'auto' must be resolved first (resolve_autocast)")
    if cfg.autocast == "none":
        return contextlib.nullcontext()
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=getattr(torch, cfg.autocast))


def extract(cfg: ExtractConfig, show_progress: bool = True) -> ExtractSummary:
    """Run the teacher over the dataset and write (or finish writing) the store ``cfg.out``.

    An image teacher over image–caption pairs writes a pair store (see ``pairs``): its samples are the
    distinct images, the teacher runs once per image and view, and its captions are a store inside it.
    """
    dataset, teacher, samples, n, pairs = _inputs(cfg)
    cfg, compute = resolve_autocast(cfg, teacher)
    captions = PairCaptions(dataset, samples, n, teacher, cfg.text_tokenizer) if pairs else None
    source = _source(cfg, samples, teacher, n)
    recipe = _recipe(cfg, teacher, pairs)
    layout, probe = _layout(cfg, teacher, source, recipe, n)
    # --shards K/N: one slice of the shards, under the lock rule of `distributed`
    writer = open_run_writer(
        cfg, functools.partial(_open_writer, cfg, samples, teacher, source, recipe, layout, n, captions)
    )
    scope = shards_of(cfg, layout.num_shards)
    todo = [k for k in scope if k not in writer.done_shards()]
    label = f"extract {cfg.teacher} → {cfg.out.name}"
    start = time.perf_counter()
    with writer:  # closed (its lock released) on leaving, after the shard in flight has landed
        if captions is not None and scope[:1] == [0]:  # written by the run that has shard 0 (--shards: slice 0)
            _write_captions(cfg, captions, recipe, show_progress)
        if cfg.cluster or cfg.scheduler:
            fill_on_cluster(cfg, writer, recipe, todo, scope, probe, label, show_progress)
        else:
            _fill(cfg, writer, teacher, source, recipe, todo, probe, label, show_progress, scope)
        if type(writer) is StoreWriter:  # holds the store lock for the whole run (mmkd-ablate reads the time)
            _add_seconds(writer, time.perf_counter() - start)
        complete = writer.finish()
    return ExtractSummary(
        path=str(cfg.out),
        samples=n,
        views=source.views,
        shards_written=len(todo),
        shards_total=layout.num_shards,
        samples_written=_samples(layout, todo),
        seconds=time.perf_counter() - start,
        bytes_on_disk=open_store(cfg.out).nbytes_stored(),
        complete=complete,
        distinct_inputs=getattr(source, "distinct_inputs", None),
        autocast=compute,
        codec=codec_name(writer.layout.codec) if writer.layout.codec else None,
    )


def _fill(
    cfg: ExtractConfig, writer: StoreWriter, teacher, source, recipe, todo, probe, label, show_progress, scope=None
) -> None:
    """Compute and write the shards ``todo`` of one store (of ``scope``, the run's shards: default all)."""
    layout = writer.layout
    total = _samples(layout, scope) if scope is not None else layout.num_samples
    with (
        ShardQueue(writer, source) as queue,
        progress_bar(
            label,
            total=total,
            completed=total - _samples(layout, todo),
            enabled=show_progress,
        ) as advance,
    ):
        try:
            _run_teacher(cfg, teacher, source, recipe, layout, todo, queue, advance, probe)
        except KeyboardInterrupt:
            queue.drain()  # let the shard in flight land; it is marked done only once written
            raise MmkdError(
                f"interrupted: {len(writer.done_shards())} of {layout.num_shards} shards of {writer.path} are "
                "written; run the same command again to continue"
            ) from None


def _write_captions(cfg: ExtractConfig, captions: PairCaptions, recipe: dict, show_progress: bool) -> None:
    """The pair store's caption store: token ids, image rows and (two-tower teachers) text embeddings."""
    text = captions.teacher
    cap_recipe = {**recipe, "tokens": False}
    batch = captions.source.probe_batch()
    with torch.inference_mode():
        probe = {**_targets(text, captions.source, batch, cap_recipe, cfg), "batch": batch}
    m = len(captions)
    layout = Layout(
        num_samples=m,
        views=1,
        time_steps=captions.source.time_steps(probe),
        dim=max(1, int(probe["pooled"].shape[-1])),
        pooled_dim=int(probe["pooled"].shape[-1]),
        dtype=cfg.dtype,
        store_tokens=False,
        input_ids=True,
        extras=tuple(captions.source.extras()),
    )
    config = {
        "teacher": text.describe(),
        "recipe": cap_recipe,
        "preprocess": _plain(text.preprocess),
        "views": {"count": 1},
        "dataset": {"captions_of": cfg.dataset, "num_samples": m},
    }
    writer = caption_writer(cfg.out, layout, config, library_versions())
    todo = [k for k in range(layout.num_shards) if k not in writer.done_shards()]
    with writer:
        _fill(cfg, writer, text, captions.source, cap_recipe, todo, probe, f"captions → {cfg.out.name}", show_progress)
        writer.finish()


def _inputs(cfg: ExtractConfig) -> tuple:
    """The dataset, the teacher, the samples it runs over, their number and whether they make a pair store."""
    dataset = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, **cfg.dataset_options)
    teacher = create_teacher(
        cfg.teacher, cfg.weights, random_init=cfg.random_weights, device=cfg.device, **cfg.teacher_options
    )
    _check_modalities(cfg, teacher, dataset)
    pairs = is_pair_store(teacher, dataset, cfg.text_tokenizer)
    if cfg.text_tokenizer and not pairs:
        raise MmkdError("--text-tokenizer: only an image teacher over image–caption data stores captions")
    # an image teacher runs once per image: a dataset with several captions per image gives its images
    samples = (
        PairImages(dataset) if pairs or (teacher.modality == "image" and hasattr(dataset, "image_id")) else dataset
    )
    return dataset, teacher, samples, min(len(samples), cfg.limit or len(samples)), pairs


def _add_seconds(writer: StoreWriter, seconds: float) -> None:
    """Add this run's time to the group attribute ``mmkd_extract_seconds`` (a resumed extraction adds its
    part): a measurement, kept out of the ``mmkd`` provenance that two equal stores share."""
    total = float(writer.group.attrs.get("mmkd_extract_seconds") or 0.0) + seconds
    writer.group.attrs["mmkd_extract_seconds"] = round(total, 3)


def _check_modalities(cfg: ExtractConfig, teacher, dataset) -> None:
    if teacher.modality == "text" and dataset.modality not in ("text", "image_text"):
        raise MmkdError(f"--teacher {cfg.teacher} reads text but dataset {cfg.dataset!r} has none")
    if teacher.modality == "image" and dataset.modality not in ("image", "image_text"):
        raise MmkdError(f"--teacher {cfg.teacher} reads images but dataset {cfg.dataset!r} has none")
    if teacher.modality == "image_text" and dataset.modality != "image_text":
        raise MmkdError(f"--teacher {cfg.teacher} reads image-text pairs but dataset {cfg.dataset!r} has none")
    if teacher.modality == "text" and cfg.views != 1:
        raise MmkdError(f"--views {cfg.views}: text has one view")


def _source(cfg: ExtractConfig, dataset, teacher, n: int):
    """What feeds the teacher: tokenized text or rendered image views.

    A source may define ``targets(teacher, batch, recipe, autocast)`` to compute a batch's outputs itself
    (a teacher that needs several passes per batch) and ``extras()`` (``Layout.extras``): arrays whose
    second axis is ``view`` are scattered from its outputs like ``pooled``; others come from
    ``finish_shard``.
    """
    if teacher.modality == "text":
        return TextSource(dataset, teacher, n)
    if teacher.modality == "image_text":  # a joint teacher (FLAVA, ViLT): one sample per pair
        from .joint import JointSource

        return JointSource(dataset, teacher, n, cfg.views, cfg.seed, cfg.crop_scale, cfg.workers)
    return ImageSource(dataset, teacher, n, cfg.views, cfg.seed, cfg.crop_scale, cfg.workers)


def _recipe(cfg: ExtractConfig, teacher, pairs: bool = False) -> dict:
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


def _layout(cfg: ExtractConfig, teacher, source, recipe: dict, n: int) -> tuple[Layout, dict]:
    """The store's layout, and the probe: one forward pass on the first sample gives T (images), D and the
    pooled width E; its result is kept (with the batch's positions) and written, not computed again."""
    batch = source.probe_batch()
    with torch.inference_mode():
        probe = _targets(teacher, source, batch, recipe, cfg)
    probe = {**probe, "batch": batch}
    layout = Layout(
        num_samples=n,
        views=source.views,
        time_steps=source.time_steps(probe),
        dim=teacher.hidden_size,
        pooled_dim=probe["pooled"].shape[-1],
        dtype=cfg.dtype,
        store_tokens=recipe["tokens"],
        input_ids=teacher.modality in ("text", "image_text"),
        view_params=source.view_params,
        chunk_size=cfg.chunk_size,
        shard_size=cfg.shard_size,
        extras=tuple(source.extras()) if hasattr(source, "extras") else (),
        codec=parse_codec(cfg.codec) if cfg.codec else None,  # None: the default, or a resumed store's own
    )
    return layout, probe


def _open_writer(
    cfg: ExtractConfig, dataset, teacher, source, recipe: dict, layout: Layout, n: int, captions=None, locked=True
) -> StoreWriter:
    dataset_attrs = {
        "options": cfg.dataset_options,
        **dataset.describe(),
        "modality": dataset.modality,
        "fingerprint": dataset.fingerprint(),
        "num_samples": n,
        "limit": cfg.limit,
        "source_size": len(dataset),
        **(captions.describe() if captions is not None else {}),
    }
    config = {
        "teacher": teacher.describe(),
        "recipe": recipe,
        "preprocess": _plain(teacher.preprocess),
        "views": source.describe_views(),
        "dataset": dataset_attrs,
    }
    # where the data was read is recorded for the loader, not compared: moving the data is fine
    data_root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    return StoreWriter.open(
        cfg.out,
        layout,
        config,
        library_versions(),
        overwrite=cfg.overwrite,
        locked=locked,
        extra={
            "data_root": data_root,
            # what rebuilds the teacher (a student's --init teacher): the registry entry and its options
            "teacher_build": {"name": cfg.teacher, "options": cfg.teacher_options},
            **source.extra_attrs(),
            **(captions.extra_attrs() if captions else {}),
        },
    )


def _samples(layout: Layout, shards: list[int]) -> int:
    return sum(hi - lo for lo, hi in map(layout.shard_range, shards))


# Shards compressed and written at once, each on its own thread, while the teacher fills the next. One: zarr
# already compresses a shard's chunks concurrently on its thread pool (async.concurrency chunks at a time, on
# min(32, cores + 4) threads), and its one event-loop thread, which every write shares, is the serial part a
# second shard in flight cannot spread; 2 measured within the noise of 1 here (benchmarks/codecs.py, README
# "Codecs") for one more shard of memory.
IN_FLIGHT = 1


class ShardQueue:
    """Writes finished shards on background threads, at most ``in_flight`` at a time, so the teacher computes
    the next shard while earlier ones are compressed and written; ``put`` waits while ``in_flight`` are.

    Memory stays bounded: the shard being filled plus ``in_flight`` being written, each in the store's dtype
    (``Layout.buffer_dtype``: 2 bytes a value for float16/bfloat16), plus what zarr holds while it compresses
    a shard (its compressed chunks, at most about the shard's size again). Shards of one store are
    independent files, each marked done after its own data, so they may land in any order.
    """

    def __init__(self, writer: StoreWriter, source, in_flight: int = IN_FLIGHT) -> None:
        self.writer, self.source, self.in_flight = writer, source, max(1, in_flight)
        self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="mmkd-writer")
        self._pending: collections.deque[Future] = collections.deque()

    def put(self, k: int, shard: dict[str, np.ndarray]) -> None:
        while len(self._pending) >= self.in_flight:
            self._pending.popleft().result()
        lo, hi = self.writer.layout.shard_range(k)
        self._pending.append(self._pool.submit(self.writer.write_shard, k, self.source.finish_shard(shard, lo, hi)))

    def drain(self) -> None:
        """Wait for the shards in flight; the first error, if any, is raised here."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> ShardQueue:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _run_teacher(
    cfg: ExtractConfig,
    teacher,
    source,
    recipe: dict,
    layout: Layout,
    todo: list[int],
    queue: ShardQueue,
    advance,
    probe: dict | None = None,
) -> None:
    """One pass over every pending shard (one DataLoader for images); batches never straddle shards.

    The probe's input (the first sample's first view) is not run again: its kept result is placed, so the
    teacher sees every input exactly once.
    """
    current, shard = None, None
    with torch.inference_mode():
        for batch in source.batches([(k, *layout.shard_range(k)) for k in todo], cfg.batch_size):
            if batch["shard"] != current:
                if current is not None:
                    queue.put(current, shard)
                current = batch["shard"]
                shard = _empty_shard(layout, *layout.shard_range(current), encoded=True)
            lo = layout.shard_range(current)[0]
            rest = _without_probe(batch, probe)
            if rest is not batch:
                _place(shard, probe["batch"], probe, lo)
                probe = None  # used up
            if len(rest["positions"]):
                _place(shard, rest, _targets(teacher, source, rest, recipe, cfg), lo)
            advance(len(batch["positions"]) // source.views)
    if current is not None:
        queue.put(current, shard)
    queue.drain()


def _without_probe(batch: dict, probe: dict | None) -> dict:
    """``batch`` without the probe's input, or ``batch`` itself when it does not hold that input."""
    if probe is None or "positions" not in probe["batch"]:
        return batch
    p = probe["batch"]
    hit = (batch["positions"] == p["positions"][0]) & (batch["view_ids"] == p["view_ids"][0])
    if not hit.any():
        return batch
    keep = ~hit
    inputs = {k: v[torch.from_numpy(keep).to(v.device)] for k, v in batch["inputs"].items()}
    return {**batch, "inputs": inputs, "positions": batch["positions"][keep], "view_ids": batch["view_ids"][keep]}


def _plain(obj) -> dict:
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else dict(obj)


def _targets(teacher, source, batch: dict, recipe: dict, cfg: ExtractConfig) -> dict[str, torch.Tensor]:
    if hasattr(source, "targets"):
        return source.targets(teacher, batch, recipe, lambda: _autocast(cfg))
    return teacher_targets(teacher, batch, recipe, lambda: _autocast(cfg))


def _empty_shard(layout: Layout, lo: int, hi: int, encoded: bool = False) -> dict[str, np.ndarray]:
    """Zeroed buffers of one shard's targets (and per-view extras): float32, or with ``encoded`` in the
    store's dtype (``Layout.buffer_dtype``), which ``_place`` then encodes each batch into as it arrives."""
    m = hi - lo
    dtype = layout.buffer_dtype if encoded else np.float32
    shard = {"pooled": np.zeros((m, layout.views, layout.pooled_dim), dtype)}
    if layout.store_tokens:
        shard["tokens"] = np.zeros((m, layout.views, layout.time_steps, layout.dim), dtype)
    for name, trailing, dtype, dims in layout.extras:
        if dims[1:2] == ("view",):
            shard[name] = np.zeros((m, *trailing), dtype)
    return shard


def _place(shard: dict[str, np.ndarray], batch: dict, out: dict[str, torch.Tensor], lo: int) -> None:
    """Scatter a batch's results into the shard buffer: row ``positions[j] - lo``, view ``view_ids[j]`` gets
    result ``take[j]`` (default j; a deduplicated batch's one result per distinct input goes to many rows)."""
    rows = batch["positions"] - lo
    views = batch["view_ids"]
    take = batch.get("take", slice(None))
    shard["pooled"][rows, views] = _host(shard, "pooled", out["pooled"], batch, take)[take]
    for name, value in out.items():
        if name not in ("tokens", "pooled", "mask") and name in shard:
            shard[name][rows, views] = value.float().cpu().numpy()[take]
    if out["tokens"] is not None:
        t = out["tokens"].shape[1]
        shard["tokens"][rows, views, :t] = _host(shard, "tokens", out["tokens"], batch, take)[take]


_ENCODED = {np.dtype("float16"): "float16", np.dtype("uint16"): "bfloat16"}


def _host(shard: dict[str, np.ndarray], name: str, value: torch.Tensor, batch: dict, take) -> np.ndarray:
    """A batch's ``name`` results on the host: encoded (and checked) into the buffer's dtype when it is a
    stored one, else float32 (which ``write_shard`` encodes and checks)."""
    dtype = _ENCODED.get(shard[name].dtype)
    if dtype is None:
        return value.float().cpu().numpy()

    def locate(j: int) -> tuple[int, int]:  # result j -> the first (sample, view) it is written to
        hits = np.flatnonzero(np.asarray(take) == j) if not isinstance(take, slice) else [j]
        k = int(hits[0]) if len(hits) else j
        return int(batch["positions"][k]), int(batch["view_ids"][k])

    return encode_targets(name, value, dtype, locate)
