import numpy as np
import pytest
import torch
import zarr
from reference import reference_targets

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store


def cfg(tmp_path, name="s.zarr", **kw):
    base = dict(
        dataset="shapes",
        dataset_options={"count": 60},
        out=tmp_path / name,
        chunk_size=8,
        shard_size=16,
        batch_size=16,
        autocast="none",  # float32: compared with an independent float32 recipe at 1e-5
    )
    base.update(kw)
    return ExtractConfig(**base)


def test_minilm_store_matches_independent_recipe(tmp_path, minilm):
    s = extract(cfg(tmp_path, dtype="float32", layers="last:3"), show_progress=False)
    assert s.complete and s.samples == 60 and s.shards_total == 4
    r = open_store(tmp_path / "s.zarr")
    a = r.attrs
    assert a["recipe"]["layers"] == [3, 4, 5] and a["recipe"]["pool"] == "teacher_mean"
    assert a["teacher"]["name"] == "minilm-l6" and len(a["teacher"]["weights_sha256"]) == 64
    assert a["dataset"]["num_samples"] == 60 and a["storage"]["dtype"] == "float32"
    from mmkd.data import create_dataset

    ds = create_dataset("shapes", count=60)
    model = minilm.model
    for i in (0, 17, 59):
        enc = minilm.tokenize([ds.text(i)])
        ids = r.read(i, i + 1)["input_ids"][0, : int(r.read(i, i + 1)["lengths"][0])]
        np.testing.assert_array_equal(ids, enc["input_ids"][0].numpy())
        with torch.inference_mode():
            hs = model(**enc, output_hidden_states=True).hidden_states[1:]
        ref = reference_targets([h[0].numpy() for h in hs], len(ids), [3, 4, 5])
        np.testing.assert_allclose(r.tokens(i), ref, atol=2e-5)
        np.testing.assert_allclose(r.pooled(i), hs[-1][0].numpy().mean(0), atol=1e-5)


def test_batch_size_does_not_change_targets(tmp_path, minilm):
    extract(cfg(tmp_path, "a.zarr", dtype="float32", batch_size=1, limit=20), show_progress=False)
    extract(cfg(tmp_path, "b.zarr", dtype="float32", batch_size=64, limit=20), show_progress=False)
    a, b = open_store(tmp_path / "a.zarr").read(0, 20), open_store(tmp_path / "b.zarr").read(0, 20)
    np.testing.assert_allclose(a["tokens"], b["tokens"], atol=1e-5)
    np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, minilm, monkeypatch):
    extract(cfg(tmp_path, "full.zarr"), show_progress=False)
    from mmkd.extract import run as run_mod

    real = run_mod.StoreWriter.write_shard
    calls = {"n": 0}

    def failing(self, k, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, k, data)

    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", failing)
    with pytest.raises(MmkdError, match="run the same command again"):
        extract(cfg(tmp_path, "part.zarr"), show_progress=False)
    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", real)
    assert not open_store(tmp_path / "part.zarr").complete
    s = extract(cfg(tmp_path, "part.zarr"), show_progress=False)
    assert s.complete and s.shards_written == 2
    full, part = zarr.open_group(str(tmp_path / "full.zarr")), zarr.open_group(str(tmp_path / "part.zarr"))
    for name in full.array_keys():
        np.testing.assert_array_equal(full[name][:], part[name][:], err_msg=name)


def test_other_configuration_is_refused(tmp_path, minilm):
    extract(cfg(tmp_path, limit=16), show_progress=False)
    with pytest.raises(MmkdError, match="recipe.layers"):
        extract(cfg(tmp_path, limit=16, layers="last:2"), show_progress=False)
    with pytest.raises(MmkdError, match="dataset"):
        extract(cfg(tmp_path, limit=16, dataset_options={"count": 61}), show_progress=False)
    s = extract(cfg(tmp_path, limit=16, layers="last:2", overwrite=True), show_progress=False)
    assert s.complete and open_store(tmp_path / "s.zarr").attrs["recipe"]["layers"] == [4, 5]


def _int8_check(tmp_path, count, size_of):
    for dtype in ("float32", "float16", "int8"):
        extract(
            cfg(
                tmp_path,
                f"{dtype}.zarr",
                dtype=dtype,
                dataset_options={"count": count},
                chunk_size=0,
                shard_size=0,
                batch_size=128,
            ),
            show_progress=False,
        )
    f32, i8 = open_store(tmp_path / "float32.zarr"), open_store(tmp_path / "int8.zarr")
    a, b = f32.read(0, count), i8.read(0, count)
    valid = np.arange(a["tokens"].shape[2])[None] < a["lengths"][:, None]
    x, y = a["tokens"][:, 0][valid], b["tokens"][:, 0][valid]
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(b["pooled"], a["pooled"], atol=2e-2)
    assert size_of(i8) <= 0.55 * size_of(open_store(tmp_path / "float16.zarr"))


def test_int8_fidelity_and_size_on_real_targets(tmp_path, minilm):
    # every token of 300 real MiniLM targets; sizes of the target arrays' chunk data
    def chunk_bytes(store):
        arrays = [d for d in store.path.iterdir() if d.name.split("_")[0] in ("tokens", "pooled")]
        total = sum(f.stat().st_size for d in arrays for f in (d / "c").rglob("*") if f.is_file())
        assert total > 0
        return total

    _int8_check(tmp_path, 300, chunk_bytes)


@pytest.mark.slow
def test_int8_whole_store_size(tmp_path, minilm):
    _int8_check(tmp_path, 1500, lambda store: store.nbytes_stored())


def test_config_errors():
    for kw, match in [
        ({"dtype": "int4"}, "--dtype"),
        ({"autocast": "fp8"}, "--autocast"),
        ({"limit": 0}, "--limit"),
        ({"batch_size": 0}, "--batch-size"),
        ({"views": 0}, "--views"),
    ]:
        with pytest.raises(MmkdError, match=match):
            ExtractConfig(**kw)


def test_text_teacher_refuses_views(tmp_path, minilm):
    with pytest.raises(MmkdError, match="text has one view"):
        extract(cfg(tmp_path, views=2), show_progress=False)
