"""transformers teachers (bert, data2vec-text, data2vec-vision, clip): tiny random models saved with
save_pretrained (tokenizers built from vocab files written here), loaded back through create_teacher."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BeitImageProcessor,
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    Data2VecTextConfig,
    Data2VecTextModel,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    RobertaTokenizer,
)

from mmkd_core.errors import MmkdError
from mmkd_core.teachers import create_teacher

WORDS = "the a cat dog sat on mat photo of and is red blue big small runs jumps over lazy fox".split()
SENTENCES = [
    "The cat sat on the mat",
    "a dog",
    "the big red fox jumps over the lazy dog and the small cat",
    "photo of a blue cat",
]
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _fake_hub_cache(root: Path, repo: str, src: Path) -> Path:
    """The layout huggingface_hub leaves: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return root


def _bpe_files(directory: Path, vocab: dict[str, int]) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return str(directory / "vocab.json"), str(directory / "merges.txt")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY_TEXT))
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def d2v_text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("d2vt")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *"abcdefghijklmnopqrstuvwxyzĠ"])}
    vocab_file, merges_file = _bpe_files(root / "tok", vocab)
    tokenizer = RobertaTokenizer(vocab=vocab_file, merges=merges_file)
    torch.manual_seed(0)
    config = Data2VecTextConfig(
        vocab_size=len(vocab), max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2, **TINY_TEXT
    )
    Data2VecTextModel(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab_file, merges_file = _bpe_files(root / "tok", vocab)
    tokenizer = CLIPTokenizer(vocab=vocab_file, merges=merges_file)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=48,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **TINY_TEXT,
        ),
        vision_config=dict(image_size=32, patch_size=8, **TINY_TEXT),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def d2v_vision_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("d2vv")
    config = Data2VecVisionConfig(
        image_size=32, patch_size=8, use_shared_relative_position_bias=True, layer_scale_init_value=0.1, **TINY_TEXT
    )
    torch.manual_seed(0)
    model = Data2VecVisionModel(config, add_pooling_layer=True)
    with torch.no_grad():  # the shared rel-pos table starts at zero: make a mis-load visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "ckpt")
    BeitImageProcessor(
        size={"height": 36, "width": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32}, resample=3
    ).save_pretrained(root / "ckpt")
    return root / "ckpt"


def _original_text(model_cls, path: Path, batch: dict[str, torch.Tensor]):
    model = model_cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        return model(**batch, output_hidden_states=True)


def _check_padding_invariance(teacher) -> None:
    """A sentence's outputs equal those it gets alone, in a batch, and with extra padding."""
    batch = teacher.tokenize(SENTENCES)
    with torch.inference_mode():
        full = teacher(**batch)
        assert len(full.hidden_states) == teacher.num_layers > 0
        for i, text in enumerate(SENTENCES):
            alone = teacher.tokenize([text])
            n = int(alone["attention_mask"].sum())
            pad = min(7, teacher.max_length - n)
            extra = {
                k: torch.cat(
                    [v, torch.full((1, pad), teacher.tokenizer.pad_token_id if k == "input_ids" else 0)], dim=1
                )
                for k, v in alone.items()
            }
            for single in (teacher(**alone), teacher(**extra)):
                for f, s in zip(full.hidden_states, single.hidden_states, strict=True):
                    torch.testing.assert_close(s[0, :n], f[i, :n], atol=1e-5, rtol=0)
                if full.embed is not None:
                    torch.testing.assert_close(single.embed[0], full.embed[i], atol=1e-5, rtol=0)


def test_bert_loads_and_matches(bert_dir):
    teacher = create_teacher("bert", weights=str(bert_dir))
    batch = teacher.tokenize(SENTENCES)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert (batch["attention_mask"] == (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None])).all()
    with torch.inference_mode():
        out = teacher(**batch)
    ref = _original_text(BertModel, bert_dir, batch)
    assert len(out.hidden_states) == teacher.num_layers == 2
    for h, r in zip(out.hidden_states, ref.hidden_states[1:], strict=True):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.mask, batch["attention_mask"].bool()) and out.embed is None
    assert teacher.modality == "text" and teacher.hidden_size == 32
    pre = teacher.preprocess
    assert (pre.tokenizer, pre.max_length, pre.lowercase) == ("BertTokenizer", 64, True)
    assert pre.extra["files_sha256"]
    _check_padding_invariance(teacher)


def test_tokenize_truncates_at_max_length(bert_dir):
    teacher = create_teacher("bert", weights=str(bert_dir), max_length=6)
    batch = teacher.tokenize(SENTENCES)
    assert batch["input_ids"].shape[1] == 6 and teacher.preprocess.max_length == 6
    full = batch["attention_mask"].all(1)
    assert full.sum() == 3 and (batch["input_ids"][full, -1] == teacher.tokenizer.sep_token_id).all()


def test_eager_attention_is_padding_invariant_too(bert_dir):
    _check_padding_invariance(create_teacher("bert", weights=str(bert_dir), attn_implementation="eager"))


def test_sentence_transformers_dir_gives_pooled_embed(bert_dir, tmp_path):
    st_dir = tmp_path / "st"
    shutil.copytree(bert_dir, st_dir)
    (st_dir / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (st_dir / "1_Pooling").mkdir()
    (st_dir / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (st_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    teacher = create_teacher("bert", weights=str(st_dir))
    assert teacher.preprocess.max_length == 12
    batch = teacher.tokenize(SENTENCES)
    with torch.inference_mode():
        out = teacher(**batch)
    m = batch["attention_mask"].unsqueeze(-1).float()
    mean = (out.hidden_states[-1] * m).sum(1) / m.sum(1)
    torch.testing.assert_close(out.embed, torch.nn.functional.normalize(mean, dim=-1), atol=1e-6, rtol=0)
    _check_padding_invariance(teacher)


def test_data2vec_text_loads_and_matches(d2v_text_dir):
    teacher = create_teacher("data2vec-text", weights=str(d2v_text_dir))
    batch = teacher.tokenize(SENTENCES)
    with torch.inference_mode():
        out = teacher(**batch)
    ref = _original_text(Data2VecTextModel, d2v_text_dir, batch)
    assert len(out.hidden_states) == teacher.num_layers == 2
    for h, r in zip(out.hidden_states, ref.hidden_states[1:], strict=True):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    assert teacher.preprocess.tokenizer == "RobertaTokenizer"
    assert teacher.max_length == 128  # RoBERTa-style position table: 130 rows minus padding_idx + 1
    _check_padding_invariance(teacher)


def test_data2vec_text_from_hub_cache(d2v_text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MmkdError, match="facebook/data2vec-text-base in the HF hub cache"):
        create_teacher("data2vec-text")
    # the cache location is read when the teacher is created, not when huggingface_hub was imported
    monkeypatch.setenv(
        "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", "facebook/data2vec-text-base", d2v_text_dir))
    )
    teacher = create_teacher("data2vec-text")
    assert teacher.source == f"hf-hub:facebook/data2vec-text-base@{COMMIT}"
    assert teacher.weights_sha256 == create_teacher("data2vec-text", weights=str(d2v_text_dir)).weights_sha256


def test_wrong_model_type_and_unknown_option(bert_dir):
    with pytest.raises(MmkdError, match="'bert' checkpoint but data2vec-text needs 'data2vec-text'"):
        create_teacher("data2vec-text", weights=str(bert_dir))
    with pytest.raises(MmkdError, match="unknown option 'no_such_option'"):
        create_teacher("bert", weights=str(bert_dir), no_such_option=1)
    with pytest.raises(MmkdError, match=r"intermediate\.dense\.bias has shape \(64,\) but the model expects \(48,\)"):
        create_teacher("bert", weights=str(bert_dir), intermediate_size=48)


def test_missing_layer_weight_is_named(bert_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bert_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MmkdError, match=r"encoder\.layer\.1\.output\.dense\.weight") as err:
        create_teacher("bert", weights=str(broken))
    assert "model.safetensors" in str(err.value)


def test_text_teacher_without_weights(tmp_path, monkeypatch, bert_dir, caplog):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MmkdError, match="--weights PATH"):
        create_teacher("bert")
    with pytest.raises(MmkdError, match="needs a tokenizer"):
        create_teacher("data2vec-text", random_init=True)
    with caplog.at_level(logging.WARNING):
        teacher = create_teacher("bert", weights=str(bert_dir), random_init=True, num_hidden_layers=3)
    assert teacher.source == "random" and teacher.weights_sha256.startswith("random:") and teacher.num_layers == 3
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


def test_data2vec_vision_loads_and_matches(d2v_vision_dir, caplog):
    with caplog.at_level(logging.INFO, logger="mmkd_core.teachers"):
        teacher = create_teacher("data2vec-vision", weights=str(d2v_vision_dir))
    assert any("pooler" in r.getMessage() for r in caplog.records)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = Data2VecVisionModel.from_pretrained(str(d2v_vision_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = teacher(pixel_values=x)
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        alone = teacher(pixel_values=x[1:2])
    assert len(out.hidden_states) == teacher.num_layers == 2
    for h, r, a in zip(out.hidden_states, ref, alone.hidden_states, strict=True):
        assert h.shape == (3, 17, 32)
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[0], h[1], atol=1e-5, rtol=0)
    assert out.mask.all() and out.mask.shape == (3, 17)
    pre = teacher.preprocess
    assert (pre.size, pre.interpolation, pre.mean) == (32, "bicubic", (0.5, 0.5, 0.5))
    assert pre.crop_pct == pytest.approx(32 / 36)


def test_data2vec_vision_random_from_options():
    teacher = create_teacher("data2vec-vision", random_init=True, image_size=32, patch_size=8, **TINY_TEXT)
    with torch.inference_mode():
        out = teacher(pixel_values=torch.randn(1, 3, 32, 32))
    assert [h.shape for h in out.hidden_states] == [(1, 17, 32)] * 2


def test_clip_vision_tower(clip_dir):
    teacher = create_teacher("clip", weights=str(clip_dir), tower="vision")
    assert (teacher.name, teacher.modality, teacher.num_layers, teacher.hidden_size) == ("clip-vision", "image", 2, 32)
    model = CLIPModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = teacher(pixel_values=x)
        ref = model.get_image_features(pixel_values=x, output_hidden_states=True)
        alone = teacher(pixel_values=x[2:])
    assert len(out.hidden_states) == 2
    for h, r in zip(out.hidden_states, ref.hidden_states[1:], strict=True):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embed, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert out.embed.shape == (3, 16)
    torch.testing.assert_close(alone.embed[0], out.embed[2], atol=1e-5, rtol=0)
    pre = teacher.preprocess
    assert (pre.size, pre.crop_pct, pre.mean[0]) == (32, 1.0, pytest.approx(0.48145466))


def test_clip_text_tower(clip_dir):
    teacher = create_teacher("clip-text", weights=str(clip_dir))
    assert teacher.modality == "text" and teacher.max_length == 48 and teacher.preprocess.lowercase is True
    model = CLIPModel.from_pretrained(str(clip_dir), dtype=torch.float32).eval()
    batch = teacher.tokenize(SENTENCES)
    with torch.inference_mode():
        out = teacher(**batch)
        ref = model.get_text_features(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 2
    for h, r in zip(out.hidden_states, ref.hidden_states[1:], strict=True):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embed, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    _check_padding_invariance(teacher)


def test_clip_needs_a_tower(clip_dir):
    with pytest.raises(MmkdError, match="tower="):
        create_teacher("clip", weights=str(clip_dir))
