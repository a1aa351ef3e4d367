import numpy as np
import pytest
import torch

from mmkd_core import quant
from mmkd_core.errors import MmkdError
from mmkd_core.store import Layout, StoreWriter, config_diff, open_store

CONFIG = {
    "teacher": {"name": "t", "weights_sha256": "abc"},
    "recipe": {"layers": [0, 1], "pool": "mean"},
    "preprocess": {},
    "views": {"count": 2},
    "dataset": {"name": "d", "fingerprint": "f"},
}


ONE_VIEW = {**CONFIG, "views": {"count": 1}}


def fake_data(layout, lo, hi, seed=0):
    rng = np.random.default_rng([seed, lo])
    n = hi - lo
    lengths = rng.integers(1, layout.time_steps + 1, n).astype(np.int32)
    tokens = rng.standard_normal((n, layout.views, layout.time_steps, layout.dim)).astype(np.float32)
    tokens *= np.arange(layout.time_steps)[None, None, :, None] < lengths[:, None, None, None]
    return {
        "tokens": tokens,
        "pooled": rng.standard_normal((n, layout.views, layout.pooled_dim)).astype(np.float32),
        "lengths": lengths,
        "input_ids": rng.integers(0, 100, (n, layout.time_steps)).astype(np.int32),
        "index": np.arange(lo, hi, dtype=np.int64),
    }


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 2e-2)])
def test_roundtrip(tmp_path, dtype, tol):
    layout = Layout(
        num_samples=23,
        views=2,
        time_steps=6,
        dim=8,
        pooled_dim=5,
        dtype=dtype,
        input_ids=True,
        chunk_size=4,
        shard_size=8,
    )
    assert layout.num_shards == 3
    w = StoreWriter.open(tmp_path / "s.zarr", layout, CONFIG, {"zarr": "x"})
    written = {}
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        written[k] = fake_data(layout, lo, hi)
        w.write_shard(k, written[k])
    assert w.finish()
    r = open_store(tmp_path / "s.zarr")
    assert len(r) == 23 and r.complete and r.views == 2
    d = written[1]
    i = 9  # second sample of shard 1
    n = d["lengths"][1]
    got = r.tokens(i, view=1)
    assert got.shape == (n, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, d["tokens"][1, 1, :n], atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(r.pooled(i, view=0), d["pooled"][1, 0], atol=tol, rtol=tol)
    run = r.read(8, 16)
    np.testing.assert_array_equal(run["index"], np.arange(8, 16))
    np.testing.assert_array_equal(run["input_ids"], d["input_ids"])
    assert run["tokens"].shape == (8, 2, 6, 8)


def test_int8_outliers_kept():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 384)).astype(np.float32)
    x[:, 7] *= 40  # an outlier channel, like real transformer activations have
    x[::3, 100] = 60
    enc = quant.encode_int8(x, quant.outliers_for(384))
    y = quant.decode_int8(*(enc["tokens" + p] for p in quant.INT8_PARTS))
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert cos.min() > 0.9999
    # what plain per-token absmax gives on the same data: the reason outliers are kept apart
    s = np.abs(x).max(-1, keepdims=True)
    plain = np.rint(x / s * 127) * s / 127
    cos_plain = (x * plain).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(plain, axis=-1)
    assert cos_plain.min() < cos.min()


def test_bfloat16_matches_torch():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e3
    bits = quant.encode_float(x, "bfloat16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy()
    np.testing.assert_array_equal(bits, ref)
    np.testing.assert_array_equal(
        quant.decode_float(bits, "bfloat16"), torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    )


def test_resume_refuses_other_config(tmp_path):
    layout = Layout(num_samples=10, views=2, time_steps=6, dim=8, pooled_dim=5, chunk_size=2, shard_size=4)
    with StoreWriter.open(tmp_path / "s.zarr", layout, CONFIG, {}) as w:
        w.write_shard(1, {k: v for k, v in fake_data(layout, 4, 8).items() if k != "input_ids"})
    with StoreWriter.open(tmp_path / "s.zarr", layout, CONFIG, {}) as w:
        assert w.done_shards() == {1}
    other = {**CONFIG, "recipe": {"layers": [1], "pool": "mean"}}
    with pytest.raises(MmkdError, match="recipe.layers"):
        StoreWriter.open(tmp_path / "s.zarr", layout, other, {})
    # --overwrite starts afresh
    with StoreWriter.open(tmp_path / "s.zarr", layout, other, {}, overwrite=True) as w:
        assert w.done_shards() == set()


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("data")
    layout = Layout(num_samples=4, views=1, time_steps=2, dim=2, pooled_dim=2)
    with pytest.raises(MmkdError, match="not an mmkd store"):
        StoreWriter.open(tmp_path / "x", layout, ONE_VIEW, {})
    assert (tmp_path / "x" / "keep.txt").exists()


def test_check_names_field(tmp_path):
    layout = Layout(num_samples=4, views=1, time_steps=2, dim=2, pooled_dim=2)
    StoreWriter.open(tmp_path / "s.zarr", layout, ONE_VIEW, {})
    r = open_store(tmp_path / "s.zarr")
    r.check({"teacher": CONFIG["teacher"]})
    with pytest.raises(MmkdError, match="teacher.weights_sha256"):
        r.check({"teacher": {"name": "t", "weights_sha256": "zzz"}})
    assert config_diff({"a": {"b": [1, 2]}}, {"a": {"b": (1, 2)}}) is None
    assert config_diff({"a": 1}, {"a": 1, "c": 2}) == "c"


def test_open_store_errors(tmp_path):
    with pytest.raises(MmkdError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "junk").mkdir()
    with pytest.raises(MmkdError, match="junk"):
        open_store(tmp_path / "junk")


def test_reader_pickles_without_open_group(tmp_path):
    import pickle

    layout = Layout(num_samples=4, views=1, time_steps=2, dim=2, pooled_dim=2)
    StoreWriter.open(tmp_path / "s.zarr", layout, ONE_VIEW, {})
    r = open_store(tmp_path / "s.zarr")
    len(r)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._group is None and len(r2) == 4


# float32 unit roundoff: every float32 operation is exact up to a relative error of u
U32 = np.finfo(np.float32).eps / 2


def test_int8_error_within_the_quantiser_bound():
    # encode stores q = rint(x / s * 127) for the non-outlier channels, s their absmax, so |127 x / s - q| <= 1/2
    # and the rule's x' = q * s / 127 is within s / 254 of x. Float32 adds at most 2u relative on the way in
    # (x / s, * 127: 2u * 127 in q units) and 2u on the way out (q * s, / 127):
    # |x - x'| <= s/127 * (1/2 + 254u) + 2u * s  =  s/254 * (1 + 1016u).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 96)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-3, 2, (400, 1))).astype(np.float32)  # far from 1 either way, float16-safe
    x[:, 5] *= 50  # outlier channels, as transformer activations have
    x[0] = 0.0  # a zero vector: scale 0
    k = quant.outliers_for(96)
    enc = quant.encode_int8(x, k)
    y = quant.decode_int8(*(enc["tokens" + p] for p in quant.INT8_PARTS))
    scale, idx = enc["tokens_scale"], enc["tokens_outlier_idx"].astype(np.int64)
    outlier = np.zeros(x.shape, bool)
    np.put_along_axis(outlier, idx, True, axis=-1)
    err = np.where(outlier, 0, np.abs(x - y))
    bound = scale[:, None] / 254 * (1 + 1016 * U32)
    assert np.all(err <= bound), float((err / np.maximum(bound, 1e-30)).max())
    assert (err / np.maximum(bound, 1e-30)).max() > 0.9  # the bound is tight: a looser one would hide a bug
    np.testing.assert_array_equal(y[outlier], x[outlier].astype(np.float16).astype(np.float32))
    assert not np.any(y[0])


# scales where the rule's grouping (q * s) / 127 and the other grouping q * (s / 127) round differently
RULE_SCALES = np.array([7.963242530822754, 1.9851304292678833, 9.27154541015625, 5.293121337890625], np.float32)


def test_int8_decoding_is_literally_the_recorded_rule():
    expr = "x = A * A_scale[..., None] / 127"
    assert expr in quant.INT8_RULE and expr in quant.__doc__
    layout = Layout(num_samples=2, views=1, time_steps=2, dim=4, pooled_dim=2, dtype="int8")
    assert layout.storage_attrs()["dequantize"] == quant.INT8_RULE
    f = np.float32
    assert any(f(127) * s / f(127) != f(127) * (s / f(127)) for s in RULE_SCALES)  # the groupings can be told apart
    codes = np.array([127, -127, 1, 64, -3, 0], np.int8)
    q = np.tile(codes, (len(RULE_SCALES), 1))
    idx = np.zeros((len(RULE_SCALES), 1), np.uint16)  # channel 0 is the outlier: its code is replaced
    val = np.full((len(RULE_SCALES), 1), 0.5, np.float16)
    got = quant.decode_int8(q, RULE_SCALES, idx, val)
    want = np.array([[f(c) * s / f(127) for c in codes] for s in RULE_SCALES], np.float32)
    want[:, 0] = 0.5
    np.testing.assert_array_equal(got, want)
    # q = 127 gives the scale back exactly for these scales (127 * s is exact in float32 for s with few bits)
    for s in (1.0, 0.75, 2.5, 1 / 64, RULE_SCALES[0], RULE_SCALES[1]):
        out = quant.decode_int8(
            np.array([[0, 127]], np.int8),
            np.array([s], np.float32),
            np.zeros((1, 1), np.uint16),
            np.zeros((1, 1), np.float16),
        )
        assert out[0, 1] == np.float32(s)


def test_versions_record_the_libraries_that_decide_inputs():
    from importlib import metadata

    from mmkd_core.versions import library_versions

    v = library_versions()
    for name in ("tokenizers", "safetensors", "huggingface_hub", "torchvision", "transformers", "torch", "zarr"):
        assert v[name] == metadata.version(name), name


def test_bfloat16_encoding_is_torchs_cast_and_keeps_nan():
    import torch

    from mmkd_core.quant import decode_float, encode_float

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(size=4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096),
            np.array([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, np.inf, -np.inf], np.float32),
        ]
    )
    bits = encode_float(x, "bfloat16")
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode_float(bits, "bfloat16"), expected)
    assert decode_float(bits[-4:-2], "bfloat16").tolist() == [1.0, 1.0 + 2**-6]  # ties round to even
    assert np.isnan(decode_float(encode_float(np.array([np.nan], np.float32), "bfloat16"), "bfloat16")).all()


def test_extra_arrays_are_written_read_and_named(tmp_path):
    extras = (("image", (), "int64", ("caption",)),)
    with pytest.raises(ValueError, match="dimension names"):
        Layout(num_samples=5, views=1, time_steps=3, dim=4, pooled_dim=4, extras=extras).arrays()
    extras = (("image", (), "int64", ("sample",)), ("alone", (1, 4), "float32", ("sample", "view", "pooled_channel")))
    layout = Layout(num_samples=5, views=1, time_steps=3, dim=4, pooled_dim=4, chunk_size=2, extras=extras)
    w = StoreWriter.open(tmp_path / "s.zarr", layout, ONE_VIEW, {})
    rng = np.random.default_rng(0)
    alone = rng.standard_normal((5, 1, 4)).astype(np.float32)
    for k in range(layout.num_shards):
        lo, hi = layout.shard_range(k)
        data = fake_data(layout, lo, hi)
        with pytest.raises(ValueError, match="no 'image' array"):
            w.write_shard(k, data)
        w.write_shard(k, {**data, "image": np.arange(lo, hi) * 10, "alone": alone[lo:hi]})
    assert w.finish()
    r = open_store(tmp_path / "s.zarr")
    assert r.extra_names == ("image", "alone")
    got = r.read(1, 4)
    np.testing.assert_array_equal(got["image"], [10, 20, 30])
    np.testing.assert_array_equal(got["alone"], alone[1:4])  # stored as given: float32, not the targets' float16
    assert r.dims("alone") == ("sample", "view", "pooled_channel")
