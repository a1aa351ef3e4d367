"""Numbers a user can get wrong are one line naming the option, before any work starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mmkd.extract.cli import app as extract_app
from mmkd.train.cli import app as train_app


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--lr", "0"], "--lr 0.0: must be positive"),
        (["--warmup", "-5"], "--warmup -5.0: must be 0 or more"),
        (["--epochs", "inf"], "--epochs inf: must be a finite number"),
        (["--grad-clip", "-1"], "--grad-clip -1.0: must be 0 or more"),
        (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    ],
)
def test_training_numbers(tmp_path, args, message):
    result = CliRunner().invoke(train_app, ["--targets", str(tmp_path / "s.zarr"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["-5", "1", "100000", "true", "'12'"])
def test_text_teacher_lengths(tmp_path, value):
    result = CliRunner().invoke(
        extract_app,
        ["--teacher-option", f"max_length={value}", "--dataset-option", "count=4", "--out", str(tmp_path / "s.zarr")],
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--teacher-option max_length=" in text and "reads from 2 to 256 tokens per text" in text
    assert "Traceback" not in result.output and not (tmp_path / "s.zarr").exists()
