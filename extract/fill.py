"""Writing a prepared run's shards: ``fill(prepared, writer, shards, progress)``.

One pass of the teacher over every pending shard (one DataLoader for images); batches never straddle
shards. Each batch's results are encoded into the shard's buffer as they arrive, and a finished shard is
compressed and written on a background thread (``ShardQueue``) while the teacher fills the next. The probe's
input (the first sample's first view, run by ``prepare``) is not run again: its kept result is placed, so the
teacher sees every input exactly once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, encode_targets

from .feeders import Feeder
from .prepare import Prepared

# Shards compressed and written at once, each on its own thread, while the teacher fills the next. One: zarr
# already compresses a shard's chunks concurrently on its thread pool (async.concurrency chunks at a time, on
# min(32, cores + 4) threads), and its one event-loop thread, which every write shares, is the serial part a
# second shard in flight cannot spread; 2 measured within the noise of 1 here (benchmarks/codecs.py,
# docs/codecs.md) for one more shard of memory.
IN_FLIGHT = 1


def fill(prepared: Prepared, writer: StoreWriter, shards: list[int], progress: Callable[[int], Any]) -> None:
    """Compute the shards ``shards`` of the store and write them through ``writer``.

    Args:
        prepared: The run (``prepare.prepare``): its teacher, feeder, recipe and probe.
        writer: The store's writer; its layout cuts the shards.
        shards: The shards to compute and write.
        progress: Called with the samples of each batch once they are computed.

    Raises:
        MmkdError: On Ctrl-C, once the shards in flight have landed (each is marked done only once written).
    """
    with ShardQueue(writer, prepared.feeder) as queue:
        try:
            _compute(prepared, writer.layout, shards, queue, progress)
        except KeyboardInterrupt:
            queue.drain()  # let the shard in flight land; it is marked done only once written
            raise MmkdError(
                f"interrupted: {len(writer.done_shards())} of {writer.layout.num_shards} shards of {writer.path} "
                "are written; run the same command again to continue"
            ) from None


def shard_samples(layout: Layout, shards: list[int]) -> int:
    """The samples of ``shards``."""
    return sum(hi - lo for lo, hi in map(layout.shard_range, shards))


class ShardQueue:
    """Writes finished shards on background threads, at most ``in_flight`` at a time, so the teacher computes
    the next shard while earlier ones are compressed and written; ``put`` waits while ``in_flight`` are.

    Memory stays bounded: the shard being filled plus ``in_flight`` being written, each in the store's dtype
    (``Layout.buffer_dtype``: 2 bytes a value for float16/bfloat16), plus what zarr holds while it compresses
    a shard (its compressed chunks, at most about the shard's size again). Shards of one store are
    independent files, each marked done after its own data, so they may land in any order.
    """

    def __init__(self, writer: StoreWriter, feeder: Feeder, in_flight: int = IN_FLIGHT) -> None:
        self.writer, self.feeder, self.in_flight = writer, feeder, max(1, in_flight)
        self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="mmkd-writer")
        self._pending: collections.deque[Future] = collections.deque()

    def put(self, k: int, shard: dict[str, np.ndarray]) -> None:
        while len(self._pending) >= self.in_flight:
            self._pending.popleft().result()
        lo, hi = self.writer.layout.shard_range(k)
        self._pending.append(self._pool.submit(self.writer.write_shard, k, self.feeder.finish_shard(shard, lo, hi)))

    def drain(self) -> None:
        """Wait for the shards in flight; the first error, if any, is raised here."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> ShardQueue:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _compute(p: Prepared, layout: Layout, todo: list[int], queue: ShardQueue, advance: Callable) -> None:
    """One pass over every pending shard, each finished shard handed to ``queue``."""
    probe = p.probe
    current, shard = None, None
    with torch.inference_mode():
        for batch in p.feeder.batches([(k, *layout.shard_range(k)) for k in todo], p.cfg.batch_size):
            if batch["shard"] != current:
                if current is not None:
                    queue.put(current, shard)
                current = batch["shard"]
                shard = empty_shard(layout, *layout.shard_range(current), encoded=True)
            lo = layout.shard_range(current)[0]
            rest = _without_probe(batch, probe)
            if rest is not batch:
                place(shard, probe["batch"], probe, lo)
                probe = None  # used up
            if len(rest["positions"]):
                place(shard, rest, p.targets(rest), lo)
            advance(len(batch["positions"]) // p.feeder.views)
    if current is not None:
        queue.put(current, shard)
    queue.drain()


def _without_probe(batch: dict, probe: dict | None) -> dict:
    """``batch`` without the probe's input, or ``batch`` itself when it does not hold that input."""
    if probe is None or "positions" not in probe["batch"]:
        return batch
    p = probe["batch"]
    hit = (batch["positions"] == p["positions"][0]) & (batch["view_ids"] == p["view_ids"][0])
    if not hit.any():
        return batch
    keep = ~hit
    inputs = {k: v[torch.from_numpy(keep).to(v.device)] for k, v in batch["inputs"].items()}
    return {**batch, "inputs": inputs, "positions": batch["positions"][keep], "view_ids": batch["view_ids"][keep]}


def empty_shard(layout: Layout, lo: int, hi: int, encoded: bool = False) -> dict[str, np.ndarray]:
    """Zeroed buffers of one shard's targets (and per-view extras): float32, or with ``encoded`` in the
    store's dtype (``Layout.buffer_dtype``), which ``place`` then encodes each batch into as it arrives."""
    m = hi - lo
    dtype = layout.buffer_dtype if encoded else np.float32
    shard = {"pooled": np.zeros((m, layout.views, layout.pooled_dim), dtype)}
    if layout.store_tokens:
        shard["tokens"] = np.zeros((m, layout.views, layout.time_steps, layout.dim), dtype)
    for name, trailing, dtype, dims in layout.extras:
        if dims[1:2] == ("view",):
            shard[name] = np.zeros((m, *trailing), dtype)
    return shard


def place(shard: dict[str, np.ndarray], batch: dict, out: dict[str, torch.Tensor], lo: int) -> None:
    """Scatter a batch's results into the shard buffer: row ``positions[j] - lo``, view ``view_ids[j]`` gets
    result ``take[j]`` (default j; a deduplicated batch's one result per distinct input goes to many rows)."""
    rows = batch["positions"] - lo
    views = batch["view_ids"]
    take = batch.get("take", slice(None))
    shard["pooled"][rows, views] = _host(shard, "pooled", out["pooled"], batch, take)[take]
    for name, value in out.items():
        if name not in ("tokens", "pooled", "mask") and name in shard:
            shard[name][rows, views] = value.float().cpu().numpy()[take]
    if out["tokens"] is not None:
        t = out["tokens"].shape[1]
        shard["tokens"][rows, views, :t] = _host(shard, "tokens", out["tokens"], batch, take)[take]


_ENCODED = {np.dtype("float16"): "float16", np.dtype("uint16"): "bfloat16"}


def _host(shard: dict[str, np.ndarray], name: str, value: torch.Tensor, batch: dict, take) -> np.ndarray:
    """A batch's ``name`` results on the host: encoded (and checked) into the buffer's dtype when it is a
    stored one, else float32 (which ``write_shard`` encodes and checks)."""
    dtype = _ENCODED.get(shard[name].dtype)
    if dtype is None:
        return value.float().cpu().numpy()

    def locate(j: int) -> tuple[int, int]:  # result j -> the first (sample, view) it is written to
        hits = np.flatnonzero(np.asarray(take) == j) if not isinstance(take, slice) else [j]
        k = int(hits[0]) if len(hits) else j
        return int(batch["positions"][k]), int(batch["view_ids"][k])

    return encode_targets(name, value, dtype, locate)
