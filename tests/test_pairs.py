"""Pair stores: an image teacher over image–caption data (once per image and view, captions beside), the
two-tower CLIP store, and students trained from them through the console scripts."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_beitv2, save_tiny_bert, save_tiny_clip
from PIL import Image

from mmkd.data import create_dataset
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core import open_store
from mmkd_core.errors import MmkdError
from mmkd_core.losses import similarity_kd
from mmkd_core.students.export import load_multimodal
from mmkd_core.targets import recipe_targets
from mmkd_core.teachers import create_teacher
from mmkd_core.teachers.beit import BeitTeacher
from mmkd_core.views import render, view_spec

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
SCRIPTS = Path(sysconfig.get_path("scripts"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
WORDS = ["red", "green", "blue", "big", "small", "cat", "dog"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO captions json: 5 images, 1 to 4 captions each, annotations interleaved across images."""
    root = tmp_path_factory.mktemp("coco")
    (root / "train2017").mkdir()
    images = []
    for k, colour in enumerate(COLOURS):
        rgb = np.zeros((24 + 4 * k, 32, 3), np.uint8)
        rgb[:] = colour
        rgb[2 : 10 + k, 3:12] = 255 - np.array(colour)
        Image.fromarray(rgb).save(root / "train2017" / f"{k:012d}.jpg", quality=95)
        images.append({"id": 100 + k, "file_name": f"{k:012d}.jpg"})
    anns = []
    for c in range(4):  # interleaved: image k's captions are not next to each other
        for k, count in enumerate([1, 4, 2, 3, 1]):
            if c < count:
                caption = f"a {WORDS[k]} {WORDS[(k + c) % 7]} photo {c}"
                anns.append({"id": len(anns), "image_id": 100 + k, "caption": caption})
    (root / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "captions_train2017.json"


@pytest.fixture(scope="module")
def beit_file(tmp_path_factory):
    return save_tiny_beitv2(tmp_path_factory.mktemp("w") / "tiny_beitv2.pth", **TINY)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert", layers=2)


def run(script, *args, cwd=None):
    return subprocess.run([str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd)


def test_image_teacher_runs_once_per_image_and_view(tmp_path, coco, beit_file, bert_dir, monkeypatch):
    seen = []
    forward = BeitTeacher.forward

    def counting(self, pixel_values=None, **kw):
        seen.append(pixel_values.shape[0])
        return forward(self, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(BeitTeacher, "forward", counting)
    cfg = ExtractConfig(
        teacher="beitv2",
        weights=str(beit_file),
        teacher_options=TINY,
        dataset="captions",
        data_root=str(coco),
        views=3,
        text_tokenizer=str(bert_dir),
        dtype="float32",
        out=tmp_path / "pairs.zarr",
        chunk_size=2,
        batch_size=4,
    )
    summary = extract(cfg, show_progress=False)
    pairs = create_dataset("captions", root=str(coco))
    assert len(pairs) == 11 and pairs.num_images == 5
    assert sum(seen) == 5 * 3  # images × views, the probe included: not once per caption
    store = open_store(tmp_path / "pairs.zarr")
    assert len(store) == 5 and summary.complete and store.attrs["dataset"]["num_captions"] == 11
    assert not store.has("tokens")  # pooled by default: the student regresses the whole sample
    caps = open_store(tmp_path / "pairs.zarr" / "captions")
    data = caps.read(0, len(caps))
    # every caption row points at the row of its own image, and holds its own tokens
    images = store.read(0, len(store))
    tok = create_teacher("bert", str(bert_dir)).tokenizer
    for row, (pos, img) in enumerate(zip(data["index"], data["image"], strict=True)):
        assert pairs.image_path(int(pos)).endswith(f"{int(images['index'][img]):012d}.jpg")
        ids = tok(pairs.text(int(pos)))["input_ids"]
        assert data["input_ids"][row, : data["lengths"][row]].tolist() == ids
    # the stored image targets are the teacher's on the stored views
    teacher = create_teacher("beitv2", str(beit_file), **TINY)
    spec = view_spec(store.attrs)
    for j, v in [(1, 0), (3, 2)]:
        image = pairs.image(int(data["index"][data["image"] == j][0]))  # image j, read through a caption of it
        x = render(image, images["view_params"][j, v], spec)[None]
        with torch.inference_mode():
            out = teacher(pixel_values=x)
        _, pooled = recipe_targets(out.hidden_states, out.mask, out.embed, store.attrs["recipe"])
        np.testing.assert_allclose(images["pooled"][j, v], pooled[0].numpy(), atol=1e-5)


def test_a_pair_store_trains_the_research_student_with_towers_from_two_models(tmp_path, coco, beit_file, bert_dir):
    out = tmp_path / "pairs.zarr"
    res = run(
        "mmkd-extract",
        *("--teacher", "beitv2", "--weights", beit_file, "--dataset", "captions", "--data-root", coco),
        *[f"--teacher-option={k}={v}" for k, v in TINY.items()],
        *("--views", 2, "--text-tokenizer", bert_dir, "--out", out, "--quiet"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    res = run(
        "mmkd-train",
        *("--targets", out, "--run-dir", tmp_path / "run", "--steps", 3, "--batch-size", 4),
        *("--init-image", "teacher", "--init-text", "bert", "--init-text-weights", bert_dir, "--depth", 1),
        *("--student-option", "text_depth=1", "--quiet"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["loss"] == {"contrastive_kd": 1.0, "itc": 1.0}
    model, transform, tokenizer = load_multimodal(tmp_path / "run" / "student")
    assert model.init_info["image"] and model.init_info["text"]
    pairs = create_dataset("captions", root=str(coco))
    with torch.inference_mode():
        img = model.encode_image(torch.stack([transform(pairs.image(0))]), normalize=True)
        txt = model.encode_text(**tokenizer([pairs.text(0)]), normalize=True)
    assert img.shape == txt.shape and torch.isfinite(img).all()
    # a text tower from a model of another vocabulary would read the captions' ids as other words
    res = run(
        "mmkd-train",
        *("--targets", out, "--run-dir", tmp_path / "run2", "--steps", 1, "--init-text", "minilm-l6", "--quiet"),
    )
    assert res.returncode == 2 and "vocabulary" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32, patch_size=16, max_position=80)


def test_two_tower_store_holds_each_towers_own_embeddings_and_trains(tmp_path, clip_dir):
    from transformers import CLIPModel

    out = tmp_path / "clip.zarr"
    res = run(
        "mmkd-extract",
        *("--teacher", "clip", "--weights", clip_dir, "--teacher-option", "tower=both", "--dataset", "shapes"),
        *("--dataset-option", "count=12", "--views", 2, "--dtype", "float32", "--out", out, "--quiet"),
        *("--autocast", "none"),  # compared with CLIP's own float32 forward pass
    )
    assert res.returncode == 0, res.stderr[-2000:]
    store, caps = open_store(out), open_store(out / "captions")
    assert store.attrs["recipe"]["pool"] == "teacher_embed" and caps.has("pooled")
    model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    ds = create_dataset("shapes", count=12)
    spec = view_spec(store.attrs)
    images, texts = store.read(0, 12), caps.read(0, 12)
    with torch.inference_mode():
        x = torch.stack([render(ds.image(i), images["view_params"][i, 1], spec) for i in range(12)])
        np.testing.assert_allclose(
            images["pooled"][:, 1],
            model.visual_projection(model.vision_model(pixel_values=x).pooler_output).numpy(),
            atol=1e-5,
        )
        for row in (0, 7):
            ids = torch.from_numpy(texts["input_ids"][row : row + 1, : texts["lengths"][row]]).long()
            ref = model.text_projection(model.text_model(input_ids=ids).pooler_output).numpy()[0]
            np.testing.assert_allclose(texts["pooled"][row, 0], ref, atol=1e-5)
            assert texts["image"][row] == row  # shapes: one caption per image
    res = run(
        "mmkd-train",
        *("--targets", out, "--run-dir", tmp_path / "run", "--steps", 3, "--batch-size", 4),
        *("--student-option", "shared_depth=0", "--student-option", "width=32", "--quiet"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["loss"] == {"mse_cosine": 1.0, "sim_kd": 1.0}
    assert len(load_multimodal(tmp_path / "run" / "student")[0].shared_blocks) == 0


def test_similarity_kd_is_zero_only_when_the_student_orders_pairs_as_the_teacher():
    torch.manual_seed(0)
    t_img, t_txt = torch.randn(6, 8), torch.randn(6, 8)
    assert similarity_kd(t_img, t_txt, t_img, t_txt) < 1e-6
    assert similarity_kd(2 * t_img, 3 * t_txt, t_img, t_txt) < 1e-6  # cosine: scale does not matter
    assert similarity_kd(t_img, t_txt[torch.randperm(6)], t_img, t_txt) > 0.1


def test_text_tokenizer_is_refused_where_there_are_no_captions(tmp_path, beit_file):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "cat" / "a.png")
    cfg = ExtractConfig(
        teacher="beitv2",
        weights=str(beit_file),
        teacher_options=TINY,
        dataset="imagefolder",
        data_root=str(tmp_path),
        text_tokenizer="minilm-l6",
        out=tmp_path / "x.zarr",
    )
    with pytest.raises(MmkdError, match="--text-tokenizer"):
        extract(cfg, show_progress=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
