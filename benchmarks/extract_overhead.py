"""Extraction cost over the bare teacher, and bf16 autocast against fp32, measured side by side.

Prints one table. Ratios are medians over --repeats interleaved runs (the machines are shared and noisy).

    HF_HUB_OFFLINE=1 python benchmarks/extract_overhead.py --n 4000
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
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.extract.sources import TextSource
from mmkd_core.store import open_store
from mmkd_core.teachers import create_teacher

SENTENCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "sentences.txt"


def bare_forward(teacher, source: TextSource, n: int, batch_size: int, shard: int, autocast: bool) -> float:
    """The teacher alone on exactly the batches extraction runs (same shards, same length order)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    start = time.perf_counter()
    with torch.inference_mode(), ctx:
        shards = [(k, lo, min(n, lo + shard)) for k, lo in enumerate(range(0, n, shard))]
        for batch in source.batches(shards, batch_size):
            teacher(**batch["inputs"])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = str(SENTENCES) if SENTENCES.exists() else None
    name, opts = ("text", {}) if root else ("shapes", {"count": args.n})
    teacher = create_teacher("minilm-l6")
    source = TextSource(create_dataset(name, root=root, **opts), teacher, args.n)
    rows: dict[str, list[float]] = {"bare": [], "extract": [], "bare_bf16": [], "extract_bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        shard = 0
        for _ in range(args.repeats):
            for autocast in ("none", "bfloat16"):
                cfg = ExtractConfig(
                    dataset=name,
                    data_root=root,
                    dataset_options=opts,
                    limit=args.n,
                    batch_size=args.batch_size,
                    autocast=autocast,
                    dtype="float32",
                    out=Path(tmp) / f"{autocast}.zarr",
                    overwrite=True,
                )
                s = extract(cfg, show_progress=False)
                shard = open_store(cfg.out).shard_size
                suffix = "" if autocast == "none" else "_bf16"
                rows["extract" + suffix].append(s.seconds)
                rows["bare" + suffix].append(
                    bare_forward(teacher, source, args.n, args.batch_size, shard, autocast != "none")
                )
        a = open_store(Path(tmp) / "none.zarr").read(0, args.n)
        b = open_store(Path(tmp) / "bfloat16.zarr").read(0, args.n)
        m = np.arange(a["tokens"].shape[2])[None] < a["lengths"][:, None]
        x, y = a["tokens"][:, 0][m], b["tokens"][:, 0][m]
        cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
        pa, pb = a["pooled"][:, 0], b["pooled"][:, 0]
        pcos = (pa * pb).sum(-1) / np.linalg.norm(pa, axis=-1) / np.linalg.norm(pb, axis=-1)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\nminilm-l6 over {args.n} {'WordNet sentences' if root else 'shapes captions'}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| measure | value | goal |\n|---|---|---|")
    print(f"| extraction loop / bare teacher forward (fp32) | {med['extract'] / med['bare']:.3f} | <= 1.05 |")
    print(f"| extraction loop / bare teacher forward (bf16) | {med['extract_bf16'] / med['bare_bf16']:.3f} | <= 1.05 |")
    print(f"| bf16 autocast speed-up over fp32 (extraction) | {med['extract'] / med['extract_bf16']:.2f}x | |")
    print(f"| token-target cosine bf16 vs fp32: median / worst | {np.median(cos):.5f} / {cos.min():.5f} | |")
    print(f"| pooled-target cosine bf16 vs fp32: median / worst | {np.median(pcos):.5f} / {pcos.min():.5f} | |")
    print(
        f"| seconds: bare {med['bare']:.2f}, extract {med['extract']:.2f}, bare bf16 {med['bare_bf16']:.2f}, "
        f"extract bf16 {med['extract_bf16']:.2f} | | |"
    )


if __name__ == "__main__":
    main()
