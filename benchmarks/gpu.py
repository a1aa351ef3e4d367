"""The GPU path, exercised: extraction, the writer, decoding on the device and training, on whatever this
machine has (CUDA, else the CPU at much smaller sizes), in one run that prints one table.

Sections (each timed in steady state: set-up and the first batches left out; median (min–max) of repeats):

- extraction: a random-weight BEiT v2 teacher (on CUDA the base model: 224 px, 196 + 1 tokens, 12 blocks, in
  bf16; on the CPU a tiny one of the same architecture, in whatever ``--autocast auto`` picks) over the
  built-in ``shapes`` images, for float16 tokens, int8 tokens and a pooled-only store. The steady rate of
  ``extract`` is the slope between a run over the first ``first`` samples and one over all ``samples``
  (``(samples - first) / (t_all - t_first)``: start-up, the DataLoader's first batches and the last shard's
  write cancel out; where the difference is under a fifth of the large run, as it can be at the CPU's tiny
  sizes, the whole large run's rate is given and the table says so). Beside it, in the same process, the
  bare teacher forward on the very inputs the store
  recorded (view 0 of the first batches, re-rendered by the loader from the stored view parameters),
  after a warm-up; the ratio is extraction time over bare-forward time for the same images (goal on a GPU:
  ≤ 1.10). The writer's rate is the stored bytes per second of that steady state; its cores are the CPU
  seconds of the writer's threads (``mmkd-writer*`` and zarr's ``zarr*``, sampled from /proc while the run
  lasts) over the run's wall time, beside the whole process's.
- decoding: one stored batch (float16, int8) made float32 on the device: ``to_device`` (stored bytes copied,
  widened there) against widening on the host (``decode_targets`` on the CPU: the values
  ``targets="float32"`` gives, checked equal) and copying float32.
- training: a 6-block ViT student from the float16 store through ``TrainRecipe`` (its ``train_step``, the
  loader, ``to_device``): steps/s from the store with 0 and 4 loader workers (CPU: 0 and 1) against the same
  steps on batches already in device memory (goal ≥ 0.9).
- ``mmkd-train --nproc 1`` as a command on this device, and the DDP path with a process group of one rank
  (NCCL on CUDA, gloo on the CPU: ``torch.distributed.run`` with one process, the student wrapped in
  ``DistributedDataParallel`` and stepped by ``TrainRecipe.train_step``). ``mmkd-train --nproc 1`` itself
  runs under torchrun with a process group of one rank (NCCL on CUDA), the single-GPU DDP path.

The table and a JSON file go to ``$OUT`` when it is set, else to ``--out`` (default: a temporary folder).

    HF_HUB_OFFLINE=1 python benchmarks/gpu.py            # CUDA if there is one, else the CPU sizes
    HF_HUB_OFFLINE=1 python benchmarks/gpu.py --quick    # the smallest sizes (the test's)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train import TrainConfig, TrainRecipe
from mmkd.train.build import loss_inputs
from mmkd.train.ddp import freeze_unused
from mmkd_core import StoreDataset, create_dataset, create_teacher, store_loader, to_device
from mmkd_core.loader import StoreLoader, decode_targets

START = time.perf_counter()
WRITER_THREADS = ("mmkd-writer", "zarr")  # the extraction's shard writer and zarr's compression/I-O threads
STORES = {  # name -> ExtractConfig fields
    "float16 tokens": {"dtype": "float16"},
    "int8 tokens": {"dtype": "int8"},
    "pooled only": {"dtype": "float16", "pooled_only": True},
}
RESULT_NAME = "gpu_benchmark"
TIMEOUT_S = 240  # each subprocess of the ranks section: a hang must not take the machine's whole lease


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section does (one set per kind of run)."""

    samples: int  # extraction: samples of the large run
    first: int  # extraction: samples of the small run (the slope's other end)
    warm: int  # extraction: samples of the untimed warm-up run, whose inputs the bare forward reuses
    batch: int  # extraction batch
    workers: int  # extraction image-rendering processes
    resolution: int  # shapes image side
    teacher: dict[str, Any]  # BEiT v2 architecture overrides ({} = the base model)
    autocast: str  # extraction compute dtype
    repeats: int  # extraction repeats per store (fewer once budget_s is spent)
    budget_s: float  # extraction section's time budget
    bare_passes: int  # bare-forward passes per repeat (after 2 warm-up passes)
    decode_repeats: int
    train_batch: int
    student: dict[str, Any]  # student options beside depth 6
    train_autocast: str
    train_warmup: int  # steps left out of every training timing
    train_steps: int  # timed steps
    train_windows: int  # the timed steps cut into this many windows: median (min–max) over them
    loader_workers: tuple[int, ...]
    ddp_steps: int


GPU = Sizes(
    samples=20_000,
    first=4_000,
    warm=1_024,
    batch=256,
    workers=10,
    resolution=224,
    teacher={},
    autocast="bfloat16",
    repeats=3,
    budget_s=240,
    bare_passes=24,
    decode_repeats=20,
    train_batch=64,
    student={"embed_dim": 768, "num_heads": 12},
    train_autocast="bfloat16",
    train_warmup=10,
    train_steps=90,
    train_windows=3,
    loader_workers=(0, 4),
    ddp_steps=20,
)
TINY_BEIT = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2}
CPU = Sizes(
    samples=96,
    first=32,
    warm=32,
    batch=16,
    workers=0,
    resolution=64,
    teacher=TINY_BEIT,
    autocast="auto",
    repeats=3,
    budget_s=60,
    bare_passes=6,
    decode_repeats=10,
    train_batch=4,
    student={"embed_dim": 64, "num_heads": 2},
    train_autocast="none",
    train_warmup=3,
    train_steps=12,
    train_windows=3,
    loader_workers=(0, 1),
    ddp_steps=3,
)
QUICK = dataclasses.replace(
    CPU, samples=48, first=16, warm=16, repeats=1, budget_s=20, bare_passes=3, decode_repeats=5, train_warmup=2,
    train_steps=3, train_windows=1, ddp_steps=2,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    """``median (min–max)`` of ``values``, or the one value."""
    if len(values) == 1:
        return fmt.format(values[0])
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} ({fmt.format(lo)}–{fmt.format(hi)})"


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast_for(device: str, dtype: str):
    """The teacher's autocast context for a resolved ``--autocast`` value."""
    if dtype == "none":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


class ThreadCPU:
    """CPU seconds of this process's threads whose names start with ``prefixes``, sampled from /proc while
    the block runs (a thread that ends loses at most its last ``every`` seconds); None where there is no
    /proc. Also the whole process's CPU seconds."""

    def __init__(self, prefixes: tuple[str, ...], every: float = 0.05) -> None:
        self.prefixes, self.every = prefixes, every
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.base: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()

    def _cpu(self, tid: int) -> float | None:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def _sample(self) -> None:
        for t in threading.enumerate():
            if t.name.startswith(self.prefixes) and t.native_id is not None:
                cpu = self._cpu(t.native_id)
                if cpu is not None:
                    self.seen[t.native_id] = max(cpu, self.seen.get(t.native_id, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> ThreadCPU:
        self._sample()
        self.base = dict(self.seen)
        self.process = time.process_time()
        self._thread = threading.Thread(target=self._run, name="gpu-benchmark-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        self.process = time.process_time() - self.process

    @property
    def seconds(self) -> float | None:
        if not Path("/proc/self/task").exists():
            return None
        return sum(v - self.base.get(tid, 0.0) for tid, v in self.seen.items())


# -------------------------------------------------------------------------------------------- extraction


def extract_config(sizes: Sizes, device: str, out: Path, limit: int, **store: Any) -> ExtractConfig:
    return ExtractConfig(
        teacher="beitv2",
        random_weights=True,
        teacher_options=dict(sizes.teacher),
        dataset="shapes",
        dataset_options={"count": sizes.samples, "resolution": sizes.resolution},
        batch_size=sizes.batch,
        workers=sizes.workers,
        device=device,
        autocast=sizes.autocast,
        limit=limit,
        out=out,
        overwrite=True,
        **store,
    )


def bare_inputs(store: Path, sizes: Sizes, device: str) -> list[torch.Tensor]:
    """The teacher's inputs of the warm-up store's samples, in extraction batches, on the device: view 0
    re-rendered from the stored view parameters (what the store's checksums vouch the teacher read)."""
    source = create_dataset("shapes", count=sizes.samples, resolution=sizes.resolution)
    ds = StoreDataset(store, sizes.batch, view=0, source=source, names=("lengths", "index", "view_params"))
    return [batch["pixel_values"].to(device) for batch in ds]


def bare_forward(teacher, inputs: list[torch.Tensor], passes: int, device: str, autocast: str) -> float:
    """Images/s of the teacher alone over ``inputs`` (``passes`` batches, cycling), after 2 warm-up passes."""
    with torch.inference_mode(), autocast_for(device, autocast):
        for x in (inputs * 2)[:2]:
            teacher(pixel_values=x)
        sync(device)
        start, images = time.perf_counter(), 0
        for k in range(passes):
            x = inputs[k % len(inputs)]
            teacher(pixel_values=x)
            images += len(x)
        sync(device)
    return images / (time.perf_counter() - start)


def steady_rate(sizes: Sizes, small_s: float, big_s: float) -> tuple[float, bool]:
    """Images/s between the small run's end and the large run's (True), or of the whole large run (False)
    where the difference is under a fifth of the large run: too small to tell from the noise."""
    if big_s - small_s > 0.2 * big_s:
        return (sizes.samples - sizes.first) / (big_s - small_s), True
    return sizes.samples / big_s, False


def extraction(sizes: Sizes, device: str, tmp: Path) -> tuple[list[list[str]], dict[str, Any], dict[str, Path]]:
    """The extraction section: rows, results, and the large stores (for the sections after it)."""
    warm = extract(extract_config(sizes, device, tmp / "warm.zarr", sizes.warm), show_progress=False)
    autocast = warm.autocast.autocast
    teacher = create_teacher("beitv2", random_init=True, device=device, **sizes.teacher)
    inputs = bare_inputs(tmp / "warm.zarr", sizes, device)
    rows, results, stores = [], {"autocast": str(warm.autocast)}, {}
    section_start = time.perf_counter()
    for k, (name, store) in enumerate(STORES.items()):
        r: dict[str, list] = {"rate": [], "whole": [], "bare": [], "ratio": [], "mbps": [], "writer": [], "process": []}
        path = tmp / f"{name.replace(' ', '-')}.zarr"
        for i in range(sizes.repeats):
            small = extract(extract_config(sizes, device, tmp / "first.zarr", sizes.first, **store), False)
            with ThreadCPU(WRITER_THREADS) as cpu:
                big = extract(extract_config(sizes, device, path, sizes.samples, **store), False)
            rate, slope = steady_rate(sizes, small.seconds, big.seconds)
            r["whole"].append(not slope)
            bare = bare_forward(teacher, inputs, sizes.bare_passes, device, autocast)
            r["rate"].append(rate)
            r["bare"].append(bare)
            r["ratio"].append(bare / rate)  # extraction time over bare-forward time, same images
            r["mbps"].append(big.bytes_per_sample * rate / 1e6)
            if cpu.seconds is not None:
                r["writer"].append(cpu.seconds / big.seconds)
            r["process"].append(cpu.process / big.seconds)
            if time.perf_counter() - section_start > sizes.budget_s * (k + 1) / len(STORES) and i + 1 < sizes.repeats:
                print(f"extraction ({name}): {i + 1} of {sizes.repeats} repeats, the section's budget is spent")
                break
        stores[name] = path
        per_sample = big.bytes_per_sample
        results[name] = {**r, "bytes_per_sample": per_sample, "repeats": len(r["rate"])}
        goal = "≤ 1.10" if device.startswith("cuda") else ""
        rows += [
            [
                f"extract, {name}",
                f"images/s ({'whole run' if any(r['whole']) else 'steady state'})",
                spread(r["rate"]),
                "",
            ],
            [f"extract, {name}", "bare teacher forward, images/s", spread(r["bare"]), ""],
            [f"extract, {name}", "extraction / bare forward (time)", spread(r["ratio"], "{:.3f}"), goal],
            [
                f"writer, {name}",
                "stored MB/s (bytes per sample)",
                f"{spread(r['mbps'], '{:,.2f}')} ({per_sample:,.0f} B)",
                "",
            ],
            [
                f"writer, {name}",
                "CPU cores: writer threads / whole process",
                f"{spread(r['writer'], '{:.2f}') if r['writer'] else 'n/a'} / {spread(r['process'], '{:.2f}')}",
                "",
            ],
        ]
        shutil.rmtree(tmp / "first.zarr", ignore_errors=True)
    del teacher, inputs
    return rows, results, stores


# ---------------------------------------------------------------------------------------------- decoding


def timed(fn: Callable[[], Any], device: str, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (after one untimed call), the device synchronised."""
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def decoding(stores: dict[str, Path], sizes: Sizes, device: str) -> tuple[list[list[str]], dict[str, Any]]:
    """One stored batch to float32 on the device: widened there against widened on the host."""
    rows, results = [], {}
    pin = torch.device(device).type == "cuda"
    names = ("tokens", "pooled", "lengths", "index")
    for name in ("float16 tokens", "int8 tokens"):
        store = stores[name]
        stored = next(iter(store_loader(store, sizes.batch, view=0, pin_memory=pin, names=names)))
        wide = next(iter(store_loader(store, sizes.batch, view=0, targets="float32", names=names)))
        on_device = timed(lambda s=stored: to_device(s, device), device, sizes.decode_repeats)
        on_host = timed(lambda s=stored: to_device(decode_targets(s), device), device, sizes.decode_repeats)
        same = torch.equal(to_device(stored, device)["tokens"].cpu(), wide["tokens"])
        nbytes = sum(v.nbytes for k, v in stored.items() if k.startswith(("tokens", "pooled")))
        wide_bytes = sum(v.nbytes for k, v in wide.items() if k in ("tokens", "pooled"))
        speedup = statistics.median(on_host) / statistics.median(on_device)
        results[name] = {"device_ms": on_device, "host_ms": on_host, "equal": same, "bytes": [nbytes, wide_bytes]}
        label = f"decode, {name}, batch {sizes.batch}"
        rows += [
            [
                label,
                "ms: widened on the device / on the host",
                f"{spread(on_device, '{:.3f}')} / {spread(on_host, '{:.3f}')}",
                "",
            ],
            [
                label,
                "host / device; MB copied: stored / float32",
                f"{speedup:.2f}x; {nbytes / 1e6:.1f} / {wide_bytes / 1e6:.1f}",
                "",
            ],
            [label, 'equal to targets="float32"', "yes" if same else "NO", "yes"],
        ]
    return rows, results


# ---------------------------------------------------------------------------------------------- training


def train_config(store: Path, sizes: Sizes, device: str, run_dir: Path, workers: int = 0) -> TrainConfig:
    return TrainConfig(
        targets=store,
        run_dir=run_dir,
        student="vit",
        depth=6,
        init="random",
        student_options=dict(sizes.student),
        batch_size=sizes.train_batch,
        steps=10**6,
        workers=workers,
        device=device,
        autocast=sizes.train_autocast,
        ckpt_every=10**9,
        log_every=10**9,
        progress=False,
    )


def loader_batches(loader: StoreLoader) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def step_rates(recipe: TrainRecipe, batches: Iterator[dict[str, Any]], sizes: Sizes) -> list[float]:
    """Steps/s of each window of the timed steps; every interval runs from one step's end to the next's
    (so the wait for the batch counts), the first ``train_warmup`` left out."""
    intervals, last = [], time.perf_counter()
    for _ in range(sizes.train_warmup + sizes.train_steps):
        recipe.train_step(to_device(next(batches), recipe.device))  # float(loss): the device is synchronised
        now = time.perf_counter()
        intervals.append(now - last)
        last = now
    timed_part = intervals[sizes.train_warmup :]
    w = max(1, len(timed_part) // sizes.train_windows)
    return [len(timed_part[i : i + w]) / sum(timed_part[i : i + w]) for i in range(0, w * sizes.train_windows, w)]


def training(store: Path, sizes: Sizes, device: str, tmp: Path) -> tuple[list[list[str]], dict[str, Any]]:
    """Steps/s from the store (per worker count) against the same steps on batches in device memory."""
    rows, results = [], {}
    for workers in sizes.loader_workers:
        recipe = TrainRecipe(train_config(store, sizes, device, tmp / f"run-{workers}", workers))
        try:
            recipe.setup()
            from_store = step_rates(recipe, loader_batches(recipe.loader), sizes)
            kept = [to_device(b, device) for b, _ in zip(loader_batches(recipe.loader), range(8), strict=False)]
            in_memory = step_rates(recipe, (kept[k % len(kept)] for k in range(10**9)), sizes)
        finally:
            recipe.release()
        ratio = statistics.median(from_store) / statistics.median(in_memory)
        results[f"workers={workers}"] = {"from_store": from_store, "in_memory": in_memory, "ratio": ratio}
        label = f"train vit depth 6, batch {sizes.train_batch}, loader workers {workers}"
        rows += [
            [label, "steps/s from the store", spread(from_store, "{:.2f}"), ""],
            [label, "steps/s, targets already in device memory", spread(in_memory, "{:.2f}"), ""],
            [label, "from the store / in memory", f"{ratio:.3f}", "≥ 0.9"],
        ]
    return rows, results


# ------------------------------------------------------------------------------------------ ranks and DDP


def mmkd_train_command() -> list[str]:
    """The ``mmkd-train`` console script of this environment (its entry function where none is installed)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "mmkd-train", shutil.which("mmkd-train")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    return [sys.executable, "-c", "from mmkd.app.entry import train; train()"]


def cli_args(cfg: TrainConfig) -> list[str]:
    args = ["--targets", str(cfg.targets), "--run-dir", str(cfg.run_dir), "--student", "vit", "--depth"]
    args += [str(cfg.depth), "--init", "random", "--device", cfg.device, "--autocast", cfg.autocast, "--quiet"]
    for key, value in cfg.student_options.items():
        args += ["--student-option", f"{key}={value}"]
    return args + ["--batch-size", str(cfg.batch_size), "--steps", str(cfg.steps)]


def ranks(store: Path, sizes: Sizes, device: str, tmp: Path) -> tuple[list[list[str]], dict[str, Any]]:
    """``mmkd-train --nproc 1`` on this device, and the DDP path with a process group of one rank."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cfg = dataclasses.replace(train_config(store, sizes, device, tmp / "run-cli"), steps=sizes.ddp_steps, depth=2)
    cli_ok, cli_said, cli_s = command([*mmkd_train_command(), "--nproc", "1", *cli_args(cfg)], env, TIMEOUT_S)
    cli_ok = cli_ok and (cfg.run_dir / "student").is_dir()  # exported
    spec = {"config": {**cli_args_dict(cfg), "run_dir": str(tmp / "run-ddp")}, "steps": sizes.ddp_steps}
    result_path = tmp / "ddp.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    check = [*launcher, __file__, "--ddp-check", json.dumps(spec), "--out", str(result_path)]
    ddp_ok, ddp_said, ddp_s = command(check, env, TIMEOUT_S)
    ddp_result = json.loads(result_path.read_text()) if ddp_ok and result_path.exists() else {}
    ddp_ok = ddp_ok and ddp_result.get("steps") == sizes.ddp_steps
    backend = "NCCL" if device.startswith("cuda") else "gloo (CPU)"
    rows = [
        [
            "mmkd-train --nproc 1",
            f"{sizes.ddp_steps} steps on {device}, student exported",
            f"{'ran' if cli_ok else 'FAILED'} ({cli_s:.0f} s with start-up; torchrun, a process group of one rank)",
            "runs",
        ],
        [
            "DDP, one rank",
            f"{backend} group, DDP(student), {sizes.ddp_steps} TrainRecipe steps",
            f"{'ran' if ddp_ok else 'FAILED'} (backend {ddp_result.get('backend', '-')}, {ddp_s:.0f} s with start-up)",
            "runs",
        ],
    ]
    results = {
        "mmkd_train_nproc_1": {"ok": cli_ok, "seconds": cli_s, "tail": cli_said},
        "ddp_one_rank": {"ok": ddp_ok, "seconds": ddp_s, **ddp_result, "tail": ddp_said},
    }
    return rows, results


def cli_args_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields the one-rank DDP check is built from (JSON values)."""
    fields = ("targets", "student", "depth", "init", "student_options", "batch_size", "device", "autocast")
    fields += ("progress", "ckpt_every", "log_every")
    d = cfg.to_json()
    return {**{k: d[k] for k in fields}, "steps": 10**6}


def command(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[bool, str, float]:
    """Run ``cmd``: (exit status 0, the end of its output, seconds); a command past ``timeout`` is stopped."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        ok, said = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        ok, said = False, f"stopped after {timeout:.0f} s: {(e.stdout or b'')[-1000:]!r} {(e.stderr or b'')[-1000:]!r}"
    return ok, said[-2000:], time.perf_counter() - start


def ddp_check(spec: dict[str, Any], out: Path) -> None:
    """Run under ``torch.distributed.run`` with one process: a process group (NCCL for CUDA, else gloo), the
    recipe's student wrapped in DistributedDataParallel, ``steps`` of ``TrainRecipe.train_step``."""
    cfg = TrainConfig(**{**spec["config"], "targets": Path(spec["config"]["targets"])})
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    recipe = TrainRecipe(cfg)
    try:
        recipe.setup()
        batches = loader_batches(recipe.loader)
        first = to_device(next(batches), recipe.device)

        def probe_loss() -> torch.Tensor:
            return recipe.loss_fn(loss_inputs(recipe.built, recipe.student, first, recipe.device))[0]

        freeze_unused(recipe.student, probe_loss)
        device_ids = [torch.cuda.current_device()] if cuda else None
        recipe.model = torch.nn.parallel.DistributedDataParallel(recipe.student, device_ids=device_ids)
        losses = [recipe.train_step(to_device(next(batches), recipe.device))[0] for _ in range(spec["steps"])]
        torch.distributed.barrier()
        result = {
            "backend": torch.distributed.get_backend(),
            "world_size": torch.distributed.get_world_size(),
            "steps": len(losses),
            "final_loss": losses[-1],
        }
    finally:
        recipe.release()
        torch.distributed.destroy_process_group()
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- main


def machine(device: str, sizes: Sizes) -> list[list[str]]:
    if device.startswith("cuda"):
        what = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        what = f"CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} torch threads"
    teacher = "BEiT v2 base, 224 px, 197 tokens, 12 blocks" if not sizes.teacher else f"tiny BEiT v2 {sizes.teacher}"
    return [
        ["machine", "device", what, ""],
        ["machine", "torch; CPU cores", f"{torch.__version__}; {os.cpu_count()}", ""],
        ["machine", "teacher (random weights)", teacher, ""],
        [
            "machine",
            "shapes images; extraction batch; workers",
            f"{sizes.samples:,} at {sizes.resolution} px; {sizes.batch}; {sizes.workers}",
            "",
        ],
    ]


def table(rows: list[list[str]]) -> str:
    lines = ["| section | measure | value | goal |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--quick", action="store_true", help="the smallest sizes (CPU only): the test's")
    ap.add_argument("--samples", type=int, default=None, help="extraction samples of the large run")
    ap.add_argument("--repeats", type=int, default=None, help="extraction repeats per store")
    ap.add_argument("--out", default=None, help="folder of the table and JSON (default: $OUT, else a temp dir)")
    ap.add_argument("--ddp-check", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_check:
        ddp_check(json.loads(args.ddp_check), Path(args.out))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("mmkd_core.teachers").addFilter(lambda r: "RANDOM weights" not in r.msg)  # said in the table
    sizes = GPU if device.startswith("cuda") else QUICK if args.quick else CPU
    if args.samples:
        sizes = dataclasses.replace(sizes, samples=args.samples, first=min(sizes.first, args.samples // 2))
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="mmkd-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    rows, results = machine(device, sizes), {"device": device, "sizes": dataclasses.asdict(sizes)}
    failed = []
    with tempfile.TemporaryDirectory(prefix="mmkd-gpu-stores-") as tmp:
        stores: dict[str, Path] = {}

        def extraction_section():
            r, res, made = extraction(sizes, device, Path(tmp))
            stores.update(made)
            return r, res

        for name, run in [
            ("extraction", extraction_section),
            ("decoding", lambda: decoding(stores, sizes, device)),
            ("training", lambda: training(stores["float16 tokens"], sizes, device, Path(tmp))),
            ("ranks", lambda: ranks(stores["float16 tokens"], sizes, device, Path(tmp))),
        ]:
            t = time.perf_counter()
            try:  # one section failing must not cost the others' figures (the GPU is lent for minutes)
                r, res = run()
            except Exception as e:
                failed.append(name)
                r, res = [[name, "FAILED", f"{type(e).__name__}: {e}"[:300].replace("|", "/"), ""]], {}
                res["error"] = traceback.format_exc()
                print(res["error"], file=sys.stderr)
            rows += r
            results[name] = {**res, "seconds": time.perf_counter() - t}
            print(
                f"{name}: {'FAILED' if name in failed else 'done'} at {time.perf_counter() - START:.0f} s", flush=True
            )
    elapsed = time.perf_counter() - START
    rows.append(["whole script", "elapsed s (imports included)", f"{elapsed:.0f}", "< 480 on a GPU"])
    rows.insert(4, ["machine", "extraction compute dtype", str(results["extraction"].get("autocast", "-")), ""])
    results["elapsed_s"], results["failed"] = elapsed, failed
    text = table(rows)
    print("\n" + text)
    (out / f"{RESULT_NAME}.md").write_text(text + "\n")
    (out / f"{RESULT_NAME}.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {out / (RESULT_NAME + '.json')}")
    if failed:
        raise SystemExit(f"sections that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
