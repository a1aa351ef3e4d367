"""Identical teacher inputs are computed once per run and written to every row that has them (extract/dedupe.py)."""

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from mmkd.extract import dedupe
from mmkd.extract import run as run_mod
from mmkd.extract.cli import app
from mmkd.extract.config import ExtractConfig
from mmkd.extract.dedupe import DistinctInputs, group_rows
from mmkd.extract.feeders import TextFeeder
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store

# 5 shape classes: 40 rows, 5 distinct captions ("a photo of a square.")
LABELLED = {"dataset": "labelled-captions", "dataset_options": {"base": "shapes", "count": 40}}


def cfg(tmp_path, name, **kw):
    base = dict(**LABELLED, out=tmp_path / name, dtype="float32", chunk_size=4, shard_size=8, batch_size=4)
    return ExtractConfig(**{**base, **kw})


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in g.array_keys()}


def _count_teacher_rows(monkeypatch):
    """Counts the inputs the teacher's forward pass sees (all teacher calls go through TextFeeder)."""
    seen = []
    real = dedupe.DistinctInputs.targets

    def spy(self, batch, compute):
        def counted(b):
            seen.append(len(b["inputs"]["input_ids"]))
            return compute(b)

        return real(self, batch, counted)

    monkeypatch.setattr(dedupe.DistinctInputs, "targets", spy)
    return seen


def test_group_rows_numbers_by_first_appearance():
    ids = np.array([[5, 6, 0], [7, 0, 0], [5, 6, 0], [5, 6, 0], [7, 0, 0], [5, 6, 1]])
    lengths = np.array([2, 1, 2, 3, 1, 3])  # row 3 has a third token that happens to equal the padding id
    np.testing.assert_array_equal(group_rows(ids, lengths), [0, 1, 0, 2, 1, 3])


def _fake_compute(batch):
    # a result that depends on the batch it ran in, as float rounding does: only a canonical batch gives it
    ids = batch["groups"]
    noise = float(ids.sum()) * 1e-3 + len(ids) * 1e-6
    tokens = torch.tensor(ids, dtype=torch.float32)[:, None, None].expand(-1, 3, 2) + noise
    return {"tokens": tokens.clone(), "pooled": tokens[:, 0].clone() * 10, "mask": torch.ones(len(ids), 3)}


def _fill(inputs, shards, batch_size):
    """Every row's (token, pooled) result over ``shards`` as the extraction loop places them."""
    n = len(inputs.group)
    tokens, pooled, placed = np.full((n, 3, 2), np.nan), np.full((n, 2), np.nan), np.zeros(n, int)
    computed = 0
    for batch in inputs.batches(shards, batch_size, lambda ids: {"inputs": {"ids": ids}}):
        if batch["inputs"] is not None:
            computed += len(batch["groups"])
        out = inputs.targets(batch, _fake_compute)
        t = out["tokens"].shape[1]
        tokens[batch["positions"], :t] = out["tokens"].numpy()[batch["take"]]
        pooled[batch["positions"]] = out["pooled"].numpy()[batch["take"]]
        np.add.at(placed, batch["positions"], 1)
    return tokens, pooled, placed, computed


def test_each_row_gets_its_inputs_result_from_its_canonical_batch(monkeypatch):
    rng = np.random.default_rng(0)
    group = rng.integers(0, 30, size=200)
    group = group_rows(group[:, None], np.ones(200, int))
    inputs = DistinctInputs(group, np.full(200, 3))
    shards = [(k, lo, min(lo + 32, 200)) for k, lo in enumerate(range(0, 200, 32))]
    tokens, pooled, placed, computed = _fill(inputs, shards, batch_size=4)
    np.testing.assert_array_equal(placed, 1)  # every row exactly once
    np.testing.assert_array_equal(np.round(tokens[:, 0, 0]), group)  # its own input's result
    assert computed == inputs.count == 30  # each distinct input once per run
    assert not inputs._kept  # nothing kept past the last shard that needs it
    # resumed (shards 0-2 written before), nothing kept (a full cache): the same floats
    monkeypatch.setattr(dedupe, "CACHE_BYTES", 0)
    again = DistinctInputs(group, np.full(200, 3))
    part = _fill(again, shards[3:], batch_size=4)
    lo = shards[3][1]
    np.testing.assert_array_equal(part[0][lo:], tokens[lo:])
    np.testing.assert_array_equal(part[1][lo:], pooled[lo:])
    # other shard sizes (another store): other canonical batches, the same results up to their rounding
    other = _fill(DistinctInputs(group, np.full(200, 3)), [(0, 0, 100), (1, 100, 200)], batch_size=4)
    np.testing.assert_allclose(other[0], tokens, atol=0.5)
    np.testing.assert_array_equal(np.round(other[0][:, 0, 0]), group)


@pytest.mark.parametrize("n,shard,batch", [(200, 32, 4), (1000, 48, 16), (97, 10, 3), (64, 64, 8)])
def test_a_process_writing_some_shards_computes_only_their_inputs(n, shard, batch):
    """Every row distinct (WordNet): workers that each write a share of the shards (dask, --shards K/N) run the
    teacher on their own shards' inputs only, since no canonical batch spans two shards, and get the floats
    of one process. Windows laid over the whole dataset made each worker compute whole windows of others'
    shards (2.3x the teacher work over 12,000 WordNet sentences with two workers)."""
    group = np.arange(n)
    lengths = np.random.default_rng(n).integers(1, 9, size=n)
    shards = [(k, lo, min(lo + shard, n)) for k, lo in enumerate(range(0, n, shard))]
    whole = _fill(DistinctInputs(group, lengths), shards, batch)
    computed = 0
    for worker in range(2):
        own = shards[worker::2]
        if not own:
            continue
        tokens, pooled, placed, c = _fill(DistinctInputs(group, lengths), own, batch)
        rows = np.concatenate([np.arange(lo, hi) for _, lo, hi in own])
        np.testing.assert_array_equal(tokens[rows], whole[0][rows])
        np.testing.assert_array_equal(pooled[rows], whole[1][rows])
        computed += c
    assert computed == n  # each input once over both workers (input 0, the probe, in its own batch)


def test_labelled_captions_run_the_teacher_once_per_caption(tmp_path, minilm, monkeypatch):
    seen = _count_teacher_rows(monkeypatch)
    s = extract(cfg(tmp_path, "d.zarr"), show_progress=False)
    assert s.complete and s.samples == 40 and s.shards_total == 5
    assert s.distinct_inputs == 5 and sum(seen) == 5  # the probe, then the other four captions in one batch
    monkeypatch.undo()
    # a run without dedupe: every row its own input
    monkeypatch.setattr(TextFeeder, "__init__", _without_dedupe(TextFeeder.__init__))
    plain = extract(cfg(tmp_path, "plain.zarr"), show_progress=False)
    assert plain.distinct_inputs == 40
    a, b = _arrays(tmp_path / "d.zarr"), _arrays(tmp_path / "plain.zarr")
    assert a.keys() == b.keys()
    for name in a:
        if name in ("tokens", "pooled"):  # per-sample targets, batch-independent up to float32 rounding
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # rows with one caption hold one result, bit for bit
    ids = a["input_ids"]
    for i in range(40):
        j = int(np.flatnonzero((ids == ids[i]).all(1))[0])
        np.testing.assert_array_equal(a["tokens"][i], a["tokens"][j])


def _without_dedupe(init):
    def patched(self, *args, **kw):
        init(self, *args, **kw)
        self.distinct = DistinctInputs(np.arange(len(self.lengths)), self.lengths)

    return patched


def test_deduplicated_runs_are_bit_equal_across_shard_sizes_and_resume(tmp_path, minilm, monkeypatch):
    extract(cfg(tmp_path, "a.zarr"), show_progress=False)
    extract(cfg(tmp_path, "b.zarr", chunk_size=8, shard_size=40), show_progress=False)
    real = run_mod.StoreWriter.write_shard
    calls = {"n": 0}

    def failing(self, k, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, k, data)

    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", failing)
    with pytest.raises(MmkdError, match="run the same command again"):
        extract(cfg(tmp_path, "c.zarr"), show_progress=False)
    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", real)
    seen = _count_teacher_rows(monkeypatch)
    s = extract(cfg(tmp_path, "c.zarr"), show_progress=False)
    assert s.complete and s.shards_written == 3
    assert sum(seen) == 5  # the probe and the captions' one batch again, not a row per sample
    a = _arrays(tmp_path / "a.zarr")
    for other in ("b.zarr", "c.zarr"):
        b = _arrays(tmp_path / other)
        for name in ("tokens", "pooled", "input_ids", "lengths", "index"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{other}: {name}")


def test_summary_table_reports_distinct_inputs_and_quiet_prints_nothing(tmp_path, minilm):
    out = tmp_path / "cli.zarr"
    args = ["--dataset", "labelled-captions", "--dataset-option", "base=shapes", "--dataset-option", "count=24"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "distinct teacher inputs" in ln)
    assert " 5 " in line
    assert open_store(out).complete
    # --quiet: errors only, so a run that has nothing left to do (or does it all) prints nothing at all
    for store in (out, tmp_path / "quiet.zarr"):
        result = CliRunner().invoke(app, [*args, "--out", str(store), "--quiet"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and result.output == "", result.output
