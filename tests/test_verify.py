"""mmkd-verify reads every chunk back and names what is damaged; --repair extracts exactly the damaged shards
again and gives the store the undamaged one had."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import save_tiny_bert
from typer.testing import CliRunner

from mmkd.extract.config import ExtractConfig
from mmkd.extract.repair import config_from_store
from mmkd.extract.run import extract
from mmkd.extract.verify_cli import app
from mmkd_core.store import read_attrs
from mmkd_core.store.verify import verify


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    weights = save_tiny_bert(root / "bert")
    cfg = ExtractConfig(
        teacher="bert", weights=str(weights), dataset="shapes", dataset_options={"count": 40}, out=root / "s.zarr",
        chunk_size=8, shard_size=16, batch_size=16, autocast="none",
    )  # fmt: skip
    extract(cfg, show_progress=False)
    return cfg.out


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][...] for name in g.array_keys()}


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result, " ".join(result.output.split())


def test_an_intact_store_verifies(pristine):
    result, out = invoke(str(pristine))
    assert result.exit_code == 0, out
    assert "40 samples, 3 shards (3 done), complete, format 2" in out and "ok: every chunk" in out


def test_damage_is_named_and_repaired_to_the_same_store(store, pristine):
    tokens = store / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(tokens.read_bytes())
    data[30] ^= 0xFF
    tokens.write_bytes(bytes(data))
    (store / "pooled" / "c" / "2" / "0" / "0").unlink()
    index = store / "lengths" / "c" / "0"  # a truncated shard: its index (at the end) is damaged
    index.write_bytes(index.read_bytes()[:-7])
    report = verify(store)
    assert report.damaged_shards == [0, 1, 2] and report.repairable
    result, out = invoke(str(store))
    assert result.exit_code == 1
    assert "DAMAGED tokens: shard 1 (samples 16-31)" in out and "DAMAGED pooled: shard 2 (samples 32-39)" in out
    assert "DAMAGED lengths: shard 0 (samples 0-15)" in out
    assert "shard 2 is marked done but its data is missing" in out and "--repair" in out
    result, out = invoke(str(store), "--repair", "--quiet")
    assert result.exit_code == 0, out
    assert "ok: every chunk" in out
    before, after = arrays(pristine), arrays(store)
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    assert read_attrs(store)["complete"] is True


def test_damaged_attributes_are_reported_not_repaired(store):
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["mmkd"]["storage"]["chunk_samples"] = 0
    (store / "zarr.json").write_text(json.dumps(meta))
    result, out = invoke(str(store), "--repair")
    assert result.exit_code == 2, out
    assert "DAMAGED attributes: store: attribute storage.chunk_samples is 0" in out
    assert "extract it again (--overwrite)" in out
    assert "which re-extracting shards cannot mend" in out


def test_the_recorded_configuration_is_the_one_that_wrote_the_store(pristine):
    cfg = config_from_store(pristine, read_attrs(pristine))
    assert (cfg.teacher, cfg.dataset, cfg.dataset_options["count"], cfg.chunk_size, cfg.shard_size) == (
        "bert", "shapes", 40, 8, 16
    )  # fmt: skip
    assert Path(cfg.weights).name == "bert" and cfg.autocast == "none" and cfg.dtype == "float16"
