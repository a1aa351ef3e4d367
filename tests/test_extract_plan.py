"""`mmkd-extract --plan` predicts the store the run then writes, and writes nothing itself (extract/plan.py)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from mmkd.extract import plan as plan_mod
from mmkd.extract.cli import app
from mmkd.extract.config import ExtractConfig
from mmkd.extract.plan import plan
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.quant import DTYPES
from mmkd_core.store import lock_path, open_store


def _nothing_written(out):
    assert not out.exists() and not lock_path(out).exists()
    assert not any(out.parent.iterdir()), list(out.parent.iterdir())


def _check(tmp_path, **kw):
    """Plan, then run with the same options: the predicted store is within 5 % of the one written."""
    out = tmp_path / "store" / "s.zarr"
    out.parent.mkdir()
    cfg = dict(out=out, **kw)
    p = plan(ExtractConfig(**cfg))
    _nothing_written(out)
    assert [s.dtype for s in p.sizes] == [p.dtype, *[d for d in DTYPES if d != p.dtype]]
    s = extract(ExtractConfig(**cfg), show_progress=False)
    real = open_store(out).nbytes_stored()
    assert p.samples == s.samples and p.distinct_inputs == s.distinct_inputs
    assert abs(p.size.store_bytes - real) <= 0.05 * real, (p.size.store_bytes, real)
    return p, real


def test_plan_predicts_a_text_store(tmp_path, minilm):
    # 4 batches of 16 spread over 300 shapes captions (8 to 17 tokens; some repeat)
    p, real = _check(tmp_path, dataset="shapes", dataset_options={"count": 300}, batch_size=16)
    assert p.sampled == 64 and p.batches == 4 and p.dtype == "float16" and p.size.spread < 0.05
    assert p.inputs_per_second > 0 and p.seconds > p.setup_seconds > 0
    sizes = {s.dtype: s.store_bytes for s in p.sizes}
    assert sizes["float32"] > sizes["float16"] > sizes["int8"]
    assert p.write_mb_per_second == pytest.approx(p.size.store_bytes / 1e6 / (p.seconds - p.setup_seconds))


def test_plan_compresses_with_the_chosen_codec(tmp_path, minilm):
    """--codec none predicts the uncompressed store it writes; with the default codec's bytes it would miss."""
    p, real = _check(tmp_path, dataset="shapes", dataset_options={"count": 120}, batch_size=16, codec="none")
    default = plan(ExtractConfig(out=tmp_path / "other.zarr", dataset="shapes", dataset_options={"count": 120}))
    assert default.size.store_bytes < 0.9 * p.size.store_bytes  # what the plan without the codec would say


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_predicts_every_dtype_over_sentences_of_varying_lengths(tmp_path, minilm, shared_data, dtype):
    # MRPC sentences: 4 batches of 8 spread over 240 sentences of 12 to 46 tokens
    p, _ = _check(tmp_path, dataset="mrpc", data_root=str(shared_data / "mrpc"), limit=240, batch_size=8, dtype=dtype)
    assert p.sampled == 32


def test_plan_counts_what_does_not_grow_with_the_data(tmp_path, minilm):
    # a tiny pooled-only store of many shards: shard indexes, shards_done and the zarr.json files are much of it
    p, real = _check(
        tmp_path, dataset="shapes", dataset_options={"count": 40}, chunk_size=4, shard_size=8, pooled_only=True
    )
    meta = sum(f.stat().st_size for f in (tmp_path / "store" / "s.zarr").rglob("zarr.json"))
    assert meta > 0.1 * real  # left out, the prediction would miss by more than 5 %
    assert p.distinct_inputs < 40  # shapes repeats captions: the teacher time follows the distinct ones
    assert p.teacher_seconds == pytest.approx(p.distinct_inputs / p.inputs_per_second)


def test_cli_plan_prints_every_dtype_and_writes_nothing(tmp_path, minilm):
    out = tmp_path / "s.zarr"
    args = ["--dataset-option", "count=40", "--out", str(out), "--plan", "--batch-size", "8"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("nothing written", "bytes/sample", "float16 (chosen)", *DTYPES, "write rate needed", "samples/s"):
        assert needle in text, needle
    assert "32 samples in 4 batches" in text
    _nothing_written(out)


def test_plan_refuses_pair_stores(tmp_path):
    cfg = ExtractConfig(
        teacher="beitv2",
        random_weights=True,
        teacher_options={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        dataset="shapes",
        dataset_options={"count": 4},
        text_tokenizer="minilm-l6",
        out=tmp_path / "p.zarr",
    )
    with pytest.raises(MmkdError, match="--plan: pair stores"):
        plan(cfg)


def test_compressed_bytes_follow_valid_tokens():
    # padding compresses to nearly nothing: a row twice as long costs about twice the bytes
    layout = plan_mod.Layout(num_samples=8, views=1, time_steps=40, dim=32, pooled_dim=32, input_ids=True)
    rng = np.random.default_rng(0)
    lengths = np.array([10, 20, 40, 10, 20, 40, 10, 20], dtype=np.int32)
    tokens = np.zeros((8, 1, 40, 32), np.float32)
    for i, n in enumerate(lengths):
        tokens[i, 0, :n] = rng.standard_normal((n, 32))
    rows = {
        "tokens": tokens,
        "pooled": rng.standard_normal((8, 1, 32)).astype(np.float32),
        "lengths": lengths,
        "input_ids": np.where(np.arange(40)[None] < lengths[:, None], 7, 0).astype(np.int32),
        "index": np.arange(8),
    }
    compressed, tokens = plan_mod._compressed(layout, rows)["tokens"]
    assert tokens == lengths.sum()
    per_token = compressed / tokens
    assert 32 * 2 * 0.8 < per_token < 32 * 2 * 1.05  # float16 normal noise barely compresses; padding does
