"""Properties of the epoch's batch order over the sizes users meet: every epoch has the batch count the loop uses,
every sample appears once per epoch across ranks, and resuming at any batch gives the same remainder."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkd_core.batch_order import OrderSpec, check_order, epoch_batches, epoch_order, num_batches
from mmkd_core.errors import MmkdError


def _specs(max_samples: int, by_length, drop_last: bool):
    """OrderSpecs over the sizes users meet: many chunks, odd remainders, up to 8 ranks."""
    return st.builds(
        OrderSpec,
        num_samples=st.integers(1, max_samples),
        chunk_size=st.integers(1, 300),
        batch_size=st.integers(1, 256),
        seed=st.integers(0, 2**16),
        buffer_runs=st.integers(1, 20),
        world_size=st.integers(1, 8),
        by_length=by_length,
        drop_last=st.just(drop_last),
    )


specs = _specs(40_000, st.booleans(), drop_last=False)
dropping = _specs(20_000, st.just(False), drop_last=True)


def _lengths(n: int) -> np.ndarray:
    return (np.arange(n) * 7919) % 61 + 1


def _usable(spec: OrderSpec) -> bool:
    try:
        check_order(spec)
    except MmkdError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=specs, epoch=st.integers(0, 50))
def test_every_epoch_and_rank_has_the_same_batch_count_and_every_sample_once(spec, epoch):
    if not _usable(spec):
        return
    lengths = _lengths(spec.num_samples)
    seen = []
    for r in range(spec.world_size):
        order = epoch_order(OrderSpec(**{**spec.__dict__, "rank": r}), epoch, lengths)
        batches = [b for _, bs in order for b in bs]
        assert len(batches) == num_batches(spec)
        assert all(1 <= len(b) <= spec.batch_size for b in batches)
        for runs, bs in order:  # a batch reads only its buffer's contiguous ranges
            inside = np.concatenate([np.arange(lo, hi) for lo, hi in runs])
            assert np.isin(np.concatenate(bs), inside).all() and len(inside) <= spec.buffer_samples
        seen.append(np.concatenate(batches))
    everything = np.concatenate(seen)
    assert len(everything) == spec.num_samples
    assert np.array_equal(np.sort(everything), np.arange(spec.num_samples))


@settings(max_examples=150, deadline=None)
@given(spec=specs, epoch=st.integers(0, 50), data=st.data())
def test_resuming_at_any_batch_gives_the_same_remainder(spec, epoch, data):
    if not _usable(spec):
        return
    lengths = _lengths(spec.num_samples)
    full = [b.tolist() for _, b in epoch_batches(spec, epoch, lengths)]
    start = data.draw(st.integers(0, len(full)))
    workers = data.draw(st.integers(1, 4))
    # workers take batches round-robin; interleaved back they give the epoch's order
    parts = [[b.tolist() for _, b in epoch_batches(spec, epoch, lengths, start, w, workers)] for w in range(workers)]
    merged = [parts[k % workers][k // workers] for k in range(sum(map(len, parts)))]
    assert merged == full[start:]


@pytest.mark.parametrize(
    "n, chunk, batch, world", [(141, 5, 8, 1), (191, 5, 8, 1), (31210, 250, 128, 1), (64, 1000, 8, 2), (17, 4, 8, 2)]
)
def test_reported_settings_have_one_count_for_all_epochs(n, chunk, batch, world):
    """Settings whose per-epoch count used to change with the epoch (a hang or lost samples)."""
    spec = OrderSpec(num_samples=n, chunk_size=chunk, batch_size=batch, world_size=world)
    for r in range(world):
        counts = {sum(len(bs) for _, bs in epoch_order(OrderSpec(**{**spec.__dict__, "rank": r}), e)) for e in range(8)}
        assert counts == {num_batches(spec)}


def test_orders_that_cannot_be_balanced_are_refused():
    with pytest.raises(MmkdError, match="fewer than the 4 ranks"):
        check_order(OrderSpec(num_samples=3, chunk_size=1, batch_size=2, world_size=4))
    with pytest.raises(MmkdError, match="--batch-size 1"):
        check_order(OrderSpec(num_samples=5, chunk_size=1, batch_size=1, world_size=2))


@settings(max_examples=200, deadline=None)
@given(spec=dropping, epoch=st.integers(0, 50))
def test_drop_last_gives_full_batches_the_same_count_and_no_sample_twice(spec, epoch):
    if not _usable(spec):
        assert num_batches(spec) == 0
        return
    seen = []
    for r in range(spec.world_size):
        batches = [b for _, bs in epoch_order(OrderSpec(**{**spec.__dict__, "rank": r}), epoch) for b in bs]
        assert len(batches) == num_batches(spec) and all(len(b) == spec.batch_size for b in batches)
        seen.append(np.concatenate(batches))
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)
    # what is left out is less than a batch per buffer and rank, plus one batch for the longer shares
    buffers = -(-(spec.num_samples // spec.world_size) // spec.buffer_samples)
    assert spec.num_samples - len(everything) < spec.world_size * (buffers + 1) * spec.batch_size + spec.world_size
