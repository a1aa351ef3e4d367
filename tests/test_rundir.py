"""Run directories are ours before anything is written: a folder of the user's files is refused and kept
intact, nothing is written through a link out of the run, one trainer writes a run, a store a trainer reads
is not replaced under it, and a checkpoint that cannot fit is refused before it is begun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_bert
from test_train_safety import _text_store
from typer.testing import CliRunner

from mmkd.extract.cli import app as extract_app
from mmkd.train.cli import app as train_app
from mmkd.train.rundir import LOCK, RECORD
from mmkd_core.store import lock_path, take_reader_lease


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    return _text_store(root, save_tiny_bert(root / "bert"), 24, 4)


def train(store: Path, run_dir: Path, *extra: str):
    args = ["--targets", str(store), "--run-dir", str(run_dir), "--steps", "2", "--batch-size", "8", "--quiet"]
    result = CliRunner().invoke(train_app, [*args, *extra])
    return result, " ".join(result.output.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_folder_of_user_files_is_refused_and_kept(tmp_path, store):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"learning_rate": 3}')
    (mine / "training.png").write_bytes(b"\x89PNG my plot")
    (mine / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = snapshot(mine)
    result, out = train(store, mine)
    assert result.exit_code == 2, out
    assert f"--run-dir {mine}: holds files that are not an mmkd run (config.json, metrics.jsonl, training.png)" in out
    assert snapshot(mine) == before


def test_a_new_run_is_recorded_and_continues(tmp_path, store):
    run = tmp_path / "run"
    result, out = train(store, run)
    assert result.exit_code == 0, out
    assert json.loads((run / RECORD).read_text())["kind"] == "mmkd-run" and not (run / LOCK).exists()
    result, out = train(store, run, "--resume")  # a run of ours: taken up again
    assert result.exit_code == 0, out


def test_links_out_of_the_run_are_not_written_through(tmp_path, store):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("theirs")
    run = tmp_path / "run"
    run.mkdir()
    (run / "student").symlink_to(outside, target_is_directory=True)
    result, out = train(store, run)
    assert result.exit_code == 2, out
    assert f"--run-dir {run}: student is a symbolic link ({outside})" in out
    assert snapshot(outside) == {"config.json": b"theirs"}


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, store, live_pid, caplog):
    run = tmp_path / "run"
    run.mkdir()
    host = socket.gethostname()
    (run / LOCK).write_text(json.dumps({"pid": live_pid, "host": host, "started": "now", "token": "x"}))
    result, out = train(store, run)
    assert result.exit_code == 2, out
    assert f"another mmkd-train (pid {live_pid} on {host}, since now) is writing this run" in out
    dead = 2**22 + 4321  # above pid_max: no such process
    (run / LOCK).write_text(json.dumps({"pid": dead, "host": host, "started": "then", "token": "y"}))
    result, out = train(store, run)
    assert result.exit_code == 0, out
    assert not (run / LOCK).exists()


def test_overwrite_waits_for_the_trainer_reading_the_store(tmp_path, store):
    lease = take_reader_lease(store)  # what a trainer holds while it reads the store
    try:
        result = CliRunner().invoke(
            extract_app, ["--out", str(store), "--overwrite", "--dataset-option", "count=4", "--quiet"]
        )
        out = " ".join(result.output.split())
        assert result.exit_code == 2, out
        assert f"--overwrite: {store} is being read by a trainer (pid {os.getpid()}" in out
        assert (store / "zarr.json").exists()
    finally:
        lease.release()
    assert not any(p.name.startswith(lock_path(store).name + ".reader") for p in store.parent.iterdir())


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_written(tmp_path, store, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    run = tmp_path / "run"
    result, out = train(store, run)
    assert result.exit_code == 2, out
    assert f"no space left for a checkpoint in {run}" in out and "--resume" in out
    assert not list((run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else True
