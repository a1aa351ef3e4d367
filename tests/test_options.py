"""mmkd.app.options: one declaration per option gives the command, --config files, grids and resume checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkd.app.options import (
    Extra,
    build_command,
    config_kwargs,
    differences,
    field_for,
    option,
    options_of,
)
from mmkd_core.errors import MmkdError

KINDS = ("auto", "text", "vit")


def _even(value: str) -> str:
    if int(value) % 2:
        raise MmkdError(f"--even {value}: must be even")
    return value


@dataclass
class ToyConfig:
    """Toy configuration."""

    targets: str = option(help="The store.", metavar="PATH")
    student: str = option("auto", help="Student kind.", choices=KINDS, noun="student kind")
    depth: int | None = option(None, help="Depth.")
    lr: float = option(1e-3, help="Peak learning rate.")
    student_options: dict = option(dict, flag="--student-option", keyvalue=True, help="Student option KEY=VALUE.")
    eval: list = option(list, repeat=True, metavar="TASK", help="Evaluate at the end.")
    freeze: bool = option(False, help="Freeze embeddings.")
    progress: bool = option(True, flag="--quiet", invert=True, help="No progress bar.")
    run_dir: Path | None = option(None, help="Output directory.")
    even: str = option("2", parser=_even, help="An even number.")
    hidden: tuple = option(tuple, cli=False)


def _app(seen: list) -> typer.Typer:
    app = typer.Typer()

    def run(cfg, extras, given):
        seen.append((cfg, extras, given))

    build_command(app, ToyConfig, run, extra=[Extra("verbose", option(False, help="Log what happens."))])
    return app


def _invoke(args: list[str]):
    seen: list = []
    result = CliRunner().invoke(_app(seen), args)
    return result, (seen[0] if seen else None)


def test_command_builds_the_config_from_its_fields():
    result, (cfg, extras, given) = _invoke(
        ["--targets", "s.zarr", "--student", "text", "--depth", "3", "--student-option", "width=64",
         "--eval", "a", "--eval", "b", "--freeze", "--quiet", "--verbose", "--run-dir", "runs/x"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert cfg == ToyConfig(
        targets="s.zarr", student="text", depth=3, student_options={"width": 64}, eval=["a", "b"], freeze=True,
        progress=False, run_dir=Path("runs/x"),
    )  # fmt: skip
    assert extras == {"verbose": True}
    assert given == {"targets", "student", "depth", "student_options", "eval", "freeze", "progress", "run_dir"}


def test_defaults_and_help_come_from_the_declaration():
    result, (cfg, _, given) = _invoke(["--targets", "s.zarr"])
    assert cfg == ToyConfig(targets="s.zarr") and given == {"targets"}
    out = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "400"}).output
    for text in ("--student-option", "Student option KEY=VALUE.", "--quiet", "No progress bar.", "--freeze",
                 "--no-freeze", "--config", "--verbose", "Peak learning rate."):  # fmt: skip
        assert text in out
    assert "--hidden" not in out and "--student-options" not in out and "--progress" not in out


def test_choices_and_parsers_are_one_line_errors():
    result, cfg = _invoke(["--targets", "s", "--student", "txt"])
    assert cfg is None and result.exit_code == 2
    assert "--student 'txt': unknown student kind, did you mean 'text'?" in " ".join(result.output.split())
    result, cfg = _invoke(["--targets", "s", "--even", "3"])
    assert cfg is None and "--even 3: must be even" in result.output


def test_config_file_keys_are_field_or_option_names(tmp_path):
    path = tmp_path / "c.json"
    # field names (a recorded run) and option names both read; progress: false is --quiet
    path.write_text(json.dumps({"targets": "f.zarr", "student_options": {"width": 8}, "progress": False, "lr": 0.5}))
    result, (cfg, _, given) = _invoke(["--config", str(path), "--lr", "0.25"])
    assert result.exit_code == 0, result.output
    assert cfg.targets == "f.zarr" and cfg.student_options == {"width": 8} and cfg.progress is False
    assert cfg.lr == 0.25 and {"targets", "student_options", "progress", "lr"} <= given
    path.write_text(json.dumps({"targets": "f.zarr", "quiet": True, "student-option": ["depth=2"]}))
    _, (cfg, _, _) = _invoke(["--config", str(path)])
    assert cfg.progress is False and cfg.student_options == {"depth": 2}
    path.write_text(json.dumps({"targets": "f.zarr", "studnet": "text"}))
    result, cfg = _invoke(["--config", str(path)])
    assert cfg is None and result.exit_code == 2 and "did you mean 'student'" in result.output


def test_grid_mappings_and_resume_comparison():
    kwargs = config_kwargs(ToyConfig, {"student-option": ["width=8"], "quiet": True, "eval": "a"}, "grid")
    assert kwargs == {"student_options": {"width": 8}, "progress": False, "eval": ["a"]}
    with pytest.raises(MmkdError, match="grid: unknown key 'lrr', did you mean 'lr'"):
        config_kwargs(ToyConfig, {"lrr": 1}, "grid")
    with pytest.raises(MmkdError, match="unknown student kind"):
        config_kwargs(ToyConfig, {"student": "vitt"}, "grid")
    assert field_for(ToyConfig, "--run-dir", "x") == ("run_dir", False)
    a, b = ToyConfig("s", run_dir=Path("r")), ToyConfig("s", run_dir="r", lr=2.0)  # a path and its string agree
    assert differences(a, b, options_of(ToyConfig)) == ["lr"]
