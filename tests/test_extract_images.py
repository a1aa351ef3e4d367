import numpy as np
import pytest
import torch
from conftest import save_tiny_beitv2

from mmkd.data import create_dataset
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core.store import open_store
from mmkd_core.targets import make_targets, pool_targets
from mmkd_core.teachers import create_teacher
from mmkd_core.views import render, view_spec

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


@pytest.fixture(scope="module")
def beit_file(tmp_path_factory):
    return save_tiny_beitv2(tmp_path_factory.mktemp("w") / "tiny_beitv2.pth", **TINY)


def test_views_are_stored_and_replay_exactly(tmp_path, beit_file):
    cfg = ExtractConfig(
        teacher="beitv2",
        weights=str(beit_file),
        teacher_options=TINY,
        dataset="shapes",
        dataset_options={"count": 12, "resolution": 40},
        views=3,
        dtype="float32",
        autocast="none",  # compared with the teacher's own float32 forward pass
        out=tmp_path / "img.zarr",
        chunk_size=2,
        shard_size=4,
        batch_size=5,
    )
    s = extract(cfg, show_progress=False)
    assert s.complete and s.views == 3
    r = open_store(tmp_path / "img.zarr")
    assert r.attrs["recipe"]["pool"] == "teacher_cls"
    data = r.read(0, 12)
    assert data["tokens"].shape == (12, 3, 17, 32)  # 16 patches + CLS
    assert data["view_params"].shape == (12, 3, 5)
    np.testing.assert_array_equal(data["lengths"], 17)
    # view 0 is the eval crop of the whole 40 px image; the others differ
    assert not np.array_equal(data["view_params"][:, 1], data["view_params"][:, 2])
    teacher = create_teacher("beitv2", str(beit_file), **TINY)
    ds = create_dataset("shapes", count=12, resolution=40)
    spec = view_spec(r.attrs)
    for i, v in [(0, 0), (5, 2), (11, 1)]:
        x = render(ds.image(i), data["view_params"][i, v], spec)[None]
        with torch.inference_mode():
            out = teacher(pixel_values=x)
        ref = make_targets(out.hidden_states, out.mask, list(range(3)))
        np.testing.assert_allclose(data["tokens"][i, v], ref[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(
            data["pooled"][i, v], pool_targets("teacher_cls", ref, out.hidden_states, out.mask)[0].numpy(), atol=1e-5
        )


def test_workers_give_the_same_store(tmp_path, beit_file):
    def run(name, workers):
        cfg = ExtractConfig(
            teacher="beitv2",
            weights=str(beit_file),
            teacher_options=TINY,
            dataset="shapes",
            dataset_options={"count": 10, "resolution": 40},
            views=2,
            dtype="float32",
            out=tmp_path / name,
            chunk_size=2,
            shard_size=4,
            batch_size=6,
            workers=workers,
        )
        extract(cfg, show_progress=False)
        return open_store(tmp_path / name).read(0, 10)

    a, b = run("w0.zarr", 0), run("w2.zarr", 2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
