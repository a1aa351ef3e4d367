"""Scale-out figures in one run: codecs, dask workers, extraction overhead, the loader, and memory.

Prints one table (medians over --repeats interleaved runs; these machines are shared and noisy, so the ratios
are the figures to quote, each measured side by side in this one run):

- write and read MB/s per core of each candidate codec on real MiniLM targets (``benchmarks/codecs.py``);
- extraction samples/s in one process and with ``--cluster local:1`` / ``local:2``, and their ratio;
- extraction wall time over the bare teacher forward on the same batches (``benchmarks/extract_overhead.py``);
- loader samples/s with 0, 1 and 2 DataLoader workers against a raw sequential read of the same store;
- peak RSS of an extraction of 1,000 and of 10,000 samples, each in a fresh process (flat memory: ratio <= 1.1).

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py            # about 15 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --quick    # smaller sizes, one repeat: a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SENTENCES = HERE.parents[1] / "shared" / "data" / "wordnet" / "sentences.txt"


def _extract_cmd(out: Path, n: int, *extra: str) -> list[str]:
    data = ["--dataset", "text", "--data-root", str(SENTENCES)] if SENTENCES.exists() else ["--dataset", "shapes"]
    return [
        sys.executable, "-m", "mmkd.extract.cli", "--teacher", "minilm-l6", *data, "--limit", str(n),
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command in a fresh process (``wait4``'s own rusage: the
    child's peak alone, not the largest of every child this process has had)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def sub_benchmark(script: str, *args: str) -> str:
    """The table another benchmark of this folder prints (its own figures, measured in this run)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmarks/{script} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout.strip()


def extraction_rows(tmp: Path, n: int, repeats: int) -> dict[str, list[float]]:
    """Samples/s of whole ``mmkd-extract`` commands (start-up and, for the cluster, its start included)."""
    rows: dict[str, list[float]] = {"1 process": [], "local:1": [], "local:2": []}
    for r in range(repeats):
        for name, extra in (
            ("1 process", ()),
            ("local:1", ("--cluster", "local:1")),
            ("local:2", ("--cluster", "local:2")),
        ):
            seconds, _ = run_measured(_extract_cmd(tmp / f"x-{name}-{r}.zarr", n, *extra))
            rows[name].append(n / seconds)
    return rows


def memory_rows(tmp: Path, sizes: tuple[int, int]) -> dict[int, int]:
    """Peak RSS of one extraction per size, in a fresh process each."""
    return {n: run_measured(_extract_cmd(tmp / f"rss-{n}.zarr", n))[1] for n in sizes}


def loader_rows(store: Path, batch_size: int, repeats: int) -> dict[str, list[float]]:
    """Samples/s of a raw sequential read and of one training epoch's batches with 0, 1, 2 workers."""
    from mmkd_core.loader import store_loader
    from mmkd_core.store import open_store

    reader = open_store(store)
    n, chunk = len(reader), reader.chunk_size
    rows: dict[str, list[float]] = {"raw": [], "0 workers": [], "1 worker": [], "2 workers": []}
    for _ in range(repeats):
        start = time.perf_counter()
        for lo in range(0, n, chunk):
            reader.read(lo, min(n, lo + chunk))
        rows["raw"].append(n / (time.perf_counter() - start))
        for workers, name in ((0, "0 workers"), (1, "1 worker"), (2, "2 workers")):
            loader = store_loader(store, batch_size, workers=workers, by_length=True)
            start = time.perf_counter()
            seen = sum(len(b["lengths"]) for b in loader)
            rows[name].append(seen / (time.perf_counter() - start))
    return rows


IMAGENET = 1_281_167  # ImageNet-1k train images
GPU_IMAGES_PER_S = (1000, 2000, 4000)


def imagenet_table(ratio: float, mb_per_core: float, codec: str) -> str:
    """BEiT v2 base (197 tokens x 768, pooled 768) over ImageNet-1k, one view: bytes per sample and store size
    for float16 tokens, int8 tokens and pooled-only float16 stores (the store's own array layout, raw bytes times
    ``ratio``, the codec's measured stored/raw on token targets), and the cores of compression each GPU rate
    needs at ``mb_per_core`` (the codec's measured write MB/s per core)."""
    import numpy as np

    from mmkd_core.store import Layout

    kinds = {
        "float16 tokens + pooled": Layout(IMAGENET, 1, 197, 768, 768, "float16", view_params=5),
        "int8 tokens + pooled": Layout(IMAGENET, 1, 197, 768, 768, "int8", view_params=5),
        "pooled only (float16)": Layout(IMAGENET, 1, 197, 768, 768, "float16", store_tokens=False, view_params=5),
    }
    rates = " | ".join(f"cores at {r:,} img/s" for r in GPU_IMAGES_PER_S)
    out = [
        f"| store (one view) | bytes/sample raw | stored (x{ratio:.2f}, {codec}) | ImageNet-1k total | {rates} |",
        "| --- | --- | --- | --- |" + " --- |" * len(GPU_IMAGES_PER_S),
    ]
    for name, layout in kinds.items():
        raw = sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize for shape, dtype in layout.arrays().values())
        cores = " | ".join(f"{r * raw / 1e6 / mb_per_core:.1f}" for r in GPU_IMAGES_PER_S)
        out.append(f"| {name} | {raw:,} | {raw * ratio:,.0f} | {raw * ratio * IMAGENET / 1e9:,.0f} GB | {cores} |")
    return "\n".join(out)


def default_codec_speed(repeats: int) -> tuple[float, float, str]:
    """Stored/raw and compress MB/s per core (CPU seconds of the compressing thread) of the store's default
    codec on random normal float16 shaped like ViT-B token targets (197 x 768), in chunks of the store's
    size: what a real image teacher's instance-normalised targets compress like (near-Gaussian), where
    random-weight teachers' targets compress far better than any real one's would."""
    import numcodecs.blosc
    import numpy as np
    from numcodecs import Blosc

    from mmkd_core.store import DEFAULT_CODEC, Layout

    numcodecs.blosc.use_threads = False  # as zarr runs blosc: one thread per call
    x = np.random.default_rng(0).standard_normal((256, 1, 197, 768)).astype(np.float16)
    c = Layout(num_samples=256, views=1, time_steps=197, dim=768, pooled_dim=768).chunk_size
    chunks = [np.ascontiguousarray(x[i : i + c]) for i in range(0, len(x), c)]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[DEFAULT_CODEC["shuffle"]]
    codec = Blosc(cname=DEFAULT_CODEC["cname"], clevel=DEFAULT_CODEC["clevel"], shuffle=shuffle, typesize=2)
    speeds = []
    for _ in range(max(repeats, 3)):
        t0 = time.thread_time()
        stored = sum(len(codec.encode(ch)) for ch in chunks)
        speeds.append(x.nbytes / 1e6 / max(time.thread_time() - t0, 1e-9))
    name = f"{DEFAULT_CODEC['cname']}-{DEFAULT_CODEC['clevel']} {DEFAULT_CODEC['shuffle']}"
    return stored / x.nbytes, _med(speeds), name


def _med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="samples of the extraction and loader rows")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=(1000, 10000))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="n=600, rss at 300 and 1,200, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rss_sizes, args.repeats = 600, (300, 1200), 1

    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small = ["--text", "300", "--images", "8", "--depth", "2"] if args.quick else []
        codec_table = sub_benchmark("codecs.py", "--sections", "codecs,writer", "--repeats", str(args.repeats), *small)
        ext = extraction_rows(tmp, args.n, args.repeats)
        overhead = sub_benchmark("extract_overhead.py", "--n", str(args.n), "--repeats", str(args.repeats))
        store = tmp / "x-1 process-0.zarr"
        load = loader_rows(store, args.batch_size, args.repeats)
        rss = memory_rows(tmp, tuple(args.rss_sizes))

    lines.append(f"\n## Codecs (real targets; MB/s per core)\n\n{codec_table}")
    one, c1, c2 = (_med(ext[k]) for k in ("1 process", "local:1", "local:2"))
    lines.append(
        f"\n## Extraction, minilm-l6 over {args.n} {'WordNet sentences' if SENTENCES.exists() else 'shapes captions'}"
        f" (whole commands, median of {args.repeats})\n\n| run | samples/s | over 1 process |\n| --- | --- | --- |\n"
        f"| 1 process | {one:.1f} | 1.00 |\n| --cluster local:1 | {c1:.1f} | {c1 / one:.2f} |\n"
        f"| --cluster local:2 | {c2:.1f} | {c2 / one:.2f} |\n\nlocal:2 / local:1 = {c2 / c1:.2f} "
        f"({os.cpu_count()} cores on this machine)"
    )
    lines.append(f"\n## Extraction overhead (extraction wall time / bare teacher forward)\n\n{overhead}")
    raw = _med(load["raw"])
    body = "".join(f"| {k} | {_med(v):.0f} | {_med(v) / raw:.2f} |\n" for k, v in load.items() if k != "raw")
    lines.append(
        f"\n## Loader, one epoch of batches of {args.batch_size} (samples/s)\n\n| reader | samples/s | over raw |\n"
        f"| --- | --- | --- |\n| raw sequential read | {raw:.0f} | 1.00 |\n{body}"
    )
    ratio, mb_core, name = default_codec_speed(args.repeats)
    lines.append(
        f"\n## Worked: BEiT v2 base over ImageNet-1k ({IMAGENET:,} images), one view\n\n"
        f"Stored sizes at the default codec's {ratio:.2f} of raw on random normal float16 (real targets are near "
        f"Gaussian); cores of compression alone at its measured {mb_core:,.0f} MB/s per core:\n\n"
        f"{imagenet_table(ratio, mb_core, name)}"
    )
    (small, big) = args.rss_sizes
    lines.append(
        f"\n## Peak RSS of extraction\n\n| samples | peak RSS |\n| --- | --- |\n"
        f"| {small:,} | {rss[small] / 2**20:.0f} MiB |\n| {big:,} | {rss[big] / 2**20:.0f} MiB |\n\n"
        f"ratio {rss[big] / rss[small]:.3f} (flat memory: <= 1.1)"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
