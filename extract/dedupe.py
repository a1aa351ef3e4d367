"""Identical teacher inputs computed once per run: the teacher's work grows with distinct inputs, not rows.

``labelled-captions`` over Fashion-MNIST has 60,000 rows and 10 distinct captions. A text feeder groups
its rows by their token ids (after tokenization: what the teacher actually reads, so two spellings that
tokenize alike are one input) and the teacher runs once per group; every row of a group is written from
that one result. The store is unchanged: every row holds its targets, so any zarr or xarray reader gets
the same arrays as from a run without this (repeated rows are bit-identical, and compress a little).

**Same floats wherever a group is computed.** Targets are per sample, but the float rounding of a forward
pass depends on the batch it ran in. A group's result must not depend on which shards this run happens
to do (a resume, ``--shards K/N``, dask workers), so every group has one *canonical batch* and is only
ever computed in it: distinct inputs in order of first appearance, cut into windows of ``WINDOW_BATCHES``
batches that never cross a shard boundary (a window holds inputs first seen in one shard: a process that
writes only some shards - a dask worker, ``--shards K/N``, a resume - computes the windows of its own shards
and no one else's), sorted longest first within a window (less padding), then cut into batches. The first row's
input (the layout probe, run alone before the shards) is its own batch. A result still needed by a later
shard of this run is kept (up to ``CACHE_BYTES``); a shard that needs a result nobody kept - its canonical
batch ran in an earlier run, in another process, or the cache was full - runs that whole batch again and
gets the same floats.

Images are not deduplicated here. A random view's parameters are drawn per sample position, so only view
0 of two identical images could coincide; and the key (a digest of the decoded pixels) exists only after
the DataLoader has decoded them, when the batch is already formed - keying before batching would need a
decoding pass over the whole dataset. A dataset that knows two samples share an image says so with
``image_id``; the teacher then runs once per image (``PairImages``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

WINDOW_BATCHES = 16
CACHE_BYTES = 512 << 20


def group_rows(input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n,) int64: each row's distinct input, numbered by first appearance; equal ids and length, one input.

    Args:
        input_ids: (n, T) token ids, padded.
        lengths: (n,) valid tokens per row.
    """
    key = np.concatenate([lengths[:, None].astype(input_ids.dtype), input_ids], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64)


class DistinctInputs:
    """Which rows share one teacher input, each input's canonical batch, and the results kept for later rows.

    Args:
        group: (n,) each row's distinct input (``group_rows``).
        lengths: (n,) each row's input length (sorts a window's batches).
    """

    def __init__(self, group: np.ndarray, lengths: np.ndarray) -> None:
        self.group = np.asarray(group, dtype=np.int64)
        self.count = int(self.group.max()) + 1 if len(self.group) else 0
        first = np.full(self.count, len(self.group), dtype=np.int64)
        np.minimum.at(first, self.group, np.arange(len(self.group)))
        self.first = first  # (count,) the first row of each distinct input: its teacher input
        self.lengths = np.asarray(lengths)[first]
        self.computed = 0  # distinct inputs the teacher ran on in this process (a rerun batch counts again)
        self._kept: dict[int, dict[str, torch.Tensor | None]] = {}
        self._kept_bytes = 0
        self._canonical: dict[tuple[int, int | None], tuple[np.ndarray, list[np.ndarray]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_kept": {}, "_kept_bytes": 0}  # results stay in the process that made them

    def canonical(self, batch_size: int, shard_size: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(count,) each input's canonical batch number, and each batch's inputs (batch 0: input 0 alone).

        Windows restart at every shard boundary (``shard_size`` rows; None: one shard)."""
        if (batch_size, shard_size) not in self._canonical:
            batches = [np.zeros(1, dtype=np.int64)]
            window = WINDOW_BATCHES * batch_size
            n_rows = len(self.group)
            starts = np.arange(shard_size, n_rows, shard_size) if shard_size else np.zeros(0, dtype=np.int64)
            # inputs are numbered by first appearance: those first seen in shard j are one contiguous range
            bounds = [1, *np.searchsorted(self.first, starts).tolist(), self.count]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                for lo in range(max(a, 1), b, window):
                    ids = np.arange(lo, min(lo + window, b))
                    ids = ids[np.argsort(-self.lengths[ids], kind="stable")]
                    batches += [ids[s : s + batch_size] for s in range(0, len(ids), batch_size)]
            number = np.empty(self.count, dtype=np.int64)
            for b, ids in enumerate(batches):
                number[ids] = b
            self._canonical[batch_size, shard_size] = (number, batches)
        return self._canonical[batch_size, shard_size]

    def batches(
        self, shards: list[tuple[int, int, int]], batch_size: int, make: Callable[[np.ndarray], dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        """Each shard's work in turn: the canonical batches of the inputs it needs and nobody kept, then the
        kept results it needs. ``positions`` are the shard's rows each batch's results go to; row j takes
        result ``take[j]``; ``groups`` are the batch's inputs (``make(groups)`` builds their teacher input)."""
        number, canon = self.canonical(batch_size, _shard_size(shards, len(self.group)))
        last = np.full(self.count, -1, dtype=np.int64)  # the last shard of this call that needs each input
        for j, (_, lo, hi) in enumerate(shards):
            last[self.group[lo:hi]] = j
        slot = np.full(self.count, -1, dtype=np.int64)
        for j, (k, lo, hi) in enumerate(shards):
            rows = np.arange(lo, hi)
            groups = self.group[lo:hi]
            needed = np.unique(groups)
            kept = np.array([g in self._kept for g in needed], dtype=bool)
            run = np.unique(number[needed[~kept]])
            reuse = needed[kept & ~np.isin(number[needed], run)]  # not also in a batch that runs anyway
            work = [(canon[b], True) for b in run]
            work += [(reuse[s : s + batch_size], False) for s in range(0, len(reuse), batch_size)]
            for ids, compute in work:
                slot[ids] = np.arange(len(ids))
                take = slot[groups]
                slot[ids] = -1
                hit = take >= 0
                batch = {
                    "groups": ids,
                    "positions": rows[hit],
                    "take": take[hit],
                    "view_ids": np.zeros(int(hit.sum()), dtype=np.int64),
                    "shard": k,
                }
                if compute:  # its canonical batch; keep the results a later shard needs
                    yield {**make(ids), **batch, "keep": ids[last[ids] > j]}
                else:
                    yield {**batch, "inputs": None}
            for g in [g for g in self._kept if last[g] <= j]:
                self._forget(g)

    def targets(self, batch: dict[str, Any], compute: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The batch's results, one per input in ``groups``: kept ones, or computed (and kept as asked)."""
        ids = batch["groups"]
        if batch["inputs"] is None:
            return _stack([self._kept[int(g)] for g in ids])
        out = compute(batch)
        self.computed += len(ids)
        lengths = self.lengths[ids]
        for g in batch.get("keep", ids):
            j = int(np.flatnonzero(ids == g)[0])
            self._keep(int(g), {name: _row(v, j, int(lengths[j]), name) for name, v in out.items()})
        return out

    def _keep(self, g: int, result: dict[str, torch.Tensor | None]) -> None:
        size = sum(v.numel() * v.element_size() for v in result.values() if v is not None)
        if g in self._kept or self._kept_bytes + size > CACHE_BYTES:
            return  # not kept: a later shard runs its canonical batch again, with the same floats
        self._kept[g] = result
        self._kept_bytes += size

    def _forget(self, g: int) -> None:
        result = self._kept.pop(g)
        self._kept_bytes -= sum(v.numel() * v.element_size() for v in result.values() if v is not None)


def _shard_size(shards: list[tuple[int, int, int]], n_rows: int) -> int | None:
    """The store's rows per shard, from shard tuples ``(k, k * size, ...)``: ``lo // k`` of any k > 0, else
    shard 0's length; None when shard 0 holds every row, or the tuples are not shard-aligned (no cuts)."""
    size = next((lo // k for k, lo, _ in shards if k > 0), None)
    if size is None:
        size = next((hi for k, _, hi in shards if k == 0), None)
    if not size or size >= n_rows or any(lo != k * size for k, lo, _ in shards):
        return None
    return size


def _row(value: torch.Tensor | None, j: int, length: int, name: str) -> torch.Tensor | None:
    """Input j's result of one output: per-token outputs cut to its length (the batch's padding dropped)."""
    if value is None:
        return None
    row = value[j]
    if name in ("tokens", "mask"):
        row = row[:length]
    return row.detach().cpu().clone()


def _stack(results: list[dict[str, torch.Tensor | None]]) -> dict[str, Any]:
    """Kept results as one batch's outputs; per-token outputs padded to the longest (as a batch pads)."""
    out: dict[str, Any] = {}
    for name in results[0]:
        values = [r[name] for r in results]
        if values[0] is None:
            out[name] = None
        elif name in ("tokens", "mask"):
            out[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
        else:
            out[name] = torch.stack(values)
    return out
