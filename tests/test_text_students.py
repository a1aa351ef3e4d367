"""A text student is its init model's own transformers encoder class at lower depth (BERT, RoBERTa, DistilBERT,
MPNet, data2vec-text): cut from chosen blocks with every other parameter copied (MPNet's relative position bias,
which lives in the encoder, included), exported as that architecture's checkpoint, which AutoModel and
sentence-transformers load natively, and trained end to end from an MPNet store."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_teachers_mpnet import save_tiny_mpnet
from typer.testing import CliRunner

from mmkd.evaluate.encoders import load_encoder
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.build import build
from mmkd.train.cli import app
from mmkd.train.config import TrainConfig
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store
from mmkd_core.students import create_student, load_student, save_student
from mmkd_core.students.base import resolve_blocks
from mmkd_core.students.text import TextStudentConfig, encoder_layers

TEXTS = ["the cat sat on the mat", "a dog ran far", "hi", "a man is eating food on the mat"]
LAYERS = 4
LETTERS = [*"abcdefghijklmnopqrstuvwxyz", "Ġ"]
# model type -> (encoder class name, config overrides beyond the shared widths)
ARCHS = {
    "bert": ("BertModel", {}),
    "roberta": ("RobertaModel", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}),
    "data2vec-text": ("Data2VecTextModel", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    "distilbert": ("DistilBertModel", {"pad_token_id": 0}),
    "mpnet": ("MPNetModel", {"pad_token_id": 1}),
}


def _tokenizer(model_type: str, root: Path):
    """A tiny tokenizer of the architecture's own kind (WordPiece for BERT, DistilBERT and MPNet, byte-level
    BPE over letters for the RoBERTa family)."""
    from transformers import BertTokenizer, DistilBertTokenizer, MPNetTokenizer, RobertaTokenizer

    root.mkdir(parents=True, exist_ok=True)
    if model_type in ("roberta", "data2vec-text"):
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *LETTERS])}
        (root / "vocab.json").write_text(json.dumps(vocab))
        (root / "merges.txt").write_text("#version: 0.2\n")
        return RobertaTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    if model_type == "mpnet":
        tokens = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", *WORDS, "<mask>"]
        return MPNetTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    cls = DistilBertTokenizer if model_type == "distilbert" else BertTokenizer
    return cls(vocab_file=str(root / "vocab.txt"))


@cache
def tiny(model_type: str):
    """``(model, tokenizer)``: a random 4-layer, 32-wide encoder of ``model_type`` in eval mode, every parameter
    moved off its init (layer norms and MPNet's relative bias too, so a parameter left uncopied shows)."""
    import tempfile

    from transformers import AutoConfig, AutoModel

    tokenizer = _tokenizer(model_type, Path(tempfile.mkdtemp()))
    extra = dict(ARCHS[model_type][1])
    widths = (
        {"dim": 32, "n_layers": LAYERS, "n_heads": 2, "hidden_dim": 64}
        if model_type == "distilbert"
        else {"hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "intermediate_size": 64}
    )
    offset = extra["pad_token_id"] + 1 if model_type in ("roberta", "data2vec-text", "mpnet") else 0
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), max_position_embeddings=40 + offset, **widths, **extra
    )
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert type(model).__name__ == ARCHS[model_type][0]
    return model.eval(), tokenizer


def _batch(model_type: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
    _, tokenizer = tiny(model_type)
    enc = tokenizer(TEXTS, padding="longest", truncation=bool(max_length), max_length=max_length, return_tensors="pt")
    assert not enc["attention_mask"].all()  # padding is part of what is compared
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _cut(model_type: str, depth: int, blocks, **kw):
    model, _ = tiny(model_type)
    return create_student("text", init="pretrained", init_from=model, depth=depth, init_blocks=blocks, **kw).eval()


@pytest.mark.parametrize("model_type", list(ARCHS))
@settings(max_examples=4, deadline=None)
@given(depth=st.integers(1, LAYERS))
def test_first_blocks_compute_the_init_models_hidden_states(model_type, depth):
    model, _ = tiny(model_type)
    student = _cut(model_type, depth, "first")
    assert type(student.bert) is type(model) and student.init_info["blocks"] == list(range(depth))
    batch = _batch(model_type)
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True).hidden_states
        got = student(**batch)
    valid = batch["attention_mask"].bool()
    assert len(got.hidden_states) == depth
    for i, g in enumerate(got.hidden_states):
        torch.testing.assert_close(g[valid], want[i + 1][valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.last_hidden_state[valid], want[depth][valid], atol=1e-6, rtol=0)


BLOCKS = st.one_of(
    st.sampled_from(["first", "last", "ends", "spread"]),
    st.integers(1, LAYERS).flatmap(lambda d: st.lists(st.integers(0, LAYERS - 1), min_size=d, max_size=d)),
)


@pytest.mark.parametrize("model_type", list(ARCHS))
@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, LAYERS), blocks=BLOCKS)
def test_a_cut_copies_the_chosen_blocks_and_every_other_parameter(model_type, depth, blocks):
    depth = len(blocks) if isinstance(blocks, list) else depth
    model, _ = tiny(model_type)
    student = _cut(model_type, depth, blocks)
    chosen = resolve_blocks("text", blocks, depth, LAYERS)
    assert student.init_info["blocks"] == chosen
    prefix, layers = encoder_layers(model)
    own_prefix, own_layers = encoder_layers(student.bert)
    assert own_prefix == prefix and len(own_layers) == depth
    for i, j in enumerate(chosen):
        want = layers[j].state_dict()
        for key, value in own_layers[i].state_dict().items():
            assert torch.equal(value, want[key]), f"layer {i} <- {j}: {key}"
    src = model.state_dict()
    others = {k: v for k, v in student.bert.state_dict().items() if not k.startswith(prefix + ".")}
    assert others and all(torch.equal(v, src[k]) for k, v in others.items())
    if model_type == "mpnet":
        assert "encoder.relative_attention_bias.weight" in others


def test_mpnet_keeps_its_relative_position_bias():
    model, _ = tiny("mpnet")
    student = _cut("mpnet", 2, "last")
    bias = student.bert.encoder.relative_attention_bias.weight
    assert torch.equal(bias, model.encoder.relative_attention_bias.weight)
    # the bias is shared by all layers and computed in the encoder: a cut without it would not be the model's
    batch = _batch("mpnet")
    with torch.no_grad():
        before = student(**batch).last_hidden_state
        bias.add_(torch.randn_like(bias))  # a constant would cancel in the softmax
        after = student(**batch).last_hidden_state
    assert (before - after).abs().max() > 1e-2


def test_a_shorter_position_table_is_cut_from_the_init_models():
    model, _ = tiny("roberta")
    student = _cut("roberta", 2, "first", max_position=12)
    table = student.bert.embeddings.position_embeddings.weight
    assert table.shape[0] == 12 + 2 and torch.equal(table, model.embeddings.position_embeddings.weight[:14])
    with pytest.raises(MmkdError, match="max_position=50 is longer than the init model's position table"):
        _cut("roberta", 2, "first", max_position=50)


def test_the_architecture_rebuilds_the_same_student():
    """The config records the architecture: a student built from it alone (as load_student and --resume do) is
    the same class with the same parameter shapes."""
    from mmkd_core.students.text import TextStudent

    for model_type in ARCHS:
        student = _cut(model_type, 2, "ends")
        config = json.loads(json.dumps(student.describe()["config"]))  # as mmkd_student.json holds it
        again = TextStudent(TextStudentConfig(**config))
        assert type(again.bert) is type(student.bert)
        a, b = again.state_dict(), student.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_settings_an_architecture_has_no_place_for_are_refused():
    arch = {"model_type": "distilbert", "dim": 32, "n_heads": 2, "hidden_dim": 64, "vocab_size": 40}
    with pytest.raises(MmkdError, match="type_vocab_size=1: a distilbert encoder has no such setting"):
        TextStudentConfig(architecture=arch, hidden_size=32, num_heads=2, type_vocab_size=1).transformers_config()
    with pytest.raises(MmkdError, match="transformers cannot build it"):
        TextStudentConfig(architecture={"model_type": "no-such-model"}).transformers_config()
    with pytest.raises(MmkdError, match="model_type"):
        TextStudentConfig(architecture={"hidden_size": 32})


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_export_loads_natively_and_gives_the_trained_embedding(tmp_path, model_type):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, tokenizer = tiny(model_type)
    student = _cut(model_type, 2, "spread", pooled_dim=24, target_dim=40)
    with torch.no_grad():
        for p in student.heads.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_student(student, tmp_path, tokenizer=tokenizer, max_seq_length=16)
    batch = _batch(model_type, max_length=16)  # as sentence-transformers and mmkd-eval cut the long texts
    with torch.no_grad():
        out = student(**batch)
    valid = batch["attention_mask"].bool()

    encoder = AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(encoder) is type(model)
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    torch.testing.assert_close(hidden[valid], out.last_hidden_state[valid], atol=1e-5, rtol=0)

    ours = SentenceTransformer(str(tmp_path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, F.normalize(out.pooled, dim=-1).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, load_encoder(str(tmp_path)).encode_text(TEXTS), atol=1e-5, rtol=0)

    again = load_student(tmp_path)
    assert type(again.bert) is type(model)
    with torch.no_grad():
        back = again(**batch)
    torch.testing.assert_close(back.pooled, out.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.tokens, out.tokens, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- mmkd-train on an MPNet store


@pytest.fixture(scope="module")
def mpnet_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mpnet")
    weights = save_tiny_mpnet(root / "all-mpnet-base-v2")
    rng = np.random.default_rng(0)
    (root / "s.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(24)) + "\n"
    )
    out = root / "t.zarr"
    extract(
        ExtractConfig(
            teacher="mpnet-base",
            weights=str(weights),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=out,
            dtype="float32",
            chunk_size=4,
            shard_size=8,
        ),
        show_progress=False,
    )
    return out


def test_mmkd_train_cuts_an_mpnet_student_whose_export_sentence_transformers_loads(tmp_path, mpnet_store):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, MPNetModel

    args = ["--targets", str(mpnet_store), "--init", "teacher", "--depth", "2", "--steps", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--ckpt-every", "1", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    record = json.loads((run / "config.json").read_text())["student"]
    assert record["config"]["architecture"]["model_type"] == "mpnet" and record["init"]["blocks"] == [0, 1]
    exported = run / "student"
    assert type(AutoModel.from_pretrained(str(exported))) is MPNetModel
    student = load_student(exported)
    tokenizer = SentenceTransformer(str(exported), device="cpu").tokenizer
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        pooled = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooled
    ours = SentenceTransformer(str(exported), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, F.normalize(pooled, dim=-1).numpy(), atol=1e-5, rtol=0)

    # the training checkpoint holds the MPNet student's parameters, its relative bias among them
    from safetensors.torch import load_file

    ckpt = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert "bert.encoder.relative_attention_bias.weight" in ckpt
    resumed = CliRunner().invoke(app, ["--targets", str(mpnet_store), "--run-dir", str(run), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output


def test_a_random_student_of_an_mpnet_store_is_an_mpnet(tmp_path, mpnet_store):
    from transformers import MPNetModel

    cfg = TrainConfig(targets=mpnet_store, init="random", depth=1, run_dir=tmp_path / "run", progress=False)
    student = build(cfg, open_store(mpnet_store)).student
    assert type(student.bert) is MPNetModel
    assert student.init_info == {"init": "random"}
    assert student.config.hidden_size == 32 and student.config.vocab_size == 20 and student.config.max_position == 64
