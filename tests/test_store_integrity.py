"""Trust the bytes: damaged chunks, missing shards and hostile attributes are refused in one line, never
read as other numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, open_store

CONFIG = {
    "teacher": {"name": "t", "weights_sha256": "abc", "num_layers": 2, "hidden_size": 8},
    "recipe": {"layers": [0, 1], "pool": "mean", "instance_norm": True, "layer_norm": True},
    "preprocess": {},
    "views": {"count": 1},
    "dataset": {"name": "d", "fingerprint": "f", "num_samples": 12},
}


def write_store(path: Path, dtype: str = "float16") -> Path:
    layout = Layout(num_samples=12, views=1, time_steps=5, dim=8, pooled_dim=8, chunk_size=2, shard_size=4, dtype=dtype,
                    input_ids=True)  # fmt: skip
    rng = np.random.default_rng(0)
    with StoreWriter.open(path, layout, CONFIG, {}) as w:
        for k in range(layout.num_shards):
            lo, hi = layout.shard_range(k)
            n = hi - lo
            w.write_shard(k, {
                "tokens": rng.standard_normal((n, 1, 5, 8)).astype(np.float32),
                "pooled": rng.standard_normal((n, 1, 8)).astype(np.float32),
                "lengths": rng.integers(1, 6, n).astype(np.int32),
                "input_ids": rng.integers(0, 100, (n, 5)).astype(np.int32),
                "index": np.arange(lo, hi, dtype=np.int64),
            })  # fmt: skip
        assert w.finish()
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "s.zarr")


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def read_all(path: Path) -> dict[str, np.ndarray]:
    r = open_store(path)
    return r.read(0, len(r))


def one_line_naming(e: pytest.ExceptionInfo, *words: str) -> None:
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    for w in words:
        assert w in message, message


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xA5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "index"])
def test_flipped_bytes_in_a_shard_are_refused_naming_array_and_samples(store, where):
    shard = store / "pooled" / "c" / "1" / "0" / "0"  # samples 4-7
    flip(shard, 20 if where == "data" else -6)  # the shard index (with its own checksum) is at the end
    with pytest.raises(MmkdError) as e:
        read_all(store)
    one_line_naming(e, str(store), "array pooled", "samples 4-5", "damaged", "mmkd-verify")  # the first bad chunk


def test_truncated_and_deleted_shard_files_are_refused(store):
    shard = store / "tokens" / "c" / "2" / "0" / "0" / "0"  # samples 8-11
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(MmkdError) as e:
        read_all(store)
    one_line_naming(e, "array tokens", "samples 8-9", "damaged")
    shard.unlink()  # read as zeros by zarr: a done shard with its data missing is damage
    with pytest.raises(MmkdError) as e:
        read_all(store)
    one_line_naming(e, "array tokens", "samples 8-11", "shard 2 is marked done but its data is missing")


def test_an_undamaged_store_reads_as_written(store, pristine):
    a, b = read_all(store), read_all(pristine)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.isfinite(a["tokens"]).all() and a["tokens"].std() > 0.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(array=st.sampled_from(["tokens", "pooled", "lengths", "input_ids", "index"]), shard=st.integers(0, 2),
       offset=st.integers(0, 10_000))  # fmt: skip
def test_any_flipped_byte_of_any_shard_is_detected(pristine, tmp_path_factory, array, shard, offset):
    path = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("flip") / "s.zarr"))
    top = path / array / "c" / str(shard)
    files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    assert len(files) == 1
    flip(files[0], offset)
    with pytest.raises(MmkdError, match=f"array {array}.*damaged"):
        read_all(path)


def test_a_stored_length_outside_the_time_steps_is_refused(store):
    lengths = zarr.open_group(str(store), mode="r+")["lengths"]
    lengths[5] = 99  # written with a valid checksum: the value itself is wrong
    with pytest.raises(MmkdError) as e:
        read_all(store)
    one_line_naming(e, "array lengths, sample 5", "length 99 is outside 1-5")


HOSTILE = {
    "storage.chunk_samples=0": (("storage", "chunk_samples"), 0, "storage.chunk_samples"),
    "storage.chunk_samples=abc": (("storage", "chunk_samples"), "abc", "storage.chunk_samples"),
    "storage.shard_samples=3": (("storage", "shard_samples"), 3, "storage.shard_samples"),
    "views.count=-1": (("views", "count"), -1, "views.count"),
    "views.count=true": (("views", "count"), True, "views.count"),
    "recipe=null": (("recipe",), None, "recipe"),
    "storage.dtype=int8": (("storage", "dtype"), "int8", "storage"),
    "storage.dtype=float8": (("storage", "dtype"), "float8", "storage.dtype"),
    "format_version=99": (("format_version",), 99, "format_version 99"),
    "complete=no": (("complete",), "no", "complete"),
    "dataset.num_samples=1e18": (("dataset", "num_samples"), 10**18, "dataset.num_samples"),
    "dataset.num_samples=13": (("dataset", "num_samples"), 13, "not the store's 13"),
    "recipe.layers=[5]": (("recipe", "layers"), [5], "recipe.layers"),
    "teacher=[]": (("teacher",), [], "teacher"),
    "mmkd=list": ((), ["x"] * 10_000, "mmkd"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_attributes_are_one_line_naming_the_field(store, case):
    keys, value, named = HOSTILE[case]
    meta_file = store / "zarr.json"
    meta = json.loads(meta_file.read_text())
    if keys:
        node = meta["attributes"]["mmkd"]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    else:
        meta["attributes"]["mmkd"] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MmkdError) as e:
        read_all(store)
    one_line_naming(e, str(store), named)


def test_a_zarr_v2_group_is_not_a_store(tmp_path):
    g = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    g.attrs["mmkd"] = CONFIG
    with pytest.raises(MmkdError, match="zarr v2 group; mmkd stores are zarr v3"):
        open_store(tmp_path / "v2.zarr")


def test_the_writer_records_views_that_agree_with_its_arrays(tmp_path):
    layout = Layout(num_samples=4, views=2, time_steps=2, dim=2, pooled_dim=2)
    with pytest.raises(MmkdError, match="records 1 views, the layout has 2"):
        StoreWriter.open(tmp_path / "s.zarr", layout, CONFIG, {})
