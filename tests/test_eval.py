"""mmkd-eval: encoders over tiny random teachers and students, each task on tiny data, the CLI contract."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert, save_tiny_clip
from typer.testing import CliRunner

from mmkd.evaluate import EvalConfig, run_evaluation
from mmkd.evaluate.cli import app
from mmkd.evaluate.encoders import Encoder, load_encoder
from mmkd.evaluate.tasks import (
    available_paraphrase_splits,
    eval_bias,
    eval_image_text,
    eval_linear_probe,
    eval_paraphrase,
    eval_paraphrase_many,
    eval_zero_shot,
)
from mmkd_core.errors import MmkdError
from mmkd_core.metrics import DEFAULT_GENDER_TERMS, DEFAULT_PROFESSIONS
from mmkd_core.students import create_student, save_student
from mmkd_core.teachers.base import ImagePreprocess

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran far",
    "the red circle",
    "a blue square at the top",
    "the green star in the center",
    "a cat and a dog",
]
PARAPHRASE_SCORES = ("s1_to_s2_r1", "s1_to_s2_r5", "s2_to_s1_r1", "s2_to_s1_r5")
SHAPES = {"count": 12, "resolution": 16}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(bert_dir))


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    """Train and dev files whose positive pairs are (s, s): any deterministic encoder has R@1 = 1."""
    root = tmp_path_factory.mktemp("mrpc")
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f"1\t{i}\t{i + 100}\t{s}\t{s}" for i, s in enumerate(SENTENCES)]
    rows.insert(2, "0\t50\t150\tthe cat sat on the mat\ta dog ran far")  # a negative pair is not evaluated
    (root / "msr_paraphrase_train.txt").write_text("\n".join([header, *rows]) + "\n")
    (root / "dev.tsv").write_text("\n".join([header, *rows[:4]]) + "\n")
    return root


@pytest.fixture(scope="module")
def text_student_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    student = create_student(
        "text", depth=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=len(tokenizer), max_position=32
    )
    return save_student(student.eval(), tmp_path_factory.mktemp("text_student"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def mm_run_dir(tmp_path_factory, tokenizer):
    """A training run directory: the multimodal student in student/."""
    torch.manual_seed(0)
    student = create_student(
        "multimodal",
        width=32,
        num_heads=2,
        img_size=16,
        patch_size=8,
        image_depth=1,
        text_depth=1,
        shared_depth=1,
        vocab_size=len(tokenizer),
        max_position=32,
    )
    run = tmp_path_factory.mktemp("run")
    preprocess = ImagePreprocess(size=16, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, crop_mode="squash")
    save_student(student.eval(), run / "student", tokenizer=tokenizer, preprocess=preprocess)
    return run


def _paraphrase_keys(splits):
    return {f"mrpc/{s}/{k}" for s in splits for k in PARAPHRASE_SCORES} | {"mean"}


def test_teacher_encoder_is_normalised_and_order_preserving(bert_dir):
    enc = load_encoder("bert", weights=str(bert_dir))
    assert enc.modalities == {"text"}
    texts = SENTENCES + SENTENCES[:2]
    emb = enc.encode_text(texts, batch_size=3)
    assert emb.shape == (len(texts), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # sorting and deduplication do not change any text's embedding
    one_by_one = np.concatenate([enc.encode_text([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5)
    with pytest.raises(MmkdError, match="embeds text only"):
        enc.encode_image([])


def test_paraphrase_known_answer(bert_dir, mrpc_dir):
    enc = load_encoder("bert", weights=str(bert_dir))
    assert available_paraphrase_splits("mrpc", mrpc_dir) == ["train", "dev"]
    out = eval_paraphrase(enc, "mrpc", str(mrpc_dir))
    assert set(out) == _paraphrase_keys(["train", "dev"])
    assert all(v == 1.0 for v in out.values())
    both = eval_paraphrase_many(enc, [("mrpc", str(mrpc_dir))], splits=["train"], limit=3)
    assert set(both) == _paraphrase_keys(["train"])


def test_paraphrase_missing_splits(bert_dir, tmp_path, mrpc_dir, caplog):
    (tmp_path / "msr_paraphrase_train.txt").write_text((mrpc_dir / "msr_paraphrase_train.txt").read_text())
    assert available_paraphrase_splits("mrpc", tmp_path) == ["train"]
    assert "no test split" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmkdError, match="holds none of"):
        available_paraphrase_splits("mrpc", (tmp_path / "empty").resolve())
    with pytest.raises(MmkdError, match="reads mrpc or qqp"):
        eval_paraphrase(load_encoder("bert", weights=str(bert_dir)), "shapes", str(tmp_path))


def test_cli_json_has_every_number(bert_dir, mrpc_dir, tmp_path):
    args = [
        "--model",
        "bert",
        "--weights",
        str(bert_dir),
        "--task",
        "paraphrase",
        "--dataset",
        "mrpc",
        "--data-root",
        str(mrpc_dir),
        "--json",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert set(out) == _paraphrase_keys(["train", "dev"]) and out["mean"] == 1.0
    record = json.loads((tmp_path / "eval-paraphrase.json").read_text())
    assert record["results"] == out and record["config"]["model"] == "bert"


def test_cli_bad_data_root_is_one_line(bert_dir, tmp_path):
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(
        app,
        ["--model", "bert", "--weights", str(bert_dir), "--task", "paraphrase", "--data-root", str(missing), "--quiet"],
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(missing) in result.output.replace("\n", "")


def test_text_student_through_its_directory(text_student_dir, mrpc_dir):
    enc = load_encoder(str(text_student_dir))
    assert enc.modalities == {"text"} and enc.run_dir is None
    out = eval_paraphrase(enc, "mrpc", str(mrpc_dir), splits=["train"])
    assert out["mean"] == 1.0
    with pytest.raises(MmkdError, match="teachers only"):
        load_encoder(str(text_student_dir), weights="x")


def test_multimodal_run_dir_image_text_and_zero_shot(mm_run_dir):
    enc = load_encoder(str(mm_run_dir))
    assert enc.modalities == {"text", "image"} and enc.run_dir == mm_run_dir
    assert enc.image_spec.size == 16 and enc.image_spec.crop_mode == "squash"
    it = eval_image_text(enc, "shapes", split="test", limit=8, dataset_options=SHAPES)
    assert set(it) == {f"shapes/test/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in it.values())
    assert it["shapes/test/i2t_r1"] <= it["shapes/test/i2t_r5"] <= it["shapes/test/i2t_r10"]
    zs = eval_zero_shot(enc, "shapes", split="test", templates=["a {} shape"], dataset_options=SHAPES)
    assert set(zs) == {"shapes/test/zero_shot_top1", "shapes/test/zero_shot_top5"}
    assert 0.0 <= zs["shapes/test/zero_shot_top1"] <= 1.0 and zs["shapes/test/zero_shot_top5"] == 1.0  # 5 classes
    lp = eval_linear_probe(enc, "shapes", limit=10, dataset_options=SHAPES, epochs=5)
    assert 0.0 <= lp["shapes/test/linear_probe_top1"] <= 1.0


def test_run_dir_is_the_default_output(mm_run_dir):
    report = run_evaluation(
        EvalConfig(model=str(mm_run_dir), tasks=["image-text"], limit=6, dataset_options=SHAPES, show_progress=False)
    )
    assert report.out_file == mm_run_dir / "eval-image-text.json" and report.out_file.is_file()
    scores = [v for k, v in report.results.items() if k != "mean"]
    assert report.results["mean"] == pytest.approx(np.mean(scores))


def test_text_only_model_refuses_image_tasks(bert_dir):
    enc = load_encoder("bert", weights=str(bert_dir))
    with pytest.raises(MmkdError, match="needs image embeddings"):
        eval_image_text(enc, "shapes", dataset_options=SHAPES)


def test_bias_against_a_teacher(bert_dir, text_student_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = eval_bias(load_encoder(str(text_student_dir)), load_encoder("bert", weights=str(bert_dir)), tmp_path)
    assert {"bias/doctor/diff", "bias/mean_abs_diff", "bias_teacher/nurse/diff", "bias/diff_correlation"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    # the summary numbers are those of the two tables it reports (student under bias/, teacher under bias_teacher/)
    student = np.array([out[f"bias/{p}/diff"] for p in DEFAULT_PROFESSIONS])
    teacher = np.array([out[f"bias_teacher/{p}/diff"] for p in DEFAULT_PROFESSIONS])
    assert student.std() > 0 and teacher.std() > 0 and not np.allclose(student, teacher)
    assert out["bias/diff_correlation"] == pytest.approx(np.corrcoef(teacher, student)[0, 1], abs=1e-9)
    assert out["bias/mean_abs_diff_teacher"] == pytest.approx(np.abs(teacher).mean(), abs=1e-9)
    assert out["bias/mean_abs_diff_student"] == out["bias/mean_abs_diff"] == pytest.approx(np.abs(student).mean())
    assert (tmp_path / "bias.png").stat().st_size > 0


class _LeaningEncoder(Encoder):
    """Gender terms on e0 (male) and e1 (female); profession k at unit norm with diff exactly 2·lean[k]."""

    modalities = frozenset({"text"})

    def __init__(self, leans):
        super().__init__()
        self.name, self.leans = "leaning", dict(zip(DEFAULT_PROFESSIONS, leans, strict=True))

    def encode_text(self, texts, batch_size=64):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            if t in DEFAULT_GENDER_TERMS["male"]:
                out[i, 0] = 1.0
            elif t in DEFAULT_GENDER_TERMS["female"]:
                out[i, 1] = 1.0
            else:  # (½ + l) e0 + (½ − l) e1 + c e_k with c making the norm 1: cos to e0 minus cos to e1 = 2l
                lean = self.leans[t]
                k = 2 + DEFAULT_PROFESSIONS.index(t)
                out[i, [0, 1, k]] = 0.5 + lean, 0.5 - lean, math.sqrt(0.5 - 2 * lean**2)
        return out


def test_bias_known_answer():
    leans = np.linspace(-0.3, 0.4, len(DEFAULT_PROFESSIONS))
    teacher, student = _LeaningEncoder(leans), _LeaningEncoder(-leans / 2)  # the student reverses and halves
    out = eval_bias(student, teacher)
    for p, lean in zip(DEFAULT_PROFESSIONS, leans, strict=True):
        assert out[f"bias_teacher/{p}/diff"] == pytest.approx(2 * lean, abs=1e-6)
        assert out[f"bias_teacher/{p}/male"] == pytest.approx(0.5 + lean, abs=1e-6)
        assert out[f"bias/{p}/diff"] == pytest.approx(-lean, abs=1e-6)
    assert out["bias/diff_correlation"] == pytest.approx(-1.0, abs=1e-6)
    assert out["bias/mean_abs_diff_teacher"] == pytest.approx(2 * np.abs(leans).mean(), abs=1e-6)
    assert out["bias/mean_abs_diff_student"] == pytest.approx(np.abs(leans).mean(), abs=1e-6)
    assert eval_bias(teacher, teacher)["bias/diff_correlation"] == pytest.approx(1.0, abs=1e-6)


def test_unknown_model_and_config_errors(tmp_path):
    with pytest.raises(MmkdError, match="not a registered teacher"):
        load_encoder("no-such-model")
    with pytest.raises(MmkdError, match="neither a training run"):
        load_encoder(str(tmp_path))
    with pytest.raises(MmkdError, match="--task 'nope'"):
        EvalConfig(model="bert", tasks=["nope"])
    with pytest.raises(MmkdError, match="one per dataset"):
        EvalConfig(model="bert", datasets=["mrpc", "qqp", "mrpc"], data_roots=["a", "b"])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_teacher_loads_both_towers(clip_dir):
    enc = load_encoder("clip", weights=str(clip_dir))
    assert enc.modalities == {"text", "image"} and enc.image_spec.size == 16
    assert enc.encode_image([], batch_size=4).shape[0] == 0
    out = eval_image_text(enc, "shapes", limit=6, dataset_options=SHAPES)
    assert set(out) == {f"shapes/test/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["shapes/test/t2i_r1"] <= out["shapes/test/t2i_r5"] <= out["shapes/test/t2i_r10"] == 1.0  # 6 images
    assert load_encoder("clip", weights=str(clip_dir), tower="vision").modalities == {"image"}
