"""The store's loader against a raw sequential read, on a text store and an image store, in one run.

Both stores are synthetic, written with the public ``StoreWriter`` (no teacher runs): a float16 text store of
``--text-n`` samples shaped like a MiniLM store (128 time steps, 384 wide, lengths 8-40 so most of each
sample is padding, as in WordNet), and a float16 image store of ``--image-n`` shapes images with 2 views
(rendered from the stored view parameters at 64 px). Per store it prints samples/s of:

- a raw sequential read: every array, whole chunks in order, nothing decoded (and its GB/s of stored target
  bytes, on one core);
- ``store_loader`` with 0, 1 and 2 workers (batches of ``--batch-size``, targets as stored);

medians of ``--repeats`` runs with their spread, timed from the third batch on (steady state), and the bytes
per sample a batch hands to the device, stored dtype against float32 on the host.

    HF_HUB_OFFLINE=1 python benchmarks/loader.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmkd.data import create_dataset
from mmkd_core import store_loader
from mmkd_core.store import Layout, StoreWriter, open_store
from mmkd_core.views import NUM_PARAMS, ViewSpec, draw_params

WARMUP = 2  # batches left out of every timing


def text_store(path: Path, n: int) -> Path:
    t, d = 128, 384
    layout = Layout(num_samples=n, views=1, time_steps=t, dim=d, pooled_dim=d, input_ids=True, dtype="float16")
    config = {"teacher": {"name": "synthetic"}, "recipe": {}, "preprocess": {}, "views": {"count": 1}}
    w = StoreWriter.open(path, layout, {**config, "dataset": {"name": "synthetic-text"}}, {})
    rng = np.random.default_rng(0)
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        m = hi - lo
        lengths = rng.integers(8, 41, m).astype(np.int32)
        valid = np.arange(t)[None] < lengths[:, None]
        tokens = rng.standard_normal((m, 1, t, d), dtype=np.float32) * valid[:, None, :, None]
        ids = rng.integers(1, 30000, (m, t)).astype(np.int32) * valid
        w.write_shard(
            k,
            {
                "tokens": tokens,
                "pooled": rng.standard_normal((m, 1, d), dtype=np.float32),
                "lengths": lengths,
                "input_ids": ids,
                "index": np.arange(lo, hi, dtype=np.int64),
            },
        )
    w.finish()
    return path


def image_store(path: Path, n: int) -> tuple[Path, object]:
    source = create_dataset("shapes", count=n)
    spec = ViewSpec(count=2, size=64)
    t, d = 1 + (64 // 16) ** 2, 192
    layout = Layout(num_samples=n, views=2, time_steps=t, dim=d, pooled_dim=d, view_params=NUM_PARAMS, dtype="float16")
    config = {"teacher": {"name": "synthetic"}, "recipe": {}, "preprocess": {}, "views": spec.describe()}
    w = StoreWriter.open(path, layout, {**config, "dataset": {"name": "shapes"}}, {})
    rng = np.random.default_rng(1)
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        m = hi - lo
        params = np.stack([draw_params(*source.image(i).size, spec, i) for i in range(lo, hi)])
        w.write_shard(
            k,
            {
                "tokens": rng.standard_normal((m, 2, t, d), dtype=np.float32),
                "pooled": rng.standard_normal((m, 2, d), dtype=np.float32),
                "lengths": np.full(m, t, np.int32),
                "view_params": params,
                "view_checksum": np.zeros((m, 2), np.uint64),  # not verified here
                "index": np.arange(lo, hi, dtype=np.int64),
            },
        )
    w.finish()
    return path, source


def raw_read(store: Path) -> tuple[float, int]:
    """Seconds to read every array whole chunk by whole chunk, and the stored target bytes read."""
    r = open_store(store)
    arrays = [r.group[name] for name in r.array_names() if name != "shards_done"]
    targets = sum(r.group[name].nbytes for name in ("tokens", "pooled") if r.has(name))
    start = time.perf_counter()
    for lo in range(0, len(r), r.chunk_size):
        for a in arrays:
            a[lo : lo + r.chunk_size]
    return time.perf_counter() - start, targets


def loader_rate(store: Path, batch_size: int, workers: int, **options) -> tuple[float, float]:
    """Samples/s from the third batch on, and the bytes per sample of the batches' targets."""
    loader = store_loader(store, batch_size, workers=workers, pin_memory=False, **options)
    count, nbytes, start = 0, 0, None
    for k, batch in enumerate(loader):
        if k == WARMUP:
            start = time.perf_counter()
        if k >= WARMUP:
            count += len(batch["index"])
        nbytes += sum(v.nbytes for name, v in batch.items() if name.startswith(("tokens", "pooled")))
    seconds = time.perf_counter() - start
    return count / seconds, nbytes / open_store(store).group["index"].shape[0]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def measure(name: str, store: Path, n: int, batch_size: int, repeats: int, **options) -> list[str]:
    rows: dict[str, list[float]] = {"raw": [], "gbps": [], 0: [], 1: [], 2: []}
    for _ in range(repeats):  # interleaved: the machines are shared and noisy
        seconds, target_bytes = raw_read(store)
        rows["raw"].append(n / seconds)
        rows["gbps"].append(target_bytes / seconds / 1e9)
        for workers in (0, 1, 2):
            rows[workers].append(loader_rate(store, batch_size, workers, **options)[0])
    stored = loader_rate(store, batch_size, 0, **options)[1]
    wide = loader_rate(store, batch_size, 0, targets="float32", **options)[1]
    med = {k: statistics.median(v) for k, v in rows.items()}
    return [
        f"| {name} | {spread(rows['raw'])} | {med['gbps']:.2f} | {spread(rows[0])} | {spread(rows[1])} | "
        f"{spread(rows[2])} | {med[0] / med['raw']:.2f} | {med[2] / med[0]:.2f} | {stored:,.0f} / {wide:,.0f} |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-n", type=int, default=20_000)
    ap.add_argument("--image-n", type=int, default=4_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        text = text_store(Path(tmp) / "text.zarr", args.text_n)
        image, source = image_store(Path(tmp) / "image.zarr", args.image_n)
        print(f"stores written in {time.perf_counter() - start:.0f} s")
        rows = measure(
            f"text, {args.text_n:,} samples", text, args.text_n, args.batch_size, args.repeats, by_length=True
        )
        rows += measure(
            f"image, {args.image_n:,} × 2 views", image, args.image_n, args.batch_size, args.repeats, source=source
        )
    print(
        f"\nsamples/s, median of {args.repeats} (min–max), from batch {WARMUP + 1} on; batch {args.batch_size}; "
        f"float16 stores; {torch.get_num_threads()} threads\n"
    )
    print(
        "| store | raw read | raw GB/s of targets (1 core) | 0 workers | 1 worker | 2 workers | 0 workers / raw "
        "| 2 workers / 0 | target bytes/sample to the device: stored / float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
