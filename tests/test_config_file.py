"""--config FILE: a YAML or JSON file of option values for mmkd-extract and mmkd-train; the command line
overrides it, an unknown key is one error line naming the key and the file, and a run repeated from a
recorded run's config.json is the same run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import WORDS, save_tiny_bert
from typer.testing import CliRunner

from mmkd.app.cli import read_config
from mmkd.extract.cli import app as extract_app
from mmkd.train import cli as train_cli
from mmkd.train.cli import app as train_app
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store


def _yaml(path, text: str):
    path.write_text(text)
    return path


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), layers=2)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "s.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 10))) for _ in range(40)) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ reading


def test_yaml_and_json_give_the_same_mapping(tmp_path):
    y = _yaml(tmp_path / "c.yaml", "batch-size: 8\nstudent_option:\n  width: 64\neval: [retrieval]\n")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"batch-size": 8, "student_option": {"width": 64}, "eval": ["retrieval"]}))
    assert read_config(y) == read_config(j) == {"batch-size": 8, "student_option": {"width": 64}, "eval": ["retrieval"]}


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("bad.yaml", "lr: [1\n", "not valid YAML (line 2"),
        ("bad.json", '{"lr": 1e-3,}', "not valid JSON"),
        ("list.yaml", "- lr\n- 1\n", "expected a mapping"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, text, needle):
    path = _yaml(tmp_path / name, text)
    line = _error_line(CliRunner().invoke(train_app, ["--config", str(path)]))
    assert needle in line and str(path) in line


def test_a_missing_file_is_named(tmp_path):
    line = _error_line(CliRunner().invoke(extract_app, ["--config", str(tmp_path / "nowhere.yaml")]))
    assert "nowhere.yaml" in line and "no such file" in line


def test_yaml_without_pyyaml_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)
    with pytest.raises(MmkdError, match="pip install pyyaml"):
        read_config(_yaml(tmp_path / "c.yaml", "lr: 1\n"))
    (tmp_path / "c.json").write_text('{"lr": 1}')
    assert read_config(tmp_path / "c.json") == {"lr": 1}


@pytest.mark.parametrize("app", [extract_app, train_app], ids=["extract", "train"])
def test_an_unknown_key_names_the_key_and_the_file(tmp_path, app):
    path = _yaml(tmp_path / "run.yaml", "seed: 1\nbatch-sise: 8\n")
    line = _error_line(CliRunner().invoke(app, ["--config", str(path)]))
    assert "'batch-sise'" in line and str(path) in line and "did you mean 'batch_size'?" in line


def test_a_value_of_the_wrong_kind_names_the_file(tmp_path):
    path = _yaml(tmp_path / "run.yaml", "views: 2.5\n")
    line = _error_line(CliRunner().invoke(extract_app, ["--config", str(path)]))
    assert "--views" in line and str(path) in line
    path = _yaml(tmp_path / "run.yaml", "seed: [1, 2]\n")
    line = _error_line(CliRunner().invoke(extract_app, ["--config", str(path)]))
    assert "'seed' takes one value" in line


def test_registry_names_in_a_file_are_checked_like_flags(tmp_path):
    path = _yaml(tmp_path / "run.yaml", "dataset: stl\n")
    line = _error_line(CliRunner().invoke(extract_app, ["--config", str(path)]))
    assert "did you mean 'stl10'?" in line


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture
def captured(monkeypatch):
    """mmkd-train's parsed TrainConfig and given fields, without training."""
    calls = []
    monkeypatch.setattr(train_cli, "train", lambda cfg, given: calls.append((cfg, given)) or SimpleNamespace(rank=1))
    return calls


def _parsed(captured, args):
    captured.clear()
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    [(cfg, given)] = captured
    return cfg, given


FLAGS = (
    "--targets t.zarr --depth 2 --batch-size 8 --lr 0.002 --loss token_mse=1,pooled_mse=1 --student-option width=64 "
    '--student-option act="gelu" --loss-option temperature=0.05 --eval retrieval --freeze-embeddings --steps 7 '
    "--seed 3 --quiet --verify-views"
).split()
FILE = {
    "targets": "t.zarr", "depth": 2, "batch-size": 8, "lr": 0.002, "loss": "token_mse=1,pooled_mse=1",
    "student_option": {"width": 64, "act": "gelu"}, "loss-option": ["temperature=0.05"], "eval": "retrieval",
    "freeze_embeddings": True, "steps": 7, "seed": 3, "quiet": True, "verify-views": True,
}  # fmt: skip


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_train_config_from_a_file_equals_the_flags(tmp_path, captured, suffix):
    import yaml

    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(FILE) if suffix == ".json" else yaml.safe_dump(FILE))
    by_flags, given_flags = _parsed(captured, FLAGS)
    by_file, given_file = _parsed(captured, ["--config", str(path)])
    assert by_file == by_flags
    assert by_file.student_options == {"width": 64, "act": "gelu"} and by_file.progress is False
    # values from the file count as given: --resume refuses them when they differ from the recorded run
    assert given_file - {"config"} == given_flags


def test_the_command_line_overrides_the_file(tmp_path, captured):
    path = _yaml(tmp_path / "run.yaml", "targets: t.zarr\nlr: 0.001\nfreeze_embeddings: true\nquiet: true\n")
    cfg, given = _parsed(captured, ["--config", str(path), "--lr", "0.003", "--no-freeze-embeddings"])
    assert cfg.lr == 0.003 and cfg.freeze_embeddings is False and cfg.progress is False
    assert {"lr", "freeze_embeddings", "progress", "targets"} <= given and "seed" not in given


def test_nproc_comes_from_the_command_line_else_the_file(tmp_path):
    path = _yaml(tmp_path / "run.yaml", "targets: t.zarr\nnproc: 2\n")
    assert train_cli._nproc(["--config", str(path)]) == (2, ["--config", str(path)])
    assert train_cli._nproc([f"--config={path}", "--nproc", "3"]) == (3, [f"--config={path}"])
    record = tmp_path / "config.json"
    record.write_text(json.dumps({"train": {"targets": "t.zarr"}, "world_size": 4}))
    assert train_cli._nproc(["--config", str(record), "--seed", "1"])[0] == 4
    assert train_cli._nproc(["--seed", "1"]) == (None, ["--seed", "1"])  # one plain process
    assert train_cli._nproc(["--nproc", "1", "--seed", "1"]) == (1, ["--seed", "1"])  # one DDP rank under torchrun


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, bert_dir, sentences):
    out = tmp_path_factory.mktemp("store") / "t.zarr"
    args = ["--teacher", "bert", "--weights", str(bert_dir), "--dataset", "text", "--data-root", str(sentences)]
    result = CliRunner().invoke(extract_app, [*args, "--out", str(out), "--chunk-size", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, text_store):
    """A short run trained end to end from a YAML file, --steps overriding the file's."""
    root = tmp_path_factory.mktemp("runs")
    path = _yaml(
        root / "train.yaml",
        f"targets: {text_store}\nrun-dir: {root / 'a'}\ndepth: 1\nbatch_size: 8\nsteps: 50\nckpt_every: 1\n"
        "student_option: {num_heads: 2}\nquiet: true\n",
    )
    result = CliRunner().invoke(train_app, ["--config", str(path), "--steps", "2"])
    assert result.exit_code == 0, result.output
    return root / "a"


def test_a_short_run_trains_from_a_file(first_run):
    record = json.loads((first_run / "config.json").read_text())
    assert record["train"]["steps"] == 2 and record["train"]["depth"] == 1 and record["train"]["batch_size"] == 8
    assert record["train"]["student_options"] == {"num_heads": 2} and record["train"]["progress"] is False
    assert (first_run / "student").is_dir()


def test_a_recorded_run_repeated_from_its_config_is_the_same_run(tmp_path, first_run):
    again = tmp_path / "b"
    result = CliRunner().invoke(train_app, ["--config", str(first_run / "config.json"), "--run-dir", str(again)])
    assert result.exit_code == 0, result.output
    a, b = (json.loads((d / "config.json").read_text()) for d in (first_run, again))
    assert b["train"].pop("run_dir") == str(again.resolve())
    a["train"].pop("run_dir")
    for record in (a, b):
        record.pop("argv")
    assert b == a


def test_resume_refuses_a_file_value_that_differs_from_the_run(tmp_path, first_run):
    targets = json.loads((first_run / "config.json").read_text())["train"]["targets"]
    path = _yaml(tmp_path / "other.yaml", f"targets: {targets}\nlr: 0.05\n")
    line = _error_line(CliRunner().invoke(train_app, ["--config", str(path), "--run-dir", str(first_run), "--resume"]))
    assert "--resume: --lr 0.05 differs" in line


# --------------------------------------------------------------------------------------------- extraction


def test_extraction_from_a_file_equals_the_flags(tmp_path, bert_dir, sentences):
    flags = [
        "--teacher", "bert", "--weights", str(bert_dir), "--dataset", "text", "--data-root", str(sentences),
        "--layers", "last:1", "--no-layer-norm", "--dtype", "float32", "--chunk-size", "8", "--shard-size", "16",
        "--limit", "24", "--quiet",
    ]  # fmt: skip
    path = _yaml(
        tmp_path / "extract.yaml",
        f"teacher: bert\nweights: {bert_dir}\ndataset: text\ndata_root: {sentences}\nlayers: 'last:1'\n"
        "layer-norm: false\ndtype: float32\nchunk_size: 8\nshard-size: 16\nlimit: 24\nquiet: true\n",
    )
    runner = CliRunner()
    assert runner.invoke(extract_app, [*flags, "--out", str(tmp_path / "flags.zarr")]).exit_code == 0
    result = runner.invoke(extract_app, ["--config", str(path), "--out", str(tmp_path / "file.zarr")])
    assert result.exit_code == 0, result.output
    a, b = open_store(tmp_path / "flags.zarr"), open_store(tmp_path / "file.zarr")
    assert a.attrs["recipe"]["layer_norm"] is False and len(a) == 24
    assert a.attrs == b.attrs
    assert a.array_names() == b.array_names()
    for name in a.array_names():
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)


def test_extract_reads_its_config_field_names(tmp_path, captured_extract):
    path = _yaml(tmp_path / "extract.yaml", "dataset_options: {count: 12}\nteacher_options: {tower: text}\n")
    result = CliRunner().invoke(extract_app, ["--config", str(path), "--dataset-option", "seed=4"])
    assert result.exit_code == 0, result.output
    [cfg] = captured_extract
    # a repeatable option given on the command line replaces the file's list, as any other option does
    assert cfg.dataset_options == {"seed": 4} and cfg.teacher_options == {"tower": "text"}


@pytest.fixture
def captured_extract(monkeypatch):
    from mmkd.extract import run

    calls = []

    def fake(cfg, show_progress):
        calls.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(run, "extract", fake)
    return calls
