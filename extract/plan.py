"""`mmkd-extract --plan`: what a run will cost, from a few real batches, before it runs. Nothing is written.

The teacher runs on ``PLAN_BATCHES`` batches of consecutive samples spread evenly over the selection (the
first, the last and between: lengths differ along a dataset). Their targets are encoded for every storage
dtype exactly as ``StoreWriter.write_shard`` encodes them and compressed by zarr itself, with the store's
codecs and chunk shape. A store's size is then predicted per array: the sample's compressed bytes per unit,
times the units of the whole selection, where an array with a time axis counts valid time steps (every
text row's length is known before the teacher runs: padding compresses to almost nothing, so bytes follow
the tokens, not the rows) and any other array counts rows; plus what does not grow with the data and
matters in small stores: each shard's index (16 bytes per chunk and a checksum), the ``shards_done``
markers and the metadata (every ``zarr.json``, written for real into a temporary directory, removed after).
Each batch also gives an estimate of its own; their standard error is printed beside the size: bytes per
token vary little between texts, bytes per image more (16 ``shapes`` images: 6 % off, ± 12 % printed; 128
images: 1.7 % off, ± 1.8 %).

Time: the teacher's throughput in inputs per second over the timed batches (the first is a warm-up and not
timed when there are others), times the inputs the run computes (distinct inputs for text, see ``dedupe``;
samples × views for images), plus the set-up measured here (loading, tokenizing, the layout probe), which
the run repeats. Writing overlaps the teacher on a background thread; its share is measured too (encode
and compress the sample) and counted where it is the slower of the two.

Pair stores (an image teacher over image–caption data) are not planned: their caption store is a second
store with its own teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.table import Table

from mmkd_core import quant
from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, compressors

from .config import ExtractConfig
from .fill import empty_shard, place
from .prepare import Prepared, open_writer, prepare
from .report import human_bytes

PLAN_BATCHES = 4
SHARD_INDEX_BYTES = 16  # per chunk of a shard (offset and length, uint64 each); plus a crc32c per shard
SHARD_INDEX_CHECKSUM = 4


@dataclass
class SizeEstimate:
    """The predicted store of one storage dtype."""

    dtype: str
    store_bytes: int
    samples: int
    spread: float = 0.0  # relative standard error from the variation between the sampled batches

    @property
    def bytes_per_sample(self) -> float:
        return self.store_bytes / max(self.samples, 1)


@dataclass
class PlanSummary:
    """What ``plan`` measured and predicts for the configured run.

    Attributes:
        samples: Samples the run writes.
        views: Views per sample.
        teacher_inputs: Inputs the run sends through the teacher (distinct inputs for text).
        distinct_inputs: Distinct teacher inputs among the samples; None where not deduplicated (images).
        sampled: Samples the plan ran the teacher on, in ``batches`` batches.
        batches: Batches run.
        dtype: The configured storage dtype.
        sizes: The predicted store of every dtype, the configured one first.
        inputs_per_second: Teacher inputs per second, the median over the timed batches.
        rate_range: The slowest and fastest timed batch (inputs per second).
        setup_seconds: Loading, tokenizing and the layout probe, measured (the run does them too).
        teacher_seconds: Predicted teacher time of the run.
        write_seconds: Predicted encode-and-compress time of the run (overlaps the teacher).
        autocast: The teacher's compute dtype, measured with, and why (``autocast.resolve_autocast``).
    """

    samples: int
    views: int
    teacher_inputs: int
    distinct_inputs: int | None
    sampled: int
    batches: int
    dtype: str
    sizes: list[SizeEstimate]
    inputs_per_second: float
    rate_range: tuple[float, float]
    setup_seconds: float
    teacher_seconds: float
    write_seconds: float
    autocast: str = ""

    @property
    def size(self) -> SizeEstimate:
        """The configured dtype's store."""
        return next(s for s in self.sizes if s.dtype == self.dtype)

    @property
    def seconds(self) -> float:
        """Predicted wall time: set-up, then the teacher or the writer, whichever is slower."""
        return self.setup_seconds + max(self.teacher_seconds, self.write_seconds)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds - self.setup_seconds, 1e-9)

    @property
    def write_mb_per_second(self) -> float:
        """The write rate the run needs: its store over its predicted time, MB (10^6 bytes) per second."""
        return self.size.store_bytes / 1e6 / max(self.seconds - self.setup_seconds, 1e-9)


def plan(cfg: ExtractConfig) -> PlanSummary:
    """Run the teacher on a few batches spread over the dataset and predict the run's store and time.

    Writes nothing: no store directory and no lock file (the metadata is measured in a temporary directory).
    """
    start = time.perf_counter()
    prepared = prepare(cfg)  # the run's own compute dtype: the times are of that dtype
    if prepared.captions is not None:
        raise MmkdError("--plan: pair stores (an image teacher over image–caption data) are not planned yet")
    setup = time.perf_counter() - start

    parts, timings = _sample(prepared)
    rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    timed = timings[1:] or timings  # the first batch warms up
    rates = [inputs / max(seconds, 1e-9) for inputs, seconds in timed]
    rate = statistics.median(rates)
    n, feeder = prepared.num_samples, prepared.feeder
    distinct = feeder.distinct_inputs
    work = distinct if distinct is not None else n * feeder.views
    sizes, write_seconds = _sizes(prepared, parts, rows)
    return PlanSummary(
        samples=n,
        views=feeder.views,
        teacher_inputs=work,
        distinct_inputs=distinct,
        sampled=len(rows["index"]),
        batches=len(timings),
        dtype=prepared.cfg.dtype,
        sizes=sizes,
        inputs_per_second=rate,
        rate_range=(min(rates), max(rates)),
        setup_seconds=setup,
        teacher_seconds=work / max(rate, 1e-9),
        write_seconds=write_seconds,
        autocast=str(prepared.compute),
    )


def _sizes(p: Prepared, parts: list[dict[str, np.ndarray]], rows: dict[str, np.ndarray]):
    """The predicted store of every dtype (the configured one first), and the configured one's write time."""
    cfg, n = p.cfg, p.num_samples
    sampled = len(rows["index"])
    sizes, write_seconds = [], 0.0
    for dtype in (cfg.dtype, *[d for d in quant.DTYPES if d != cfg.dtype]):
        lay = dataclasses.replace(p.layout, dtype=dtype)
        tick = time.perf_counter()
        data = _compressed(lay, rows)  # chunks as long as the store's, as far as the sample goes
        if dtype == cfg.dtype:
            write_seconds = (time.perf_counter() - tick) * n / sampled
        units = _units(lay, p.feeder, n)
        fixed = _shard_overhead(lay) + _metadata_bytes(dataclasses.replace(p, layout=lay))
        body = sum(data[name][0] / max(data[name][1], 1.0) * units[name] for name in units)
        # each batch's own estimate: the standard error of their mean, relative
        per_run = [_compressed(lay, run_rows) for run_rows in parts] if len(parts) > 1 else []
        each = [sum(r[name][0] / max(r[name][1], 1.0) * units[name] for name in units) for r in per_run]
        spread = statistics.stdev(each) / math.sqrt(len(each)) / statistics.mean(each) if each else 0.0
        sizes.append(SizeEstimate(dtype, int(round(body + fixed)), n, spread * body / (body + fixed)))
    return sizes, write_seconds


def _sample(p: Prepared):
    """Per run, the sampled rows' arrays as a shard gives them to the writer (float32 targets); per batch,
    (teacher inputs, seconds). Runs of one batch each, spread evenly; text runs its rows as one batch
    (``Feeder.sample_batches``: the plan needs representative rows, not the canonical batches of ``dedupe``)."""
    n, feeder = p.num_samples, p.feeder
    per = max(1, p.cfg.batch_size // feeder.views)
    if n <= PLAN_BATCHES * per:  # all of it
        starts = list(range(0, n, per))
    else:  # the first run, the last and evenly between: they never overlap
        starts = [round(j * (n - per) / (PLAN_BATCHES - 1)) for j in range(PLAN_BATCHES)]
    ranges = [(j, lo, min(lo + per, n)) for j, lo in enumerate(starts)]
    shards = [empty_shard(p.layout, lo, hi) for _, lo, hi in ranges]
    timings = []
    with torch.inference_mode():
        tick = time.perf_counter()
        for batch in feeder.sample_batches(ranges, p.cfg.batch_size):
            lo = ranges[batch["shard"]][1]
            place(shards[batch["shard"]], batch, p.targets(batch), lo)
            now = time.perf_counter()
            timings.append((len(batch["positions"]), now - tick))
            tick = time.perf_counter()
    return [feeder.finish_shard(shard, lo, hi) for shard, (_, lo, hi) in zip(shards, ranges, strict=True)], timings


def _encoded(layout: Layout, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sampled rows' arrays as ``StoreWriter.write_shard`` stores them in ``layout.dtype``."""
    enc = dict(rows)
    for name in ("tokens", "pooled"):
        if name not in layout.arrays():
            enc.pop(name, None)
            continue
        x = np.ascontiguousarray(rows[name], dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if layout.dtype == "int8":
                del enc[name]
                enc.update(quant.encode_int8(x, quant.outliers_for(x.shape[-1]), name))
            else:
                enc[name] = quant.encode_float(x, layout.dtype)
    return {name: enc[name].astype(dtype, copy=False) for name, (_, dtype) in layout.arrays().items()}


def _compressed(layout: Layout, rows: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """(compressed bytes, units (``_units``)) of each array of one run's rows, compressed by zarr with the
    store's codecs in chunks of the store's chunk length (the run's last chunk as long as it is)."""
    written: dict = {}
    store = zarr.storage.MemoryStore(store_dict=written)
    out: dict[str, tuple[float, float]] = {}
    for name, x in _encoded(layout, rows).items():
        total = 0
        for s in range(0, len(x), layout.chunk_size):
            piece = x[s : s + layout.chunk_size]
            arr = zarr.create_array(
                store,
                name=f"{name}/{s}",
                shape=piece.shape,
                dtype=piece.dtype,
                chunks=piece.shape,
                compressors=compressors(piece.dtype, layout.codec),
                fill_value=0,
            )
            arr[...] = piece
            total += sum(len(v) for k, v in written.items() if k.startswith(f"{name}/{s}/c/"))
        out[name] = (float(total), float(_weights(layout, name, rows["lengths"]).sum()))
    return out


def _weights(layout: Layout, name: str, lengths: np.ndarray) -> np.ndarray:
    """Per row, what the array's size follows: its valid time steps for an array with a time axis, else 1."""
    dims = layout.dimension_names(name) or ()
    return lengths.astype(np.float64) if "time" in dims else np.ones(len(lengths))


def _units(layout: Layout, feeder, n: int) -> dict[str, float]:
    """What each array's size follows, summed over the selection (tokenized text knows its lengths up front)."""
    lengths = feeder.row_lengths(n, layout.time_steps)
    return {name: float(_weights(layout, name, lengths).sum()) for name in layout.arrays()}


def _shard_overhead(layout: Layout) -> int:
    """Bytes of every shard's index, for every sharded array, and of the ``shards_done`` markers (1 byte each)."""
    per_shard = SHARD_INDEX_BYTES * (layout.shard_size // layout.chunk_size) + SHARD_INDEX_CHECKSUM
    return len(layout.arrays()) * layout.num_shards * per_shard + layout.num_shards


def _metadata_bytes(p: Prepared) -> int:
    """Every zarr.json of the store, as the run writes them, in a temporary directory removed after."""
    with tempfile.TemporaryDirectory(prefix="mmkd-plan-") as tmp:
        out = Path(tmp) / p.cfg.out.name  # a local path or a StoreURL: the name only
        writer = open_writer(dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, out=out)))
        with contextlib.closing(writer):
            return sum(f.stat().st_size for f in out.rglob("zarr.json"))


def plan_tables(p: PlanSummary) -> list[Table]:
    """The plan as the tables ``mmkd-extract --plan`` prints."""
    run_table = Table(title="plan (nothing written)", show_header=False)
    distinct = f" ({p.distinct_inputs:,} distinct teacher inputs)" if p.distinct_inputs is not None else ""
    run_table.add_row("samples", f"{p.samples:,} × {p.views} view{'s' * (p.views != 1)}{distinct}")
    run_table.add_row("measured on", f"{p.sampled:,} samples in {p.batches} batches spread over the dataset")
    lo, hi = p.rate_range
    run_table.add_row("teacher, measured", f"{p.inputs_per_second:,.1f} inputs/s (timed batches {lo:,.1f}–{hi:,.1f})")
    if p.autocast:
        run_table.add_row("autocast", p.autocast)
    run_table.add_row("samples/s of the run", f"{p.samples_per_second:,.1f}")
    run_table.add_row(
        "estimated time",
        f"{_duration(p.seconds)} (set-up {p.setup_seconds:.1f} s, teacher {_duration(p.teacher_seconds)}, "
        f"encode+compress {_duration(p.write_seconds)} beside it)",
    )
    run_table.add_row("write rate needed", f"{p.write_mb_per_second:,.2f} MB/s")
    sizes = Table(title="store size by --dtype (encoded and compressed as the store does)")
    for column in ("dtype", "bytes/sample", "store", "± between batches"):
        sizes.add_column(column, justify="right" if column != "dtype" else "left")
    for s in p.sizes:
        mark = " (chosen)" if s.dtype == p.dtype else ""
        sizes.add_row(
            s.dtype + mark, human_bytes(s.bytes_per_sample), human_bytes(s.store_bytes), f"{100 * s.spread:.1f} %"
        )
    return [run_table, sizes]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:,.0f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"
