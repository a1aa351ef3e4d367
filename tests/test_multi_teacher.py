"""A student trained against several teachers of one store (``mmkd-train --teachers``): a prediction head per
further teacher, each teacher's targets for the same rows, the weighted sum of each teacher's loss, logging,
resume, the export of every head (load_student, SentenceTransformer, mmkd-eval) and the refusals.

The store: a 2-block BERT of width 32 (the first teacher), a 3-block BERT of width 48 with the same tokenizer
(``wide``: token and pooled heads) and a 2-block BERT of width 32 with a letter-level vocabulary (``other``: its
tokens are not the student's, pooled head only), the last two added with ``mmkd-extract --add-teacher``."""

import json
import math
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

from mmkd.evaluate.cli import app as eval_app
from mmkd.evaluate.encoders import StudentEncoder, load_encoder
from mmkd.evaluate.tasks import eval_paraphrase
from mmkd.extract.cli import app as extract_app
from mmkd.train.cli import app as train_app
from mmkd.train.config import TrainConfig
from mmkd.train.recipe import TrainRecipe
from mmkd_core import store_loader
from mmkd_core.errors import MmkdError
from mmkd_core.losses import build_loss, contrastive_kd, pooled_cosine, teachers_loss
from mmkd_core.store import open_store
from mmkd_core.students import load_student
from mmkd_core.students.export.loading import teacher_directory
from mmkd_core.students.teacher_heads import with_teacher_head

N = 40
STORAGE = ["--chunk-size", "4", "--shard-size", "8", "--autocast", "none", "--quiet"]
TRAIN = ["--steps", "3", "--batch-size", "8", "--quiet"]
SENTENCES = ["the cat sat on the mat", "a red circle", "he runs over the lazy fox", "blue star at top left"]


def _bert(root: Path, hidden: int, layers: int, tokenizer_from: Path | None = None, vocab: list[str] | None = None):
    """A tiny random BERT: the tokenizer files of ``tokenizer_from`` (the same tokenizer, byte for byte), or
    a new one over ``vocab``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root.mkdir(parents=True)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if "token" in f.name or f.name == "vocab.txt":
                shutil.copy(f, root / f.name)
    else:
        (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]) + "\n")
        BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(str(root))
    size = len((root / "vocab.txt").read_text().split())
    torch.manual_seed(hidden + layers)
    config = BertConfig(
        vocab_size=size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(root))
    return root


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    first = save_tiny_bert(root / "bert", 2)
    wide = _bert(root / "wide", 48, 3, tokenizer_from=first)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    other = _bert(root / "other", 32, 2, vocab=[*letters, *(f"##{c}" for c in letters)])  # a word: its letters
    rng = np.random.default_rng(0)
    text = root / "s.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 10))) for _ in range(N)) + "\n")
    store = root / "t.zarr"
    data = ["--dataset", "text", "--data-root", str(text)]
    _ok(
        CliRunner().invoke(
            extract_app, ["--teacher", "bert", "--weights", str(first), *data, "--out", str(store), *STORAGE]
        )
    )
    for name, weights in (("wide", wide), ("other", other)):
        args = ["--add-teacher", "bert", "--weights", str(weights), "--teacher-name", name, "--out", str(store)]
        _ok(CliRunner().invoke(extract_app, [*args, *STORAGE]))
    assert open_store(store).teachers == ["bert", "other", "wide"]  # added ones by name
    return {"root": root, "store": store, "text": text}


def _train(work, run: str, *args: str):
    return CliRunner().invoke(
        train_app, ["--targets", str(work["store"]), "--run-dir", str(work["root"] / run), *TRAIN, *args]
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(work):
    """``--teachers bert,wide,other --teacher-weight wide=2`` for 3 steps through the CLI."""
    _ok(_train(work, "abc", "--teachers", "bert,wide,other", "--teacher-weight", "wide=2", "--log-every", "1"))
    return work["root"] / "abc"


# ------------------------------------------------------------------------------------------------- training


def test_every_teacher_is_logged_and_the_heads_have_its_widths(trained):
    rows = _metrics(trained)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for teacher in ("bert", "wide", "other"):
            assert {f"{teacher}/loss", f"{teacher}/pooled_cosine", f"{teacher}/contrastive_kd"} <= set(row)
        weighted = row["bert/loss"] + 2 * row["wide/loss"] + row["other/loss"]
        assert row["loss"] == pytest.approx(weighted, rel=1e-5)
    weights = load_file(str(sorted((trained / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert weights["teacher_heads.wide.pooled_head.weight"].shape == (48, 32)
    assert weights["teacher_heads.wide.token_head.weight"].shape == (48, 32)  # same tokenizer: a token head
    assert weights["teacher_heads.other.pooled_head.weight"].shape == (32, 32)
    assert not any(k.startswith("teacher_heads.other.token_head") for k in weights)  # another tokenizer: none
    record = json.loads((trained / "config.json").read_text())
    assert record["train"]["teachers"] == "bert,wide,other" and record["train"]["teacher_weights"] == {"wide": 2}


def _recipe(work, run: str, **kw) -> TrainRecipe:
    cfg = TrainConfig(targets=work["store"], run_dir=work["root"] / run, batch_size=8, steps=3, progress=False, **kw)
    recipe = TrainRecipe(cfg)
    recipe.setup()
    return recipe


def test_the_total_is_the_weighted_sum_of_each_teachers_loss(work):
    """On one batch, by hand: each teacher's loss from its own head and its own stored targets."""
    recipe = _recipe(work, "by-hand", teachers="bert,wide,other", teacher_weights={"wide": 2, "other": 0.5})
    try:
        from mmkd_core.loader import to_device

        batch = to_device(next(iter(recipe.loader)), "cpu")
        recipe.student.eval()  # no dropout: the same forward twice
        store = open_store(work["store"])
        rows = batch["index"].numpy()
        for name in ("wide", "other"):  # the loader's targets are that teacher's, for the batch's rows
            stored = np.stack([store.teacher(name).pooled(int(i)) for i in rows]).reshape(len(rows), -1)
            np.testing.assert_array_equal(batch[f"{name}/pooled"].numpy(), stored)
        total, terms = recipe.objective(recipe.student, batch)
        o = recipe.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        preds = {"bert": o.pooled, "wide": o.teachers["wide"][1], "other": o.teachers["other"][1]}
        targets = {"bert": batch["pooled"], "wide": batch["wide/pooled"], "other": batch["other/pooled"]}
        each = {t: pooled_cosine(preds[t], targets[t]) + contrastive_kd(preds[t], targets[t]) for t in preds}
        expected = each["bert"] + 2 * each["wide"] + 0.5 * each["other"]
        assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        assert terms["wide/loss"] == pytest.approx(float(each["wide"].detach()), rel=1e-6)
    finally:
        recipe.release()


@settings(max_examples=20, deadline=None)
@given(
    w=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), min_size=3, max_size=3).filter(any),
    seed=st.integers(0, 2**16),
)
def test_teachers_loss_is_the_weighted_sum(w, seed):
    g = torch.Generator().manual_seed(seed)
    loss = build_loss("pooled_mse=1,pooled_cosine=0.5")
    inputs = {
        f"t{i}": {
            "mask": None,
            "pooled": torch.randn(4, d, generator=g, requires_grad=True),
            "pooled_target": torch.randn(4, d, generator=g),
        }
        for i, d in enumerate((8, 16, 8))
    }
    weights = {f"t{i}": x for i, x in enumerate(w)}
    total, terms = teachers_loss(loss, inputs, weights)
    each = {t: float(loss(b)[0]) for t, b in inputs.items()}
    assert float(total) == pytest.approx(sum(weights[t] * each[t] for t in inputs), rel=1e-6)
    assert all(terms[f"{t}/loss"] == pytest.approx(each[t], rel=1e-6) for t in inputs)
    total.backward()
    for t, b in inputs.items():  # a teacher of weight 0 sends no gradient at all
        assert (b["pooled"].grad is None) == (weights[t] == 0)


def test_a_weight_of_zero_leaves_that_teachers_head_untouched(work):
    def heads(run: str, weight: str) -> dict:
        _ok(_train(work, run, "--teachers", "bert,wide", "--teacher-weight", f"wide={weight}", "--log-every", "1"))
        state = load_file(str(work["root"] / run / "checkpoints" / "step_00000003" / "model.safetensors"))
        return {k: v for k, v in state.items() if k.startswith("teacher_heads.wide.")}

    recipe = _recipe(work, "zero-init", teachers="bert,wide")  # the heads as the run starts them (same seed)
    start = {f"teacher_heads.{k}": v.detach().clone() for k, v in recipe.student.teacher_heads.state_dict().items()}
    recipe.release()
    zero, two = heads("zero", "0"), heads("two", "2")
    assert zero.keys() == start.keys() and start
    assert all(torch.equal(zero[k], start[k]) for k in start)
    assert not all(torch.equal(two[k], start[k]) for k in start)  # trained when its weight is not 0
    assert "wide/pooled_cosine" in _metrics(work["root"] / "zero")[-1]  # still logged


def test_resume_continues_exactly_and_other_teachers_are_another_run(work, trained):
    run = work["root"] / "resumed"
    _ok(
        _train(
            work,
            "resumed",
            "--teachers",
            "bert,wide,other",
            "--teacher-weight",
            "wide=2",
            "--log-every",
            "1",
            "--ckpt-every",
            "2",
        )
    )
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    shutil.rmtree(run / "student")
    _ok(CliRunner().invoke(train_app, ["--targets", str(work["store"]), "--run-dir", str(run), "--resume", "--quiet"]))
    a = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    b = load_file(str(trained / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == [
        {**r, "seconds": s["seconds"]} for r, s in zip(_metrics(trained), _metrics(run), strict=True)
    ]
    line = _error_line(
        CliRunner().invoke(
            train_app, ["--targets", str(work["store"]), "--run-dir", str(run), "--resume", "--teachers", "bert,wide"]
        )
    )
    assert "--teachers 'bert,wide' differs from this run's 'bert,wide,other'" in line


# --------------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(work):
    """Trained and exported through the library's recipe: (run directory, the trained student)."""
    recipe = _recipe(work, "export", teachers="bert,wide,other")
    try:
        recipe.train()
        recipe.export()
        return work["root"] / "export", recipe.student.eval()
    finally:
        recipe.release()


def test_every_head_is_exported_and_loads_as_trained(exported):
    from sentence_transformers import SentenceTransformer

    run, model = exported
    out = run / "student"
    enc = load_encoder(str(out))._tokenize(SENTENCES)
    with torch.no_grad():
        o = model(**enc)
    trained = {"bert": (o.tokens, o.pooled), **o.teachers}
    assert json.loads((out / "mmkd_student.json").read_text())["teachers"] == ["bert", "wide", "other"]
    for name, (tokens, pooled) in trained.items():
        directory = teacher_directory(out, name)
        assert directory == (out if name == "bert" else out / "teachers" / name)
        for loaded in (load_student(out, teacher=name), load_student(directory)):
            with torch.no_grad():
                lo = loaded(**enc)
            torch.testing.assert_close(lo.pooled, pooled, atol=1e-5, rtol=0)
            if tokens is None:
                assert lo.tokens is None
            else:
                torch.testing.assert_close(lo.tokens, tokens, atol=1e-5, rtol=0)
        st = SentenceTransformer(str(directory), device="cpu").encode(SENTENCES, convert_to_tensor=True)
        torch.testing.assert_close(st, F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)
        mmkd_eval = load_encoder(str(directory)).encode_text(SENTENCES)  # what mmkd-eval embeds
        np.testing.assert_allclose(mmkd_eval, F.normalize(pooled, dim=-1).numpy(), atol=1e-5)
    # the default directory is what a student of one teacher exports: AutoModel reads the shared encoder
    from transformers import AutoModel

    hidden = AutoModel.from_pretrained(str(out / "teachers" / "wide")).eval()(**enc).last_hidden_state
    torch.testing.assert_close(hidden, o.last_hidden_state, atol=1e-5, rtol=0)
    with pytest.raises(MmkdError, match="no heads for teacher 'nope'; it has heads for bert, wide, other"):
        load_student(out, teacher="nope")


def test_mmkd_eval_scores_each_head_as_the_trained_model(exported, tmp_path):
    run, model = exported
    rng = np.random.default_rng(1)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = []
    for i in range(12):
        a = list(rng.choice(WORDS, size=6))
        b = [w if rng.random() < 0.5 else str(rng.choice(WORDS)) for w in a]
        rows.append(f"1\t{i}\t{i + 100}\t{' '.join(a)}\t{' '.join(b)}")
    (tmp_path / "msr_paraphrase_train.txt").write_text("\n".join([header, *rows]) + "\n")
    scores = {}
    for name, spec in (("bert", run), ("wide", run / "student" / "teachers" / "wide")):
        args = ["--model", str(spec), "--task", "paraphrase", "--dataset", "mrpc", "--data-root", str(tmp_path)]
        result = _ok(
            CliRunner().invoke(
                eval_app, [*args, "--splits", "train", "--json", "--quiet", "--out", str(tmp_path / name)]
            )
        )
        scores[name] = json.loads(result.stdout)
        head = model if name == "bert" else with_teacher_head(model, name)
        directory = teacher_directory(run / "student", name)
        ours = eval_paraphrase(
            StudentEncoder(head, directory, load_encoder(str(directory)).tokenizer),
            "mrpc",
            str(tmp_path),
            splits=["train"],
        )
        assert scores[name] == pytest.approx(ours, abs=1e-6)
    assert scores["bert"] != scores["wide"]


# ------------------------------------------------------------------------------------------------ refusals

REFUSALS = {
    "an unknown teacher": (
        ["--teachers", "bert,nope"],
        "--teachers nope: ",
        "holds no such teacher (it holds bert, other, wide)",
    ),
    "a weight for a teacher not trained against": (
        ["--teachers", "bert,wide", "--teacher-weight", "other=1"],
        "--teacher-weight other=1: other is not a teacher this run trains against",
    ),
    "a weight beside the default teacher": (
        ["--teacher-weight", "wide=1"],
        "--teacher-weight wide=1: wide is not a teacher this run trains against (bert)",
    ),
    "a negative weight": (
        ["--teachers", "bert,wide", "--teacher-weight", "wide=-1"],
        "--teacher-weight wide=-1: a teacher's weight is a finite number, 0 or more",
    ),
    "a nan weight": (
        ["--teachers", "bert,wide", "--teacher-weight", "wide=NaN"],
        "--teacher-weight wide=nan: a teacher's weight is a finite number",
    ),
    "a word as weight": (["--teachers", "bert,wide", "--teacher-weight", "wide=heavy"], "--teacher-weight wide=heavy"),
    "every weight 0": (
        ["--teachers", "bert,wide", "--teacher-weight", "wide=0", "--teacher-weight", "bert=0"],
        "every teacher of --teachers bert,wide has weight 0",
    ),
    "a teacher named twice": (["--teachers", "bert,wide,bert"], "teacher bert is named twice"),
    "token terms toward another tokenizer": (
        ["--teachers", "bert,other", "--loss", "token_mse=1,pooled_cosine=1"],
        "--loss token_mse: teacher other's tokenizer (BertTokenizer",
        "is not the student's (BertTokenizer",
    ),
    "a memory bank": (
        ["--teachers", "bert,wide", "--bank-size", "8"],
        "--bank-size 8: the memory bank holds the first teacher's targets only",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line(work, case):
    args, *needles = REFUSALS[case]
    line = _error_line(_train(work, f"refused-{case.replace(' ', '-')}", *args))
    assert all(n in line for n in needles), line
    assert not (work["root"] / f"refused-{case.replace(' ', '-')}" / "checkpoints").exists()


def test_token_terms_train_toward_a_teacher_of_the_same_tokenizer(work):
    _ok(_train(work, "tokens", "--teachers", "bert,wide", "--loss", "token_mse=1,pooled_mse=1", "--log-every", "1"))
    row = _metrics(work["root"] / "tokens")[-1]
    assert math.isfinite(row["wide/token_mse"]) and math.isfinite(row["bert/token_mse"])


def test_the_first_listed_teacher_builds_the_student(work):
    """``--teachers wide,bert``: the student is cut from the 3-block, 48-wide teacher; bert gets a head."""
    recipe = _recipe(work, "wide-first", teachers="wide,bert")
    try:
        assert recipe.student.width == 48 and recipe.reader.teacher_name == "wide"
        assert recipe.student.teacher_heads["bert"].pooled_head.weight.shape == (32, 48)
    finally:
        recipe.release()


# -------------------------------------------------------------------------------------------------- loader


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 16), seed=st.integers(0, 1000), dtype=st.sampled_from(["stored", "float32"]))
def test_the_loader_reads_each_teachers_targets_for_the_same_rows(work, batch, seed, dtype):
    store = open_store(work["store"])
    loader = store_loader(
        work["store"], batch, seed=seed, targets=dtype, teachers={"wide": ("tokens", "pooled"), "other": "pooled"}
    )
    for b in loader:
        rows = b["index"].numpy()
        for name in ("wide", "other"):
            reader = store.teacher(name)
            expected = np.stack([reader.pooled(int(i)) for i in rows]).reshape(len(rows), -1).astype(np.float32)
            np.testing.assert_array_equal(b[f"{name}/pooled"].float().numpy(), expected)
        assert "other/tokens" not in b and b["wide/tokens"].shape[:2] == b["tokens"].shape[:2]
        # the same rows read as that teacher's own loader reads them (its tokens are the first's: the same order)
        alone = next(iter(store_loader(work["store"], batch, seed=seed, teacher="wide", targets="float32")))
        np.testing.assert_array_equal(alone["index"].numpy(), rows)
        for name in ("tokens", "pooled"):
            np.testing.assert_array_equal(alone[name].numpy(), b[f"wide/{name}"].float().numpy())
        break


def test_the_loader_refuses_tokens_of_another_tokenizer(work):
    with pytest.raises(MmkdError, match="tokens for teacher other.*read its pooled targets only"):
        for _ in store_loader(work["store"], 8, teachers=["other"]):
            pass
    with pytest.raises(MmkdError, match="no teacher 'nope'"):
        store_loader(work["store"], 8, teachers=["nope"])


# --------------------------------------------------------------------------------------------------- ablate


def _mrpc(directory: Path) -> Path:
    """MRPC's format, a train split whose pairs share about half their words (so students score apart)."""
    rng = np.random.default_rng(1)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = []
    for i in range(16):
        a = list(rng.choice(WORDS, size=6))
        b = [w if rng.random() < 0.5 else str(rng.choice(WORDS)) for w in a]
        rows.append(f"1\t{i}\t{i + 100}\t{' '.join(a)}\t{' '.join(b)}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "msr_paraphrase_train.txt").write_text("\n".join([header, *rows]) + "\n")
    return directory


def test_an_ablation_varies_the_teachers(work, tmp_path):
    from mmkd.ablate.cli import app as ablate_app

    mrpc = _mrpc(tmp_path / "mrpc")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"teachers": ["bert", "bert,wide"], "teacher-weight": ["wide=1", "wide=2"]}))
    base = ["--targets", str(work["store"]), "--eval", f"mrpc:{mrpc}", "--quiet"]
    train = ["--", "--steps", "2", "--batch-size", "8"]
    # a bad grid value is refused before anything runs: a weight for a teacher of no run, a name not in the store
    line = _error_line(
        CliRunner().invoke(ablate_app, [*base, "--out", str(tmp_path / "bad"), "--grid", str(grid), *train])
    )
    assert "--teacher-weight wide=1: wide is not a teacher this run trains against (--teachers bert)" in line
    line = _error_line(
        CliRunner().invoke(
            ablate_app, [*base, "--out", str(tmp_path / "bad"), "--vary", "teachers=bert|bert,nope", *train]
        )
    )
    assert "--teachers nope:" in line and not (tmp_path / "bad").exists()
    grid.write_text(json.dumps([{"teachers": ["bert"]}, {"teachers": ["bert,wide"], "teacher-weight": ["wide=2"]}]))
    out = tmp_path / "abl"
    _ok(CliRunner().invoke(ablate_app, [*base, "--out", str(out), "--grid", str(grid), *train]))
    runs = sorted(p.name for p in out.iterdir() if (p / "config.json").is_file())
    assert runs == ["teacher-weight=wide=2,teachers=bert+wide,seed=0", "teachers=bert,seed=0"], runs
    rows = _metrics(out / runs[0])
    assert "wide/pooled_cosine" in rows[-1] and (out / runs[0] / "student" / "teachers" / "wide").is_dir()
