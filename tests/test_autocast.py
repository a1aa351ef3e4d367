"""--autocast auto: the teacher's compute dtype from the hardware, recorded concretely, kept on resume."""

import logging
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mmkd.extract import hardware
from mmkd.extract import run as run_mod
from mmkd.extract.autocast import autocast_context, resolve_autocast
from mmkd.extract.cli import app
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store

# 40 rows, 5 distinct captions: the real MiniLM runs 5 inputs
LABELLED = {"dataset": "labelled-captions", "dataset_options": {"base": "shapes", "count": 40}}


def cfg(tmp_path, name="s.zarr", **kw):
    base = dict(**LABELLED, out=tmp_path / name, dtype="float32", chunk_size=4, shard_size=8, batch_size=4)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture
def machine(monkeypatch):
    """A pretend CPU: which dtypes it runs natively and what the probe measures (set the attributes)."""
    state = SimpleNamespace(native={"bfloat16"}, evidence="avx512_bf16", speedup=2.0, probes=0)

    def probe(device, width, dtype=None):
        state.probes += 1
        return state.speedup

    monkeypatch.setattr(hardware, "native_dtypes", lambda device: (set(state.native), state.evidence))
    monkeypatch.setattr(hardware, "probe_speedup", probe)
    hardware.auto_autocast.cache_clear()
    yield state
    hardware.auto_autocast.cache_clear()


def test_auto_is_the_default_and_resolves_to_a_concrete_dtype_the_store_records(tmp_path, machine):
    assert ExtractConfig().autocast == "auto"
    s = extract(cfg(tmp_path), show_progress=False)
    assert open_store(tmp_path / "s.zarr").attrs["recipe"]["autocast"] == "bfloat16"
    assert s.autocast.autocast == "bfloat16"
    assert str(s.autocast) == "bfloat16 (auto: avx512_bf16, probe 2.0x)"


def test_auto_takes_float32_where_the_probe_finds_bf16_not_clearly_faster(tmp_path, machine):
    machine.speedup = 1.1
    s = extract(cfg(tmp_path), show_progress=False)
    assert open_store(tmp_path / "s.zarr").attrs["recipe"]["autocast"] == "none"
    assert str(s.autocast).startswith("float32 (auto: avx512_bf16, probe 1.10x < 1.2x")


def test_auto_without_native_bf16_does_not_probe(tmp_path, machine):
    machine.native, machine.evidence = set(), "avx2 only"
    choice = hardware.auto_autocast("cpu", 384)
    assert choice.autocast == "none" and machine.probes == 0
    assert str(choice) == "float32 (auto: avx2 only, no native bf16)"


def test_resume_with_auto_keeps_the_recorded_dtype_though_the_probe_now_says_otherwise(tmp_path, machine, monkeypatch):
    real = run_mod.StoreWriter.write_shard
    calls = {"n": 0}

    def failing(self, k, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, k, data)

    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", failing)
    with pytest.raises(MmkdError, match="run the same command again"):
        extract(cfg(tmp_path), show_progress=False)
    monkeypatch.setattr(run_mod.StoreWriter, "write_shard", real)
    assert open_store(tmp_path / "s.zarr").attrs["recipe"]["autocast"] == "bfloat16"

    machine.speedup = 0.5  # a busier machine now: a fresh probe would choose float32
    hardware.auto_autocast.cache_clear()
    probes = machine.probes
    s = extract(cfg(tmp_path), show_progress=False)  # no "another configuration" refusal
    assert s.complete and 0 < s.shards_written < s.shards_total
    assert s.autocast.autocast == "bfloat16" and "recorded in the store" in s.autocast.reason
    assert machine.probes == probes  # the recorded dtype is taken, not probed
    assert open_store(tmp_path / "s.zarr").attrs["recipe"]["autocast"] == "bfloat16"

    # --overwrite starts another run: it asks the hardware again
    s = extract(cfg(tmp_path, overwrite=True), show_progress=False)
    assert s.autocast.autocast == "none"
    assert open_store(tmp_path / "s.zarr").attrs["recipe"]["autocast"] == "none"


def test_a_forced_dtype_is_kept_and_a_resume_with_another_is_refused(tmp_path, machine):
    extract(cfg(tmp_path, autocast="none"), show_progress=False)
    with pytest.raises(MmkdError, match="recipe.autocast"):
        extract(cfg(tmp_path, autocast="bfloat16"), show_progress=False)


def test_a_forced_emulated_dtype_warns_in_one_line(machine, caplog):
    machine.native, machine.evidence = set(), "avx2 only"
    teacher = SimpleNamespace(hidden_size=32)
    with caplog.at_level(logging.WARNING):
        resolved, choice = resolve_autocast(ExtractConfig(autocast="bfloat16"), teacher)
    assert resolved.autocast == "bfloat16" and choice.reason == "forced"
    (record,) = [r for r in caplog.records if "--autocast bfloat16" in r.getMessage()]
    assert "emulated" in record.getMessage() and "\n" not in record.getMessage()

    machine.native = {"bfloat16"}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_autocast(ExtractConfig(autocast="bfloat16"), teacher)
        resolve_autocast(ExtractConfig(autocast="none"), teacher)
    assert not [r for r in caplog.records if "emulated" in r.getMessage()]


def test_unknown_autocast_is_refused_with_the_choices():
    with pytest.raises(MmkdError, match="--autocast 'fp8': choose one of auto, none, bfloat16, float16"):
        ExtractConfig(autocast="fp8")
    res = CliRunner().invoke(app, ["--autocast", "fp8"])
    assert res.exit_code != 0 and "auto" in res.output


def test_auto_needs_resolving_before_the_teacher_runs():
    with pytest.raises(RuntimeError, match="resolve_autocast"):
        autocast_context(ExtractConfig())


def test_the_real_probe_answers_quickly_with_a_concrete_dtype():
    hardware.auto_autocast.cache_clear()
    choice = hardware.auto_autocast("cpu", 32)
    assert choice.autocast in ("none", "bfloat16") and choice.reason.startswith("auto: ")
    assert hardware.probe_speedup("cpu", 32) > 0
