import json

import numpy as np
import pytest
import torch
from conftest import WORDS, save_tiny_bert
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train
from mmkd_core.errors import MmkdError

TINY_STUDENT = {"num_heads": 2}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), layers=4)


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(96)]
    (root / "s.txt").write_text("\n".join(lines) + "\n")
    out = root / "t.zarr"
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert_dir),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=out,
            dtype="float32",
            chunk_size=8,
            shard_size=16,
        ),
        show_progress=False,
    )
    return out


def _cfg(tmp_path, store, **kw):
    base = dict(
        targets=store, depth=2, batch_size=16, steps=8, ckpt_every=4, run_dir=tmp_path / "run", progress=False, lr=1e-3
    )
    base.update(kw)
    return TrainConfig(**base)


def test_text_student_trains_and_exports_to_transformers(tmp_path, text_store, bert_dir):
    from transformers import AutoModel, AutoTokenizer

    result = train(_cfg(tmp_path, text_store, steps=12))
    assert result.steps == 12 and np.isfinite(result.losses).all()
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["loss"] == {"pooled_cosine": 1.0, "contrastive_kd": 1.0} and cfg["store"]["recipe"]["layers"] == [
        0,
        1,
        2,
        3,
    ]
    # the text default cuts the student from block 0 and the top ones ("ends", the best free truncation of both
    # real teachers measured): not the first two ([0, 1]), nor evenly spaced ones ([1, 3], "spread")
    assert cfg["student"]["init"]["blocks"] == [0, 3]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and {"pooled_cosine", "contrastive_kd", "lr"} <= set(rows[-1])
    # the export loads with transformers alone and computes what the student computes
    from mmkd_core.students import load_student

    student = load_student(run / "student")
    hf = AutoModel.from_pretrained(str(run / "student")).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "student"))
    enc = tok(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        ours = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).hidden_states[-1]
        theirs = hf(**enc).last_hidden_state
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly(tmp_path, text_store, monkeypatch):
    full = train(_cfg(tmp_path / "a", text_store))
    from mmkd.train.recipe import TrainRecipe

    real = TrainRecipe.save_checkpoint

    def crash_after_first(recipe):
        real(recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRecipe, "save_checkpoint", crash_after_first)
    with pytest.raises(MmkdError, match="--resume"):
        train(_cfg(tmp_path / "b", text_store))
    monkeypatch.setattr(TrainRecipe, "save_checkpoint", real)
    with pytest.raises(MmkdError, match="already holds a run"):
        train(_cfg(tmp_path / "b", text_store))
    resumed = train(_cfg(tmp_path / "b", text_store, resume=True))
    assert resumed.losses == full.losses[4:]
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_store_with_another_recipe(tmp_path, text_store, bert_dir):
    train(_cfg(tmp_path, text_store, steps=4))
    other = tmp_path / "other.zarr"
    src = json.loads((text_store / "zarr.json").read_text())["attributes"]["mmkd"]["dataset"]
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert_dir),
            dataset="text",
            data_root=str(text_store.parent / "s.txt"),
            out=other,
            dtype="float32",
            layers="last:2",
            chunk_size=8,
            shard_size=16,
        ),
        show_progress=False,
    )
    assert src["name"] == "text"
    with pytest.raises(MmkdError, match="recipe.layers"):
        train(_cfg(tmp_path, other, steps=8, resume=True))


def test_random_init_and_head_prediction(tmp_path, text_store):
    r = train(
        _cfg(tmp_path, text_store, init="random", token_pred="head", loss="token_mse=1,pooled_cosine=0.5", steps=4)
    )
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["student"]["init"] in ({}, None) or cfg["student"]["init"].get("init") != "pretrained"
    assert cfg["loss"] == {"token_mse": 1.0, "pooled_cosine": 0.5} and r.steps == 4


def test_cli_trains_and_reports_errors_in_one_line(tmp_path, text_store):
    from mmkd.train.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "--targets",
            str(text_store),
            "--depth",
            "1",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--run-dir",
            str(tmp_path / "cli"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "student" / "mmkd_student.json").exists()
    assert (tmp_path / "cli" / "training.png").read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, ["--targets", str(tmp_path / "missing.zarr"), "--quiet"])
    assert bad.exit_code == 2 and "missing.zarr" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["--targets", str(text_store), "--loss", "nope=1", "--run-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown term 'nope'" in bad.output


def test_embedded_default_path_multimodal(tmp_path, minilm):
    """mmkd-extract's default (MiniLM over shapes captions) then mmkd-train on it, at toy size."""
    from mmkd.extract.cli import app as extract_app
    from mmkd.train.cli import app as train_app

    runner = CliRunner()
    store = tmp_path / "mm.zarr"
    res = runner.invoke(extract_app, ["--dataset-option", "count=48", "--out", str(store)])
    assert res.exit_code == 0, res.output
    assert "bytes per sample" in res.output  # the summary (--quiet prints errors and warnings only)
    res = runner.invoke(
        train_app,
        [
            "--targets",
            str(store),
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--quiet",
            "--run-dir",
            str(tmp_path / "run"),
            "--student-option",
            "width=32",
            "--student-option",
            "num_heads=2",
            "--student-option",
            "text_num_heads=2",
            "--bank-size",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["student"]["kind"] == "multimodal" and cfg["loss"] == {"contrastive_kd": 1.0, "itc": 1.0}
    assert cfg["train"]["init"] == "random" and cfg["train"]["batch_size"] == 16 and cfg["train"]["bank_size"] == 20
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results) == {f"shapes/test/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(0 <= v <= 1 for v in results.values())
    assert "i2t_r1" in res.output and (tmp_path / "run" / "eval.png").exists()


def test_memory_bank_holds_store_targets(text_store):
    from mmkd.train.bank import memory_bank
    from mmkd_core.store import open_store

    reader = open_store(text_store)
    bank, index = memory_bank(reader, 20, seed=0, epoch=3)
    assert bank.shape == (20, 32) and len(set(index.tolist())) == 20
    pooled = reader.read(0, len(reader))["pooled"][:, 0]
    np.testing.assert_array_equal(bank.numpy(), pooled[index])
    assert not np.array_equal(index, memory_bank(reader, 20, seed=0, epoch=4)[1])


def test_student_cut_from_teacher_starts_with_its_pooled_embedding(minilm):
    from mmkd_core.students import create_student
    from mmkd_core.targets import masked_mean

    student = create_student(
        "text", depth=3, init="pretrained", init_from=minilm, pool="mean", target_dim=384, pooled_dim=384
    ).eval()
    enc = minilm.tokenize(["a red circle at the top left", "two words"])
    with torch.inference_mode():
        ours = student(**enc).pooled
        hs = minilm(**enc).hidden_states
    torch.testing.assert_close(ours, masked_mean(hs[2], enc["attention_mask"].bool()), atol=1e-5, rtol=1e-5)


def _automodel_mean(directory, texts):
    """What a user who loads the encoder alone computes: AutoModel, then the masked mean, normalised."""
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    enc = AutoTokenizer.from_pretrained(str(directory))(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = hf(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()


@pytest.mark.parametrize("pooled_head", ["identity", "linear"])
def test_identity_pooled_head_is_what_automodel_with_mean_pooling_gives(tmp_path, text_store, pooled_head):
    from sentence_transformers import SentenceTransformer

    texts = ["the cat sat on the mat", "a dog", "the red circle in the top left of the picture"]
    cfg = _cfg(
        tmp_path, text_store, steps=12, lr=2e-2, loss="pooled_cosine=1", student_options={"pooled_head": pooled_head}
    )
    train(cfg)
    student = tmp_path / "run" / "student"
    st = SentenceTransformer(str(student), device="cpu").encode(texts, convert_to_numpy=True)
    gap = float(np.abs(st - _automodel_mean(student, texts)).max())
    if pooled_head == "identity":  # the embedding trained is the encoder's mean-pooled output, through either door
        assert gap < 1e-5
    else:  # the trained projection is only in sentence-transformers' Dense layer
        assert gap > 0.01, "a trained linear head left the embedding unchanged: the identity case proves nothing"
