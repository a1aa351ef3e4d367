"""Students cut from another pretrained model than the store's teacher: a tiny random MPNet teacher's text store
(48 wide, MPNet tokenizer) and a tiny random BERT init model (32 wide, its own WordPiece vocabulary), through
``mmkd-train --init minilm-l6 --init-weights DIR``.

The student is the init model's BertModel at its width, reads the store's source texts through its own
tokenizer, learns the whole-sentence targets through a linear projection to the teacher's width, and exports as
Transformer -> Pooling -> Dense(32 -> 48) -> Normalize."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, save_tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train import recipe as recipe_module
from mmkd.train.build import build
from mmkd.train.cli import app
from mmkd.train.config import TrainConfig
from mmkd_core.dataset import StoreDataset
from mmkd_core.store import open_store
from mmkd_core.students import load_student
from mmkd_core.students.export import StudentTokenizer
from mmkd_core.students.kinds.cross import tokenizer_mismatch

TEACHER_WIDTH, STUDENT_WIDTH = 48, 32
SENTENCES = ["the cat sat on the mat", "a big red fox jumps over the lazy dog", "hi"]


def save_wide_mpnet(root: Path) -> Path:
    """A tiny random MPNet (48 wide) with its own tokenizer (words in reverse order, so no word has the id the
    tiny BERT gives it) and sentence-transformers mean pooling."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    root.mkdir(parents=True, exist_ok=True)
    words = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", *reversed(WORDS), "<mask>"]
    tokenizer = MPNetTokenizer(vocab={t: i for i, t in enumerate(words)})
    tokenizer.save_pretrained(str(root))
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(words),
        hidden_size=TEACHER_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    MPNetModel(config).save_pretrained(str(root))
    return sentence_transformers_dir(root, TEACHER_WIDTH, 32)


def sentence_transformers_dir(root: Path, width: int, max_seq_length: int) -> Path:
    """Make a saved transformers model a sentence-transformers directory with mean pooling, as the real ones are."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": width, "pooling_mode_mean_tokens": True}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (root / "sentence_bert_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "s.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    # the student's length is its own: 40 tokens (the store's teacher reads 32, the position table has 64)
    return sentence_transformers_dir(save_tiny_bert(tmp_path_factory.mktemp("bert"), layers=4), STUDENT_WIDTH, 40)


def _extract(teacher: str, weights: Path, corpus: Path, out: Path) -> Path:
    extract(
        ExtractConfig(
            teacher=teacher,
            weights=str(weights),
            dataset="text",
            data_root=str(corpus),
            out=out,
            dtype="float32",
            chunk_size=8,
            shard_size=16,
            batch_size=8,
        ),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("mpnet")
    return _extract("mpnet-base", save_wide_mpnet(root / "teacher"), corpus, root / "t.zarr")


def _args(store: Path, run_dir: Path, bert_dir: Path, *extra: str) -> list[str]:
    init = ["--init", "minilm-l6", "--init-weights", str(bert_dir)]
    base = ["--targets", str(store), "--depth", "2", "--steps", "3", "--batch-size", "8", "--lr", "1e-3"]
    return [*base, *init, "--run-dir", str(run_dir), "--quiet", *extra]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, store, bert_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = CliRunner().invoke(app, _args(store, run_dir, bert_dir))
    assert result.exit_code == 0, result.output
    return run_dir


def _epochs(dataset: StoreDataset):
    while True:  # each pass is the next epoch
        yield from dataset


def _texts(corpus: Path) -> list[str]:
    return [s for line in corpus.read_text().splitlines() if (s := line.strip())]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.sampled_from([4, 8, 16]), workers=st.sampled_from([0, 2]))
def test_student_reads_its_own_tokens_of_the_right_samples_in_order(
    tmp_path_factory, store, bert_dir, corpus, batch_size, workers
):
    """Every batch the student saw holds, row by row, its own tokenizer's ids of the source sentence the row's
    target belongs to, in the store's global order; the stored (MPNet) ids are never what it reads."""
    from transformers import AutoTokenizer

    seen: list[dict[str, torch.Tensor]] = []
    real = recipe_module.loss_inputs

    def spy(built, model, batch, device):
        seen.append({k: batch[k].clone() for k in ("index", "input_ids", "attention_mask", "pooled")})
        return real(built, model, batch, device)

    run_dir = tmp_path_factory.mktemp("spy") / "run"
    extra = ["--batch-size", str(batch_size), "--workers", str(workers), "--steps", "4"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_module, "loss_inputs", spy)
        result = CliRunner().invoke(app, _args(store, run_dir, bert_dir, *extra))
    assert result.exit_code == 0, result.output
    assert len(seen) == 4
    own = StudentTokenizer(AutoTokenizer.from_pretrained(str(bert_dir)), 40)
    texts = _texts(corpus)
    reader = open_store(store)
    stored_ids = reader.group["input_ids"][:]
    # the order the store's loader gives for these settings (contrastive KD: full batches only)
    plain = StoreDataset(store, batch_size, seed=0, remainder="drop", by_length=True)
    expected = [b["index"] for b in itertools.islice(_epochs(plain), 4)]
    for batch, index in zip(seen, expected, strict=True):
        assert torch.equal(batch["index"], index)
        for row, i in enumerate(batch["index"].tolist()):
            want = own([texts[i]])["input_ids"][0]
            got = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            assert torch.equal(got, want), (i, got, want)
            length = int(reader.group["lengths"][i])
            assert not torch.equal(got, torch.from_numpy(stored_ids[i, :length].astype(np.int64)))
            # the target is the store's own row of sample i
            torch.testing.assert_close(batch["pooled"][row], torch.from_numpy(reader.group["pooled"][i, 0]))


def test_the_student_is_the_init_models_architecture_with_a_learned_projection(tmp_path, run, store, bert_dir):
    cfg = json.loads((run / "config.json").read_text())
    config = cfg["student"]["config"]
    assert config["hidden_size"] == STUDENT_WIDTH and config["depth"] == 2 and config["pooled_dim"] == TEACHER_WIDTH
    assert config["pooled_head"] == "linear" and config["token_pred"] == "none"
    assert cfg["student"]["init"]["init"] == "pretrained" and cfg["student"]["init"]["blocks"] == [
        0,
        3,
    ]  # the text default, ends
    assert cfg["loss"] == {"pooled_cosine": 1.0, "contrastive_kd": 1.0}
    # the projection is a trained linear map from the student's width to the teacher's
    trained = load_student(run / "student").heads.pooled_head
    train_cfg = TrainConfig(
        targets=store, depth=2, init="minilm-l6", init_weights=str(bert_dir), run_dir=tmp_path / "r", progress=False
    )
    torch.manual_seed(0)
    start = build(train_cfg.resolved("text"), open_store(store)).student.heads.pooled_head
    assert trained.weight.shape == (TEACHER_WIDTH, STUDENT_WIDTH) and start.weight.requires_grad
    assert not torch.allclose(trained.weight, start.weight)


def test_the_export_encodes_in_the_teachers_space(run, bert_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from mmkd.evaluate.encoders import load_encoder

    directory = run / "student"
    dense = json.loads((directory / "2_Dense" / "config.json").read_text())
    assert (dense["in_features"], dense["out_features"], dense["bias"]) == (STUDENT_WIDTH, TEACHER_WIDTH, True)
    assert dense["activation_function"] == "torch.nn.modules.linear.Identity"
    assert type(AutoModel.from_pretrained(str(directory))).__name__ == "BertModel"
    # its own tokenizer, and its own length (40 tokens, not the MPNet store's 32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(bert_dir)).get_vocab()
    model = SentenceTransformer(str(directory), device="cpu")
    assert model.max_seq_length == 40
    encoded = torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True))
    assert encoded.shape == (len(SENTENCES), TEACHER_WIDTH)
    # the round trip: load_student gives the trained weights exactly, and its pooled output is the export's
    student = load_student(directory)
    trained = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    state = student.state_dict()
    assert trained.keys() == state.keys() and all(torch.equal(trained[k], state[k]) for k in trained)
    with torch.inference_mode():
        pooled = student(**StudentTokenizer(tokenizer, 40)(SENTENCES)).pooled
    torch.testing.assert_close(encoded, F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)
    # mmkd-eval's encoder embeds the same way
    ours = load_encoder(str(run)).encode_text(SENTENCES)
    torch.testing.assert_close(F.normalize(torch.as_tensor(ours), dim=-1), encoded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["token_mse=1,pooled_cosine=1", "d2v=1", "cls_mse=1"])
def test_token_losses_are_refused_in_one_line(tmp_path, store, bert_dir, loss):
    result = CliRunner().invoke(app, _args(store, tmp_path / "run", bert_dir, "--loss", loss))
    line = _one_error_line(result)
    term = "token_mse" if loss != "cls_mse=1" else "cls_mse"
    assert f"--loss {term}" in line and "MPNetTokenizer" in line and "BertTokenizer" in line
    assert "whole-sentence" in line


def test_a_changed_or_missing_source_dataset_is_refused_in_one_line(tmp_path, store, bert_dir, corpus):
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus.read_text().replace("cat", "dog"))
    line = _one_error_line(CliRunner().invoke(app, _args(store, tmp_path / "a", bert_dir, "--data-root", str(changed))))
    assert "--init minilm-l6" in line and "source texts" in line and "dataset.fingerprint" in line
    missing = tmp_path / "moved" / "s.txt"
    line = _one_error_line(CliRunner().invoke(app, _args(store, tmp_path / "b", bert_dir, "--data-root", str(missing))))
    assert "--init minilm-l6" in line and str(missing) in line


def test_a_moved_dataset_given_with_data_root_trains(tmp_path, store, bert_dir, corpus):
    moved = tmp_path / "elsewhere" / "s.txt"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)
    result = CliRunner().invoke(app, _args(store, tmp_path / "run", bert_dir, "--data-root", str(moved)))
    assert result.exit_code == 0, result.output


def test_the_mismatch_is_said_in_one_log_line(tmp_path, store, bert_dir, caplog):
    cfg = TrainConfig(
        targets=store, depth=2, init="minilm-l6", init_weights=str(bert_dir), run_dir=tmp_path / "r", progress=False
    )
    with caplog.at_level(logging.INFO, logger="mmkd_core.students.kinds.cross"):
        built = build(cfg.resolved("text"), open_store(store))
    lines = [r.getMessage() for r in caplog.records if r.name == "mmkd_core.students.kinds.cross"]
    assert len(lines) == 1 and "MPNetTokenizer" in lines[0] and "BertTokenizer" in lines[0], lines
    assert built.whole_sample_only and "retokenize" in built.loader_options and built.max_seq_length == 40


def test_the_same_tokenizer_reads_the_stored_ids(tmp_path, bert_dir, corpus, caplog):
    """An init model whose tokenizer is the store's (here: the store's own teacher directory under another
    registered name) keeps reading the stored ids, with every loss term open to it."""
    store = _extract("bert", bert_dir, corpus, tmp_path / "bert.zarr")
    cfg = TrainConfig(
        targets=store, depth=2, init="minilm-l6", init_weights=str(bert_dir), run_dir=tmp_path / "r", progress=False
    )
    with caplog.at_level(logging.INFO, logger="mmkd_core.students.kinds.cross"):
        built = build(cfg.resolved("text"), open_store(store))
    assert not [r for r in caplog.records if r.name == "mmkd_core.students.kinds.cross"]
    assert built.source is None and built.loader_options == {} and built.whole_sample_only == ""
    result = CliRunner().invoke(app, _args(store, tmp_path / "run", bert_dir, "--loss", "token_mse=1,pooled_cosine=1"))
    assert result.exit_code == 0, result.output


def test_a_caption_store_refuses_another_tokenizer_in_one_line(tmp_path, bert_dir):
    """Caption and pair stores keep the captions' ids only: a text tower with another tokenizer is refused."""
    teacher = save_wide_mpnet(tmp_path / "teacher")
    out = tmp_path / "captions.zarr"
    extract(
        ExtractConfig(
            teacher="mpnet-base",
            weights=str(teacher),
            dataset="shapes",
            dataset_options={"count": 8, "resolution": 32},
            out=out,
            dtype="float32",
            chunk_size=4,
            shard_size=8,
            batch_size=8,
        ),
        show_progress=False,
    )
    line = _one_error_line(CliRunner().invoke(app, _args(out, tmp_path / "run", bert_dir)))
    assert "--init minilm-l6" in line and "MPNetTokenizer" in line and "BertTokenizer" in line


def test_tokenizer_mismatch_compares_class_vocabulary_and_files():
    base = {"tokenizer": "BertTokenizerFast", "extra": {"vocab_size": 30522, "files_sha256": "ab" * 32}}
    assert tokenizer_mismatch(base, base) is None
    other_files = {**base, "extra": {**base["extra"], "files_sha256": "cd" * 32}}
    mine, theirs = tokenizer_mismatch(other_files, base)
    assert "files sha256 cdcdcdcdcdcd" in mine and "files sha256 abababababab" in theirs
    mpnet = {"tokenizer": "MPNetTokenizerFast", "extra": {"vocab_size": 30527, "files_sha256": "ef" * 32}}
    assert tokenizer_mismatch(base, mpnet) == ("BertTokenizerFast, vocab 30522", "MPNetTokenizerFast, vocab 30527")


def test_a_run_on_its_own_tokens_resumes_exactly(tmp_path, store, bert_dir, monkeypatch):
    from mmkd.train.loop import train
    from mmkd.train.recipe import TrainRecipe
    from mmkd_core.errors import MmkdError

    def cfg(run_dir, **kw):
        return TrainConfig(
            targets=store,
            depth=2,
            init="minilm-l6",
            init_weights=str(bert_dir),
            batch_size=8,
            steps=4,
            ckpt_every=2,
            lr=1e-3,
            run_dir=run_dir,
            progress=False,
            **kw,
        )

    full = train(cfg(tmp_path / "a"))
    real = TrainRecipe.save_checkpoint

    def crash_after_first(recipe):
        real(recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRecipe, "save_checkpoint", crash_after_first)
    with pytest.raises(MmkdError, match="--resume"):
        train(cfg(tmp_path / "b"))
    monkeypatch.setattr(TrainRecipe, "save_checkpoint", real)
    resumed = train(cfg(tmp_path / "b", resume=True))
    assert resumed.losses == full.losses[2:]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
