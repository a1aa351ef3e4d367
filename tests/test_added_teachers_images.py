"""Image teachers added to a store (``mmkd-extract --add-teacher``): a tiny random data2vec-vision added to a
tiny BEiT v2 store of ``shapes`` with 2 views reads the store's own views — its targets are that teacher run
directly on the replayed views — and views that do not replay are refused."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import save_tiny_beitv2
from typer.testing import CliRunner

from mmkd.data import create_dataset
from mmkd.extract.cli import app
from mmkd_core import store_loader
from mmkd_core.store import open_store
from mmkd_core.targets import make_targets, pool_targets
from mmkd_core.teachers import create_teacher
from mmkd_core.views import render, view_checksum, view_spec

BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
# a smaller input than BEiT's (24 px): the views are rendered again at its size, from the stored crops
D2V = {"image_size": 24, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 64}  # fmt: skip
DATA = {"count": 12, "resolution": 40}
STORAGE = ["--dtype", "float32", "--autocast", "none", "--chunk-size", "2", "--shard-size", "4", "--quiet"]


def _options(opts: dict) -> list[str]:
    return [a for k, v in opts.items() for a in ("--teacher-option", f"{k}={v}")]


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _files(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in path.rglob("*") if f.is_file()
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-teachers")
    beit = save_tiny_beitv2(root / "tiny_beitv2.pth", **BEIT)
    base = root / "base.zarr"
    data = ["--dataset", "shapes", *[a for k, v in DATA.items() for a in ("--dataset-option", f"{k}={v}")]]
    first = ["--teacher", "beitv2", "--weights", str(beit), *_options(BEIT), *data, "--views", "2"]
    _ok(CliRunner().invoke(app, [*first, "--out", str(base), *STORAGE]))
    return {"root": root, "beit": beit, "base": base}


def _copy(work, name: str) -> Path:
    out = work["root"] / "trials" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work["base"], out)
    return out


def _add_d2v(out: Path, *extra: str):
    args = ["--add-teacher", "data2vec-vision", "--random-weights", *_options(D2V), "--out", str(out)]
    return CliRunner().invoke(app, [*args, *STORAGE, "--batch-size", "3", *extra])


def test_an_added_image_teacher_reads_the_stored_views(work):
    out = _copy(work, "d2v.zarr")
    before = _files(out)
    _ok(_add_d2v(out, "--workers", "2"))  # views rendered in DataLoader workers
    assert {k: v for k, v in _files(out).items() if not k.startswith("teachers/")} == before
    store = open_store(out)
    assert store.teachers == ["beitv2", "data2vec-vision"]
    first, added = store, store.teacher("data2vec-vision")
    assert added.complete and added.views == 2 and added.attrs["views_of"] == "beitv2"
    # the very crops of the store, as stored (bytes), drawn by its record; rendered at this teacher's size
    assert added.raw("view_params", 0, 12).tobytes() == first.raw("view_params", 0, 12).tobytes()
    spec = view_spec(added.attrs)
    assert (spec.size, spec.seed, spec.crop_pct) == (24, 0, view_spec(first.attrs).crop_pct)
    teacher = create_teacher("data2vec-vision", random_init=True, **D2V)
    dataset = create_dataset("shapes", **DATA)
    data = added.read(0, 12)
    assert data["tokens"].shape == (12, 2, 10, 32)  # 9 patches + CLS at 24 px
    for i in range(12):
        x = torch.stack([render(dataset.image(i), data["view_params"][i, v], spec) for v in range(2)])
        with torch.inference_mode():
            out_ = teacher(pixel_values=x)
        ref = make_targets(out_.hidden_states, out_.mask, [0, 1])
        np.testing.assert_allclose(data["tokens"][i], ref.numpy(), atol=1e-5)
        pooled = pool_targets("teacher_cls", ref, out_.hidden_states, out_.mask)
        np.testing.assert_allclose(data["pooled"][i], pooled.numpy(), atol=1e-5)
        np.testing.assert_array_equal(added.raw("view_checksum", i, i + 1)[0], view_checksum(x, spec))
    # one process renders the same bytes as two workers
    again = _copy(work, "d2v-0.zarr")
    _ok(_add_d2v(again, "--workers", "0"))
    group = zarr.open_group(str(again / "teachers" / "data2vec-vision"), mode="r")
    for name in group.array_keys():
        assert group[name][...].tobytes() == added.group[name][...].tobytes(), name


def test_the_loader_renders_an_added_teachers_views(work):
    out = _copy(work, "loader.zarr")
    _ok(_add_d2v(out))
    dataset = create_dataset("shapes", **DATA)
    added = open_store(out).teacher("data2vec-vision")
    batch = next(iter(store_loader(out, 4, teacher="data2vec-vision", source=dataset, targets="float32")))
    assert batch["pixel_values"].shape[-1] == 24
    for j, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist(), strict=True)):
        x = render(dataset.image(i), added.raw("view_params", i, i + 1)[0, v], view_spec(added.attrs))
        torch.testing.assert_close(batch["pixel_values"][j], x, atol=0, rtol=0)
        np.testing.assert_array_equal(batch["pooled"][j].numpy(), added.pooled(i, v))


def test_the_first_teacher_added_again_equals_the_store(work):
    """The store's own teacher, added under another name: every array of its group is the store's own."""
    out = _copy(work, "again.zarr")
    args = ["--add-teacher", "beitv2", "--teacher-name", "beit-again", "--weights", str(work["beit"]), *_options(BEIT)]
    _ok(CliRunner().invoke(app, [*args, "--out", str(out), *STORAGE]))
    group, root = zarr.open_group(str(out / "teachers" / "beit-again"), mode="r"), zarr.open_group(str(out), mode="r")
    assert sorted(group.array_keys()) == sorted(root.array_keys())
    for name in root.array_keys():
        assert group[name][...].tobytes() == root[name][...].tobytes(), name


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_views_that_do_not_replay_are_refused(work, workers):
    out = _copy(work, f"tampered-{workers}.zarr")
    sums = zarr.open_group(str(out), mode="r+")["view_checksum"]
    sums[5, 1] = np.uint64(sums[5, 1]) ^ np.uint64(1)  # as if the source image had changed since
    line = _error_line(_add_d2v(out, "--workers", str(workers)))
    assert "sample 5, view 1 does not replay" in line and "the source image changed" in line
    assert not (out / "teachers" / "data2vec-vision" / "shards_done" / "c" / "1").exists()  # shard 1 not done


def test_other_data_is_refused(work):
    out = _copy(work, "other-data.zarr")
    line = _error_line(_add_d2v(out, "--dataset-option", "resolution=48"))
    assert "not the store's (dataset.fingerprint" in line
