"""mmkd.app.options: one declaration per option gives the command, --config files, grids and resume checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmkd.app.cli import excerpt, guarded, one_line, read_config
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


# ------------------------------------------------------------------------ hostile files, library errors, signals


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        bomb.append(f"{name}: &{name} [*{'abcdefghi'[i]}, *{'abcdefghi'[i]}, *{'abcdefghi'[i]}, *{'abcdefghi'[i]}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    with pytest.raises(MmkdError) as e:
        read_config(path)
    assert "aliases" in str(e.value) and len(str(e.value)) < 200
    path.write_text("batch_size: 32\nname: plain\n")  # no alias: read as before
    assert read_config(path) == {"batch_size": 32, "name": "plain"}


def test_error_lines_quote_values_briefly():
    assert len(excerpt("x" * 10_000)) <= 80 and excerpt("short") == "'short'"
    assert len(one_line("error " + "y" * 50_000)) <= 600


def test_library_write_failures_are_one_line(capsys):
    class SafetensorError(Exception):
        pass

    @guarded
    def save(path="/runs/x/model.safetensors"):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              '"No space left on device" })')  # fmt: skip

    with pytest.raises(typer.Exit) as e:
        save()
    assert e.value.exit_code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "could not write /runs/x/model.safetensors: no space left on device (SafetensorError)" in err

    @guarded
    def other():
        raise RuntimeError("a bug, not a full disk")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        other()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_command_still_imports_is_one_line(sig):
    # the entry point's handlers are in place before the stage's imports (torch alone takes over a second)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import mmkd.app.entry as e, time; e._early_handlers(); print('ready', flush=True); "
         "import torch, transformers; time.sleep(30)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.strip() == "error: interrupted; run the same command again to continue"
