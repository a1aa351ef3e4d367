"""Extraction cost over the bare teacher, bf16 autocast against fp32, and where the rest of the time goes.

Prints one table, then a breakdown of the extraction loop and the top of its profile. Ratios are medians
over --repeats interleaved runs, with their range (the machines are shared and noisy):

- extraction / bare forward: ``extract``'s loop time over the teacher alone on the very inputs the run
  computed (same canonical batches, same length order; ``bare_forward``), timed in separate runs; and
  the same in CPU time of the whole process (all threads: torch's, the writer's, zarr's). Neither is clean
  on a loaded machine: the wall time follows the other jobs, and the CPU time counts OpenMP's threads
  spinning while they wait for each other, which load makes longer (it came out below 1 here);
- in-run share: within each extraction, the loop time over the time spent in the teacher's own forward
  calls (measured in the same run, so it is not disturbed by load that changes between runs; it counts
  the writer thread's competition for the cores as teacher time, which the first ratio does not);
- the breakdown: target math, placing results in the shard buffer, waiting for the writer, batching
  (the rest of the main thread), and the time the writer thread is busy beside them.

    HF_HUB_OFFLINE=1 python benchmarks/extract_overhead.py --n 4000
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mmkd.data import create_dataset
from mmkd.extract import feeders as feeders_mod
from mmkd.extract import fill as fill_mod
from mmkd.extract import prepare as prepare_mod
from mmkd.extract import run as run_mod
from mmkd.extract.config import ExtractConfig
from mmkd.extract.feeders import TextFeeder
from mmkd.extract.hardware import auto_autocast
from mmkd.extract.run import extract
from mmkd_core.store import StoreWriter, open_store
from mmkd_core.teachers import create_teacher

SENTENCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet" / "sentences.txt"
PROFILE_LINES = 14


def _ctx(autocast: str):
    if autocast == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=getattr(torch, autocast))


def bare_forward(
    teacher, feeder: TextFeeder, n: int, batch_size: int, shard: int, autocast: str
) -> tuple[float, float]:
    """The teacher alone on exactly the inputs extraction computes: the same canonical batches, and a result
    kept for a later shard is not computed again (``DistinctInputs.targets`` with the forward pass only).

    Returns:
        (wall seconds, CPU seconds of the process: every thread's).
    """
    shards = [(k, lo, min(n, lo + shard)) for k, lo in enumerate(range(0, n, shard))]
    feeder.distinct._kept.clear()
    feeder.distinct._kept_bytes = 0

    def forward(batch):
        return {"mask": teacher(**batch["inputs"]).mask}

    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), _ctx(autocast):
        for batch in feeder.batches(shards, batch_size):
            feeder.distinct.targets(batch, forward)
    return time.perf_counter() - start, time.process_time() - cpu


class Meter:
    """Seconds spent in the loop's parts during one extraction (main thread), and the writer thread's busy
    time beside them (zarr compresses on threads of its own: the wall time of ``write_shard``, not a CPU time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self, teacher):
        """Wrap the teacher's forward, the target math, ``place``, the writer wait and ``write_shard``."""
        patches = []

        inside = threading.local()  # a timed part called from another of the same key is not counted twice

        def wrap(owner, name, key, clock=time.perf_counter):
            real = getattr(owner, name)

            def timed(*a, **kw):
                if getattr(inside, key, False):
                    return real(*a, **kw)
                setattr(inside, key, True)
                t = clock()
                try:
                    return real(*a, **kw)
                finally:
                    setattr(inside, key, False)
                    with self._lock:
                        self.seconds[key] += clock() - t

            patches.append((owner, name, real))
            setattr(owner, name, timed)

        real_fill = run_mod.fill

        def fill(*a, **kw):  # the loop starts: what the layout probe spent before it is not the loop's
            self.seconds.clear()
            self.seconds["set-up CPU"] = time.process_time() - self._cpu_start
            return real_fill(*a, **kw)

        self._cpu_start = time.process_time()

        patches.append((run_mod, "fill", real_fill))
        run_mod.fill = fill
        wrap(teacher, "forward", "teacher forward")
        wrap(feeders_mod, "recipe_targets", "target math")
        wrap(fill_mod, "place", "place in shard buffer")
        wrap(fill_mod.ShardQueue, "put", "wait for the writer")
        wrap(fill_mod.ShardQueue, "drain", "wait for the writer")
        wrap(StoreWriter, "write_shard", "writer busy (wall, beside the rest)")
        try:
            yield self
        finally:
            for owner, name, real in reversed(patches):
                setattr(owner, name, real)


def _extract(cfg: ExtractConfig, teacher, meter: Meter | None = None, profile: cProfile.Profile | None = None):
    """``extract(cfg)`` with the already loaded teacher (loading is not what is measured)."""
    real = prepare_mod.create_teacher
    prepare_mod.create_teacher = lambda *a, **kw: teacher
    try:
        with meter.installed(teacher) if meter else contextlib.nullcontext():
            if profile is not None:
                profile.enable()
            try:
                return extract(cfg, show_progress=False)
            finally:
                if profile is not None:
                    profile.disable()
    finally:
        prepare_mod.create_teacher = real


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _profile_top(profile: cProfile.Profile, lines: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    text = out.getvalue()
    body = text[text.index("ncalls") :] if "ncalls" in text else text
    return "\n".join(line.replace(str(Path(torch.__file__).parents[1]) + "/", "") for line in body.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float16", help="storage dtype of the extraction runs")
    ap.add_argument("--autocast", default="none,bfloat16", help="compute dtypes to compare, comma-separated")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled run")
    args = ap.parse_args()
    root = str(SENTENCES) if SENTENCES.exists() else None
    name, opts = ("text", {}) if root else ("shapes", {"count": args.n})
    teacher = create_teacher("minilm-l6")
    feeder = TextFeeder(create_dataset(name, root=root, **opts), teacher, args.n)
    dtypes = args.autocast.split(",")
    rows: dict[str, dict[str, list[float]]] = {a: defaultdict(list) for a in dtypes}
    parts: dict[str, dict[str, list[float]]] = {a: defaultdict(list) for a in dtypes}
    with tempfile.TemporaryDirectory() as tmp:

        def config(autocast: str, tag: str = "") -> ExtractConfig:
            return ExtractConfig(
                dataset=name,
                data_root=root,
                dataset_options=opts,
                limit=args.n,
                batch_size=args.batch_size,
                autocast=autocast,
                dtype=args.dtype,
                out=Path(tmp) / f"{autocast}{tag}.zarr",
                overwrite=True,
            )

        for _ in range(args.repeats):
            for autocast in dtypes:
                meter = Meter()
                cpu = time.process_time()
                s = _extract(config(autocast), teacher, meter)
                cpu = time.process_time() - cpu - meter.seconds["set-up CPU"]
                shard = open_store(s.path).shard_size
                bare, bare_cpu = bare_forward(teacher, feeder, args.n, args.batch_size, shard, autocast)
                r = rows[autocast]
                r["extract"].append(s.seconds)
                r["bare"].append(bare)
                r["ratio"].append(s.seconds / bare)
                r["cpu_ratio"].append(cpu / bare_cpu)
                r["in_run"].append(s.seconds / meter.seconds["teacher forward"])
                for k, v in meter.seconds.items():
                    if k != "set-up CPU":
                        parts[autocast][k].append(v / s.seconds)
                main_thread = sum(v for k, v in meter.seconds.items() if not k.startswith(("writer", "set-up")))
                parts[autocast]["batching and the rest"].append(max(0.0, s.seconds - main_thread) / s.seconds)
        profile = None
        if not args.no_profile:
            profile = cProfile.Profile()
            _extract(config(dtypes[0], "-profiled"), teacher, profile=profile)
        cos = pcos = None
        if {"none", "bfloat16"} <= set(dtypes):
            a = open_store(Path(tmp) / "none.zarr").read(0, args.n)
            b = open_store(Path(tmp) / "bfloat16.zarr").read(0, args.n)
            m = np.arange(a["tokens"].shape[2])[None] < a["lengths"][:, None]
            x, y = a["tokens"][:, 0][m].astype(np.float64), b["tokens"][:, 0][m].astype(np.float64)
            cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
            pa, pb = a["pooled"][:, 0].astype(np.float64), b["pooled"][:, 0].astype(np.float64)
            pcos = (pa * pb).sum(-1) / np.linalg.norm(pa, axis=-1) / np.linalg.norm(pb, axis=-1)

    print(
        f"\nminilm-l6 over {args.n} {'WordNet sentences' if root else 'shapes captions'}, batch {args.batch_size}, "
        f"--dtype {args.dtype}, {torch.get_num_threads()} torch threads, median (min–max) of {args.repeats}; "
        f"--autocast auto here: {auto_autocast('cpu', teacher.hidden_size)}\n"
    )
    print("| measure | value | goal |\n|---|---|---|")
    for a in dtypes:
        label = "fp32" if a == "none" else a
        print(f"| extraction / bare teacher forward ({label}) | {_spread(rows[a]['ratio'])} | <= 1.05 |")
        print(f"| extraction / bare teacher forward, CPU time ({label}) | {_spread(rows[a]['cpu_ratio'])} | |")
        print(f"| extraction / its own teacher forward time ({label}) | {_spread(rows[a]['in_run'])} | |")
    if {"none", "bfloat16"} <= set(dtypes):
        speedup = [f / b for f, b in zip(rows["none"]["extract"], rows["bfloat16"]["extract"], strict=True)]
        print(f"| bf16 autocast speed-up over fp32 (extraction) | {_spread(speedup)}x | |")
        print(f"| token-target cosine bf16 vs fp32: median / worst | {np.median(cos):.6f} / {cos.min():.6f} | |")
        print(f"| pooled-target cosine bf16 vs fp32: median / worst | {np.median(pcos):.6f} / {pcos.min():.6f} | |")
    for a in dtypes:
        r = rows[a]
        print(
            f"| seconds ({'fp32' if a == 'none' else a}), each run: extract "
            f"{', '.join(f'{v:.2f}' for v in r['extract'])}; bare {', '.join(f'{v:.2f}' for v in r['bare'])} | | |"
        )
    print("\nshare of the extraction loop's wall time (median over the runs):\n")
    print("| part | " + " | ".join("fp32" if a == "none" else a for a in dtypes) + " |")
    print("|---|" + "---|" * len(dtypes))
    keys = [
        "teacher forward",
        "target math",
        "place in shard buffer",
        "wait for the writer",
        "batching and the rest",
        "writer busy (wall, beside the rest)",
    ]
    for k in keys:
        cells = [f"{100 * statistics.median(parts[a][k]):.1f} %" if parts[a][k] else "-" for a in dtypes]
        print(f"| {k} | " + " | ".join(cells) + " |")
    if profile is not None:
        label = "fp32" if dtypes[0] == "none" else dtypes[0]
        print(f"\ncProfile of one extraction ({label}, main thread), top {PROFILE_LINES} by own time:\n")
        print(_profile_top(profile, PROFILE_LINES))


if __name__ == "__main__":
    main()
