"""The batch order of one epoch of a store: which samples make each batch, and which contiguous ranges of the
store each buffer reads.

The order is a pure function of (store size, chunk size, batch size, seed, epoch, rank, world size): the
store's samples are cut into runs of whole chunks; the runs are shuffled and laid end to end; each rank takes
a contiguous share of that stream; each share is cut into buffers of a fixed number of samples; samples are
shuffled within a buffer and cut into batches. Every read is a contiguous range, memory is bounded by one
buffer, the number of batches is the same in every epoch and on every rank, and the order can be replayed
from any batch, which is what makes resumption exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import MmkdError


@dataclass(frozen=True)
class OrderSpec:
    """What fixes an epoch's batches and their order.

    Attributes:
        num_samples: Samples in the store.
        chunk_size: Store chunk size; runs are whole chunks.
        batch_size: Samples per batch (the last batch of a buffer may be smaller).
        seed: Shuffle seed.
        run_chunks: Chunks per contiguous read.
        buffer_runs: Runs shuffled together.
        rank: This process's rank.
        world_size: Number of ranks.
        by_length: Within each buffer, batch samples of similar length together (then shuffle the batches):
            text batches are padded to their longest sample, so random batches of short and long sentences
            spend most of their compute on padding.
        drop_last: Yield full batches only (contrastive losses: a short batch has fewer negatives, and its
            loss shows as a spike every epoch); the few samples left over change with the epoch's order.
    """

    num_samples: int
    chunk_size: int
    batch_size: int
    seed: int = 0
    run_chunks: int = 1
    buffer_runs: int = 16
    rank: int = 0
    world_size: int = 1
    by_length: bool = False
    drop_last: bool = False

    @property
    def buffer_samples(self) -> int:
        """Samples shuffled together (memory is bounded by one buffer)."""
        return self.chunk_size * self.run_chunks * self.buffer_runs


def rank_range(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's share of an epoch's sample stream, as positions [lo, hi): sizes differ by at most one."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def num_batches(spec: OrderSpec) -> int:
    """Batches per epoch: the same for every epoch and every rank (DDP ranks step together).

    The largest rank share is cut into buffers of ``buffer_samples`` samples and each buffer into batches;
    a share one sample shorter that would come out one batch short splits its largest batch in two.
    """
    if spec.drop_last:  # full batches only: the smallest share sets the count
        n, b, k = spec.num_samples // spec.world_size, spec.buffer_samples, spec.batch_size
        return (n // b) * (b // k) + (n % b) // k
    return _count(-(-spec.num_samples // spec.world_size), spec.buffer_samples, spec.batch_size)


def _count(n: int, buffer: int, batch: int) -> int:
    return (n // buffer) * -(-buffer // batch) + -(-(n % buffer) // batch)


def check_order(spec: OrderSpec) -> None:
    """Refuse orders in which the ranks cannot take the same number of steps with every sample once."""
    if spec.num_samples < spec.world_size:
        raise MmkdError(f"the store has {spec.num_samples} samples, fewer than the {spec.world_size} ranks")
    if spec.drop_last and num_batches(spec) == 0:
        raise MmkdError(
            f"--batch-size {spec.batch_size}: no full batch in a share of {spec.num_samples // spec.world_size} "
            "samples (contrastive losses train on full batches only); use a smaller batch"
        )
    if not spec.drop_last and min(spec.batch_size, spec.buffer_samples) == 1 and spec.num_samples % spec.world_size:
        # batches of one sample cannot be split to even out shares that differ by one sample
        raise MmkdError(
            f"--batch-size {spec.batch_size} with {spec.world_size} ranks needs a store size divisible "
            f"by {spec.world_size} ({spec.num_samples} samples): use a larger batch"
        )


def _pieces(starts: np.ndarray, run_len: int, num_samples: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sample ranges covering stream positions [lo, hi) of runs laid end to end in the order ``starts``."""
    lens = np.minimum(starts + run_len, num_samples) - starts
    ends = np.cumsum(lens)
    out = []
    for j in range(int(np.searchsorted(ends, lo, side="right")), len(starts)):
        begin = int(ends[j] - lens[j])
        if begin >= hi:
            break
        a, b = max(lo, begin) - begin, min(hi, int(ends[j])) - begin
        out.append((int(starts[j]) + a, int(starts[j]) + b))
    return out


def epoch_order(
    spec: OrderSpec, epoch: int, lengths: np.ndarray | None = None
) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
    """This rank's batches of an epoch, grouped by buffer: ``[(runs, batches_of_indices), ...]``.

    The store's runs of whole chunks are shuffled and laid end to end (the short last run, if any, at the
    end); each rank takes a contiguous share of that stream (so every sample is in exactly one rank's
    share), cuts it into buffers of ``buffer_samples`` and shuffles each buffer. With one rank every buffer
    is whole runs; with several, a buffer may begin or end inside a chunk (that chunk is read twice).
    Every count depends only on (N, batch size, buffer, world size), never on the epoch's order:
    ``num_batches`` holds for every epoch and rank.

    Args:
        spec: What fixes the order.
        epoch: Epoch number (seeds the order).
        lengths: Every sample's length, needed with ``spec.by_length``.

    Returns:
        A list of (contiguous sample ranges to read, sample indices of each batch) per buffer.
    """
    check_order(spec)
    run_len = spec.chunk_size * spec.run_chunks
    full = spec.num_samples // run_len
    # the one short run goes last, so buffers of a single rank's share are whole runs in every epoch
    starts = np.concatenate(
        [
            np.random.default_rng([spec.seed, epoch]).permutation(full) * run_len,
            np.arange(full * run_len, spec.num_samples, run_len),
        ]
    ).astype(np.int64)
    lo, hi = rank_range(spec.num_samples, spec.world_size, spec.rank)
    out = []
    for b, a in enumerate(range(lo, hi, spec.buffer_samples)):
        rng = np.random.default_rng([spec.seed, epoch, spec.rank, b])
        runs = sorted(_pieces(starts, run_len, spec.num_samples, a, min(a + spec.buffer_samples, hi)))
        idx = np.concatenate([np.arange(r0, r1) for r0, r1 in runs])
        idx = idx[rng.permutation(len(idx))]
        if spec.by_length:
            idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches = [idx[i : i + spec.batch_size] for i in range(0, len(idx), spec.batch_size)]
        if spec.drop_last and batches and len(batches[-1]) < spec.batch_size:
            batches.pop()
        if spec.by_length:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        out.append((runs, batches))
    if spec.drop_last:  # a longer share may hold one full batch more than the count: leave its last out
        extra = sum(len(bs) for _, bs in out) - num_batches(spec)
        for _, bs in reversed(out):
            take = min(extra, len(bs))
            del bs[len(bs) - take :]
            extra -= take
    elif sum(len(bs) for _, bs in out) < num_batches(spec):  # a share one sample short: split its largest batch
        bs = out[-1][1]
        j = int(np.argmax([len(x) for x in bs]))
        half = (len(bs[j]) + 1) // 2
        bs[j : j + 1] = [bs[j][:half], bs[j][half:]]
    return out


def epoch_batches(
    spec: OrderSpec,
    epoch: int,
    lengths: np.ndarray | None = None,
    start_batch: int = 0,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """(buffer ranges, batch) for the epoch's batches from ``start_batch`` on that are this worker's
    (round-robin: worker w takes the w-th, (w + num_workers)-th, ... of them)."""
    g = 0  # position of the buffer's first batch in the epoch
    for runs, batches in epoch_order(spec, epoch, lengths):
        for j, b in enumerate(batches):
            if g + j >= start_batch and (g + j - start_batch) % num_workers == worker:
                yield runs, b
        g += len(batches)
