import numpy as np
import pytest
import torch

from mmkd_core.batch_order import OrderSpec, epoch_order, num_batches
from mmkd_core.loader import StoreBatches, make_loader
from mmkd_core.store import Layout, StoreWriter

CONFIG = {"teacher": {"name": "t"}, "recipe": {}, "preprocess": {}, "views": {"count": 3}, "dataset": {"name": "d"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "s.zarr"
    layout = Layout(
        num_samples=50,
        views=3,
        time_steps=5,
        dim=4,
        pooled_dim=2,
        input_ids=True,
        chunk_size=4,
        shard_size=8,
        dtype="float32",
    )
    w = StoreWriter.open(path, layout, CONFIG, {})
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        idx = np.arange(lo, hi)
        lengths = (idx % 5 + 1).astype(np.int32)
        # each value encodes (sample, view, step) so the test can tell what it got
        tokens = (
            idx[:, None, None, None] * 100 + np.arange(3)[None, :, None, None] * 10 + np.arange(5)[None, None, :, None]
        ) * np.ones((1, 1, 1, 4))
        w.write_shard(
            k,
            {
                "tokens": tokens.astype(np.float32),
                "pooled": np.repeat(idx[:, None, None] * 100 + np.arange(3)[None, :, None] * 10.0, 2, -1),
                "lengths": lengths,
                "input_ids": np.tile(np.arange(5, dtype=np.int32), (len(idx), 1)),
                "index": idx.astype(np.int64),
            },
        )
    w.finish()
    return path


def test_order_covers_every_sample_once_in_contiguous_chunk_runs():
    spec = OrderSpec(num_samples=50, chunk_size=4, batch_size=6, seed=1, buffer_runs=3)
    order = epoch_order(spec, epoch=0)
    seen = np.concatenate([b for _, batches in order for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    for runs, batches in order:
        assert all(lo % 4 == 0 and hi - lo <= 4 for lo, hi in runs)
        inside = {i for lo, hi in runs for i in range(lo, hi)}
        assert all(set(b.tolist()) <= inside for b in batches)  # a batch reads only its buffer's runs
    assert epoch_order(spec, 1)[0][1][0].tolist() != order[0][1][0].tolist()  # a new order each epoch
    assert [b.tolist() for _, bs in epoch_order(spec, 0) for b in bs] == [b.tolist() for _, bs in order for b in bs]


def test_ranks_read_disjoint_samples():
    parts = [epoch_order(OrderSpec(50, 4, 5, seed=2, rank=r, world_size=3), 0) for r in range(3)]
    sets = [{int(i) for _, bs in p for b in bs for i in b} for p in parts]
    assert set.union(*sets) == set(range(50))
    assert all(not (sets[a] & sets[b]) for a in range(3) for b in range(a + 1, 3))


def test_batches_carry_the_right_targets(store):
    order = OrderSpec(50, 4, 7, seed=0)
    for batch in StoreBatches(store, order, epoch=0):
        idx, view = batch["index"].numpy(), batch["view"].numpy()
        assert batch["tokens"].shape[1] == batch["lengths"].max()
        for j, (i, v) in enumerate(zip(idx, view, strict=True)):
            n = i % 5 + 1
            assert batch["lengths"][j] == n
            expected = i * 100 + v * 10 + np.arange(n)
            np.testing.assert_array_equal(batch["tokens"][j, :n, 0].numpy(), expected)
            assert not batch["mask"][j, n:].any()
            assert batch["pooled"][j, 0] == i * 100 + v * 10
    views = np.concatenate([b["view"].numpy() for b in StoreBatches(store, order, epoch=0)])
    assert set(views) == {0, 1, 2}  # a random stored view per sample


def test_resume_from_any_batch_and_with_workers_keeps_the_order(store):
    order = OrderSpec(50, 4, 6, seed=3, buffer_runs=2)
    full = [b["index"].tolist() for b in StoreBatches(store, order, epoch=1)]
    assert len(full) == num_batches(order)
    rest = [b["index"].tolist() for b in StoreBatches(store, order, epoch=1, start_batch=5)]
    assert rest == full[5:]
    with_workers = [b["index"].tolist() for b in make_loader(StoreBatches(store, order, epoch=1, start_batch=3), 2)]
    assert with_workers == full[3:]


def test_in_memory_equals_streamed(store):
    order = OrderSpec(50, 4, 8, seed=0)
    a = list(StoreBatches(store, order))
    b = list(StoreBatches(store, order, in_memory=True))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["index"], y["index"])


def test_length_bucketing_keeps_coverage_and_groups_lengths(store):
    from mmkd_core.store import open_store

    lengths = open_store(store).group["lengths"][:]
    spec = OrderSpec(50, 4, 5, seed=4, buffer_runs=6, by_length=True)
    order = epoch_order(spec, 0, lengths)
    seen = np.concatenate([b for _, bs in order for b in bs])
    assert sorted(seen.tolist()) == list(range(50))
    spread = np.mean([np.ptp(lengths[b]) for _, bs in order for b in bs])
    unsorted = np.mean(
        [np.ptp(lengths[b]) for _, bs in epoch_order(OrderSpec(50, 4, 5, seed=4, buffer_runs=6), 0) for b in bs]
    )
    assert spread < unsorted
    assert num_batches(spec) == sum(len(bs) for _, bs in order)
    full = [b["index"].tolist() for b in StoreBatches(store, spec)]
    assert [b["index"].tolist() for b in StoreBatches(store, spec, start_batch=4)] == full[4:]
