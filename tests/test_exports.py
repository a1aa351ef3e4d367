"""Exported students give the embedding mmkd evaluates in their own ecosystems, without mmkd: text students
through sentence-transformers (and transformers for the encoder), vit/beit students through timm, multimodal
students through ``load_multimodal``; exports of format version 1 keep loading.

Every student's pooled head is moved away from the identity first, so a comparison that passes without the
head applied is impossible (each test also checks that the headless embedding is far from the right one)."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import save_tiny_bert
from PIL import Image
from transformers import AutoModel, AutoTokenizer, BertModel

from mmkd.evaluate.encoders import load_encoder
from mmkd_core.errors import MmkdError
from mmkd_core.students import create_student, load_multimodal, load_student, save_student
from mmkd_core.targets import masked_mean
from mmkd_core.teachers.base import ImagePreprocess
from mmkd_core.views import eval_params, render, view_spec

ATOL = 1e-5  # the promise: the exported model computes mmkd's embedding to float32 rounding
IMG, PATCH = 16, 8
VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=IMG, patch_size=PATCH)
IMAGE_PRE = ImagePreprocess(size=IMG, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "the red circle in the top left and the blue square at the bottom right of the picture",
    "a small man runs over the lazy fox",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    return AutoTokenizer.from_pretrained(str(bert_dir))


def _perturb(module, scale=0.5):
    """Move every parameter well away from its init (heads start as the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _pil_images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)) for i in range(n)]


def _pixels(images, preprocess):
    spec = view_spec(preprocess)
    return torch.stack([render(im, eval_params(*im.size, spec.crop_pct, spec.crop_mode), spec) for im in images])


def _assert_far(a, b, what):
    gap = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    assert gap > 0.05, f"{what}: the headless embedding is within {gap} of the right one; the test cannot tell"


# ------------------------------------------------------------------------------------------------- text


def _text_student(bert_dir, **kw):
    source = AutoModel.from_pretrained(str(bert_dir), dtype=torch.float32)
    student = create_student("text", depth=2, init="pretrained", init_from=source, **kw)
    _perturb(student.heads)
    return student.eval()


@pytest.mark.parametrize("pool,pooled_dim", [("mean", None), ("cls", 24)])
def test_sentence_transformers_gives_the_embedding_mmkd_evaluates(tmp_path, bert_dir, tokenizer, pool, pooled_dim):
    from sentence_transformers import SentenceTransformer

    student = _text_student(bert_dir, pool=pool, pooled_dim=pooled_dim, target_dim=40)
    save_student(student, tmp_path, tokenizer=tokenizer, max_seq_length=12)

    ours = SentenceTransformer(str(tmp_path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    evaluated = load_encoder(str(tmp_path)).encode_text(TEXTS)
    assert ours.shape == evaluated.shape == (len(TEXTS), pooled_dim or 32)
    np.testing.assert_allclose(ours, evaluated, atol=ATOL, rtol=0)

    # the same numbers from the in-memory student, fed as mmkd-eval feeds it (truncated at max_seq_length)
    enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=12, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 12  # the long caption is cut
    with torch.no_grad():
        out = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    np.testing.assert_allclose(ours, F.normalize(out.pooled, dim=-1).numpy(), atol=ATOL, rtol=0)
    summary = out.last_hidden_state[:, 0] if pool == "cls" else masked_mean(out.last_hidden_state, out.mask)
    if pooled_dim is None:
        _assert_far(F.normalize(summary, dim=-1).numpy(), ours, "text")

    # the directory is sentence-transformers' own layout, and AutoModel still loads the encoder
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 12
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 12
    dense = json.loads((tmp_path / "2_Dense" / "config.json").read_text())
    assert dense["activation_function"] == "torch.nn.modules.linear.Identity"
    encoder = AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(hidden[valid], out.last_hidden_state[valid], atol=ATOL, rtol=0)

    # load_student rebuilds every head, the token head included
    with torch.no_grad():
        again = load_student(tmp_path)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    torch.testing.assert_close(again.pooled, out.pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(again.tokens, out.tokens, atol=ATOL, rtol=0)


def test_text_export_without_max_seq_length_reads_the_whole_position_table(tmp_path, bert_dir, tokenizer):
    from sentence_transformers import SentenceTransformer

    student = _text_student(bert_dir, max_position=20)
    save_student(student, tmp_path, tokenizer=tokenizer)
    assert SentenceTransformer(str(tmp_path), device="cpu").max_seq_length == 20
    assert load_encoder(str(tmp_path)).max_length == 20


# ------------------------------------------------------------------------------------------------ image


@pytest.mark.parametrize("kind,pool,pooled_dim", [("vit", "cls", 24), ("vit", "mean", None), ("beit", "cls", None)])
def test_timm_gives_the_pooled_embedding_and_features(tmp_path, kind, pool, pooled_dim):
    student = create_student(kind, **VIT, pool=pool, pooled_dim=pooled_dim, token_pred="head").eval()
    _perturb(student, scale=0.05)  # layer scales, biases and norms off their init too
    _perturb(student.heads)
    save_student(student, tmp_path, preprocess=IMAGE_PRE)
    images = _pil_images()
    x = _pixels(images, IMAGE_PRE)
    with torch.no_grad():
        out = student(pixel_values=x)
        model = timm.create_model(f"local-dir:{tmp_path.resolve()}", pretrained=True).eval()
        embedding = model(x)
        model.reset_classifier(0)
        features = model(x)
    torch.testing.assert_close(embedding, out.pooled, atol=ATOL, rtol=0)
    summary = out.last_hidden_state[:, 0] if pool == "cls" else out.last_hidden_state.mean(dim=1)
    torch.testing.assert_close(features, summary, atol=ATOL, rtol=0)
    if pooled_dim is None:
        _assert_far(features, embedding, kind)

    # mmkd-eval scores what timm computes (normalised), through the preprocessing timm's config records
    evaluated = load_encoder(str(tmp_path)).encode_image(images)
    np.testing.assert_allclose(F.normalize(embedding, dim=-1).numpy(), evaluated, atol=ATOL, rtol=0)
    assert tuple(timm.data.resolve_data_config(model=model)["mean"]) == IMAGE_PRE.mean

    # config.json names a builder timm has and the student's real size, not a pretrained base model
    cfg = json.loads((tmp_path / "config.json").read_text())
    args = cfg["model_args"]
    assert (args["depth"], args["embed_dim"], args["num_heads"], cfg["num_classes"]) == (2, 32, 2, pooled_dim or 32)
    if kind == "vit":
        assert cfg["architecture"] == "vit_tiny_patch16_224"  # the named size nearest width 32
    assert cfg["pretrained_cfg"]["description"].startswith(f"mmkd {kind} student: 2 blocks, width 32")
    assert cfg["pretrained_cfg"]["tag"] == "mmkd_student"

    with torch.no_grad():
        again = load_student(tmp_path)(pixel_values=x)
    torch.testing.assert_close(again.pooled, out.pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(again.tokens, out.tokens, atol=ATOL, rtol=0)


def test_beit_mean_pooling_is_exported_as_features_with_a_warning(tmp_path, caplog):
    student = create_student("beit", **VIT, pool="mean").eval()
    _perturb(student.heads)
    with caplog.at_level("WARNING", logger="mmkd_core.students.export"):
        save_student(student, tmp_path, preprocess=IMAGE_PRE)
    assert "num_classes=0" in caplog.text and "without CLS" in caplog.text
    meta = json.loads((tmp_path / "mmkd_student.json").read_text())
    assert meta["timm_head"] is False and "without CLS" in meta["timm_head_note"]
    model = timm.create_model(f"local-dir:{tmp_path.resolve()}", pretrained=True).eval()
    assert model.num_classes == 0
    x = _pixels(_pil_images(2), IMAGE_PRE)
    with torch.no_grad():
        want = student(pixel_values=x)
        torch.testing.assert_close(model.forward_features(x), want.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(load_student(tmp_path)(pixel_values=x).pooled, want.pooled, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- multimodal


def test_load_multimodal_gives_model_transform_and_tokenizer(tmp_path, tokenizer):
    student = create_student(
        "multimodal",
        width=32,
        num_heads=2,
        img_size=IMG,
        patch_size=PATCH,
        image_depth=1,
        text_depth=1,
        shared_depth=1,
        vocab_size=len(tokenizer),
        max_position=10,
    ).eval()
    _perturb(student.image_heads)
    _perturb(student.text_heads)
    preprocess = ImagePreprocess(size=IMG, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, crop_mode="squash")
    save_student(student, tmp_path, tokenizer=tokenizer, preprocess=preprocess)

    model, transform, tokenize = load_multimodal(tmp_path)
    images = _pil_images()
    batch = tokenize(TEXTS)
    assert batch["input_ids"].shape[1] == 10  # truncated at the student's position table
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([transform(im) for im in images]))
        text_emb = model.encode_text(**batch)
        enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=10, return_tensors="pt")
        want_image = student.encode_image(_pixels(images, preprocess))
        want_text = student.encode_text(enc["input_ids"], enc["attention_mask"])
        headless = F.normalize(student.forward_image(_pixels(images, preprocess)).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(image_emb, want_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(text_emb, want_text, atol=ATOL, rtol=0)
    _assert_far(headless, F.normalize(image_emb, dim=-1), "multimodal")

    # normalize=True gives what mmkd-eval compares
    evaluated = load_encoder(str(tmp_path))
    with torch.no_grad():
        np.testing.assert_allclose(
            model.encode_image(torch.stack([transform(im) for im in images]), normalize=True).numpy(),
            evaluated.encode_image(images),
            atol=ATOL,
            rtol=0,
        )
        np.testing.assert_allclose(
            model.encode_text(**batch, normalize=True).numpy(), evaluated.encode_text(TEXTS), atol=ATOL, rtol=0
        )


def test_load_multimodal_refuses_other_students(tmp_path, bert_dir, tokenizer):
    save_student(_text_student(bert_dir), tmp_path, tokenizer=tokenizer)
    with pytest.raises(MmkdError, match="not a multimodal one"):
        load_multimodal(tmp_path)


# -------------------------------------------------------------------------------------- old exports (v1)


def _write_v1(student, directory, tokenizer=None):
    """The format-1 layout (mmkd before sentence-transformers/timm heads): the bare library model, every head
    in mmkd_heads.safetensors."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    directory.mkdir(parents=True, exist_ok=True)
    if student.name == "text":
        full = BertModel._from_config(student.bert.config, dtype=torch.float32, add_pooling_layer=True)
        full.load_state_dict(student.bert.state_dict(), strict=False)
        full.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
        fmt, files = "transformers", {"model": "model.safetensors", "heads": "mmkd_heads.safetensors"}
    else:
        save_for_hf(student.model, str(directory), safe_serialization=True)
        fmt, files = "timm", {"model": "model.safetensors", "config": "config.json", "heads": "mmkd_heads.safetensors"}
    save_file({k: v.contiguous() for k, v in student.heads.state_dict().items()}, str(directory / files["heads"]))
    from dataclasses import asdict

    meta = {"format_version": 1, "student": student.name, "format": fmt, "files": files}
    meta.update(config=asdict(student.config), init=student.init_info, versions={})
    (directory / "mmkd_student.json").write_text(json.dumps(meta))


def test_format_1_exports_still_load(tmp_path, bert_dir, tokenizer):
    text = _text_student(bert_dir, target_dim=40)
    _write_v1(text, tmp_path / "text", tokenizer)
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        want = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        got = load_student(tmp_path / "text")(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    torch.testing.assert_close(got.pooled, want.pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.tokens, want.tokens, atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        load_encoder(str(tmp_path / "text")).encode_text(TEXTS), F.normalize(want.pooled, dim=-1), atol=ATOL, rtol=0
    )

    vit = create_student("vit", **VIT, token_pred="head", pooled_dim=24).eval()
    _perturb(vit.heads)
    _write_v1(vit, tmp_path / "vit")
    x = _pixels(_pil_images(2), IMAGE_PRE)
    with torch.no_grad():
        want, got = vit(pixel_values=x), load_student(tmp_path / "vit")(pixel_values=x)
    torch.testing.assert_close(got.pooled, want.pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.tokens, want.tokens, atol=ATOL, rtol=0)
