"""Stage 1: dataset x teacher -> store, shard by shard, resumable: ``extract(cfg)``.

``prepare`` builds what the run needs, ``open_run_writer`` creates or resumes the store (the whole store, or
with ``--shards K/N`` one slice of it), and ``fill`` writes the pending shards here, or ``fill_on_cluster``
on dask workers. A pair store's captions are written first, by the run that has shard 0.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from mmkd.app.progress import progress_bar
from mmkd_core.store import StoreWriter, codec_name, open_store

from .config import ExtractConfig
from .distributed import fill_on_cluster, open_run_writer, shards_of
from .fill import fill, shard_samples
from .hardware import Choice
from .prepare import Prepared, open_caption_writer, open_writer, prepare, prepare_captions


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
    # the teacher's compute dtype, as recorded in recipe.autocast, and why (``autocast.resolve_autocast``)
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


def extract(cfg: ExtractConfig, show_progress: bool = True) -> ExtractSummary:
    """Run the teacher over the dataset and write (or finish writing) the store ``cfg.out`` (with
    ``--add-teacher``: the teacher's group in it, ``added``).

    An image teacher over image–caption pairs writes a pair store (see ``pairs``): its samples are the
    distinct images, the teacher runs once per image and view, and its captions are a store inside it.
    """
    prepared = prepare(cfg)
    cfg, layout = prepared.cfg, prepared.layout
    # --shards K/N: one slice of the shards, under the lock rule of `distributed`
    writer = open_run_writer(cfg, functools.partial(open_writer, prepared))
    scope = shards_of(cfg, layout.num_shards)
    todo = [k for k in scope if k not in writer.done_shards()]
    label = f"extract {cfg.teacher} → {cfg.out.name}" + (f"/teachers/{cfg.teacher_name}" if cfg.add_teacher else "")
    start = time.perf_counter()
    with writer:  # closed (its lock released) on leaving, after the shard in flight has landed
        if prepared.captions is not None and scope[:1] == [0]:  # by the run with shard 0 (--shards: slice 0)
            _write_captions(prepared, show_progress)
        if cfg.cluster or cfg.scheduler:
            fill_on_cluster(prepared, writer, todo, scope, label, show_progress)
        else:
            _fill_here(prepared, writer, todo, scope, label, show_progress)
        if type(writer) is StoreWriter:  # holds the store lock for the whole run (mmkd-ablate reads the time)
            _add_seconds(writer, time.perf_counter() - start)
        complete = writer.finish()
    return ExtractSummary(
        path=str(cfg.target),
        samples=prepared.num_samples,
        views=prepared.feeder.views,
        shards_written=len(todo),
        shards_total=layout.num_shards,
        samples_written=shard_samples(layout, todo),
        seconds=time.perf_counter() - start,
        bytes_on_disk=open_store(cfg.target).nbytes_stored(),
        complete=complete,
        distinct_inputs=prepared.feeder.distinct_inputs,
        autocast=prepared.compute,
        codec=codec_name(writer.layout.codec) if writer.layout.codec else None,
    )


def _fill_here(
    prepared: Prepared, writer: StoreWriter, todo: list[int], scope: list[int], label: str, show_progress: bool
) -> None:
    """``fill`` in this process, with a progress bar over ``scope``, the run's shards."""
    total = shard_samples(writer.layout, scope)
    done = total - shard_samples(writer.layout, todo)
    with progress_bar(label, total=total, completed=done, enabled=show_progress) as advance:
        fill(prepared, writer, todo, advance)


def _write_captions(prepared: Prepared, show_progress: bool) -> None:
    """The pair store's caption store: token ids, image rows and (two-tower teachers) text embeddings."""
    caps = prepare_captions(prepared)
    writer = open_caption_writer(caps)
    every = list(range(caps.layout.num_shards))
    todo = [k for k in every if k not in writer.done_shards()]
    with writer:
        _fill_here(caps, writer, todo, every, f"captions → {caps.cfg.out.name}", show_progress)
        writer.finish()


def _add_seconds(writer: StoreWriter, seconds: float) -> None:
    """Add this run's time to the group attribute ``mmkd_extract_seconds`` (a resumed extraction adds its
    part): a measurement, kept out of the ``mmkd`` provenance that two equal stores share."""
    total = float(writer.group.attrs.get("mmkd_extract_seconds") or 0.0) + seconds
    writer.group.attrs["mmkd_extract_seconds"] = round(total, 3)
