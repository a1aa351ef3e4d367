"""--task agreement and its metric: cosine to a reference model's embeddings and nearest-neighbour agreement."""

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmkd.evaluate.cli import app
from mmkd_core.errors import MmkdError
from mmkd_core.metrics import embedding_agreement


@settings(max_examples=25, deadline=None)
@given(n=st.integers(12, 80), dim=st.integers(2, 24), block=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_rotated_and_rescaled_embeddings_agree_fully(n, dim, block, seed):
    """Cosines between texts survive a rotation and per-row scaling, so every neighbour agrees; the cosine to
    the reference is that of the rotation, row by row."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    model = (ref @ q) * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    out = embedding_agreement(model, ref, ks=(1, 10), block=block)
    assert out["nn_agree"] == 1.0 and out["nn10_overlap"] == 1.0
    cos = torch.nn.functional.cosine_similarity(model, ref, dim=1)
    assert out["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert out["cosine_p05"] <= out["cosine_mean"] + 1e-6
    assert embedding_agreement(ref, ref, block=block)["cosine_mean"] == pytest.approx(1.0, abs=1e-6)


def test_known_answer_excludes_each_text_itself():
    reference = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # nearest others: 1, 0, 1
    model = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]])  # nearest others: 2, 2, 1
    out = embedding_agreement(model, reference, ks=(1,))
    assert out["nn_agree"] == pytest.approx(1 / 3)
    # model 0 = (1, 0) is nearest reference 0, model 1 = (0, 1) nearest reference 2, model 2 nearest reference 2
    assert out["own_nearest"] == pytest.approx(2 / 3)
    assert out["cosine_mean"] == pytest.approx(np.mean([1.0, 0.1 / np.hypot(0.9, 0.1), 0.9 / np.hypot(0.1, 0.9)]))


def test_neighbour_overlap_known_answer():
    # on a circle each point's 2 nearest others are its two neighbours; a model that lists the points in the
    # reverse order keeps every neighbour pair while its embeddings point elsewhere
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False) + 0.1 * np.arange(12) ** 1.5 / 12
    ref = np.stack([np.cos(angles), np.sin(angles)], 1)
    out = embedding_agreement(ref[::-1].copy(), ref, ks=(1, 2))
    assert out["nn2_overlap"] == 1.0
    assert out["cosine_mean"] == pytest.approx(np.mean(np.cos(angles[::-1] - angles)), abs=1e-6)
    shifted = embedding_agreement(np.roll(ref, 3, axis=0), ref, ks=(1, 2))  # row i now holds point i-3
    assert shifted["nn2_overlap"] == 1.0 and shifted["cosine_mean"] < 0.5 and shifted["own_nearest"] == 0.0
    assert embedding_agreement(ref, ref, ks=(1, 2), block=5)["own_nearest"] == 1.0


def test_different_spaces_and_too_few_texts_are_refused():
    with pytest.raises(MmkdError, match="same space"):
        embedding_agreement(np.ones((20, 4)), np.ones((20, 8)))
    with pytest.raises(MmkdError, match="give more than 10"):
        embedding_agreement(np.eye(5), np.eye(5))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    words = "red blue green circle square star top left bottom right small large".split()
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, 5)) for _ in range(40)) + "\n")
    return path


def _agreement(args):
    result = CliRunner().invoke(app, ["--task", "agreement", "--json", "--quiet", *args])
    return result


def test_cli_model_against_itself_and_another(bert_dir, sentences, tmp_path):
    base = ["--model", "bert", "--weights", str(bert_dir), "--dataset", "text", "--data-root", str(sentences)]
    same = _agreement([*base, "--teacher", "bert", "--teacher-weights", str(bert_dir), "--limit", "30"])
    assert same.exit_code == 0, same.output
    out = json.loads(same.stdout)
    assert out["agreement/text/train/nn_agree"] == 1.0
    assert out["agreement/text/train/cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert "mean" not in out  # agreement numbers are statistics, not scores averaged into the headline
    other = save_tiny_bert(tmp_path / "other", layers=3)  # one more random layer: another space
    differ = _agreement([*base, "--teacher", "bert", "--teacher-weights", str(other)])
    assert differ.exit_code == 0, differ.output
    assert json.loads(differ.stdout)["agreement/text/train/cosine_mean"] < 0.99


def test_cli_without_reference_is_one_line(bert_dir, sentences):
    result = _agreement(["--model", "bert", "--weights", str(bert_dir), "--data-root", str(sentences)])
    assert result.exit_code == 2 and "--teacher" in result.output
    assert len(result.output.strip().splitlines()) == 1


def _tiny_student(bert_dir, directory, seed):
    from transformers import BertTokenizer

    from mmkd_core.students import create_student, save_student

    tokenizer = BertTokenizer.from_pretrained(str(bert_dir))
    torch.manual_seed(seed)
    student = create_student(
        "text", depth=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=len(tokenizer), max_position=32
    )
    return save_student(student.eval(), directory, tokenizer=tokenizer)


def test_the_table_script_embeds_the_teacher_once_and_reports_each_model(bert_dir, sentences, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    a, b = _tiny_student(bert_dir, tmp_path / "a", 0), _tiny_student(bert_dir, tmp_path / "b", 1)
    script = Path(__file__).parents[1] / "scripts" / "agreement_table.py"
    args = [sys.executable, str(script), str(a), str(b), "--teacher", str(a), "--texts", str(sentences)]
    res = subprocess.run([*args, "--limit", "30"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["model"] for r in rows] == [str(a), str(b)] and rows[0]["texts"] == 30
    assert rows[0]["cosine_mean"] == pytest.approx(1.0, abs=1e-5) and rows[0]["own_nearest"] == 1.0
    assert rows[1]["cosine_mean"] < 0.99
