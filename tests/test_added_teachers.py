"""Several teachers in one store (``mmkd-extract --add-teacher``): the store's bytes kept, the added teacher's
arrays those of a store of that teacher alone, its refusals, resuming after an interruption or a kill -9,
``--shards``/``--cluster``/``--plan``, the readers (open_store, StoreDataset, xarray) and mmkd-verify."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import save_tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmkd.extract.added import settle
from mmkd.extract.cli import app
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.extract.verify_cli import app as verify_app
from mmkd_core.errors import MmkdError
from mmkd_core.store import StoreWriter, lock_path, open_store
from mmkd_core.store.schema import SchemaError

REPO = Path(__file__).resolve().parents[1]
N = 40
STORAGE = ["--chunk-size", "4", "--shard-size", "8", "--autocast", "none", "--quiet"]


def _suite():
    spec = importlib.util.spec_from_file_location("fault_suite", REPO / "benchmarks" / "fault_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_suite", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two tiny BERTs (2 and 3 blocks), 40 sentences, the first BERT's store and the second's alone."""
    root = tmp_path_factory.mktemp("teachers")
    fs = _suite()
    w = {
        "root": root,
        "a": save_tiny_bert(root / "bert2", 2),
        "b": save_tiny_bert(root / "bert3", 3),
        "text": root / "sentences.txt",
    }
    w["text"].write_text(fs.sentences(N))
    w["base"] = root / "base.zarr"
    _ok(_first(w, w["a"], w["base"]))
    w["alone"] = root / "alone.zarr"
    _ok(_first(w, w["b"], w["alone"]))
    return w


def _first(w, weights: Path, out: Path, *extra: str):
    data = ["--dataset", "text", "--data-root", str(w["text"])]
    return CliRunner().invoke(
        app, ["--teacher", "bert", "--weights", str(weights), *data, "--out", str(out), *STORAGE, *extra]
    )


def _add(w, out: Path, *extra: str, name: str = "bert3"):
    """``mmkd-extract --add-teacher bert`` (the 3-block BERT) as ``name``; ``extra`` may name another teacher."""
    teacher = [] if "--add-teacher" in extra else ["--add-teacher", "bert", "--weights", str(w["b"])]
    args = [*teacher, "--teacher-name", name, "--out", str(out)]
    return CliRunner().invoke(app, [*args, *STORAGE, *extra])


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _files(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def _copy(w, name: str) -> Path:
    out = w["root"] / "trials" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(w["base"], out)
    return out


def _same_arrays(a: Path, b: Path) -> None:
    """Every array of ``a`` in ``b``, bit for bit (dtype, shape, bytes), and ``b`` has no other."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][...], gb[name][...]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


# ---------------------------------------------------------------------------------------------- the contract


def test_added_teacher_keeps_every_byte_and_equals_the_teacher_alone(work):
    out = _copy(work, "contract.zarr")
    before = _files(out)
    _ok(_add(work, out))
    after = _files(out)
    assert {k: v for k, v in after.items() if not k.startswith("teachers/")} == before  # nothing else changed
    group = out / "teachers" / "bert3"
    _same_arrays(work["alone"], group)
    # the chunk files themselves: the same bytes as the store of that teacher alone
    alone = {k: v for k, v in _files(work["alone"]).items() if not k.endswith("zarr.json")}
    assert {k: after[f"teachers/bert3/{k}"] for k in alone} == alone
    attrs = open_store(group).attrs
    assert attrs["teacher_group"] == "bert3" and attrs["complete"] is True
    assert attrs["teacher"]["num_layers"] == 3 and attrs["dataset"] == open_store(work["base"]).attrs["dataset"]
    assert not lock_path(out).exists()


def test_readers_see_every_teacher(work):
    import xarray as xr

    from mmkd_core import store_loader

    out = _copy(work, "readers.zarr")
    _ok(_add(work, out))
    reader = open_store(out)
    assert reader.teachers == ["bert", "bert3"]
    assert reader.teacher() is reader and reader.teacher("bert") is reader
    b = reader.teacher("bert3")
    np.testing.assert_array_equal(b.pooled(7), open_store(work["alone"]).pooled(7))
    assert b.teacher_name == "bert3" and b.attrs["teacher"]["num_layers"] == 3 and len(b) == len(reader) == N
    with pytest.raises(MmkdError, match="no teacher 'nope'.*holds bert, bert3"):
        reader.teacher("nope")
    assert "teachers: bert, bert3" in repr(reader)
    # xarray opens each teacher: the first at the root, the added one in its group
    ds = xr.open_zarr(str(out), group="teachers/bert3", consolidated=False)
    np.testing.assert_array_equal(ds["pooled"].values, zarr.open_group(str(work["alone"]))["pooled"][...])
    assert ds.attrs["mmkd"]["teacher_group"] == "bert3"
    assert xr.open_zarr(str(out), consolidated=False)["tokens"].shape[-1] == 32
    assert reader.teacher("bert3").to_xarray()["tokens"].dtype == np.float32
    # the loader reads either teacher's targets; the first by default
    for teacher, store in ((None, work["base"]), ("bert3", work["alone"])):
        batch = next(iter(store_loader(out, 8, teacher=teacher, targets="float32", seed=3)))
        ref = next(iter(store_loader(store, 8, targets="float32", seed=3)))
        assert batch.keys() == ref.keys()
        for k in batch:
            np.testing.assert_array_equal(batch[k].numpy(), ref[k].numpy())
    with pytest.raises(MmkdError, match="no teacher 'x'"):
        store_loader(out, 8, teacher="x")


def test_the_library_takes_the_store_record(work):
    """``settle`` fills what the store records; without it a differing option is refused, never overridden."""
    out = _copy(work, "library.zarr")
    cfg = ExtractConfig(
        add_teacher="bert",
        teacher_name="bert3",
        weights=str(work["b"]),
        out=out,
        chunk_size=4,
        shard_size=8,
        autocast="none",
    )
    with pytest.raises(MmkdError, match="not the store's"):  # dataset 'shapes' (the default) is not this store's
        extract(cfg, show_progress=False)
    with pytest.raises(MmkdError, match="--views 2: the store"):
        settle(ExtractConfig(add_teacher="bert", out=out, views=2), given={"add_teacher", "views"})
    s = extract(settle(cfg, given={"add_teacher", "teacher_name", "weights", "out"}), show_progress=False)
    assert s.complete and s.path.endswith("teachers/bert3")
    _same_arrays(work["alone"], out / "teachers" / "bert3")


# -------------------------------------------------------------------------------------------------- refusals


def _move_data(w, out):
    other = w["root"] / "other.txt"
    other.write_text(w["text"].read_text().replace("cat", "dog"))
    return ["--data-root", str(other)]


def _incomplete_root(w, out):
    g = zarr.open_group(str(out), mode="r+")
    g["shards_done"][2] = 0
    g.attrs["mmkd"] = {**g.attrs["mmkd"], "complete": False}
    return []


D2V = ["--teacher-option", "hidden_size=32", "--teacher-option", "num_hidden_layers=2", "--teacher-option",
       "num_attention_heads=2", "--teacher-option", "intermediate_size=64", "--teacher-option", "image_size=32",
       "--teacher-option", "patch_size=8"]  # fmt: skip

# name: (what is done to the store first and the options it gives, the refused command's options, the error)
REFUSALS = {
    "data of another fingerprint": (_move_data, [], "not the store's (dataset.fingerprint"),
    "the first teacher's name": (None, ["--teacher-name", "bert"], "first teacher is named 'bert'"),
    "a name already present": (lambda w, out: _ok(_add(w, out)) or [], [], "already holds teacher 'bert3'"),
    "an incomplete first extraction": (_incomplete_root, [], "first extraction is incomplete (4 of 5 shards"),
    "another modality": (None, ["--add-teacher", "data2vec-vision", "--random-weights", *D2V], "reads images, but"),
    "views given": (None, ["--views", "2"], "--views 2: the store"),
    "--teacher beside it": (None, ["--teacher", "bert"], "--teacher and --add-teacher"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_touch_nothing(work, case):
    prepare, options, needle = REFUSALS[case]
    out = _copy(work, f"refuse-{case.replace(' ', '-')}.zarr")
    options = [*(prepare(work, out) if prepare else []), *options]
    before = _files(out)
    assert needle in _error_line(_add(work, out, *options))
    assert _files(out) == before and not lock_path(out).exists()


def test_no_store_to_add_to_is_refused(work):
    assert "no store there to add a teacher to" in _error_line(_add(work, work["root"] / "absent.zarr"))
    assert not (work["root"] / "absent.zarr").exists()


def test_teacher_name_is_checked():
    with pytest.raises(MmkdError, match="--teacher-name '../x'"):
        ExtractConfig(add_teacher="bert", teacher_name="../x", out=Path("s.zarr"))
    with pytest.raises(MmkdError, match="use it with --add-teacher"):
        ExtractConfig(teacher_name="x")


def _group_attrs(out: Path, **changes) -> None:
    g = zarr.open_group(str(out / "teachers" / "bert3"), mode="r+")
    g.attrs["mmkd"] = {**g.attrs["mmkd"], **changes}


@pytest.mark.parametrize(
    "damage, needle",
    [
        ({"teacher_group": "other"}, "attribute teacher_group is 'other', expected 'bert3'"),
        ({"teacher_group": ["bert3"]}, "attribute teacher_group is ['bert3']"),
        ({"views": {"count": "1"}}, "teachers/bert3: attribute views.count is '1'"),
        ({"storage": None}, "teachers/bert3: attribute storage is None"),
        ({"dataset": {"fingerprint": "0" * 16, "num_samples": N}}, "data of fingerprint '0000000000000000'"),
    ],
)
def test_a_damaged_teacher_group_is_refused_in_one_line(work, damage, needle):
    out = _copy(work, "damaged.zarr")
    _ok(_add(work, out))
    _group_attrs(out, **damage)
    with pytest.raises(SchemaError, match=re.escape(needle)) as e:
        open_store(out)
    assert "\n" not in str(e.value)
    assert open_store(out, teachers=False).teachers == ["bert"]  # the root alone still reads
    report = CliRunner().invoke(verify_app, [str(out)])
    assert report.exit_code == 1 and "teacher bert3's attributes or layout are damaged" in report.output


@pytest.mark.parametrize("text", ["{not json", '{"zarr_format": 3, "node_type": "array"}', ""])
def test_a_damaged_teacher_group_zarr_json_is_one_line(work, text):
    out = _copy(work, "garbled.zarr")
    _ok(_add(work, out))
    (out / "teachers" / "bert3" / "zarr.json").write_text(text)
    with pytest.raises(MmkdError) as e:
        open_store(out)
    assert "teachers" in str(e.value) and "\n" not in str(e.value)
    report = CliRunner().invoke(verify_app, [str(out)])
    assert report.exit_code == 1 and "Traceback" not in report.output, report.output


def test_teachers_that_disagree_on_the_sample_count_are_refused(work):
    out = _copy(work, "count.zarr")
    short = work["root"] / "trials" / "short.zarr"
    shutil.rmtree(short, ignore_errors=True)
    _ok(_first(work, work["b"], short, "--limit", "32"))
    shutil.copytree(short, out / "teachers" / "bert3")
    zarr.open_group(str(out / "teachers"), mode="a")
    _group_attrs(out, teacher_group="bert3")
    with pytest.raises(SchemaError, match="teacher bert3 holds 32 samples, the store's first teacher 40"):
        open_store(out)


# ------------------------------------------------------------------------------------ resume, slices, plan


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard=st.sampled_from([4, 8, 12]), batch=st.sampled_from([3, 64]), stop_after=st.integers(0, 3))
def test_an_interrupted_addition_resumes_to_the_same_arrays(work, shard, batch, stop_after):
    """Ctrl-C after ``stop_after`` shards (the writer raises as a signal would), then the same command again:
    the arrays of that teacher extracted alone (the same batch size: padding changes float rounding)."""
    sizes = ["--shard-size", str(shard), "--batch-size", str(batch)]
    ref = work["root"] / "trials" / f"ref-{shard}-{batch}.zarr"
    if not ref.exists():
        _ok(_first(work, work["b"], ref, *sizes))
    out = _copy(work, f"resume-{shard}-{batch}-{stop_after}.zarr")
    written, original = [], StoreWriter.write_shard

    def write(self, k, data):
        if "teachers" in str(self.path) and len(written) == stop_after:
            raise KeyboardInterrupt
        written.append(k)
        original(self, k, data)

    StoreWriter.write_shard = write
    try:
        result = _add(work, out, *sizes)
    finally:
        StoreWriter.write_shard = original
    assert "run the same command again" in _error_line(result)
    assert not open_store(out).teacher("bert3").complete
    _ok(_add(work, out, *sizes))
    _same_arrays(ref, out / "teachers" / "bert3")


def test_kill_9_during_addition_then_rerun_gives_the_same_arrays(work):
    fs = _suite()
    out = _copy(work, "kill.zarr")
    before = _files(out)
    cmd = [
        fs.script("mmkd-extract"),
        "--add-teacher", "bert", "--teacher-name", "bert3", "--weights", str(work["b"]), "--out", str(out),
        "--batch-size", "1", *STORAGE,
    ]  # fmt: skip
    done = out / "teachers" / "bert3" / "shards_done" / "c"
    o = fs.run_faulted(
        cmd, out.parent, marker=(out / "teachers").exists, sig=signal.SIGKILL, group=True,
        trigger=lambda: done.exists() and len(os.listdir(done)) >= 2,
    )  # fmt: skip
    assert o.signalled and o.rc == -signal.SIGKILL, o.text[-2000:]
    assert not open_store(out).teacher("bert3").complete
    assert json.loads(lock_path(out).read_text())["pid"]  # the dead writer's lock, beside the store
    o2 = fs.run(cmd, out.parent)
    assert o2.rc == 0, o2.text[-2000:]
    ref = work["root"] / "trials" / "kill-ref.zarr"  # uninterrupted, in batches of one too
    _ok(_first(work, work["b"], ref, "--batch-size", "1"))
    _same_arrays(ref, out / "teachers" / "bert3")
    assert {k: v for k, v in _files(out).items() if not k.startswith("teachers/")} == before


def test_shards_slices_fill_the_group_together(work):
    out = _copy(work, "slices.zarr")
    for k in (1, 0):
        _ok(_add(work, out, "--shards", f"{k}/2"))
        assert open_store(out).teacher("bert3").complete == (k == 0)
    _same_arrays(work["alone"], out / "teachers" / "bert3")
    assert not list(out.parent.glob("slices.zarr.lock*"))


@pytest.mark.slow
def test_a_cluster_fills_the_group(work):
    out = _copy(work, "cluster.zarr")
    _ok(_add(work, out, "--cluster", "local:2"))
    _same_arrays(work["alone"], out / "teachers" / "bert3")


def test_plan_predicts_and_writes_nothing(work):
    out = _copy(work, "plan.zarr")
    before = _files(out)
    result = _add(work, out, "--plan")
    _ok(result)
    assert "plan (nothing written)" in result.output and "store size by --dtype" in result.output
    assert _files(out) == before and not lock_path(out).exists()


def test_verify_repairs_a_damaged_teacher_group(work):
    out = _copy(work, "repair.zarr")
    _ok(_add(work, out))
    before = _files(out)
    chunk = out / "teachers" / "bert3" / "pooled" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    found = CliRunner().invoke(verify_app, [str(out)])
    assert found.exit_code == 1
    assert "teacher bert3 (teachers/bert3)" in found.output and "DAMAGED pooled: shard 2" in found.output
    _ok(CliRunner().invoke(verify_app, [str(out), "--repair", "--quiet"]))
    _same_arrays(work["alone"], out / "teachers" / "bert3")
    after = _files(out)
    assert {k: v for k, v in after.items() if "zarr.json" not in k} == {
        k: v for k, v in before.items() if "zarr.json" not in k
    }


def test_overwrite_extracts_that_teacher_again_and_nothing_else(work):
    out = _copy(work, "overwrite.zarr")
    before = _files(out)
    _ok(_add(work, out))
    group = out / "teachers" / "bert3"
    (group / "tokens" / "c" / "0" / "0" / "0" / "0").unlink()  # to see that the group is written afresh
    _ok(_add(work, out, "--overwrite"))
    _same_arrays(work["alone"], group)
    assert {k: v for k, v in _files(out).items() if not k.startswith("teachers/")} == before
