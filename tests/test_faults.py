"""Faults a user meets: bad inputs, interrupts, kill -9, disk full. The whole suite is benchmarks/fault_suite.py
(slow); the default run checks the one-line errors in-process and one SIGTERM and one kill -9 for real."""

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import save_tiny_bert
from PIL import Image
from typer.testing import CliRunner

from mmkd.app.cli import guarded, one_line
from mmkd_core.errors import MmkdError

REPO = Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("fault_suite", REPO / "benchmarks" / "fault_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_suite", mod)
    spec.loader.exec_module(mod)
    return mod


fs = _suite()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fs.Workspace(tmp_path_factory.mktemp("faults"), quick=True)


@pytest.fixture(scope="module")
def beit(ws):
    return ws.beit


def _error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _extract(tmp_path, *args):
    from mmkd.extract.cli import app

    return CliRunner().invoke(
        app, ["--out", str(tmp_path / "s.zarr"), "--quiet", "--chunk-size", "2", "--shard-size", "4", *args]
    )


def _text_args(bert, root):
    return ["--teacher", "bert", "--weights", str(bert), "--dataset", "text", "--data-root", str(root)]


def _beit_args(beit):
    opts = [a for k, v in fs.TINY_BEIT.items() for a in ("--teacher-option", f"{k}={v}")]
    return ["--teacher", "beitv2", "--weights", str(beit), *opts]


def _nothing_valid(path: Path) -> bool:
    return fs.store_state(path) != "complete"


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("missing.txt", None, "missing.txt"),
        ("empty.txt", b"", "empty.txt"),
        ("blank.txt", b"\n  \n", "blank.txt"),
        ("latin1.txt", b"a cat\nthe dog\na caf\xe9\n", "latin1.txt:3"),
    ],
)
def test_bad_text_files(tmp_path, bert, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = _extract(tmp_path, *_text_args(bert, path))
    assert result.exit_code == 2
    assert needle in _error_line(result)
    assert _nothing_valid(tmp_path / "s.zarr")


@pytest.mark.parametrize(
    "layers,needle", [("12", "block 12"), ("-1", "'-1'"), ("last:0", "last:0"), ("garbage", "garbage"), ("0,0", "0,0")]
)
def test_bad_layers(tmp_path, bert, layers, needle):
    (tmp_path / "t.txt").write_text("a cat sat\nthe dog ran\n")
    result = _extract(tmp_path, *_text_args(bert, tmp_path / "t.txt"), "--layers", layers)
    line = _error_line(result)
    assert result.exit_code == 2 and "--layers" in line and needle in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "flag,value",
    [("--batch-size", "0"), ("--limit", "0"), ("--views", "0"), ("--shard-size", "3"), ("--chunk-size", "-1")],
)
def test_bad_extract_flags(tmp_path, bert, flag, value):
    (tmp_path / "t.txt").write_text("a cat sat\n")
    result = _extract(tmp_path, *_text_args(bert, tmp_path / "t.txt"), flag, value)
    assert result.exit_code == 2 and flag in _error_line(result)
    assert not (tmp_path / "s.zarr").exists()


def _folder(root: Path, broken: dict[str, bytes] | None = None, modes=("RGB",)) -> Path:
    return fs.make_folder(root, broken, modes)


@pytest.mark.parametrize("kind,workers", [("zero", 0), ("truncated", 0), ("truncated", 2)])
def test_bad_images_name_the_file(tmp_path, beit, kind, workers):
    good = fs._png_bytes()
    data = b"" if kind == "zero" else good[: len(good) // 2]
    root = _folder(tmp_path / "imgs", {"b/03.png": data})
    result = _extract(
        tmp_path, *_beit_args(beit), "--dataset", "imagefolder", "--data-root", str(root), "--workers", str(workers)
    )
    assert result.exit_code == 2
    assert "03.png" in _error_line(result)  # also through a DataLoader worker: its own message, one line
    assert _nothing_valid(tmp_path / "s.zarr")


def test_image_modes_are_converted(tmp_path, beit):
    from mmkd.data.files import open_rgb

    modes = ("CMYK", "RGBA", "L", "LA", "P", "1", "I;16", "RGB")
    root = _folder(tmp_path / "imgs", modes=modes)
    for p in sorted(root.rglob("*.*")):
        im = open_rgb(p)
        assert im.mode == "RGB" and im.size == (48, 40)
    # 16-bit greyscale is scaled to 8 bits, not clipped to white
    wide = np.asarray(open_rgb(next(p for p in sorted(root.rglob("*.png")) if Image.open(p).mode == "I;16")))
    assert wide.mean() < 200 and wide.min() < 50
    result = _extract(tmp_path, *_beit_args(beit), "--dataset", "imagefolder", "--data-root", str(root))
    assert result.exit_code == 0, result.output
    assert fs.store_state(tmp_path / "s.zarr") == "complete"


def test_captions_naming_a_missing_image(tmp_path, beit):
    (tmp_path / "one.png").write_bytes(fs._png_bytes())
    (tmp_path / "c.tsv").write_text("one.png\ta red circle\ngone.png\ta blue square\n")
    result = _extract(tmp_path, *_beit_args(beit), "--dataset", "captions", "--data-root", str(tmp_path / "c.tsv"))
    line = _error_line(result)
    assert result.exit_code == 2 and "c.tsv:2" in line and "gone.png" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("kind", ["magic", "truncated", "count"])
def test_bad_idx_files(tmp_path, beit, kind):
    root = fs.make_idx(
        tmp_path / "mnist",
        magic=b"\x00\x00\x08\x02" if kind == "magic" else None,
        cut=100 if kind == "truncated" else 0,
        n_labels=11 if kind == "count" else 12,
    )
    result = _extract(tmp_path, *_beit_args(beit), "--dataset", "mnist", "--data-root", str(root))
    assert result.exit_code == 2 and "idx" in _error_line(result) and str(root) in _error_line(result)
    assert not (tmp_path / "s.zarr").exists()


def test_train_refuses_what_is_not_a_finished_store(tmp_path, bert):
    from mmkd.extract.config import ExtractConfig
    from mmkd.extract.run import extract
    from mmkd.train.cli import app

    (tmp_path / "notastore").mkdir()
    (tmp_path / "t.txt").write_text("".join(f"a cat sat on the mat {i}\n" for i in range(12)))
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert),
            dataset="text",
            data_root=str(tmp_path / "t.txt"),
            out=tmp_path / "full.zarr",
            chunk_size=2,
            shard_size=4,
        ),
        show_progress=False,
    )
    fs.make_incomplete(tmp_path / "full.zarr", tmp_path / "half.zarr")
    for target, needle in [("notastore", "notastore"), ("missing.zarr", "missing.zarr"), ("half.zarr", "incomplete")]:
        run_dir = tmp_path / f"run-{target}"
        result = CliRunner().invoke(
            app, ["--targets", str(tmp_path / target), "--run-dir", str(run_dir), "--steps", "2", "--quiet"]
        )
        assert result.exit_code == 2 and needle in _error_line(result)
        assert not (run_dir / "student").exists()


# ---------------------------------------------------------------------------------------------------- guarded


def _guarded_app(body):
    app = typer.Typer(add_completion=False)

    @app.command()
    @guarded
    def main() -> None:
        body()

    return app


def test_sigterm_is_an_interrupt_with_exit_code_143():
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(_guarded_app(body), [])
    assert result.exit_code == 143, result.output
    assert "run the same command again to continue" in _error_line(result)
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_the_stage_message_is_kept_with_exit_code_130():
    def body():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise MmkdError("interrupted at step 4; continue with --resume --run-dir runs/x") from None

    result = CliRunner().invoke(_guarded_app(body), [])
    assert result.exit_code == 130
    assert "--resume --run-dir runs/x" in _error_line(result)


def test_a_signal_inside_a_finaliser_still_interrupts():
    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # handled while __del__ runs: raising there would be dropped
            time.sleep(0.01)

    def body():
        Finalised()
        time.sleep(5)
        raise AssertionError("the signal was lost")

    result = CliRunner().invoke(_guarded_app(body), [])
    assert result.exit_code == 130, result.output
    assert "Exception ignored" not in result.output
    assert "run the same command again" in _error_line(result)


def test_disk_full_names_the_path():
    def body():
        path = "/data/s.zarr/tokens/c/3/0/0/0"  # noqa: F841 - found in the failing frame, as zarr's _put has it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    result = CliRunner().invoke(_guarded_app(body), [])
    line = _error_line(result)
    assert result.exit_code == 1
    assert "/data/s.zarr/tokens/c/3/0/0/0" in line and "free space and run the same command again" in line


def test_worker_wrapped_error_becomes_its_own_line():
    wrapped = (
        "Caught MmkdError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\nmmkd_core.errors.MmkdError: cannot read image a.png: truncated\n'
    )
    assert one_line(wrapped) == "cannot read image a.png: truncated"
    assert one_line("two\nlines") == "two lines"


# ------------------------------------------------------------------------------------------- real processes


def _shards_done(out: Path, k: int):
    """True once k shards are marked done: the fault lands mid-store, whatever the machine's speed."""

    def check() -> bool:
        try:
            return sum(1 for _ in os.scandir(out / "shards_done" / "c")) >= k
        except FileNotFoundError:
            return False

    return check


def test_sigterm_during_extraction_says_how_to_continue(ws):
    d = ws.trial_dir("sigterm")
    out = d / "s.zarr"
    o = fs.run_faulted(
        ws.text_cmd(out, "--batch-size", "1"), d, marker=out.exists, sig=signal.SIGTERM, trigger=_shards_done(out, 3)
    )
    assert o.signalled
    assert fs.one_error_line(o, "run the same command again") is None, o.text[-2000:]
    assert o.rc == 143
    assert fs.store_state(out) != "complete"


def test_kill_9_during_extraction_then_rerun_equals_uninterrupted(ws):
    ref = ws.root / "ref.zarr"
    cmd_ref = ws.text_cmd(ref, "--batch-size", "1")
    assert fs.run(cmd_ref, ws.root).rc == 0
    d = ws.trial_dir("kill")
    out = d / "s.zarr"
    cmd = ws.text_cmd(out, "--batch-size", "1")
    o = fs.run_faulted(cmd, d, marker=out.exists, sig=signal.SIGKILL, group=True, trigger=_shards_done(out, 5))
    assert o.signalled and o.rc == -signal.SIGKILL
    assert fs.store_state(out) != "complete"
    o2, _ = fs.continue_extract(ws, cmd, d, out)
    assert o2.rc == 0, o2.text[-2000:]
    assert fs.store_diff(ref, out) is None


# ------------------------------------------------------------------------------------------------ the suite


@pytest.mark.slow
def test_fault_suite_every_row_whole(tmp_path):
    rows_file = tmp_path / "rows.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fault_suite.py"), "--trials", "10", "--json", str(rows_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    rows = json.loads(rows_file.read_text())
    lost = [r for r in rows if r["whole"] != r["trials"]]
    assert rows and not lost, p.stdout[-6000:]
    assert p.returncode == 0


# --------------------------------------------------------------------------------- the suite's fault moments


def test_moments_are_drawn_over_the_whole_run_and_spread_by_fifths(ws):
    import random

    ws.refs["fake"] = fs.Outcome([], 0, "", "", seconds=10.0)
    rng = random.Random(0)
    row = fs.Row("x")
    for _ in range(200):
        delay = ws.draw("fake", rng)
        assert 0 <= delay <= 10.0 and ws.moment == pytest.approx(delay / 10.0)
        row.moments.append(ws.moment)
    fifths = [int(n) for n in row.spread().split()]
    assert len(fifths) == 5 and sum(fifths) == 200 and min(fifths) > 20  # from start-up to the exit
    assert fs.Row("y", moments=[0.0, 0.19, 0.99, 1.0]).spread() == "2 0 0 0 2"
    assert fs.Row("z").spread() == ""


def test_the_suite_runs_without_pytest(tmp_path):
    """The suite imports neither pytest nor the tests' conftest: a row runs with both unimportable."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'conftest'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = [sys.argv[0], '--quick', '--keep', sys.argv[1], '--only', 'SIGTERM 0.3 s after mmkd-verify']\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "import fault_suite\n"
        "sys.exit(fault_suite.main(sys.argv[1:]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "SIGTERM 0.3 s after mmkd-verify" in p.stdout


@pytest.mark.parametrize("command", ["mmkd-train", "mmkd-verify"])
def test_signals_at_the_first_instant_are_one_line(ws, command):
    for sig in (signal.SIGINT, signal.SIGTERM):
        problem, _ = fs.trial_early_signal(ws, command, sig)
        if problem and "killed silently" in problem:
            # two shared cores can stall an interpreter's start past 0.3 s; a second try tells such a stall
            # from handlers installed too late
            problem, _ = fs.trial_early_signal(ws, command, sig)
        assert problem is None, problem


# -------------------------------------------------------------------------------------- hostile and damaged

_HOSTILE = {h[0]: h for h in fs.HOSTILE}
_QUICK_HOSTILE = ("storage.chunk_samples 0", "recipe null", "format_version 99", "dataset.num_samples 10**18")


@pytest.mark.parametrize(
    "name",
    [
        *_QUICK_HOSTILE,
        "a negative length",  # read with the lengths' 1..T check: one line naming the sample
        *[pytest.param(n, marks=pytest.mark.slow) for n in _HOSTILE if n not in (*_QUICK_HOSTILE, "a negative length")],
    ],
)
def test_hostile_attributes_are_refused_in_one_line(ws, name):
    problem, _ = fs.trial_hostile(ws, *_HOSTILE[name])
    assert problem is None, problem


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("flipped data bytes", marks=pytest.mark.slow),
        pytest.param("deleted shard file", marks=pytest.mark.slow),
        # the repair deletes a damaged shard's files first: zarr would read its index back to write into it
        pytest.param("flipped index bytes", marks=pytest.mark.slow),
        pytest.param("truncated shard file", marks=pytest.mark.slow),
    ],
)
def test_damaged_shards_are_refused_reported_and_repaired(ws, kind):
    import random

    problem, _ = fs.trial_damage(ws, kind, random.Random(1))
    assert problem is None, problem


# ------------------------------------------------------------------------------------------ run directories


def test_a_folder_of_user_files_is_kept(ws):
    problem, _ = fs.trial_user_folder(ws)
    assert problem is None, problem


@pytest.mark.slow
def test_a_student_link_is_not_followed(ws):
    problem, _ = fs.trial_student_link(ws)
    assert problem is None, problem


@pytest.mark.slow
def test_two_trainers_in_one_run(ws):
    import random

    problem, _ = fs.trial_two_trainers(ws, random.Random(0))
    assert problem is None, problem


@pytest.mark.slow
def test_disk_full_in_training_then_resume(ws):
    disk = fs.DiskFull(ws.root / "disk-train", shim=fs.TRAIN_SHIM)
    try:
        for budget in (0, 200_000):
            problem, _ = fs.trial_disk_full_train(ws, disk, budget)
            assert problem is None, problem
    finally:
        disk.close()


# -------------------------------------------------------------------------------- checkpoint boundaries


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_kill_exactly_at_a_checkpoint_then_resume(ws):
    """kill -9 the moment checkpoint 4 is renamed into place (its metrics row logged at that very step, the
    oldest checkpoint maybe not yet deleted): --resume ends with the uninterrupted run's weights and rows."""
    ref_run = ws.ref("train")
    d = ws.trial_dir("kill-at-checkpoint")
    run_dir = d / "run"
    cmd = ws.train_cmd(ws.ref("text"), run_dir)
    o = fs.run_faulted(
        cmd, d, lambda: True, sig=signal.SIGKILL, group=True, trigger=_step_dir(run_dir, 4).exists, trigger_timeout=120
    )
    assert o.signalled, o.text[-2000:]
    assert fs.latest_checkpoint(run_dir).name in ("step_00000004", "step_00000006")  # the kill lands within ms
    o2 = fs.run([*cmd, "--resume"], d)
    assert o2.rc == 0, o2.text[-2000:]
    assert fs.weights_diff(ref_run, run_dir) is None
    assert fs.metrics_diff(ref_run, run_dir) is None


def test_resume_with_a_killed_checkpoint_write_left_behind(ws):
    """A run killed while writing checkpoint 16 (after 14): its step_*.tmp leftovers, one holding half a
    model, are neither read nor kept; --resume from 14 ends with the uninterrupted run's weights and rows."""
    ref_run = ws.ref("train")
    last = ws.train_steps
    d = ws.trial_dir("tmp-leftovers")
    run_dir = d / "run"
    shutil.copytree(ref_run, run_dir)
    shutil.rmtree(run_dir / "student")
    shutil.rmtree(_step_dir(run_dir, last))
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= last - 2))
    for step in (last, last + 2):
        tmp = _step_dir(run_dir, step).with_name(f"step_{step:08d}.tmp")
        tmp.mkdir()
        half = (_step_dir(run_dir, last - 2) / "model.safetensors").read_bytes()
        (tmp / "model.safetensors").write_bytes(half[: len(half) // 2])
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
    assert fs.latest_checkpoint(run_dir).name == f"step_{last - 2:08d}"
    o = fs.run([*ws.train_cmd(ws.ref("text"), run_dir), "--resume"], d)
    assert o.rc == 0, o.text[-2000:]
    assert fs.weights_diff(ref_run, run_dir) is None
    assert fs.metrics_diff(ref_run, run_dir) is None
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
