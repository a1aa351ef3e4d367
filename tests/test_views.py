import numpy as np
import pytest
import torch
from PIL import Image

from mmkd_core import views
from mmkd_core.errors import MmkdError
from mmkd_core.views import ViewSpec, draw_params, eval_params, render, render_views


def image(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_view0_is_eval_centre_crop():
    spec = ViewSpec(count=3, size=16, crop_pct=0.5)
    p = draw_params(40, 30, spec, index=7)
    assert p.shape == (3, 5)
    np.testing.assert_array_equal(p[0], eval_params(40, 30, 0.5))
    np.testing.assert_array_equal(p[0], [7, 12, 15, 15, 0])


def test_params_deterministic_and_in_bounds():
    spec = ViewSpec(count=8, size=16, seed=3)
    a = draw_params(40, 30, spec, index=5)
    np.testing.assert_array_equal(a, draw_params(40, 30, spec, index=5))
    assert not np.array_equal(a, draw_params(40, 30, spec, index=6))
    top, left, h, w, flip = a[1:].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 40).all()
    assert set(np.unique(flip)) == {0.0, 1.0}  # both occur among the 7 random views


def test_replay_is_bit_exact_and_flip_flips():
    spec = ViewSpec(count=4, size=16)
    img = image()
    params = draw_params(*img.size, spec, index=0)
    a = render_views(img, params, spec)
    b = render_views(image(), params.copy(), spec)
    assert a.shape == (4, 3, 16, 16)
    assert torch.equal(a, b)
    p = params[1].copy()
    p[4] = 0
    q = p.copy()
    q[4] = 1
    assert torch.equal(render(img, p, spec).flip(-1), render(img, q, spec))


def test_normalisation():
    spec = ViewSpec(size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    x = render(white, eval_params(8, 8, 1.0), spec)
    assert torch.allclose(x, torch.ones_like(x))


def test_spec_errors():
    with pytest.raises(MmkdError, match="--views"):
        ViewSpec(count=0)
    with pytest.raises(MmkdError, match="scale"):
        ViewSpec(scale=(0.5, 0.2))


def test_checksum_is_of_the_pixels_rendered():
    spec = ViewSpec(count=4, size=16)
    img = image()
    params = draw_params(*img.size, spec, index=0)
    p = params[1].copy()
    p[4] = 0
    q = p.copy()
    q[4] = 1
    a = views.view_checksum(render(img, p, spec), spec)
    assert a.dtype == np.uint64 and a.shape == ()
    assert a == views.view_checksum(render(image(), p.copy(), spec), spec)  # same view rendered twice
    assert a != views.view_checksum(render(img, q, spec), spec)  # flip toggled
    batch = render_views(img, params, spec)
    np.testing.assert_array_equal(
        views.view_checksum(batch[None], spec)[0], [views.view_checksum(x, spec) for x in batch]
    )


def test_checksum_ignores_float_noise_not_a_grey_level():
    spec = ViewSpec(size=16)
    img = image()
    x = render(img, eval_params(*img.size, 1.0), spec)
    c = views.view_checksum(x, spec)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 1e-4  # far below 1/255 / std
    assert views.view_checksum(x + noise, spec) == c
    pixels = views.render_pixels(img, eval_params(*img.size, 1.0), spec).copy()
    pixels[3, 5, 1] ^= 1  # one channel of one pixel, one grey level
    assert views.view_checksum(views.normalize(pixels, spec), spec) != c
    with pytest.raises(MmkdError, match="checksum rule"):
        views.view_checksum(x, ViewSpec(size=16, checksum="md5 of something else"))


def test_render_versions_name_the_renderers():
    v = views.render_versions()
    assert {"pillow", "libjpeg", "numpy", "torch", "torchvision"} <= set(v)
    assert ViewSpec().describe()["checksum"] == views.CHECKSUM_RULE
