import logging
import shutil

import numpy as np
import PIL
import pytest
import zarr

from mmkd.data import create_dataset
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.verify_views import verify_views
from mmkd_core import views
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store
from mmkd_core.views import CHECKSUM_RULE, render, render_versions, view_checksum, view_spec

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
DATA = {"count": 12, "resolution": 40}


def config(out, **kw):
    return ExtractConfig(
        teacher="beitv2",
        random_weights=True,
        teacher_options=TINY,
        dataset="shapes",
        dataset_options=DATA,
        views=3,
        dtype="float16",
        out=out,
        chunk_size=2,
        shard_size=4,
        batch_size=5,
        **kw,
    )


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "img.zarr"
    assert extract(config(path), show_progress=False).complete
    return path


@pytest.fixture
def store(extracted, tmp_path):
    """A private copy of the extracted store, free to damage."""
    path = tmp_path / "img.zarr"
    shutil.copytree(extracted, path)
    return path


@pytest.fixture(scope="module")
def source():
    return create_dataset("shapes", **DATA)


def test_extraction_stores_the_checksum_of_each_teacher_input(extracted, source):
    r = open_store(extracted)
    data = r.read(0, 12, ("view_params", "view_checksum", "index"))
    assert data["view_checksum"].shape == (12, 3) and data["view_checksum"].dtype == np.uint64
    spec = view_spec(r.attrs)
    expect = np.array(
        [
            [view_checksum(render(source.image(int(i)), p, spec), spec) for p in ps]
            for i, ps in zip(data["index"], data["view_params"], strict=True)
        ]
    )
    np.testing.assert_array_equal(data["view_checksum"], expect)
    assert (data["view_checksum"] != 0).all()  # no row left at the fill value
    assert r.attrs["views"]["checksum"] == CHECKSUM_RULE  # the rule is compared: one rule per store
    assert r.attrs["view_render"]["versions"] == render_versions()  # recorded, not compared
    assert r.attrs["view_render"]["versions"]["pillow"] == PIL.__version__


def test_untouched_store_verifies(extracted, source):
    r = open_store(extracted)
    verify_views(r, source, view_spec(r.attrs))
    verify_views(r, source, None, sample=None)
    verify_views(r, source, None, sample=5, seed=3)


def test_altered_view_params_are_refused_naming_sample_and_view(store, source):
    g = zarr.open_group(str(store), mode="r+")
    p = g["view_params"][5, 2]
    q = np.array([0, 0, 20, 20, 1 - p[4]], dtype=np.float32)
    spec = view_spec(open_store(store).attrs)
    image = source.image(int(g["index"][5]))
    assert view_checksum(render(image, q, spec), spec) != view_checksum(render(image, p, spec), spec)
    g["view_params"][5, 2] = q
    r = open_store(store)
    with pytest.raises(MmkdError, match=r"sample 5 \(dataset index 5\), view 2 .*same versions") as e:
        verify_views(r, source, None, sample=None)
    assert "\n" not in str(e.value)
    with pytest.raises(MmkdError, match=r"sample 5 \(dataset index 5\), view 2"):
        verify_views(r, source, None)  # the default sample covers all 36 views of this store


def _shift_one_pixel(monkeypatch):
    original = views.render_pixels

    def shifted(image, params, spec):
        return np.roll(original(image, params, spec), 1, axis=1)

    monkeypatch.setattr(views, "render_pixels", shifted)


def test_a_renderer_shifted_by_one_pixel_is_refused(extracted, source, monkeypatch):
    _shift_one_pixel(monkeypatch)
    r = open_store(extracted)
    with pytest.raises(MmkdError, match=r"sample \d+ \(dataset index \d+\), view \d .*same versions"):
        verify_views(r, source, view_spec(r.attrs))  # the default sample, as training starts


def test_other_versions_are_named_but_do_not_refuse_identical_pixels(store, source, monkeypatch):
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs["mmkd"])
    attrs["view_render"] = {"versions": {**render_versions(), "pillow": "9.0.0"}}
    g.attrs["mmkd"] = attrs
    r = open_store(store)
    verify_views(r, source, None, sample=None)  # an upgrade that renders alike is fine
    _shift_one_pixel(monkeypatch)
    with pytest.raises(MmkdError, match=rf"pillow 9\.0\.0 at extraction, {PIL.__version__} now") as e:
        verify_views(r, source, None)
    assert "same versions" not in str(e.value) and "numpy" not in str(e.value)


def test_sample_is_deterministic_and_none_checks_every_view(extracted, source, monkeypatch):
    seen, reads = [], []
    original_render = views.render

    def recording(image, params, spec):
        seen.append(tuple(params.tolist()))
        return original_render(image, params, spec)

    monkeypatch.setattr(views, "render", recording)
    r = open_store(extracted)
    original_read = r.read
    monkeypatch.setattr(r, "read", lambda lo, hi, names=None: reads.append((lo, hi)) or original_read(lo, hi, names))
    verify_views(r, source, None, sample=7, seed=1)
    first = list(seen)
    assert len(first) == 7
    assert all(0 <= lo < hi <= 12 and hi - lo <= r.shard_size for lo, hi in reads)
    seen.clear()
    verify_views(r, source, None, sample=7, seed=1)
    assert seen == first
    seen.clear()
    verify_views(r, source, None, sample=None)
    assert len(seen) == 36
    seen.clear()
    verify_views(r, source, None, sample=0)
    assert seen == []


def test_store_without_checksums_warns_once(store, source, caplog):
    shutil.rmtree(store / "view_checksum")  # as extracted before checksums existed
    r = open_store(store)
    with caplog.at_level(logging.WARNING, logger="mmkd.train.verify_views"):
        verify_views(r, source, None)
        verify_views(r, source, None, sample=None)
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0].getMessage()


def test_resuming_a_store_written_before_checksums_is_refused_by_name(store):
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs["mmkd"])
    attrs["views"] = {k: val for k, val in attrs["views"].items() if k != "checksum"}
    attrs.pop("view_render")
    attrs["complete"] = False
    g.attrs["mmkd"] = attrs
    g["shards_done"][2] = 0
    shutil.rmtree(store / "view_checksum")
    with pytest.raises(MmkdError, match=r"views\.checksum"):
        extract(config(store), show_progress=False)


def test_text_stores_have_nothing_to_verify(tmp_path):
    class Reader:
        path = tmp_path

        def has(self, name):
            return False

    verify_views(Reader(), None, None, sample=None)
