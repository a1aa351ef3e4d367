"""--help teaches: choices come from the registries (help, completion and errors list the same names), every
command ends with examples, flags are --x/--no-x with no value type, and a near miss is one error line
that names the name meant."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mmkd.ablate.cli import app as ablate_app
from mmkd.app.cli import choice, did_you_mean
from mmkd.data import DATASETS, list_datasets
from mmkd.evaluate import TASKS
from mmkd.evaluate.cli import app as eval_app
from mmkd.extract.cli import app as extract_app
from mmkd.extract.config import AUTOCAST as EXTRACT_AUTOCAST
from mmkd.train.cli import app as train_app
from mmkd.train.config import AUTOCAST as TRAIN_AUTOCAST
from mmkd.train.config import STUDENT_CHOICES
from mmkd_core.errors import MmkdError
from mmkd_core.losses import LOSSES
from mmkd_core.quant import DTYPES
from mmkd_core.teachers import list_teachers

APPS = {"mmkd-extract": extract_app, "mmkd-train": train_app, "mmkd-eval": eval_app, "mmkd-ablate": ablate_app}


def _help(app) -> str:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(
    "app,names",
    [
        (extract_app, lambda: [*list_teachers(), *list_datasets(), *DTYPES, *EXTRACT_AUTOCAST]),
        (train_app, lambda: [*STUDENT_CHOICES, *LOSSES.names(), *TRAIN_AUTOCAST, *list_teachers()]),
        (eval_app, lambda: [*TASKS, *list_datasets(), *list_teachers()]),
    ],
    ids=["extract", "train", "eval"],
)
def test_help_lists_every_registered_name(app, names):
    text = _help(app)
    missing = [n for n in names() if n not in text]
    assert not missing, f"--help omits {missing}"


def test_extract_help_names_the_datasets_it_used_to_omit():
    text = _help(extract_app)
    assert "stl10" in text and "labelled-captions" in text


@pytest.mark.parametrize("prog", APPS)
def test_flags_have_no_value_type_and_can_be_switched_off(prog):
    text = _help(APPS[prog])
    assert "<bool>" not in text
    assert "--no-quiet" in text and "--no-verbose" in text


def test_every_boolean_can_be_set_both_ways():
    # a boolean set in a --config file must be reversible on the command line
    assert "--no-verify-views" in _help(train_app) and "--no-freeze-embeddings" in _help(train_app)
    assert "--no-layer-norm" in _help(extract_app) and "--no-pooled-only" in _help(extract_app)


@pytest.mark.parametrize("prog", APPS)
def test_help_ends_with_examples_of_the_command(prog):
    text = _help(APPS[prog])
    examples = text[text.index("Examples:") :]
    lines = [ln.strip() for ln in examples.splitlines() if ln.strip().startswith(prog)]
    assert len(lines) >= 3, examples


@pytest.mark.parametrize(
    "app,args,meant",
    [
        (extract_app, ["--dataset", "stl"], "'stl10'"),
        (extract_app, ["--teacher", "minilm"], "'minilm-l6'"),
        (extract_app, ["--dtype", "int9"], "'int8'"),
        (extract_app, ["--pool", "teacher-mean"], "'teacher_mean'"),
        (train_app, ["--targets", "s.zarr", "--loss", "token_mes=1"], "'token_mse'"),
        (train_app, ["--targets", "s.zarr", "--student", "multimodl"], "'multimodal'"),
        (train_app, ["--targets", "s.zarr", "--init", "data2vec-visoin"], "'data2vec-vision'"),
        (train_app, ["--targets", "s.zarr", "--eval", "retreival"], "'retrieval'"),
        (eval_app, ["--model", "minilm"], "'minilm-l6'"),
        (eval_app, ["--model", "bert", "--task", "paraphrase,zero-shoot"], "'zero-shot'"),
        (eval_app, ["--model", "bert", "--dataset", "mrcp"], "'mrpc'"),
    ],
)
def test_a_near_miss_is_one_line_naming_the_name_meant(app, args, meant):
    line = _error_line(CliRunner().invoke(app, args))
    assert f"did you mean {meant}?" in line and args[-1].split(",")[-1].split("=")[0] in line


def test_an_unknown_name_lists_the_known_ones():
    line = _error_line(CliRunner().invoke(extract_app, ["--dataset", "zzzz"]))
    assert "did you mean" not in line and all(n in line for n in list_datasets())


@pytest.mark.parametrize(
    "args,needle",
    [(["--views", "many"], "--views"), (["--datset", "shapes"], "--dataset"), (["--limit"], "--limit")],
)
def test_usage_mistakes_are_one_line(args, needle):
    line = _error_line(CliRunner().invoke(extract_app, args))
    assert needle in line


def test_aliases_are_accepted_and_passed_on_unchanged():
    parse = choice("--dataset", "dataset", DATASETS)
    assert parse("imagenet") == "imagenet" and parse("stl10") == "stl10"
    with pytest.raises(MmkdError, match="'stl'"):
        parse("stl")
    tasks = choice("--task", "task", TASKS, comma=True)
    assert tasks("paraphrase, bias") == "paraphrase, bias"


def test_did_you_mean_only_for_a_near_miss():
    assert did_you_mean("fashion_mnist", list_datasets()) == ", did you mean 'fashion-mnist'?"
    assert did_you_mean("imagenet-21k-winter", list_datasets()) == ""


@pytest.mark.parametrize(
    "app,option,incomplete,expected",
    [
        (extract_app, "dataset", "s", {"shapes", "stl10"}),
        (extract_app, "dtype", "", set(DTYPES)),
        (train_app, "student", "m", {"multimodal"}),
        (eval_app, "tasks", "", set(TASKS)),  # the parameter is the EvalConfig field behind --task
    ],
)
def test_completion_offers_the_registered_names(app, option, incomplete, expected):
    command = typer.main.get_command(app)
    ctx = command.make_context("prog", [], resilient_parsing=True)
    param = next(p for p in command.params if p.name == option)
    assert {c.value for c in param.shell_complete(ctx, incomplete)} == expected


def test_extract_help_loads_no_model_or_store_library():
    # the registries bring torch (their models' base classes); models, zarr and dask wait for a run
    code = (
        "import sys; from mmkd.extract.cli import app; "
        "print(sorted(m for m in ('transformers', 'timm', 'zarr', 'dask') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
