"""Extraction over many processes: shards as dask.distributed tasks (``--cluster``, ``--scheduler``), and
independent commands that each take a slice of the shards (``--shards K/N``).

On a cluster the client (the ``mmkd-extract`` command) probes the teacher, creates or verifies the store and
holds its lock for the whole run, writes a pair store's captions itself (one cheap pass over short texts,
before any image shard, as a single process does) and submits one task per pending shard. Each worker
process prepares the run once (``prepare``, with the client's layout: a per-process cache keyed by the run's
configuration) and writes its shards straight into the store, without the lock, through ``fill``, as a single
process does. One task per shard, so two workers never write one shard at once; a shard is
marked done only after its data is written, so a worker lost mid-shard leaves it undone and the scheduler
gives the task to another worker, which rewrites the shard whole. The first sample's first view is the
probe's result, shipped with shard 0's task, exactly as a single process places it: the store is
bit-identical to one written by one process.

``--shards K/N`` (SLURM job arrays, torchrun ranks): N commands, possibly started together, fill one store,
each the shards k ≡ K (mod N). The lock rule of this mode:

- the store lock ``<store>.lock`` is held only briefly: to create the store or verify its configuration and
  take the slice's lock, and at the end to mark the store complete. A command waits for it up to
  ``LOCK_WAIT`` seconds (another command creating the store holds it for a moment; a whole run holds it
  for the run, and is waited for only that long).
- the slice lock ``<store>.lock.K-of-N`` is held while the slice is written: a second command with the same
  K/N is refused, so is a slice of another N while one of N runs (their shards overlap), and so is a whole
  run (without ``--shards``) while any slice runs.
- the command whose shards include shard 0 (slice 0) writes a pair store's captions, first.
- each command marks the store complete at its end if every shard is done and a pair store's captions are
  complete: the last one to finish does. ``--overwrite`` is refused (the commands would delete each other's
  work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import zarr

from mmkd.app.progress import progress_bar
from mmkd_core.errors import MmkdError
from mmkd_core.store import StoreWriter, config_diff, lock_path, open_store, refuse_slices, take_slice, wait_for_lock

from .config import ExtractConfig
from .fill import fill, shard_samples
from .prepare import Prepared, prepare

log = logging.getLogger(__name__)

LOCK_WAIT = 120.0  # seconds a --shards command waits for the store lock
# a run stopped on an error or Ctrl-C waits this long for the shards a remote worker is writing
STOP_WAIT = 600.0


# ---------------------------------------------------------------------------------------- --shards K/N


def shards_of(cfg: ExtractConfig, num_shards: int) -> list[int]:
    """The shards this run is responsible for: all, or with ``--shards K/N`` those ≡ K (mod N)."""
    if cfg.shard_slice is None:
        return list(range(num_shards))
    k, n = cfg.shard_slice
    return list(range(k, num_shards, n))


def open_run_writer(cfg: ExtractConfig, open_writer: Callable[..., StoreWriter]) -> StoreWriter:
    """The run's StoreWriter. Without ``--shards``: ``open_writer()``, which holds the store lock for the run,
    refused while a slice is being written. With ``--shards K/N``: a SliceWriter (the module's lock rule).

    Args:
        cfg: The run's configuration.
        open_writer: Creates or resumes the store; ``locked=False`` leaves the lock to the caller.
    """
    if cfg.shard_slice is None:
        writer = open_writer()
        try:
            refuse_slices(cfg.out, None)
        except BaseException:
            writer.close()
            raise
        return writer
    k, n = cfg.shard_slice
    store_lock = wait_for_lock(lock_path(cfg.out), cfg.out, LOCK_WAIT)
    try:
        writer = open_writer(locked=False)  # creates the store, or verifies its configuration
        lock = take_slice(cfg.out, k, n)
    finally:
        store_lock.release()
    try:
        return SliceWriter(writer.path, writer.layout, writer.group, lock, writer.lock_of)
    except BaseException:
        lock.release()
        raise


class SliceWriter(StoreWriter):
    """Writes the shards of one ``--shards`` slice, holding the slice's lock. ``finish`` takes the store lock
    briefly and marks the store complete once every shard is done and a pair store's captions are complete."""

    def finish(self) -> bool:
        if self.closed:
            raise RuntimeError(f"StoreWriter of {self.path} is closed")
        try:
            store_lock = wait_for_lock(lock_path(self.lock_of), self.lock_of, LOCK_WAIT)
            try:
                if not self._captions_complete():
                    return False
                fresh = zarr.open_group(str(self.path), mode="r+")  # other commands wrote since this one opened
                return StoreWriter(self.path, self.layout, fresh).finish()
            finally:
                store_lock.release()
        finally:
            self.close()

    def _captions_complete(self) -> bool:
        group = (self.group.attrs["mmkd"].get("dataset") or {}).get("captions_group")
        if not group:
            return True
        try:
            return open_store(self.path / group).complete
        except MmkdError:  # slice 0 has not begun them
            return False


# ---------------------------------------------------------------------------------------- the cluster


def fill_on_cluster(
    prepared: Prepared, writer: StoreWriter, todo: list[int], scope: list[int], label: str, show_progress: bool
) -> None:
    """Compute and write the shards ``todo`` on dask.distributed workers, one task per shard, with one
    progress bar over all of them. The caller holds the store's lock (or its slice's) throughout.

    Args:
        prepared: The run (``prepare``; ``cluster`` or ``scheduler`` set): its configuration, recipe and the
            probe's result, which shard 0's task places.
        writer: The store's writer: its layout, and the done shards when interrupted.
        todo: Shards to write.
        scope: The run's shards (the progress bar's total).
        label: The progress bar's label.
        show_progress: Show the progress bar.
    """
    layout = writer.layout
    run_id = secrets.token_hex(4)
    topic = f"mmkd-extract-{run_id}"
    events: queue.SimpleQueue = queue.SimpleQueue()
    with _connect(prepared.cfg) as (client, local):
        resources = _resources(prepared.cfg, client, local)
        client.subscribe_topic(topic, events.put)
        futures = _submit(client, prepared, layout, todo, topic, run_id, resources)
        total = shard_samples(layout, scope)
        with progress_bar(
            label + f" on {len(client.nthreads())} workers",
            total=total,
            completed=total - shard_samples(layout, todo),
            enabled=show_progress,
        ) as advance:
            try:
                _follow(futures, events, _ShardProgress(layout, todo), advance)
            except BaseException as e:
                _stop(client, futures, local)
                error = _explained(e, futures, writer)
                if error is None:
                    raise
                raise error from None


def _submit(client, prepared: Prepared, layout, todo: list[int], topic: str, run_id: str, resources) -> dict:
    """One task per shard of ``todo`` (shard 0's with the probe's result): {future: shard}."""
    task_cfg = _portable(prepared.cfg)
    shipped = _to_cpu(prepared.probe) if 0 in todo else None
    return {
        client.submit(
            _shard_task,
            task_cfg,
            layout,
            prepared.recipe,
            k,
            shipped if k == 0 else None,
            topic,
            key=f"mmkd-shard-{k}-{run_id}",
            resources=resources,
            pure=False,
        ): k
        for k in todo
    }


class _ShardProgress:
    """Samples computed per shard and attempt, from the workers' events: a shard given to another worker
    counts once (its best attempt), a finished one whole."""

    def __init__(self, layout, todo: list[int]) -> None:
        self.sizes = {k: hi - lo for k in todo for lo, hi in [layout.shard_range(k)]}
        self.attempts: dict[int, dict[str, int]] = {k: {} for k in todo}

    def add(self, k: int, attempt: str, m: int) -> None:
        self.attempts[k][attempt] = self.attempts[k].get(attempt, 0) + m

    def done(self, k: int) -> None:
        self.attempts[k]["done"] = self.sizes[k]

    def samples(self) -> int:
        return sum(min(self.sizes[k], max(a.values(), default=0)) for k, a in self.attempts.items())


def _follow(futures: dict, events: queue.SimpleQueue, progress: _ShardProgress, advance: Callable) -> None:
    """Wait for every task, advancing the progress bar by the workers' events; a task's error is raised."""
    from distributed import as_completed

    shown = 0
    finishing = as_completed(futures)
    while not finishing.is_empty():
        for future in finishing.next_batch(block=False):
            future.result()  # a task's error is raised here
            progress.done(futures[future])
        while not events.empty():
            _, (k, attempt, m) = events.get()
            progress.add(k, attempt, m)
        now = progress.samples()
        advance(now - shown)
        shown = now
        time.sleep(0.2)


def _explained(error: BaseException, futures: dict, writer: StoreWriter) -> MmkdError | None:
    """The one-line error a stopped cluster run reports for ``error``; None: ``error`` itself."""
    from distributed import KilledWorker

    if isinstance(error, KilledWorker):
        shard = next((k for f, k in futures.items() if f.key == error.task), "?")
        return MmkdError(
            f"shard {shard}: the {error.allowed_failures + 1} workers that ran it died (out of memory?); "
            + _progress(writer)
        )
    if isinstance(error, KeyboardInterrupt):
        return MmkdError(f"interrupted: {_progress(writer)}")
    if isinstance(error, ImportError):  # a remote worker without mmkd, or without the teacher's packages
        return MmkdError(
            f"a worker cannot import {error.name or error}: install mmkd and the teacher's packages on every worker"
        )
    return None


def _progress(writer: StoreWriter) -> str:
    done, total = len(writer.done_shards()), writer.layout.num_shards
    return f"{done} of {total} shards of {writer.path} are written; run the same command again to continue"


def _stop(client, futures: dict, local: bool) -> None:
    """Cancel the tasks not yet begun. A local cluster's workers end with it (a shard they were writing is
    not marked done); on a remote cluster the shards being written land first, so that no worker still
    writes one when the lock is released."""
    if local:
        client.cancel(list(futures))
        return
    from distributed import wait

    busy = {key for keys in client.processing().values() for key in keys}
    running = [f for f in futures if f.key in busy and not f.done()]
    client.cancel([f for f in futures if f not in running])
    if running:
        log.warning("waiting for the %d shards being written to land", len(running))
        with contextlib.suppress(Exception):
            wait(running, timeout=STOP_WAIT)


@contextlib.contextmanager
def _connect(cfg: ExtractConfig) -> Iterator[tuple[Any, bool]]:
    """A client of the run's cluster, and whether the cluster is this run's own (``--cluster local:N``)."""
    import dask
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise MmkdError(f"--scheduler {cfg.scheduler}: cannot connect ({type(e).__name__}: {e})") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise MmkdError(f"--scheduler {cfg.scheduler}: the cluster has no workers (waited 60 s)") from None
            yield client, False
        return
    n = cfg.cluster_workers
    gpu = torch.device(cfg.device).type == "cuda"
    if gpu and n > torch.cuda.device_count():
        raise MmkdError(
            f"--cluster local:{n}: one worker per GPU, and this host has {torch.cuda.device_count()}; "
            f"use local:{max(1, torch.cuda.device_count())}"
        )
    # worker processes start image decoding processes (--workers): they must not be daemons; the threads
    # of a worker's torch are set per worker (`_build`), not dask's one thread per process
    config = {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": {}}
    with dask.config.set(config), _quiet("distributed"):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},  # its http server: any free port, not 8787
            # no memory limit: a worker holds a whole teacher, and pausing or restarting it would not help
            memory_limit=0,
            resources={"GPU": 1} if gpu else None,
            silence_logs=logging.ERROR,  # the workers' own logs (a cancelled task's warnings on Ctrl-C)
        )
        with cluster, Client(cluster) as client:
            client.register_plugin(_exit_plugin(), name="mmkd-exit")
            yield client, True


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """dask's INFO lines (scheduler and workers starting, connections) off for the run."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _exit_plugin():
    """A worker plugin that ends a local worker's process at once when the run closes its cluster: the
    interpreter's teardown of torch took seconds, and the nanny killed the workers after 4 s, with a warning.
    Every task has finished (or is abandoned) by then and each shard is written before its task returns."""
    from distributed import WorkerPlugin

    class ExitAtTeardown(WorkerPlugin):
        def teardown(self, worker) -> None:
            import multiprocessing.util

            multiprocessing.util._run_finalizers()  # what exit would run first: semaphores unlinked (tqdm's)
            os._exit(0)

    return ExitAtTeardown()


def _resources(cfg: ExtractConfig, client, local: bool) -> dict[str, int] | None:
    """``{"GPU": 1}`` on GPU workers, so that two tasks never share one device: a local cluster's workers
    (one per device) and a remote cluster's when its workers declare the resource ``GPU``."""
    if torch.device(cfg.device).type != "cuda":
        return None
    if local or any("GPU" in (w.get("resources") or {}) for w in client.scheduler_info()["workers"].values()):
        return {"GPU": 1}
    return None


def _portable(cfg: ExtractConfig) -> ExtractConfig:
    """The configuration the workers run: local paths made absolute (a remote worker has another cwd)."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    return dataclasses.replace(
        cfg, out=cfg.out.resolve(), data_root=absolute(cfg.data_root), weights=absolute(cfg.weights)
    )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------- on a worker

_CONTEXT: dict[str, Any] = {}
_CONTEXT_LOCK = threading.Lock()


def _shard_task(cfg: ExtractConfig, layout, recipe: dict, k: int, probe: dict | None, topic: str) -> int:
    """A worker's task: compute shard ``k`` and write it into the store (the probe's result placed in shard 0)."""
    from distributed import get_worker

    worker = get_worker()
    prepared, writer = _context(cfg, layout, recipe, worker)
    attempt = secrets.token_hex(4)

    def advance(m: int = 1) -> None:
        worker.log_event(topic, (k, attempt, int(m)))

    fill(dataclasses.replace(prepared, probe=probe), writer, [k], advance)
    return k


def _context(cfg: ExtractConfig, layout, recipe: dict, worker) -> tuple[Prepared, StoreWriter]:
    """The prepared run and the writer of this worker process, built once per run configuration."""
    key = json.dumps([dataclasses.asdict(cfg), dataclasses.asdict(layout), recipe], default=str, sort_keys=True)
    with _CONTEXT_LOCK:
        if _CONTEXT.get("key") != key:
            _CONTEXT.clear()  # another run's teacher goes first
            _CONTEXT.update(key=key, value=_build(cfg, layout, recipe, worker))
        return _CONTEXT["value"]


def _build(cfg: ExtractConfig, layout, recipe: dict, worker) -> tuple[Prepared, StoreWriter]:
    if cfg.cluster and torch.device(cfg.device).type == "cuda":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(worker.name)}")  # a local cluster: worker i, GPU i
    elif cfg.cluster:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // cfg.cluster_workers))  # the host's cores shared by its workers
    prepared = prepare(cfg, layout)
    where = f"worker {worker.address} on {socket.gethostname()}"
    stored = open_store(cfg.target).attrs
    mine = {k: v for k, v in prepared.teacher.describe().items() if k != "source"}  # its path may differ here
    diff = config_diff({k: stored["teacher"].get(k) for k in mine}, mine, "teacher.")
    if diff is None and prepared.recipe != recipe:
        diff = "recipe"
    if diff is None and prepared.num_samples != layout.num_samples:
        diff = "dataset.num_samples"
    if diff is not None:
        raise MmkdError(
            f"{where}: its {diff} differs from the store's; give every worker the same mmkd, weights and data"
        )
    target = cfg.target  # the store, or an added teacher's group in it; the client holds the store's lock
    writer = StoreWriter(target, layout, zarr.open_group(str(target), mode="r+"), lock_of=cfg.out)
    log.info("%s: teacher %s loaded", where, cfg.teacher)
    return prepared, writer
