"""An epoch's global order of a store's samples, and how global steps share it among ranks.

The order is a pure function of (store size, chunk size, seed, epoch) and the buffer size, never of the
world size, the worker count or the batch size: the store's chunks are shuffled and laid end to end (the one
short chunk, if any, last), the resulting stream of positions is cut into buffers of ``buffer_samples``
samples (whole chunks, so every buffer is a few contiguous reads), and each buffer is shuffled. ``by_length``
then sorts a buffer by length and shuffles groups of ``length_group`` samples, a fixed size, so text batches
pad little whatever the batch size.

A global step takes ``world_size × batch_size`` consecutive positions of that order; rank r takes
``[p + r·B, p + (r+1)·B)``. What is left at the epoch's end is handled by ``StepSpec.remainder``, the same
on every rank. Steps count from any position ``start`` (the samples the epoch has consumed), so a run
continues an epoch with another world size or batch size: the positions before ``start`` were seen, those
after it will be, each once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MmkdError

REMAINDERS = ("split", "drop", "pad")


@dataclass(frozen=True)
class OrderSpec:
    """What fixes an epoch's global order.

    Attributes:
        num_samples: Samples in the store.
        chunk_size: Store chunk size; reads are whole chunks.
        seed: Shuffle seed.
        buffer_chunks: Chunks shuffled together (memory holds one buffer per reader).
        by_length: Sort each buffer by sample length and shuffle groups of ``length_group`` samples: text
            batches are padded to their longest sample.
        length_group: Samples per length group (fixed: not the batch size, so the order stays one).
    """

    num_samples: int
    chunk_size: int
    seed: int = 0
    buffer_chunks: int = 16
    by_length: bool = False
    length_group: int = 64

    @property
    def buffer_samples(self) -> int:
        """Samples per buffer."""
        return self.chunk_size * self.buffer_chunks

    @property
    def num_buffers(self) -> int:
        """Buffers per epoch."""
        return -(-self.num_samples // self.buffer_samples)


@dataclass(frozen=True)
class StepSpec:
    """How global steps take the order: batch size per rank, ranks, and the epoch's remainder.

    Attributes:
        batch_size: Samples per rank per step.
        world_size: Ranks stepping together.
        remainder: What the epoch's last ``< world_size × batch_size`` samples do: ``split`` (one last step
            divides them evenly over the ranks, every sample seen once; fewer than ``world_size`` left join
            the step before), ``drop`` (left out: full batches only) or ``pad`` (filled up from the epoch's
            start).
    """

    batch_size: int
    world_size: int = 1
    remainder: str = "split"

    def __post_init__(self) -> None:
        if self.remainder not in REMAINDERS:
            raise MmkdError(f"remainder {self.remainder!r}: choose one of {', '.join(REMAINDERS)}")
        if self.batch_size < 1 or self.world_size < 1:
            raise MmkdError(f"batch size {self.batch_size} and world size {self.world_size} must be positive")


@dataclass(frozen=True)
class Piece:
    """Part of one rank's batch that lies in one buffer: positions ``[lo, hi)`` of the order, which start at
    ``offset`` in the batch of global step ``step``; the batch has ``parts`` pieces."""

    step: int
    offset: int
    parts: int
    buffer: int
    lo: int
    hi: int


def chunk_starts(spec: OrderSpec, epoch: int) -> np.ndarray:
    """First sample of each chunk in the epoch's order (whole chunks shuffled, the short one last)."""
    full = spec.num_samples // spec.chunk_size
    shuffled = np.random.default_rng([spec.seed, epoch]).permutation(full) * spec.chunk_size
    rest = np.arange(full * spec.chunk_size, spec.num_samples, spec.chunk_size)
    return np.concatenate([shuffled, rest]).astype(np.int64)


def buffer_ranges(spec: OrderSpec, epoch: int, k: int, starts: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Buffer k's samples as sorted contiguous store ranges ``[(lo, hi), ...]`` (neighbouring chunks merged)."""
    starts = chunk_starts(spec, epoch) if starts is None else starts
    picked = np.sort(starts[k * spec.buffer_chunks : (k + 1) * spec.buffer_chunks])
    out: list[tuple[int, int]] = []
    for lo in picked.tolist():
        hi = min(lo + spec.chunk_size, spec.num_samples)
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def buffer_order(
    spec: OrderSpec, epoch: int, k: int, lengths: np.ndarray | None = None, starts: np.ndarray | None = None
) -> np.ndarray:
    """The sample indices at buffer k's positions, in order (``lengths``: every sample's, for ``by_length``)."""
    idx = np.concatenate([np.arange(lo, hi) for lo, hi in buffer_ranges(spec, epoch, k, starts)])
    rng = np.random.default_rng([spec.seed, epoch, 0, k])
    idx = idx[rng.permutation(len(idx))]
    if spec.by_length:
        if lengths is None:
            raise MmkdError("ordering by length needs every sample's length")
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        groups = [idx[i : i + spec.length_group] for i in range(0, len(idx), spec.length_group)]
        idx = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
    return idx


def epoch_order(spec: OrderSpec, epoch: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """The epoch's whole global order: the sample index at every position."""
    starts = chunk_starts(spec, epoch)
    return np.concatenate([buffer_order(spec, epoch, k, lengths, starts) for k in range(spec.num_buffers)])


def step_cuts(num_samples: int, steps: StepSpec, start: int = 0) -> np.ndarray:
    """The epoch's global steps from position ``start`` on, as cut points: an array (S, world_size + 1);
    rank r of step s takes positions ``[cuts[s, r], cuts[s, r + 1])``. Positions past the epoch's end
    (``remainder="pad"``) wrap to its start.

    Raises:
        MmkdError: ``split`` with fewer samples left than ranks and no full step to join them to.
    """
    w, b = steps.world_size, steps.batch_size
    full, rest = divmod(max(num_samples - start, 0), w * b)
    grid = start + np.arange(full, dtype=np.int64)[:, None] * (w * b) + np.arange(w + 1, dtype=np.int64) * b
    if rest == 0 or steps.remainder == "drop":
        return grid
    at = start + full * w * b
    if steps.remainder == "pad":
        return np.concatenate([grid, (at + np.arange(w + 1, dtype=np.int64) * b)[None]])
    if rest < w:  # too few for every rank: they join the last full step (some ranks take one sample more)
        if full == 0:
            raise MmkdError(
                f"{rest} sample(s) left in the epoch, fewer than the {w} ranks: continue with at most {rest} "
                "rank(s), or use remainder 'drop' or 'pad'"
            )
        grid, at, rest = grid[:-1], at - w * b, rest + w * b
    return np.concatenate([grid, (at + np.arange(w + 1, dtype=np.int64) * rest // w)[None]])


def num_steps(num_samples: int, steps: StepSpec, start: int = 0) -> int:
    """Global steps from position ``start`` to the epoch's end: the same on every rank."""
    return len(step_cuts(num_samples, steps, start))


def rank_pieces(cuts: np.ndarray, rank: int, spec: OrderSpec) -> list[Piece]:
    """Rank ``rank``'s batches of the steps ``cuts`` cut into pieces that each lie within one buffer."""
    n, size = spec.num_samples, spec.buffer_samples
    out: list[Piece] = []
    for s, (a, b) in enumerate(zip(cuts[:, rank].tolist(), cuts[:, rank + 1].tolist(), strict=True)):
        segments, p = [], a
        while p < b:  # split at the epoch's end (padding wraps) and at buffer ends
            lo = p % n
            hi = min(lo + b - p, n, (lo // size + 1) * size)
            segments.append((lo // size, lo, hi))
            p += hi - lo
        offset = 0
        for k, lo, hi in segments:
            out.append(Piece(s, offset, len(segments), k, lo, hi))
            offset += hi - lo
    return out


def worker_buffers(pieces: list[Piece], worker: int = 0, num_workers: int = 1) -> dict[int, list[Piece]]:
    """The buffers worker ``worker`` of ``num_workers`` reads, with their pieces: the j-th buffer the pieces
    need (in the order first needed) goes to worker ``j % num_workers``, so no buffer is read twice."""
    by_buffer: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_buffer.setdefault(piece.buffer, []).append(piece)
    return {k: ps for j, (k, ps) in enumerate(by_buffer.items()) if j % num_workers == worker}


def assemble_steps(pieces: Iterable[tuple[Piece, Any]]) -> Iterator[tuple[int, list[Any]]]:
    """``(step, [payload, ...])`` in step order, each step's payloads in batch order, from pieces that come in
    any order (a later step's wait until each earlier step is whole).

    Raises:
        RuntimeError: the pieces stop before a step they began is whole.
    """
    held: dict[int, list[tuple[int, int, Any]]] = {}
    nxt = 0
    for piece, payload in pieces:
        held.setdefault(piece.step, []).append((piece.offset, piece.parts, payload))
        while nxt in held and len(held[nxt]) == held[nxt][0][1]:
            yield nxt, [p for _, _, p in sorted(held.pop(nxt), key=lambda x: x[0])]
            nxt += 1
    if held:
        raise RuntimeError(f"the pieces stopped before step {min(held)} was whole")
