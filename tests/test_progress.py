"""Progress that a log file can read, and a bar that fits a narrow terminal."""

import json
import os
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, save_tiny_bert
from rich.console import Console

from mmkd.app import progress
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract


def test_plain_lines_when_not_a_terminal(monkeypatch):
    out = Console(file=open(os.devnull, "w"), record=True, width=200, force_terminal=False)
    monkeypatch.setattr(progress, "console", out)
    monkeypatch.setenv("MMKD_PROGRESS_SECONDS", "0")
    with progress.progress_bar("train text student", total=4, unit="steps", fields={"loss": "-"}) as advance:
        for i in range(4):
            advance(1, loss=f"{1 / (i + 1):.4f}")
    lines = out.export_text().splitlines()
    assert lines[0].startswith("train text student: 0/4 steps (0%)")
    assert "train text student: 2/4 steps (50%)" in lines[2] and "steps/s" in lines[2] and "loss 0.5000" in lines[2]
    assert "eta " in lines[2] and lines[-1].endswith(tuple("0123456789")) and "done in" in lines[-1]
    assert len(lines) == 6  # start, one per step with a zero interval, the end


def test_lines_are_spaced_by_the_interval(monkeypatch):
    out = Console(file=open(os.devnull, "w"), record=True, width=200, force_terminal=False)
    monkeypatch.setattr(progress, "console", out)
    monkeypatch.setenv("MMKD_PROGRESS_SECONDS", "3600")
    with progress.progress_bar("extract", total=100) as advance:
        for _ in range(100):
            advance(1)
    assert len(out.export_text().splitlines()) == 2  # the first and the last line only


def test_terminal_bar_fits_sixty_columns(monkeypatch):
    out = Console(file=open(os.devnull, "w"), record=True, width=60, force_terminal=True)
    monkeypatch.setattr(progress, "console", out)
    with progress.progress_bar(
        "train multimodal student", total=948, unit="steps", extra="loss {task.fields[loss]}", fields={"loss": "-"}
    ) as advance:
        advance(100, loss="0.1234")
    # the live display redraws in place: the recording holds each frame, one after another
    frames = ["train" + f for f in out.export_text().replace("\n", "").split("train") if f]
    assert "100/948" in frames[-1] and "loss 0.1234" in frames[-1]
    assert all(len(f.rstrip()) <= 60 for f in frames), frames


def test_foreign_bars_are_silenced(monkeypatch):
    import transformers

    transformers.utils.logging.enable_progress_bar()
    monkeypatch.setattr(progress, "console", Console(file=open(os.devnull, "w"), force_terminal=False))
    with progress.progress_bar("x", total=1):
        assert not transformers.utils.logging.is_progress_bar_enabled()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("p")
    bert = save_tiny_bert(root / "bert", layers=2)
    rng = np.random.default_rng(0)
    (root / "s.txt").write_text("\n".join(" ".join(rng.choice(WORDS, size=6)) for _ in range(40)) + "\n")
    extract(
        ExtractConfig(
            teacher="bert", weights=str(bert), dataset="text", data_root=str(root / "s.txt"), out=root / "t.zarr"
        ),
        show_progress=False,
    )
    return root / "t.zarr"


def test_training_into_a_log_file_prints_progress_lines_and_records_what_ran(tmp_path, store):
    """As under ``nohup mmkd-train … > log``: stderr and stdout are a file, not a terminal."""
    log = tmp_path / "log"
    cmd = [
        str(Path(sysconfig.get_path("scripts")) / "mmkd-train"),
        "--targets",
        str(store),
        "--depth",
        "1",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--run-dir",
        "run",
    ]
    with open(log, "w") as f:
        res = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            timeout=300,
            env={**os.environ, "MMKD_PROGRESS_SECONDS": "0"},
        )
    text = log.read_text()
    assert res.returncode == 0, text[-2000:]
    steps = [line for line in text.splitlines() if line.startswith("train text student: ")]
    assert len(steps) >= 7 and "6/6 steps (100%)" in steps[-1] and "loss " in steps[-2]
    assert "\r" not in text and "\x1b[" not in text  # plain lines, no bar redraws or colour codes
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["argv"][1:3] == ["--targets", str(store)]
    assert cfg["train"]["loss"] == "pooled_cosine=1,contrastive_kd=1" and cfg["train"]["eval"] == []
    assert Path(cfg["train"]["targets"]).is_absolute() and Path(cfg["train"]["run_dir"]).is_absolute()
    # the export reads as many tokens as the teacher did
    st = json.loads((tmp_path / "run" / "student" / "sentence_bert_config.json").read_text())
    assert st["max_seq_length"] == cfg["store"]["preprocess"]["max_length"]
