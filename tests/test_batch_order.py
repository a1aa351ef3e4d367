"""Properties of the epoch's global order and of how ranks and workers share it: one order whatever the world
size, workers or batch size; every sample exactly once through a resume with other ranks, workers and batch
size; for unchanged ranks and batch size, the batches of the uninterrupted run."""

from itertools import cycle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkd_core.batch_order import (
    OrderSpec,
    StepSpec,
    assemble_steps,
    buffer_order,
    buffer_ranges,
    epoch_order,
    num_steps,
    rank_pieces,
    step_cuts,
    worker_buffers,
)
from mmkd_core.errors import MmkdError


def _lengths(n: int) -> np.ndarray:
    return (np.arange(n) * 7919) % 61 + 1


def _round_robin(streams):
    """What a DataLoader does with K iterable workers: take from each in turn, skipping those done."""
    live = [iter(s) for s in streams]
    for it in cycle(list(live)):
        if not live:
            return
        if it not in live:
            continue
        try:
            yield next(it)
        except StopIteration:
            live.remove(it)


def run(order: OrderSpec, steps: StepSpec, epoch: int, start: int, workers: int, stop: int | None = None):
    """Every rank's batches (sample indices) of the epoch from position ``start``, read by ``workers`` workers
    per rank exactly as the loader reads them, up to global step ``stop``; and the position reached."""
    lengths = _lengths(order.num_samples)
    cuts = step_cuts(order.num_samples, steps, start)
    stop = len(cuts) if stop is None else stop
    out = []
    for rank in range(steps.world_size):
        pieces = rank_pieces(cuts, rank, order)

        def worker(w, pieces=pieces):
            for k, ps in worker_buffers(pieces, w, workers).items():
                ids = buffer_order(order, epoch, k, lengths)
                for p in ps:
                    yield p, ids[p.lo - k * order.buffer_samples : p.hi - k * order.buffer_samples]

        batches = [
            np.concatenate(parts) for _, parts in assemble_steps(_round_robin([worker(w) for w in range(workers)]))
        ]
        assert len(batches) == len(cuts)  # every rank steps the same number of times
        out.append(batches[:stop])
    reached = order.num_samples if stop == len(cuts) else int(cuts[stop - 1, -1]) if stop else start
    return out, reached


orders = st.builds(
    OrderSpec,
    num_samples=st.integers(1, 3000),
    chunk_size=st.integers(1, 64),
    seed=st.integers(0, 2**16),
    buffer_chunks=st.integers(1, 6),
    by_length=st.booleans(),
    length_group=st.integers(1, 40),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=orders, epoch=st.integers(0, 20), data=st.data())
def test_resume_with_other_ranks_workers_and_batch_sees_every_sample_once(order, epoch, data):
    n = order.num_samples
    before = StepSpec(data.draw(st.integers(1, 64)), data.draw(st.integers(1, 4)))
    after = StepSpec(data.draw(st.integers(1, 64)), data.draw(st.integers(1, 4)))
    k1, k2 = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    if n < before.world_size:
        return
    total = num_steps(n, before)
    stop = data.draw(st.integers(0, total))
    first, reached = run(order, before, epoch, 0, k1, stop)
    if 0 < n - reached < after.world_size:
        with pytest.raises(MmkdError, match="fewer than"):
            step_cuts(n, after, reached)
        return
    second, _ = run(order, after, epoch, reached, k2)
    seen = np.concatenate([b for part in (first, second) for rank in part for b in rank] + [np.array([], int)])
    assert np.array_equal(np.sort(seen), np.arange(n))  # exactly once
    # globally the steps walk the one order: rank r's batch of a step is the r-th slice of its positions
    order_ids = epoch_order(order, epoch, _lengths(n))
    flat = np.concatenate([np.concatenate([first[r][s] for r in range(before.world_size)]) for s in range(stop)] + [[]])
    assert np.array_equal(flat, order_ids[: len(flat)])
    if (after.batch_size, after.world_size) == (before.batch_size, before.world_size):
        whole, _ = run(order, before, epoch, 0, k2)  # determinism: the batches of the uninterrupted run
        for r in range(before.world_size):
            assert [b.tolist() for b in first[r] + second[r]] == [b.tolist() for b in whole[r]]


@settings(max_examples=80, deadline=None)
@given(order=orders, epoch=st.integers(0, 20), batch=st.integers(1, 64), world=st.integers(1, 4))
def test_one_global_order_whatever_the_workers(order, epoch, batch, world):
    if order.num_samples < world:
        return
    steps = StepSpec(batch, world)
    one = run(order, steps, epoch, 0, 1)[0]
    for k in (2, 4):
        assert [[b.tolist() for b in r] for r in run(order, steps, epoch, 0, k)[0]] == [
            [b.tolist() for b in r] for r in one
        ]


@settings(max_examples=100, deadline=None)
@given(order=orders, epoch=st.integers(0, 20))
def test_the_order_is_one_permutation_of_contiguous_buffers(order, epoch):
    ids = epoch_order(order, epoch, _lengths(order.num_samples))
    assert np.array_equal(np.sort(ids), np.arange(order.num_samples))
    for k in range(order.num_buffers):
        ranges = buffer_ranges(order, epoch, k)
        inside = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        size = order.buffer_samples
        assert set(ids[k * size : (k + 1) * size].tolist()) == set(inside.tolist())  # a buffer reads its ranges
        assert len(ranges) <= order.buffer_chunks
        assert all(lo % order.chunk_size == 0 for lo, _ in ranges)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 5000),
    batch=st.integers(1, 64),
    world=st.integers(1, 8),
    remainder=st.sampled_from(["split", "drop", "pad"]),
)
def test_remainders(n, batch, world, remainder):
    steps = StepSpec(batch, world, remainder)
    g = batch * world
    try:
        cuts = step_cuts(n, steps)
    except MmkdError:
        assert remainder == "split" and n < world
        return
    sizes = np.diff(cuts, axis=1)
    if remainder == "drop":
        assert len(cuts) == n // g and (sizes == batch).all()
    elif remainder == "pad":
        assert len(cuts) == -(-n // g) and (sizes == batch).all()
        covered = np.concatenate([np.arange(a, b) % n for a, b in zip(cuts[:, 0], cuts[:, -1], strict=True)])
        assert set(covered.tolist()) == set(range(n))
    else:
        assert cuts[0, 0] == 0 and cuts[-1, -1] == n and (sizes >= 1).all()
        assert (cuts[1:, 0] == cuts[:-1, -1]).all() and (sizes[:-1] == batch).all()
        assert sizes[-1].max() - sizes[-1].min() <= 1


def test_the_order_does_not_depend_on_the_batch_size_or_world():
    """Unlike an order cut per rank: the same positions hold the same samples for every StepSpec."""
    order = OrderSpec(num_samples=1000, chunk_size=10, seed=5, buffer_chunks=4, by_length=True, length_group=8)
    ids = epoch_order(order, 3, _lengths(1000))
    for steps in (StepSpec(7, 1), StepSpec(5, 3), StepSpec(64, 2)):
        got, _ = run(order, steps, 3, 0, 2)
        flat = np.concatenate(
            [np.concatenate([got[r][s] for r in range(steps.world_size)]) for s in range(len(got[0]))]
        )
        assert np.array_equal(flat, ids[: len(flat)])
    assert not np.array_equal(ids, epoch_order(order, 4, _lengths(1000)))  # a new order each epoch


def test_length_groups_pad_less():
    lengths = _lengths(2000)
    order = OrderSpec(2000, 10, seed=1, buffer_chunks=16, by_length=True, length_group=16)
    plain = OrderSpec(2000, 10, seed=1, buffer_chunks=16)
    spread = [np.ptp(lengths[epoch_order(o, 0, lengths)].reshape(-1, 16), axis=1).mean() for o in (order, plain)]
    assert spread[0] < spread[1] / 4


def test_too_few_samples_for_the_ranks_is_refused():
    with pytest.raises(MmkdError, match="fewer than the 4 ranks"):
        step_cuts(3, StepSpec(2, 4))
    with pytest.raises(MmkdError, match="remainder"):
        StepSpec(2, 1, "keep")
