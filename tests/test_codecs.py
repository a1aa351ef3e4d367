"""The store's codec (recorded, resumed, refused when it differs, absent in older stores), the writer's batch
encoding (overflow still refused), and serial against parallel writing and zarr's two codec pipelines."""

import json

import numpy as np
import pytest
import torch
import zarr

from mmkd.extract import fill
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core import quant
from mmkd_core.errors import MmkdError
from mmkd_core.store import (
    DEFAULT_CODEC,
    LEGACY_CODEC,
    Layout,
    StoreWriter,
    codec_name,
    encode_targets,
    open_store,
    parse_codec,
)

CONFIG = {"teacher": {"name": "t"}, "recipe": {}, "preprocess": {}, "views": {"count": 1}, "dataset": {"name": "d"}}


def cfg(tmp_path, name="s.zarr", **kw):
    base = dict(dataset="shapes", dataset_options={"count": 40}, out=tmp_path / name, chunk_size=8, shard_size=16)
    return ExtractConfig(**{**base, "autocast": "none", **kw})


def blosc(store, name="tokens"):
    meta = json.loads((store / name / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    return next((c["configuration"] for c in inner if c["name"] == "blosc"), None)


def test_parse_codec_and_its_errors():
    assert parse_codec("lz4") == {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"} == DEFAULT_CODEC
    assert parse_codec("zstd-3") == LEGACY_CODEC
    assert parse_codec("zstd-1-bitshuffle") == {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
    assert codec_name(parse_codec("ZSTD-1-bitshuffle")) == "zstd-1-bitshuffle" and codec_name(DEFAULT_CODEC) == "lz4-5"
    assert parse_codec("none")["cname"] == "none"
    for bad in ("brotli", "zstd-12", "lz4-fast", "zstd-3-shuffle-x"):
        with pytest.raises(MmkdError, match="--codec"):
            parse_codec(bad)
    with pytest.raises(MmkdError, match="--codec 'gzip'"):
        ExtractConfig(codec="gzip")


def test_codec_is_recorded_and_used(tmp_path, minilm):
    s = extract(cfg(tmp_path), show_progress=False)
    assert s.codec == "lz4-5" and open_store(s.path).storage["codec"] == DEFAULT_CODEC
    assert blosc(tmp_path / "s.zarr")["cname"] == "lz4"
    z = extract(cfg(tmp_path, "z.zarr", codec="zstd-1"), show_progress=False)
    assert open_store(z.path).storage["codec"] == {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}
    assert blosc(tmp_path / "z.zarr", "pooled")["clevel"] == 1
    n = extract(cfg(tmp_path, "n.zarr", codec="none"), show_progress=False)
    assert blosc(tmp_path / "n.zarr") is None
    a, b, c = (open_store(p).read(0, 40) for p in (s.path, z.path, n.path))
    for name in a:  # the codec changes bytes, never values
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_array_equal(a[name], c[name], err_msg=name)


def _interrupt_at_second_shard(monkeypatch):
    """Ctrl-C while the second shard is written (the first is done); returns the real write_shard."""
    real = StoreWriter.write_shard
    calls = {"n": 0}

    def failing(self, k, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, k, data)

    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    return real


def test_resume_keeps_the_store_codec_and_refuses_another(tmp_path, minilm, monkeypatch):
    real = _interrupt_at_second_shard(monkeypatch)
    with pytest.raises(MmkdError, match="run the same command again"):
        extract(cfg(tmp_path, codec="zstd-1"), show_progress=False)
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    with pytest.raises(MmkdError, match=r"storage\.codec\.cname: store has 'zstd', expected 'lz4'"):
        extract(cfg(tmp_path, codec="lz4"), show_progress=False)
    s = extract(cfg(tmp_path), show_progress=False)  # no --codec: the store's own
    assert s.complete and s.shards_written == 2 and s.codec == "zstd-1"
    assert open_store(s.path).storage["codec"]["clevel"] == 1


def _drop_codec(store):
    """The store as written before storage.codec was recorded: zstd-3 arrays, no codec in the attribute."""
    path = store / "zarr.json"
    meta = json.loads(path.read_text())
    del meta["attributes"]["mmkd"]["storage"]["codec"]
    path.write_text(json.dumps(meta))


def test_older_store_without_codec_opens_and_resumes_as_zstd3(tmp_path, minilm, monkeypatch):
    full = extract(cfg(tmp_path, "full.zarr", codec="zstd-3"), show_progress=False)
    real = _interrupt_at_second_shard(monkeypatch)
    with pytest.raises(MmkdError):
        extract(cfg(tmp_path, "old.zarr", codec="zstd-3"), show_progress=False)
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    _drop_codec(tmp_path / "old.zarr")
    assert "codec" not in open_store(tmp_path / "old.zarr").storage
    with pytest.raises(MmkdError, match=r"storage\.codec\.cname: store has 'zstd', expected 'lz4'"):
        extract(cfg(tmp_path, "old.zarr", codec="lz4"), show_progress=False)
    s = extract(cfg(tmp_path, "old.zarr"), show_progress=False)  # the same command as before: resumes
    assert s.complete and s.shards_written == 2 and s.codec == "zstd-3"
    assert "codec" not in open_store(s.path).storage  # its record is left as it was
    s = extract(cfg(tmp_path, "old.zarr", codec="zstd-3"), show_progress=False)  # the old codec, named
    assert s.shards_written == 0
    a, b = open_store(full.path).read(0, 40), open_store(s.path).read(0, 40)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _layout(n=32, dtype="float16", **kw):
    return Layout(
        num_samples=n, views=1, time_steps=5, dim=8, pooled_dim=8, dtype=dtype, chunk_size=4, shard_size=8, **kw
    )


def _shard(layout, k, rng):
    lo, hi = layout.shard_range(k)
    m = hi - lo
    return {
        "tokens": rng.standard_normal((m, 1, 5, 8)).astype(np.float32),
        "pooled": rng.standard_normal((m, 1, 8)).astype(np.float32),
        "lengths": np.full(m, 5, np.int32),
        "index": np.arange(lo, hi, dtype=np.int64),
    }


def test_overflow_is_refused_after_batch_encoding(tmp_path):
    layout = _layout()
    # write_shard given float32: as before
    shard = _shard(layout, 1, np.random.default_rng(0))
    shard["tokens"][3, 0, 2, 1] = 70000.0
    with StoreWriter.open(tmp_path / "a.zarr", layout, CONFIG, {}) as w:
        with pytest.raises(MmkdError, match=r"array 'tokens', sample 11, view 0, time step 2: value 70000 .*float16"):
            w.write_shard(1, shard)
        assert w.done_shards() == set()
    # extraction's path: float16 shard buffers, each batch encoded as it is placed
    buf = fill.empty_shard(layout, 8, 16, encoded=True)
    assert buf["tokens"].dtype == np.float16 and buf["pooled"].dtype == np.float16
    tokens = torch.randn(4, 5, 8)
    tokens[2, 3, 0] = 70000.0
    batch = {"positions": np.arange(12, 16), "view_ids": np.zeros(4, np.int64)}
    with pytest.raises(MmkdError, match=r"array 'tokens', sample 14, view 0, time step 3: value 70000 .*float16"):
        fill.place(buf, batch, {"tokens": tokens, "pooled": torch.randn(4, 8), "mask": None}, 8)
    nan = torch.randn(4, 8)
    nan[1, 5] = float("nan")
    with pytest.raises(MmkdError, match=r"array 'pooled', sample 13, view 0: the teacher's target is nan"):
        fill.place(buf, batch, {"tokens": None, "pooled": nan, "mask": None}, 8)
    # a deduplicated batch: result 0 goes to rows 12 and 14, result 1 (overflowing) to rows 13 and 15
    take = np.array([0, 1, 0, 1])
    big = torch.randn(2, 8)
    big[1, 0] = -1e6
    with pytest.raises(MmkdError, match=r"array 'pooled', sample 13, view 0: value -1000000 .*float16"):
        fill.place(buf, {**batch, "take": take}, {"tokens": None, "pooled": big, "mask": None}, 8)
    # an encoded shard handed to write_shard with an inf in it (a caller that skipped encode_targets)
    with np.errstate(over="ignore"):
        enc = {**shard, "tokens": shard["tokens"].astype(np.float16), "pooled": shard["pooled"].astype(np.float16)}
    with StoreWriter.open(tmp_path / "a.zarr", layout, CONFIG, {}) as w:
        with pytest.raises(MmkdError, match=r"array 'tokens', sample 11, view 0, time step 2: the teacher's target"):
            w.write_shard(1, enc)


def test_batch_encoding_equals_quant_bit_for_bit():
    x = np.array([[0.0, -0.0, 1.0, 65504.0, 65519.99, 6e-8, -3e-5, 1e-40, 1.5e38]], np.float32)
    for dtype, values in (("float16", x[:, :-1]), ("bfloat16", x), ("float32", x)):
        want = quant.encode_float(values, dtype)
        got = encode_targets("pooled", torch.from_numpy(values), dtype, lambda j: (j, 0))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), dtype
    noise = torch.randn(64, 7, 33) * 1000
    for dtype in ("float16", "bfloat16"):
        want = quant.encode_float(noise.numpy(), dtype)
        assert encode_targets("tokens", noise, dtype, lambda j: (j, 0)).tobytes() == want.tobytes()
    with pytest.raises(MmkdError, match="sample 0, view 0: value 3.4e\\+38 is beyond the range of bfloat16"):
        encode_targets("pooled", torch.tensor([[1.0, 3.4e38]]), "bfloat16", lambda j: (j, 0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_serial_and_parallel_writing_give_identical_arrays(tmp_path, dtype):
    layout = _layout(n=60, dtype=dtype)

    class Source:
        def finish_shard(self, shard, lo, hi):
            return {**shard, "lengths": np.full(hi - lo, 5, np.int32), "index": np.arange(lo, hi, dtype=np.int64)}

    def write(path, in_flight, encoded):
        torch.manual_seed(0)
        w = StoreWriter.open(path, _layout(n=60, dtype=dtype), CONFIG, {})
        with w, fill.ShardQueue(w, Source(), in_flight=in_flight) as queue:
            for k in range(layout.num_shards):
                lo, hi = layout.shard_range(k)
                shard = fill.empty_shard(layout, lo, hi, encoded=encoded)
                for s in range(lo, hi, 3):  # batches of 3, some of them partly padded
                    e = min(hi, s + 3)
                    t = torch.zeros(e - s, 5, 8)
                    t[:, :4] = torch.randn(e - s, 4, 8) * 300
                    b = {"positions": np.arange(s, e), "view_ids": np.zeros(e - s, np.int64)}
                    fill.place(shard, b, {"tokens": t[:, :4], "pooled": t[:, 0], "mask": None}, lo)
                queue.put(k, shard)
            queue.drain()  # the shards in flight land before the writer closes
            w.finish()
        return zarr.open_group(str(path), mode="r")

    serial = write(tmp_path / "serial.zarr", 1, encoded=False)  # float32 buffers, as before
    for i, (in_flight, encoded) in enumerate([(1, True), (3, True), (3, False)]):
        other = write(tmp_path / f"p{i}.zarr", in_flight, encoded)
        assert sorted(other.array_keys()) == sorted(serial.array_keys())
        for name in serial.array_keys():
            a, b = serial[name][:], other[name][:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, in_flight, encoded)


def test_zarrs_pipeline_writes_the_same_arrays(tmp_path, minilm):
    pytest.importorskip("zarrs")
    from mmkd_core.store import codec_pipeline

    a = extract(cfg(tmp_path, "a.zarr"), show_progress=False)
    with codec_pipeline("zarrs"):
        b = extract(cfg(tmp_path, "b.zarr"), show_progress=False)
    for path in (a.path, b.path):
        for pipeline in ("default", "zarrs"):
            with codec_pipeline(pipeline):
                got = open_store(path).read(0, 40)
            want = open_store(a.path).read(0, 40)
            for name in want:
                assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


def test_use_zarrs_falls_back_when_it_cannot_import(monkeypatch, caplog):
    import sys

    from mmkd_core.store import DEFAULT_PIPELINE, use_zarrs

    before = zarr.config.get("codec_pipeline.path")
    monkeypatch.setitem(sys.modules, "zarrs", None)  # import zarrs raises ImportError
    try:
        assert use_zarrs(True) is False
        assert zarr.config.get("codec_pipeline.path") == DEFAULT_PIPELINE
        assert "zarrs is unavailable" in caplog.text
    finally:
        zarr.config.set({"codec_pipeline.path": before})
