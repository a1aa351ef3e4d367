"""The store's loader on real stores: the right targets in their stored dtype, decoded on the device to what
the reader decodes; the same batches with 0, 1, 2 and 4 workers, each buffer read once; exact resume with
the same ranks and elastic resume with other ranks, workers and batch size."""

import numpy as np
import pytest
import torch

from mmkd_core import StoreDataset, store_loader, to_device
from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, open_store

CONFIG = {"teacher": {"name": "t"}, "recipe": {}, "preprocess": {}, "views": {"count": 3}, "dataset": {"name": "d"}}
N = 50


def write_store(path, dtype: str, n: int = N):
    layout = Layout(
        num_samples=n,
        views=3,
        time_steps=5,
        dim=4,
        pooled_dim=2,
        input_ids=True,
        chunk_size=4,
        shard_size=8,
        dtype=dtype,
    )
    w = StoreWriter.open(path, layout, CONFIG, {})
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        idx = np.arange(lo, hi)
        # each value encodes (sample, view, step) so the test can tell what it got
        tokens = (
            idx[:, None, None, None] * 100 + np.arange(3)[None, :, None, None] * 10 + np.arange(5)[None, None, :, None]
        )
        w.write_shard(
            k,
            {
                "tokens": (tokens * np.ones((1, 1, 1, 4)) / 64).astype(np.float32),
                "pooled": np.repeat(idx[:, None, None] * 100 + np.arange(3)[None, :, None] * 10.0, 2, -1) / 64,
                "lengths": (idx % 5 + 1).astype(np.int32),
                "input_ids": np.tile(np.arange(5, dtype=np.int32), (len(idx), 1)),
                "index": idx.astype(np.int64),
            },
        )
    w.finish()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("s")
    return {dt: write_store(root / f"{dt}.zarr", dt) for dt in ("float32", "float16", "bfloat16", "int8")}


@pytest.fixture(scope="module")
def store(stores):
    return stores["float32"]


def ids(batches):
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_targets_travel_as_stored_and_decode_on_the_device_as_the_reader_decodes(stores, dtype):
    reader = open_store(stores[dtype])
    bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[dtype]
    for batch in store_loader(stores[dtype], 7, seed=2):
        assert batch["tokens"].element_size() == bytes_per
        wide = to_device(batch, "cpu")
        assert wide["tokens"].dtype == wide["pooled"].dtype == torch.float32 and "tokens_scale" not in wide
        for j, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist(), strict=True)):
            n = int(batch["lengths"][j])
            assert torch.equal(wide["tokens"][j, :n], torch.from_numpy(reader.tokens(i, v)))  # bit for bit
            assert torch.equal(wide["pooled"][j], torch.from_numpy(reader.pooled(i, v)))
            assert not batch["mask"][j, n:].any()
    host = list(store_loader(stores[dtype], 7, seed=2, targets="float32"))
    for a, b in zip(host, store_loader(stores[dtype], 7, seed=2), strict=True):
        assert a["tokens"].dtype == torch.float32 and torch.equal(a["tokens"], to_device(b, "cpu")["tokens"])


def test_batches_carry_the_right_sample_view_and_padding(store):
    views = []
    for batch in store_loader(store, 7, seed=0, buffer_chunks=2):
        idx, view = batch["index"].numpy(), batch["view"].numpy()
        assert batch["tokens"].shape[1] == batch["lengths"].max() == batch["input_ids"].shape[1]
        for j, (i, v) in enumerate(zip(idx, view, strict=True)):
            n = i % 5 + 1
            np.testing.assert_array_equal(batch["tokens"][j, :n, 0].numpy() * 64, i * 100 + v * 10 + np.arange(n))
            assert batch["pooled"][j, 0] * 64 == i * 100 + v * 10
        views += view.tolist()
    assert set(views) == {0, 1, 2}  # a random stored view per sample


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("by_length", [False, True])
def test_the_same_batches_with_0_1_2_and_4_workers(store, by_length):
    opts = dict(seed=3, buffer_chunks=2, by_length=by_length, length_group=3)
    alone = ids(store_loader(store, 6, **opts))
    assert sorted(sum(alone, [])) == list(range(N))
    for workers in (1, 2, 4):
        got = list(store_loader(store, 6, workers=workers, **opts))
        assert ids(got) == alone
        assert all(b["tokens"].shape[1] == b["lengths"].max() for b in got)  # padded to the batch's longest


def test_workers_read_each_buffer_once(store, monkeypatch):
    from mmkd_core import dataset

    reads = []
    real = dataset.StoreDataset._read
    monkeypatch.setattr(
        dataset.StoreDataset, "_read", lambda self, lo, hi: reads.append((lo, hi)) or real(self, lo, hi)
    )
    ds = StoreDataset(store, 5, seed=1, buffer_chunks=2)
    for w in range(3):
        list(ds.pieces(w, 3))
    assert sorted(reads) == sorted(set(reads))  # no range read twice
    assert sum(hi - lo for lo, hi in reads) == N


def test_resume_with_the_same_ranks_gives_the_uninterrupted_batches(store):
    whole = ids(store_loader(store, 6, seed=4, buffer_chunks=2))
    loader = store_loader(store, 6, seed=4, buffer_chunks=2)
    first = []
    for batch in loader:
        first.append(batch["index"].tolist())
        if len(first) == 3:
            break
    state = loader.state_dict()
    assert state == {"format": "mmkd-store-dataset/1", "epoch": 0, "consumed": 18, "seed": 4}
    again = store_loader(store, 6, seed=4, buffer_chunks=2, workers=2)
    again.load_state_dict(state)
    assert len(again) == len(whole) - 3
    assert first + ids(again) == whole
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["consumed"] == 0  # the epoch ended


def _ranks(store, world, state=None, batch=4, workers=0, stop=None):
    """Every rank's sample indices from ``state`` on (ranks simulated in one process); the state reached."""
    seen, states = [], []
    for r in range(world):
        loader = store_loader(store, batch, seed=5, rank=r, world_size=world, buffer_chunks=2, workers=workers)
        loader.set_epoch(2)
        if state is not None:
            loader.load_state_dict(state)
        for k, b in enumerate(loader):
            seen += b["index"].tolist()
            if stop is not None and k + 1 == stop:
                break
        states.append(loader.state_dict())
    assert all(s == states[0] for s in states)  # every rank agrees where the epoch stands
    return seen, states[0]


@pytest.mark.parametrize("world, batch, workers", [(1, 5, 0), (3, 3, 2), (2, 7, 1)])
def test_a_run_stopped_on_2_ranks_continues_on_others_every_sample_once(store, world, batch, workers):
    before, state = _ranks(store, 2, stop=4)
    assert state["consumed"] == 4 * 2 * 4 and state["epoch"] == 2
    after, end = _ranks(store, world, state, batch, workers)
    assert sorted(before + after) == list(range(N))
    assert end["epoch"] == 3 and end["consumed"] == 0


def test_remainder_options(store):
    drop = list(store_loader(store, 8, remainder="drop"))
    assert [len(b["index"]) for b in drop] == [8] * 6  # 50 = 6 x 8 + 2 left out
    pad = list(store_loader(store, 8, remainder="pad"))
    assert [len(b["index"]) for b in pad] == [8] * 7
    assert set(sum(ids(pad), [])) == set(range(N))
    split = [len(b["index"]) for r in range(3) for b in store_loader(store, 8, rank=r, world_size=3)]
    assert sum(split) == N and len(split) % 3 == 0  # every rank steps as often, every sample once


def test_state_from_another_order_is_refused(store):
    loader = store_loader(store, 4, seed=1)
    with pytest.raises(MmkdError, match="seed 2"):
        loader.load_state_dict({"format": "mmkd-store-dataset/1", "epoch": 0, "consumed": 4, "seed": 2})
    with pytest.raises(MmkdError, match="not a"):
        loader.load_state_dict({"epoch": 0})


def test_in_memory_equals_streamed(store):
    for x, y in zip(store_loader(store, 8), store_loader(store, 8, in_memory=True), strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["index"], y["index"])


def test_a_dataloaders_own_workers_are_refused_with_what_to_use(store):
    loader = torch.utils.data.DataLoader(StoreDataset(store, 4), batch_size=None, num_workers=1)
    with pytest.raises(Exception, match="store_loader"):
        next(iter(loader))
    assert ids(torch.utils.data.DataLoader(StoreDataset(store, 4), batch_size=None)) == ids(StoreDataset(store, 4))


def test_workers_are_spawned_under_the_zarrs_pipeline():
    """zarrs' Rust threads do not survive a fork (forked workers hung reading nothing): its workers spawn."""
    import zarr

    from mmkd_core.loader import _worker_start
    from mmkd_core.store.codecs import DEFAULT_PIPELINE, ZARRS_PIPELINE

    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        assert _worker_start() == "spawn"
    with zarr.config.set({"codec_pipeline.path": DEFAULT_PIPELINE}):
        assert _worker_start() is None
