"""Stores are ordinary array data: zarr v3 dimension_names on every array, xarray.open_zarr opens every kind
of store, the encodings say how they decode, and StoreReader gives lazy dask/xarray views of the targets."""

import json
import pickle
import sys

import numpy as np
import pytest

from mmkd_core import quant
from mmkd_core.errors import MmkdError
from mmkd_core.store import DIMS, Layout, StoreWriter, dimension_names, open_store

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")

CONFIG = {
    "teacher": {"name": "t", "weights_sha256": "abc"},
    "recipe": {"layers": [0, 1], "pool": "mean"},
    "preprocess": {},
    "views": {"count": 2},
    "dataset": {"name": "d", "fingerprint": "f"},
}

# every kind of store the project writes; pooled widths differ from token widths where they can, and int8's
# outlier counts differ between tokens (D=192: K=2) and pooled (E=96: K=1)
KINDS = {
    "float16-text": dict(dtype="float16", views=1, dim=8, pooled_dim=8, input_ids=True),
    "float32-images": dict(dtype="float32", views=3, dim=8, pooled_dim=6, view_params=5),
    "bfloat16-text": dict(dtype="bfloat16", views=2, dim=8, pooled_dim=5, input_ids=True),
    "int8-images": dict(dtype="int8", views=2, dim=192, pooled_dim=96, view_params=5),
    "int8-text": dict(dtype="int8", views=1, dim=96, pooled_dim=96, input_ids=True),
    "pooled-only-float16": dict(dtype="float16", views=1, dim=8, pooled_dim=8, store_tokens=False, input_ids=True),
    "pooled-only-int8": dict(dtype="int8", views=2, dim=8, pooled_dim=8, store_tokens=False, view_params=5),
}
N, T = 23, 6


def shard_data(layout, lo, hi):
    rng = np.random.default_rng(lo)
    n, v = hi - lo, layout.views
    lengths = rng.integers(1, layout.time_steps + 1, n).astype(np.int32)
    tokens = rng.standard_normal((n, v, layout.time_steps, layout.dim)).astype(np.float32) * 3
    tokens *= np.arange(layout.time_steps)[None, None, :, None] < lengths[:, None, None, None]
    out = {
        "pooled": rng.standard_normal((n, v, layout.pooled_dim)).astype(np.float32) * 3,
        "lengths": lengths,
        "index": np.arange(lo, hi, dtype=np.int64) * 3,
    }
    if layout.store_tokens:
        out["tokens"] = tokens
    if layout.input_ids:
        out["input_ids"] = rng.integers(0, 1000, (n, layout.time_steps)).astype(np.int32)
    if layout.view_params:
        out["view_params"] = rng.uniform(0, 64, (n, v, layout.view_params)).astype(np.float32)
        out["view_checksum"] = rng.integers(0, 2**63, (n, v), dtype=np.uint64) * 2 + 1
    return out


def make_store(path, kind, shards=None):
    layout = Layout(num_samples=N, time_steps=T, chunk_size=4, shard_size=8, **KINDS[kind])
    with StoreWriter.open(path, layout, {**CONFIG, "views": {"count": layout.views}}, {"zarr": "x"}) as w:
        for k in range(layout.num_shards) if shards is None else shards:
            w.write_shard(k, shard_data(layout, *layout.shard_range(k)))
        if shards is None:
            assert w.finish()
    return layout


def everything(r):
    """What StoreReader.read gives for the whole store, every array it has."""
    return r.read(0, len(r), names=tuple(DIMS))


def decode_by_recorded_rule(ds, name, storage):
    """Decode target ``name`` of an xarray.open_zarr Dataset by what the store records, not by mmkd code."""
    a = ds[name]
    if storage["dtype"] == "bfloat16":
        assert a.attrs["decode"] == storage["decode"] == "float32 bits = uint16 << 16"
        assert a.dtype == np.uint16
        return (a.values.astype(np.uint32) << 16).view(np.float32)
    if storage["dtype"] == "int8":
        assert "mmkd.storage.dequantize" in a.attrs["dequantize"]
        assert storage["dequantize"].startswith("for A in (tokens, pooled): x = A * A_scale[..., None] / 127;")
        parts = a.attrs["mmkd_parts"]
        assert parts == [f"{name}_scale", f"{name}_outlier_idx", f"{name}_outlier_val"]
        for part in parts:
            assert ds[part].attrs["mmkd_part_of"] == name
        scale, idx, val = (ds[p].values for p in parts)
        x = a.values.astype(np.float32) * scale.astype(np.float32)[..., None] / np.float32(127)
        for k in range(idx.shape[-1]):
            np.put_along_axis(x, idx[..., k : k + 1].astype(np.int64), val[..., k : k + 1].astype(np.float32), -1)
        return x
    assert a.attrs["mmkd_logical_dtype"] == storage["dtype"]
    return a.values.astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_open_zarr_reads_every_kind_of_store(tmp_path, kind):
    layout = make_store(tmp_path / "s.zarr", kind)
    r = open_store(tmp_path / "s.zarr")
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    g = r.group
    assert set(ds.data_vars) == set(g.array_keys())
    for name in g.array_keys():
        assert g[name].metadata.dimension_names == dimension_names(name), name
        assert ds[name].dims == dimension_names(name) and ds[name].shape == g[name].shape, name
    sizes = {"sample": N, "view": layout.views, "pooled_channel": layout.pooled_dim, "shard": 3}
    if layout.store_tokens:
        sizes["channel"] = layout.dim
    if layout.store_tokens or layout.input_ids:
        sizes["time"] = T
    if layout.view_params:
        sizes["param"] = layout.view_params
    if layout.dtype == "int8":
        sizes["pooled_outlier"] = quant.outliers_for(layout.pooled_dim)
        if layout.store_tokens:
            sizes["outlier"] = quant.outliers_for(layout.dim)
    assert dict(ds.sizes) == sizes
    assert ds.attrs["mmkd"] == r.attrs
    want = everything(r)
    for name, value in want.items():
        got = decode_by_recorded_rule(ds, name, r.storage) if name in ("tokens", "pooled") else ds[name].values
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    np.testing.assert_array_equal(ds["shards_done"].values, [1, 1, 1])


def test_decoding_is_recorded_on_arrays_and_in_storage(tmp_path):
    make_store(tmp_path / "b.zarr", "bfloat16-text")
    b = open_store(tmp_path / "b.zarr")
    assert b.storage["decode"] == quant.BFLOAT16_RULE == "float32 bits = uint16 << 16"
    for name in ("tokens", "pooled"):
        assert dict(b.group[name].attrs) == {"mmkd_logical_dtype": "bfloat16", "decode": quant.BFLOAT16_RULE}
    bits = np.array([0x3F80, 0xC000, 0x0001, 0x7F7F], np.uint16)
    np.testing.assert_array_equal(quant.decode_float(bits, "bfloat16"), (bits.astype(np.uint32) << 16).view("f4"))

    make_store(tmp_path / "q.zarr", "int8-images")
    q = open_store(tmp_path / "q.zarr")
    assert q.storage["dequantize"] == quant.INT8_RULE and "decode" not in q.storage
    for target in ("tokens", "pooled"):
        attrs = q.group[target].attrs
        assert attrs["mmkd_logical_dtype"] == "int8" and attrs["dequantize"].endswith(f"A = {target}")
        for part in ("_scale", "_outlier_idx", "_outlier_val"):
            assert q.group[target + part].attrs["mmkd_part_of"] == target
    for name in ("lengths", "index", "view_params", "view_checksum", "shards_done"):
        assert dict(q.group[name].attrs) == {}, name


@pytest.mark.parametrize("kind", KINDS)
def test_to_dask_is_lazy_chunked_as_the_store_and_equals_read(tmp_path, kind, monkeypatch):
    from mmkd_core.store import reader

    make_store(tmp_path / "s.zarr", kind)
    r = open_store(tmp_path / "s.zarr")
    reads = []
    real_getitem = reader._ZarrSource.__getitem__
    monkeypatch.setattr(reader._ZarrSource, "__getitem__", lambda s, k: reads.append(s.name) or real_getitem(s, k))
    arrays = r.to_dask()
    assert reads == []  # nothing is read until computed
    expected = [n for n in DIMS if n in r.group]
    assert list(arrays) == expected  # int8's parts are consumed by the targets' decoding
    for name, x in arrays.items():
        z = r.group[name]
        assert isinstance(x, da.Array) and x.shape == z.shape, name
        c, n = z.chunks[0], z.shape[0]
        assert x.chunks[0] == tuple(min(c, n - i) for i in range(0, n, c)), name  # the store's chunks
        assert all(c == (s,) for c, s in zip(x.chunks[1:], z.shape[1:], strict=True)), name
    assert arrays["index"].chunks[0] == (4, 4, 4, 4, 4, 3) and arrays["shards_done"].chunks[0] == (1, 1, 1)
    target = "tokens" if "tokens" in arrays else "pooled"
    assert arrays[target].dtype == np.float32
    first = arrays[target][:4].compute()  # one chunk reads one chunk of each encoded array
    parts = 4 if r.storage["dtype"] == "int8" else 1
    assert sorted(reads) == sorted([target] + [target + p for p in quant.INT8_PARTS[1:]][: parts - 1])
    np.testing.assert_array_equal(first, r.read(0, 4, names=(target,))[target])
    want = everything(r)
    for name, value in want.items():
        got = arrays[name].compute()
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    # the arrays travel to dask workers
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(arrays[target])).compute(), want[target])


@pytest.mark.parametrize("kind", ["bfloat16-text", "int8-images", "pooled-only-int8", "float32-images"])
def test_to_xarray_dequantised_lazy_with_provenance(tmp_path, kind):
    layout = make_store(tmp_path / "s.zarr", kind)
    r = open_store(tmp_path / "s.zarr")
    ds = r.to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert ds.attrs["mmkd"] == r.attrs and ds.attrs["mmkd"]["storage"]["dtype"] == layout.dtype
    assert list(ds.data_vars) == [n for n in DIMS if n in r.group]
    for name in ds.data_vars:
        assert isinstance(ds[name].data, da.Array), name  # lazy
        assert ds[name].dims == DIMS[name], name
    want = everything(r)
    for name, value in want.items():
        got = ds[name].values
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    for target in ("tokens", "pooled"):
        if target in ds:
            assert ds[target].dtype == np.float32
            # already decoded: no decoding rule that a reader could apply a second time
            assert ds[target].attrs == {
                "mmkd_logical_dtype": layout.dtype,
                "mmkd_decoded": "float32, as StoreReader.read",
            }
    # aligned by name: one sample's view of every per-view array at once
    one = ds.isel(sample=9, view=layout.views - 1).compute()
    np.testing.assert_array_equal(one["pooled"].values, want["pooled"][9, -1])


def test_to_xarray_without_xarray_says_how_to_install(tmp_path, monkeypatch):
    make_store(tmp_path / "s.zarr", "float16-text")
    r = open_store(tmp_path / "s.zarr")
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray raises ImportError
    with pytest.raises(MmkdError, match=r"pip install 'mmkd\[xarray\]'"):
        r.to_xarray()
    assert set(r.to_dask()) >= {"tokens", "pooled"}  # dask needs no extra


def test_repr_names_path_size_dtype_arrays_and_completion(tmp_path):
    make_store(tmp_path / "s.zarr", "bfloat16-text", shards=[0, 2])
    r = open_store(tmp_path / "s.zarr")
    text = repr(r)
    first = text.splitlines()[0]
    for part in (str(tmp_path / "s.zarr"), "23 samples", "2 views", "bfloat16 (stored as uint16)", "teacher t"):
        assert part in first, (part, first)
    assert "incomplete (2/3 shards done)" in first
    for name in ("tokens", "pooled", "lengths", "input_ids", "index", "shards_done"):
        z = r.group[name]
        line = next(row for row in text.splitlines()[1:] if row.split()[0] == name)
        assert f"{z.shape} {z.dtype}" in line and f"({', '.join(DIMS[name])})" in line, line
    assert len(text.splitlines()) == 1 + len(list(r.group.array_keys()))

    make_store(tmp_path / "c.zarr", "int8-images")
    text = repr(open_store(tmp_path / "c.zarr"))
    assert ", complete" in text.splitlines()[0] and "incomplete" not in text
    assert "int8" in text and "tokens_outlier_idx  (23, 2, 6, 2) uint16  (sample, view, time, outlier)" in text
    assert "pooled_outlier_idx  (23, 2, 1) uint16  (sample, view, pooled_outlier)" in text


def _strip_new_metadata(path):
    """Make ``path`` look like a store written before dimension_names and the bfloat16 decode record."""
    for meta_path in path.glob("*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        meta.pop("dimension_names", None)
        meta["attributes"] = {}
        meta_path.write_text(json.dumps(meta))
    group = json.loads((path / "zarr.json").read_text())
    del group["attributes"]["mmkd"]["storage"]["decode"]
    (path / "zarr.json").write_text(json.dumps(group))


def test_stores_without_dimension_names_still_read_and_resume(tmp_path):
    path = tmp_path / "old.zarr"
    layout = make_store(path, "bfloat16-text", shards=[0])
    _strip_new_metadata(path)
    assert all(open_store(path).group[n].metadata.dimension_names is None for n in open_store(path).group.array_keys())
    # a store written by the previous version resumes (its storage record lacks `decode`)
    with StoreWriter.open(path, layout, {**CONFIG, "views": {"count": 2}}, {}) as w:
        assert w.done_shards() == {0}
        for k in (1, 2):
            w.write_shard(k, shard_data(layout, *layout.shard_range(k)))
        assert w.finish()
    r = open_store(path)
    assert r.complete and "decode" not in r.storage
    want = everything(r)
    np.testing.assert_array_equal(r.tokens(3, view=1), want["tokens"][3, 1, : want["lengths"][3]])
    ds = r.to_xarray()  # dimension names come from the format when the store has none
    for name, value in want.items():
        assert ds[name].dims == DIMS[name]
        np.testing.assert_array_equal(ds[name].values, value, err_msg=name)
    assert "(sample, view, time, channel)" in repr(r)
    # an actual difference in storage is still refused on resume
    other = Layout(
        num_samples=N, time_steps=T, chunk_size=4, shard_size=8, **{**KINDS["bfloat16-text"], "dtype": "float16"}
    )
    with pytest.raises(MmkdError, match="storage"):
        StoreWriter.open(path, other, {**CONFIG, "views": {"count": 2}}, {})


def test_to_dask_keys_follow_the_data(tmp_path):
    path = tmp_path / "s.zarr"
    layout = make_store(path, "float16-text", shards=[0])
    before = open_store(path).to_dask()
    assert open_store(path).to_dask()["tokens"].name == before["tokens"].name  # deterministic for one state
    assert not before["tokens"][8:16].compute().any()  # shard 1 not written yet
    with StoreWriter.open(path, layout, {**CONFIG, "views": {"count": 1}}, {}) as w:
        w.write_shard(1, shard_data(layout, *layout.shard_range(1)))
    after = open_store(path).to_dask()
    assert after["tokens"].name != before["tokens"].name  # a dask cache never serves the shard's old zeros
    assert after["tokens"][8:16].compute().any()
    np.testing.assert_array_equal(after["tokens"][8:16].compute(), open_store(path).read(8, 16)["tokens"])
