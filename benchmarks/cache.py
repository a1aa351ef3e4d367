"""The cost of streaming targets from a store, and what the cache saves, measured side by side.

Prints one table of ratios (medians over --repeats interleaved runs; the machines are shared and noisy):
- a training epoch streamed from the store over the same epoch with every target in RAM (goal <= 1.05);
- loader samples/s over a raw sequential read of the same store (goal >= 0.8; benchmarks/loader.py measures the
  loader in detail);
- an epoch with the teacher run online over the cached epoch, beside the teacher/student compute ratio.

    HF_HUB_OFFLINE=1 python benchmarks/cache.py --n 4000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from recipes import InMemoryRecipe, OnlineTeacherRecipe, run

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train
from mmkd_core import store_loader
from mmkd_core.store import open_store
from mmkd_core.teachers import create_teacher

SENTENCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "sentences.txt"


def raw_read(store: Path) -> float:
    r = open_store(store)
    start = time.perf_counter()
    for lo in range(0, len(r), r.chunk_size):
        r.read(lo, min(len(r), lo + r.chunk_size))
    return time.perf_counter() - start


def loader_read(store: Path, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in store_loader(store, batch_size, targets="float32", pin_memory=False):
        pass
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = str(SENTENCES) if SENTENCES.exists() else None
    name, opts = ("text", {}) if root else ("shapes", {"count": args.n})
    rows: dict[str, list[float]] = {k: [] for k in ("stream", "ram", "online", "raw", "loader", "teacher", "step")}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        extract(
            ExtractConfig(dataset=name, data_root=root, dataset_options=opts, limit=args.n, out=store),
            show_progress=False,
        )
        teacher = create_teacher("minilm-l6")
        for r in range(args.repeats):

            def cfg(tag: str, r: int = r) -> TrainConfig:
                return TrainConfig(
                    targets=store,
                    depth=args.depth,
                    epochs=1,
                    batch_size=args.batch_size,
                    run_dir=Path(tmp) / f"{tag}{r}",
                    progress=False,
                    ckpt_every=10**9,
                )

            rows["stream"].append(train(cfg("stream")).seconds)
            rows["ram"].append(run(InMemoryRecipe(cfg("ram"))).seconds)
            rows["online"].append(run(OnlineTeacherRecipe(cfg("online"), teacher)).seconds)
            rows["raw"].append(raw_read(store))
            rows["loader"].append(loader_read(store, args.batch_size))
        # compute per batch: the teacher's forward against a student's training step, same batches
        batches = list(store_loader(store, args.batch_size, pin_memory=False))[:20]
        with torch.inference_mode():
            start = time.perf_counter()
            for b in batches:
                teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            rows["teacher"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    n = args.n
    print(
        f"\n{n} {'WordNet sentences' if root else 'shapes captions'}, MiniLM targets (float16), {args.depth}-block "
        f"text student, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| measure | value | goal |\n|---|---|---|")
    print(f"| training epoch streamed / all targets in RAM | {med['stream'] / med['ram']:.3f} | <= 1.05 |")
    print(f"| loader samples/s / raw sequential read samples/s | {med['raw'] / med['loader']:.3f} | >= 0.8 |")
    print(f"| online-teacher epoch / cached epoch | {med['online'] / med['stream']:.2f}x | |")
    print(
        f"| teacher forward / student step (per batch, 20 batches) | "
        f"{med['teacher'] / (med['stream'] / (n / args.batch_size) * 20):.2f} | |"
    )
    print(
        f"| seconds: stream {med['stream']:.1f}, ram {med['ram']:.1f}, online {med['online']:.1f}, "
        f"raw read {med['raw']:.2f}, loader {med['loader']:.2f} | | |"
    )


if __name__ == "__main__":
    main()
