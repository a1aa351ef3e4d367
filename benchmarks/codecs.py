"""Codecs for the target store, measured on real targets; the writer's speed and memory; zarr's Rust pipeline.

Sections (``--sections``, default all):

- ``codecs``: each candidate blosc codec on the store's chunks (``Layout``'s chunk length) of
  (a) real MiniLM-L6 WordNet token targets with their padding (read from a real store, or extracted here),
  (b) BEiT v2 base token targets (197 x 768) from a teacher with RANDOM weights over ``shapes`` images
      (the recipe is real, the weights are not: no BEiT v2 checkpoint is on these machines),
  (c) random normal float16 of the same shape (the figures issue 11 started from).
  Ratio = stored / raw bytes; MB/s per core = raw MB over the CPU seconds of the one thread that (de)compressed
  (``time.thread_time``): CPU time, not wall time, because this 2-core machine is shared while it runs.
- ``threads``: blosc's own threads (numcodecs ``set_nthreads``) and zarr's concurrency over a shard's chunks.
- ``writer``: ``StoreWriter.write_shard`` fed as extraction feeds it (``fill.empty_shard`` / ``_place`` /
  ``ShardQueue``): write MB/s per core and the peak memory the shard buffers and the writer allocate.
- ``checksums``: the writer's and the reader's CPU MB/s with the crc32c of every chunk (format 2) and without.
- ``zarrs``: writing and the loader's contiguous reads (``StoreReader.read``) with zarr's default codec pipeline
  and with ``zarrs.ZarrsCodecPipeline``, and whether the arrays are identical.

Every figure is the median of --repeats, the spread (min-max) beside it.

    HF_HUB_OFFLINE=1 nice -n 15 python benchmarks/codecs.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numcodecs.blosc
import numpy as np
import torch
import zarr
from numcodecs import Blosc

from mmkd.extract import fill, run
from mmkd.extract.config import ExtractConfig
from mmkd_core.store import Layout, StoreWriter, open_store

try:
    from mmkd_core.store import parse_codec
except ImportError:  # the code before the codec was recorded (for a before/after run)
    parse_codec = None

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SENTENCES = SHARED / "wordnet" / "sentences.txt"
REAL_STORE = Path("/work/runs/wordnet/minilm-wordnet.zarr")
CACHE = Path(os.environ.get("MMKD_BENCH_CACHE", Path(tempfile.gettempdir()) / "mmkd-bench-codecs"))
MB = 1e6

# (label, cname, clevel, shuffle); shuffle 0 none, 1 byte, 2 bit
CANDIDATES = [
    ("zstd-1 shuffle", "zstd", 1, 1),
    ("zstd-1 bitshuffle", "zstd", 1, 2),
    ("zstd-3 shuffle", "zstd", 3, 1),
    ("zstd-3 bitshuffle", "zstd", 3, 2),
    ("lz4-5 shuffle", "lz4", 5, 1),
    ("lz4-5 bitshuffle", "lz4", 5, 2),
    ("lz4hc-5 shuffle", "lz4hc", 5, 1),
    ("none", None, 0, 0),
]


def med(xs: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max)'."""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


# ---------------------------------------------------------------------------------------------------- targets


def text_targets(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(tokens float16 (n, 1, T, 384), lengths, where from): the real store's first n samples when its shards
    are done, else extracted here by the real teacher over the first n WordNet sentences."""
    if REAL_STORE.exists():
        r = open_store(REAL_STORE)  # read-only; another run may still be writing its later shards
        done = r.group["shards_done"][:]
        if len(r) >= n and done[: -(-n // r.shard_size)].all():
            g = r.group
            return g["tokens"][:n], g["lengths"][:n], f"{REAL_STORE} (real MiniLM-L6 over WordNet, first {n})"
    cached = CACHE / f"minilm-wordnet-{n}.npz"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                teacher="minilm-l6", dataset="text", data_root=str(SENTENCES), limit=n, out=Path(tmp) / "t.zarr"
            )
            run.extract(cfg, show_progress=False)
            g = open_store(cfg.out).group
            np.savez(cached, tokens=g["tokens"][:], lengths=g["lengths"][:])
    z = np.load(cached)
    return z["tokens"], z["lengths"], f"extracted here: real MiniLM-L6 over the first {n} WordNet sentences"


def image_targets(n: int, depth: int) -> tuple[np.ndarray, str]:
    """BEiT v2 base targets (n, 1, 197, 768) float16 from RANDOM weights over shapes images (cached)."""
    cached = CACHE / f"beitv2-random-d{depth}-shapes-{n}.npy"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                teacher="beitv2",
                random_weights=True,
                teacher_options={"depth": depth},
                dataset="shapes",
                dataset_options={"count": n},
                batch_size=16,
                out=Path(tmp) / "i.zarr",
            )
            run.extract(cfg, show_progress=False)
            np.save(cached, open_store(cfg.out).group["tokens"][:])
    what = f"BEiT v2 base (197 x 768, {depth} blocks) with RANDOM weights over {n} shapes images"
    return np.load(cached), what


def chunks_of(x: np.ndarray) -> list[np.ndarray]:
    """The store's chunks of x: the chunk length ``Layout`` picks (about 4 MiB)."""
    n, v, t, d = x.shape
    c = Layout(num_samples=n, views=v, time_steps=t, dim=d, pooled_dim=d).chunk_size
    return [np.ascontiguousarray(x[i : i + c]) for i in range(0, n, c)]


# ---------------------------------------------------------------------------------------------------- codecs


def codec_table(name: str, x: np.ndarray, repeats: int, lengths: np.ndarray | None = None) -> list[str]:
    """Rows of the codec table; with ``lengths`` (text) also stored bytes over the valid time steps' bytes."""
    numcodecs.blosc.use_threads = False  # as zarr sets it: one thread per (de)compression call
    chunks = chunks_of(x)
    raw = sum(c.nbytes for c in chunks)
    valid = raw if lengths is None else float(lengths.sum()) / (len(lengths) * x.shape[2]) * raw
    rows = []
    for label, cname, clevel, shuffle in CANDIDATES:
        if cname is None:
            rows.append(f"| {name} | {label} | 1.000 | {raw / valid:.2f} | - | - |")
            continue
        codec = Blosc(cname=cname, clevel=clevel, shuffle=shuffle, typesize=x.dtype.itemsize)
        enc_speed, dec_speed = [], []
        for _ in range(repeats):
            t0 = time.thread_time()
            encoded = [codec.encode(c) for c in chunks]
            t1 = time.thread_time()
            for e in encoded:
                codec.decode(e)
            t2 = time.thread_time()
            enc_speed.append(raw / MB / max(t1 - t0, 1e-9))
            dec_speed.append(raw / MB / max(t2 - t1, 1e-9))
        stored = sum(len(e) for e in encoded)
        rows.append(
            f"| {name} | {label} | {stored / raw:.3f} | {stored / valid:.2f} | {med(enc_speed)} | {med(dec_speed)} |"
        )
    return rows


def codecs_section(sets: dict[str, np.ndarray], repeats: int, lengths: dict[str, np.ndarray]) -> None:
    print("\n### codecs: stored/raw and MB/s per core (CPU time of the one thread), median (min-max)\n")
    print("| targets | codec | stored/raw | stored/valid | compress MB/s/core | decompress MB/s/core |")
    print("|---|---|---|---|---|---|")
    for name, x in sets.items():
        for row in codec_table(name, x, repeats, lengths.get(name)):
            print(row, flush=True)


# ---------------------------------------------------------------------------------------------------- threads


def threads_section(x: np.ndarray, repeats: int, cname: str, clevel: int) -> None:
    """numcodecs blosc nthreads on one chunk at a time; zarr's async concurrency over one shard's chunks."""
    chunks = chunks_of(x)
    raw = sum(c.nbytes for c in chunks)
    print(f"\n### threads: blosc {cname}-{clevel} shuffle, {raw / MB:.0f} MB, load average {os.getloadavg()[0]:.1f}\n")
    print("| how | threads | compress wall MB/s | CPU s / wall s |")
    print("|---|---|---|---|")
    codec = Blosc(cname=cname, clevel=clevel, shuffle=1, typesize=x.dtype.itemsize)
    old = numcodecs.blosc.use_threads
    try:
        for n in (1, 2, 4):
            numcodecs.blosc.use_threads = True
            numcodecs.blosc.set_nthreads(n)
            speed, util = [], []
            for _ in range(repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                for c in chunks:
                    codec.encode(c)
                w1, c1 = time.perf_counter(), time.process_time()
                speed.append(raw / MB / (w1 - w0))
                util.append((c1 - c0) / (w1 - w0))
            print(f"| numcodecs blosc nthreads | {n} | {med(speed)} | {med(util, '{:.2f}')} |", flush=True)
    finally:
        numcodecs.blosc.use_threads = old
        numcodecs.blosc.set_nthreads(1)
    from zarr.codecs import BloscCodec

    shard = x[: len(chunks[0]) * 16]  # one shard of 16 chunks, as the store's
    for conc in (1, 2, 10):
        speed, util = [], []
        for _ in range(repeats):
            with zarr.config.set({"async.concurrency": conc}):
                store = zarr.storage.MemoryStore()
                a = zarr.create_array(
                    store,
                    shape=shard.shape,
                    dtype=shard.dtype,
                    chunks=chunks[0].shape,
                    shards=shard.shape,
                    compressors=[BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", typesize=x.dtype.itemsize)],
                    fill_value=0,
                )
                w0, c0 = time.perf_counter(), time.process_time()
                a[...] = shard
                w1, c1 = time.perf_counter(), time.process_time()
            speed.append(shard.nbytes / MB / (w1 - w0))
            util.append((c1 - c0) / (w1 - w0))
        print(f"| zarr shard write, async.concurrency | {conc} | {med(speed)} | {med(util, '{:.2f}')} |", flush=True)


# ---------------------------------------------------------------------------------------------------- writer


class _Peak:
    """Peak bytes allocated through numpy/Python (tracemalloc) between start and stop, and the peak RSS rise
    (sampled every 5 ms)."""

    def __enter__(self) -> _Peak:
        import psutil

        gc.collect()
        self._proc = psutil.Process()
        self.base_rss = self.peak_rss = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        self.rss = self.peak_rss - self.base_rss


class _Source:
    """What ``ShardQueue`` asks of a source: the shard's other arrays."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    def finish_shard(self, shard: dict, lo: int, hi: int) -> dict:
        t = shard["tokens"].shape[2]
        return {
            **shard,
            "lengths": self.lengths[lo:hi],
            "input_ids": np.zeros((hi - lo, t), np.int32),
            "index": np.arange(lo, hi, dtype=np.int64),
        }


def _feed(layout: Layout, tokens: torch.Tensor, queue, batch: int, encoded: bool) -> None:
    """Extraction's loop without the teacher: batches of float32 results placed into shard buffers (in the
    stored dtype with ``encoded``, else float32 as before), each finished shard handed to the writer queue."""
    import inspect

    encoded = {"encoded": encoded} if "encoded" in inspect.signature(fill.empty_shard).parameters else {}
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        shard = fill.empty_shard(layout, lo, hi, **encoded)
        for s in range(lo, hi, batch):
            e = min(hi, s + batch)
            out = {"tokens": tokens[s:e, 0], "pooled": tokens[s:e, 0, 0], "mask": None}
            b = {"positions": np.arange(s, e), "view_ids": np.zeros(e - s, np.int64)}
            fill.place(shard, b, out, lo)
        queue.put(k, shard)
    queue.drain()


def write_store(
    path: Path,
    x16: np.ndarray,
    lengths: np.ndarray,
    batch: int = 128,
    codec: str | None = None,
    encoded: bool = True,
    **queue_options,
) -> dict:
    """Write x (float16 targets, handed over as float32 as the teacher gives them) the way extraction does;
    CPU seconds of the whole process, wall seconds and peak memory."""
    n, v, t, d = x16.shape
    extra = {"codec": parse_codec(codec)} if codec else {}
    layout = Layout(num_samples=n, views=v, time_steps=t, dim=d, pooled_dim=d, input_ids=True, **extra)
    tokens = torch.from_numpy(x16.astype(np.float32))
    writer = StoreWriter.open(
        path,
        layout,
        {"teacher": {"name": "t"}, "recipe": {}, "preprocess": {}, "views": {"count": v}, "dataset": {}},
        {},
    )
    with writer, _Peak() as peak:
        w0, c0 = time.perf_counter(), time.process_time()
        with fill.ShardQueue(writer, _Source(lengths), **queue_options) as queue:
            _feed(layout, tokens, queue, batch, encoded)
        w1, c1 = time.perf_counter(), time.process_time()
    shard_mb = layout.shard_size * v * t * d * 2 / MB
    return {"wall": w1 - w0, "cpu": c1 - c0, "traced": peak.traced / MB, "rss": peak.rss / MB, "shard_mb": shard_mb}


def writer_section(x16: np.ndarray, lengths: np.ndarray, repeats: int) -> None:
    raw = x16.nbytes / MB
    if parse_codec is None:  # the code before codecs were chosen: zstd-3, one shard in flight, float32 buffers
        variants = {"zstd-3, 1 shard in flight (float32 shard buffers)": {}}
    else:
        variants = {
            "zstd-3, 1 in flight, float32 shard buffers (the buffers before)": {"codec": "zstd-3", "encoded": False}
        }
        variants.update(
            {
                f"{codec}, {k} in flight, float16 shard buffers": {"codec": codec, "in_flight": k}
                for codec in ("zstd-3", "lz4")
                for k in (1, 2)
            }
        )
    print(
        f"\n### writer: {raw:.0f} MB of float16 tokens written as extraction writes them (float32 batches placed into "
        f"shard buffers, ShardQueue, StoreWriter.write_shard to a local directory); load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print("| writer | MB/s per core (CPU) | wall MB/s | peak traced MB | peak RSS rise MB | shard MB (float16) |")
    print("|---|---|---|---|---|---|")
    for label, opts in variants.items():
        rows = []
        for i in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(write_store(Path(tmp) / f"w{i}.zarr", x16, lengths, **opts))
        pick = {k: [r[k] for r in rows] for k in rows[0]}
        print(
            f"| {label} | {med([raw / c for c in pick['cpu']])} | {med([raw / w for w in pick['wall']])} | "
            f"{med(pick['traced'])} | {med(pick['rss'])} | {rows[0]['shard_mb']:.0f} |",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------ checksums


@contextlib.contextmanager
def without_checksums():
    """Stores written as format 1 wrote them: the compressor alone, no crc32c per chunk."""
    from mmkd_core.store import writer as writer_module

    original = writer_module.compressors

    def plain(dtype, codec=None):
        return [c for c in original(dtype, codec) if type(c).__name__ != "Crc32cCodec"] or None

    writer_module.compressors = plain
    try:
        yield
    finally:
        writer_module.compressors = original


def checksums_section(x16: np.ndarray, lengths: np.ndarray, repeats: int, batch: int) -> None:
    """What the per-chunk crc32c costs: the writer's and the reader's CPU MB/s with and without it, side by
    side in one run, interleaved so that the machine's load falls on both alike."""
    raw = x16.nbytes / MB
    rows: dict[str, dict[str, list[float]]] = {"crc32c per chunk (format 2)": {}, "none (format 1)": {}}
    for i in range(repeats):
        for label in rows:
            ctx = without_checksums() if label.startswith("none") else contextlib.nullcontext()
            with tempfile.TemporaryDirectory() as tmp, ctx:
                path = Path(tmp) / f"c{i}.zarr"
                w = write_store(path, x16, lengths, codec="lz4")
                c0 = time.process_time()
                reader = open_store(path)
                for lo in range(0, len(reader), batch):
                    reader.read(lo, min(len(reader), lo + batch), ("tokens",))
                read_cpu = time.process_time() - c0
            rows[label].setdefault("write", []).append(raw / w["cpu"])
            rows[label].setdefault("read", []).append(raw / read_cpu)
    print(f"\n### checksums: {raw:.0f} MB of float16 tokens, lz4; load average {os.getloadavg()[0]:.1f}\n")
    print("| chunks carry | write MB/s per core (CPU) | read MB/s per core (CPU) |")
    print("|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {med(r['write'])} | {med(r['read'])} |")
    base = rows["none (format 1)"]
    crc = rows["crc32c per chunk (format 2)"]
    ratio = [a / b for a, b in zip(crc["write"], base["write"], strict=True)]
    ratio_read = [a / b for a, b in zip(crc["read"], base["read"], strict=True)]
    print(f"| crc32c / none | {med(ratio, '{:.3f}')} | {med(ratio_read, '{:.3f}')} |")


# ---------------------------------------------------------------------------------------------------- zarrs


@contextlib.contextmanager
def pipeline(path: str):
    with zarr.config.set({"codec_pipeline.path": path}):
        yield


DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


def read_all(path: Path, batch: int, raw: bool = False) -> tuple[float, float, dict[str, np.ndarray]]:
    """The loader's reads: contiguous ranges through StoreReader.read (float16 decoded to float32), or with
    ``raw`` the zarr array's own (the pipeline alone); (wall s, CPU s, the arrays)."""
    r = open_store(path)
    names = ("tokens", "lengths", "input_ids")
    parts: dict[str, list[np.ndarray]] = {}
    w0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, len(r), batch):
        hi = min(len(r), lo + batch)
        got = {k: r.group[k][lo:hi] for k in names} if raw else r.read(lo, hi, names)
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    w1, c1 = time.perf_counter(), time.process_time()
    return w1 - w0, c1 - c0, {k: np.concatenate(v) for k, v in parts.items()}


def zarrs_section(x16: np.ndarray, lengths: np.ndarray, repeats: int, batch: int) -> None:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        print("\n### zarrs: not installed (pip install zarrs); skipped")
        return
    raw = x16.nbytes / MB
    print(f"\n### zarr codec pipelines: {raw:.0f} MB float16 tokens; load average {os.getloadavg()[0]:.1f}\n")
    print(
        "| pipeline | write MB/s per core (CPU) | write wall MB/s | StoreReader.read MB/s per core (CPU) | "
        "read wall MB/s | zarr array read MB/s per core (CPU) |"
    )
    print("|---|---|---|---|---|---|")
    results: dict[str, dict[str, list[float]]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for label, path in (("default (BatchedCodecPipeline)", DEFAULT_PIPELINE), ("zarrs", ZARRS_PIPELINE)):
                out = Path(tmp) / f"{label[:5]}-{i}.zarr"
                with pipeline(path):
                    w = write_store(out, x16, lengths)
                with pipeline(path):
                    rw, rc, arrays[label] = read_all(out, batch)
                    _, zc, _ = read_all(out, batch, raw=True)
                res = results.setdefault(label, {"wc": [], "ww": [], "rc": [], "rw": [], "zc": []})
                res["zc"].append(raw / zc)
                res["wc"].append(raw / w["cpu"])
                res["ww"].append(raw / w["wall"])
                res["rc"].append(raw / rc)
                res["rw"].append(raw / rw)
                if i < repeats - 1:
                    arrays.pop(label)
        for label, res in results.items():
            cells = " | ".join(med(res[k]) for k in ("wc", "ww", "rc", "rw", "zc"))
            print(f"| {label} | {cells} |")
        a, b = arrays.values()
        same = all(np.array_equal(a[k], b[k]) for k in a)
        print(f"\narrays identical between the two pipelines (tokens decoded, lengths, input_ids): {same}")
    pipeline_only(x16, repeats * 2, batch)


def pipeline_only(x16: np.ndarray, repeats: int, batch: int) -> None:
    """The pipelines alone: the tokens array written whole (sharded as the store shards it) into a local
    directory and read back in contiguous runs of ``batch`` samples, the two pipelines interleaved."""
    from mmkd_core.store import compressors

    raw = x16.nbytes / MB
    layout = Layout(num_samples=len(x16), views=1, time_steps=x16.shape[2], dim=x16.shape[3], pooled_dim=1)
    print(f"\npipelines alone (zarr array write and contiguous reads, {repeats} interleaved runs):\n")
    print("| codec | pipeline | write MB/s per core (CPU) | read MB/s per core (CPU) | read wall MB/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("lz4", "zstd-3"):
            res: dict[str, dict[str, list[float]]] = {}
            for i in range(repeats):
                for label, path in (("default", DEFAULT_PIPELINE), ("zarrs", ZARRS_PIPELINE)):
                    with pipeline(path):
                        a = zarr.create_array(
                            str(Path(tmp) / f"{codec}-{label}-{i}.zarr"),
                            shape=x16.shape,
                            dtype=x16.dtype,
                            chunks=(layout.chunk_size, *x16.shape[1:]),
                            shards=(layout.shard_size, *x16.shape[1:]),
                            compressors=compressors("float16", parse_codec(codec)),
                            fill_value=0,
                            config={"write_empty_chunks": True},
                        )
                        c0 = time.process_time()
                        a[...] = x16
                        c1 = time.process_time()
                        w1 = time.perf_counter()
                        for lo in range(0, len(x16), batch):
                            a[lo : lo + batch]
                        c2, w2 = time.process_time(), time.perf_counter()
                    r = res.setdefault(label, {"w": [], "r": [], "rw": []})
                    r["w"].append(raw / (c1 - c0))
                    r["r"].append(raw / (c2 - c1))
                    r["rw"].append(raw / (w2 - w1))
            for label, r in res.items():
                print(f"| {codec} | {label} | {med(r['w'])} | {med(r['r'])} | {med(r['rw'])} |", flush=True)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="codecs,threads,writer,checksums,zarrs")
    ap.add_argument("--text", type=int, default=2000, help="MiniLM WordNet samples")
    ap.add_argument("--images", type=int, default=64, help="BEiT v2 (random weights) shapes images")
    ap.add_argument("--depth", type=int, default=12, help="blocks of the random BEiT v2 base")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="samples per loader read")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text, lengths, text_from = text_targets(args.text)
    pad = 1 - lengths.mean() / text.shape[2]
    print(f"text targets: {text.shape} float16, {text_from}; {pad:.0%} of the time steps are padding (zeros)")
    sets = {"MiniLM text": text}
    if sections & {"codecs", "threads"}:
        image, image_from = image_targets(args.images, args.depth)
        print(f"image targets: {image.shape} float16, {image_from}")
        rng = np.random.default_rng(0)
        sets["BEiT v2 (random weights)"] = image
        sets["random normal"] = rng.standard_normal(image.shape, dtype=np.float32).astype(np.float16)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; zarr {zarr.__version__}")
    if "codecs" in sections:
        codecs_section(sets, args.repeats, {"MiniLM text": lengths})
    if "threads" in sections:
        threads_section(text, args.repeats, "zstd", 3)
        threads_section(text, args.repeats, "lz4", 5)
    if "writer" in sections:
        writer_section(text, lengths, args.repeats)
    if "checksums" in sections:
        checksums_section(text, lengths, args.repeats, args.batch)
    if "zarrs" in sections:
        zarrs_section(text, lengths, args.repeats, args.batch)


if __name__ == "__main__":
    main()
