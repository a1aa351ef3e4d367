"""Fault suite: kill, interrupt, starve and mislead the CLIs, and count the trials in which nothing was lost.

Every command runs as a user would run it: the installed console scripts (`mmkd-extract`, `mmkd-train`) in
subprocesses with HF_HUB_OFFLINE=1, over tiny random teachers saved to disk (a 2-block BERT, a 2-block BEiT v2
checkpoint: --random-weights would differ from process to process) and small stores cut into many shards, so
a fault lands mid-store and a trial takes seconds. Prints ONE table: each row a fault, its trials, and how
many ended whole:

- kill -9 of mmkd-extract (text; images with 3 views) at random moments -> re-run -> every array bit-equal to
  an uninterrupted run's, and the killed store never reads as complete unless it already equals it;
- kill -9 of mmkd-train at random moments and inside checkpoint writes -> --resume -> the final student's
  weights bit-equal to an uninterrupted run's;
- disk full during extraction (a tmpfs filled with ballast when this user may mount one, else a shim that
  fails zarr's writes with ENOSPC past a byte budget) -> one error line -> space freed -> the same command
  finishes with the same arrays;
- SIGTERM and Ctrl-C (SIGINT) during each command -> one line saying how to continue, exit code 143/130 ->
  doing what it says finishes with the same result;
- bad inputs -> one error line naming the file or flag, no traceback, nothing written that looks valid
  (and images in CMYK/RGBA/grey/palette/16-bit modes are converted and work);
- stale stores: teacher weights, recipe, dtype, views, preprocessing, dataset content or limit changed
  between an extraction and its re-run or a resumed training -> refused, naming the field.

    HF_HUB_OFFLINE=1 python benchmarks/fault_suite.py --trials 10
    HF_HUB_OFFLINE=1 python benchmarks/fault_suite.py --quick          # one trial per row, smaller data

Exits 1 when any row lost something. ``--keep DIR`` keeps every trial's files there for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# the tiny BERT's vocabulary (tests/conftest.py) minus the special tokens: every sentence tokenizes fully
WORDS = (
    "a the cat dog sat on mat ran far red blue green circle square triangle star cross in at top left "
    "right center bottom and photo of is there are picture shows small big runs jumps over lazy fox"
).split()
CKPT_NAME = re.compile(r"step_\d+")
NOTES_PER_ROW = 3


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def script(name: str) -> str:
    """The console script beside this interpreter (not a version-manager shim, which adds a process)."""
    p = BIN / name
    return str(p) if p.exists() else (shutil.which(name) or name)


# ----------------------------------------------------------------------------------------------- processes


@dataclass
class Outcome:
    cmd: list[str]
    rc: int
    out: str
    err: str
    seconds: float
    signalled: bool = False  # our signal was sent while the process still ran
    window: float = 0.0  # seconds from the marker appearing to the exit

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip().startswith("error:")]

    def brief(self) -> str:
        lines = self.error_lines() or [ln for ln in self.text.strip().splitlines() if ln.strip()][-1:]
        return f"rc={self.rc}: {lines[0][:200] if lines else '(no output)'}"


def shell(cmd: list[str]) -> str:
    return " ".join(a if re.fullmatch(r"[\w./:=,+-]+", a) else repr(a) for a in cmd)


def run(cmd: list[str], cwd: Path, timeout: float = 600, extra_env: dict[str, str] | None = None) -> Outcome:
    start = time.perf_counter()
    p = subprocess.run(
        cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout
    )
    return Outcome(cmd, p.returncode, p.stdout, p.stderr, time.perf_counter() - start)


def run_faulted(
    cmd: list[str],
    cwd: Path,
    marker: Callable[[], bool],
    *,
    delay: float = 0.0,
    sig: int | None = None,
    group: bool = False,
    trigger: Callable[[], bool] | None = None,
    trigger_timeout: float = 30.0,
    timeout: float = 600,
    done: Callable[[], bool] | None = None,
) -> Outcome:
    """Start ``cmd``; once ``marker()`` holds (the work has begun), wait ``delay`` seconds — or, with
    ``trigger``, until ``trigger()`` holds — then send ``sig`` (to the process group with ``group``, as
    a terminal's Ctrl-C or the OOM killer's kill -9 of a whole job would; else to the process, as
    ``kill PID``). ``sig=None`` only measures: ``window`` is the time from the marker to ``done()`` (the
    result is written; the interpreter's teardown after it takes a second or two), else to the exit."""
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    start = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=out_f, stderr=err_f, text=True, start_new_session=True)
    signalled, t_marker = False, None
    try:
        while p.poll() is None and not marker():
            time.sleep(0.003)
        t_marker = time.perf_counter()
        t_done = None
        if sig is None and done is not None:
            while p.poll() is None and not done():
                time.sleep(0.003)
            t_done = time.perf_counter() if p.poll() is None else None
        if sig is not None and p.poll() is None:
            if trigger is not None:
                while p.poll() is None and not trigger() and time.perf_counter() - t_marker < trigger_timeout:
                    time.sleep(0.0005)
            else:
                while p.poll() is None and time.perf_counter() - t_marker < delay:
                    time.sleep(0.001)
            if p.poll() is None:
                (os.killpg if group else os.kill)(p.pid, sig)
                signalled = True
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise RuntimeError(f"hung after signal {sig}: {shell(cmd)}") from None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # DataLoader workers a kill -9 of the parent left behind
    end = time.perf_counter()
    out_f.seek(0)
    err_f.seek(0)
    return Outcome(
        cmd, p.returncode, out_f.read(), err_f.read(), end - start, signalled, (t_done or end) - (t_marker or end)
    )


def one_error_line(o: Outcome, *needles: str) -> str | None:
    """None when ``o`` failed with exactly one ``error:`` line holding every needle and no traceback."""
    if o.rc == 0:
        return "exit code 0"
    if "Traceback" in o.text:
        lines = o.text[o.text.index("Traceback") :].strip().splitlines()
        where = [ln.strip() for ln in lines if ln.strip().startswith("File ")][-2:]
        return f"traceback in the output: {lines[-1][:160]} (at {' <- '.join(reversed(where))[:300]})"
    lines = o.error_lines()
    if len(lines) != 1:
        return f"{len(lines)} error lines (rc={o.rc}): {o.text.strip()[-300:]!r}"
    missing = [n for n in needles if n not in lines[0]]
    if missing:
        return f"error line does not name {', '.join(map(repr, missing))}: {lines[0][:240]}"
    return None


# -------------------------------------------------------------------------------------------------- stores


def store_state(path: Path) -> str:
    """absent, unreadable (not an mmkd store), incomplete or complete — as a later reader would see it."""
    from mmkd_core.errors import MmkdError
    from mmkd_core.store import open_store

    if not path.exists():
        return "absent"
    try:
        return "complete" if open_store(path).complete else "incomplete"
    except MmkdError:
        return "unreadable"
    except Exception as e:  # noqa: BLE001 - a reader crashing on a damaged store is itself a finding
        return f"unreadable ({type(e).__name__}: {e})"


def store_diff(ref: Path, got: Path) -> str | None:
    """None when ``got`` is complete and every array is bit-equal (dtype, shape, bytes) to ``ref``'s and the
    compared provenance agrees; else what differs."""
    import zarr

    from mmkd_core.store import CONFIG_FIELDS, open_store

    state = store_state(got)
    if state != "complete":
        return f"store is {state}"
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(got), mode="r")
    na, nb = sorted(a.array_keys()), sorted(b.array_keys())
    if na != nb:
        return f"arrays differ: {na} vs {nb}"
    for name in na:
        x, y = a[name][...], b[name][...]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        if x.tobytes() != y.tobytes():
            bad = np.flatnonzero(np.asarray(x != y).reshape(len(x), -1).any(axis=1)) if x.ndim else []
            return f"{name}: {len(bad)} samples differ (first {[int(i) for i in bad[:5]]})"
    ra, rb = open_store(ref).attrs, open_store(got).attrs
    for k in CONFIG_FIELDS:
        if json.dumps(ra.get(k), sort_keys=True, default=str) != json.dumps(rb.get(k), sort_keys=True, default=str):
            return f"attribute {k} differs"
    return None


def weights_diff(ref_run: Path, run: Path) -> str | None:
    """None when every safetensors file of the exported student and the last checkpoint's weights are
    bit-equal to the reference run's."""
    from safetensors.numpy import load_file

    def files(r: Path) -> dict[str, Path]:
        out = {f"student/{p.name}": p for p in sorted((r / "student").glob("*.safetensors"))}
        ckpts = sorted(p for p in (r / "checkpoints").glob("step_*") if CKPT_NAME.fullmatch(p.name))
        if ckpts:
            out[f"last checkpoint ({ckpts[-1].name})"] = ckpts[-1] / "model.safetensors"
        return out

    fa, fb = files(ref_run), files(run)
    if not fb or set(fa) != set(fb):
        return f"files differ: {sorted(fa)} vs {sorted(fb)}"
    for key in fa:
        try:
            a, b = load_file(str(fa[key])), load_file(str(fb[key]))
        except Exception as e:  # noqa: BLE001
            return f"{key}: unreadable ({type(e).__name__}: {e})"
        if sorted(a) != sorted(b):
            return f"{key}: tensor names differ"
        for t in a:
            if a[t].dtype != b[t].dtype or a[t].shape != b[t].shape or a[t].tobytes() != b[t].tobytes():
                return f"{key}: tensor {t} differs (max abs {np.abs(a[t].astype(np.float64) - b[t]).max():.3g})"
    return None


def marked_complete(store: Path) -> Callable[[], bool]:
    """A cheap poll: the store's zarr.json says it is complete."""
    pattern = re.compile(r'"complete":\s*true')

    def check() -> bool:
        try:
            return bool(pattern.search((store / "zarr.json").read_text()))
        except (OSError, UnicodeDecodeError):
            return False

    return check


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if CKPT_NAME.fullmatch(p.name))
    return done[-1] if done else None


def checkpoint_in_flight(run_dir: Path) -> bool:
    """A checkpoint being written: anything in checkpoints/ that is not a finished ``step_N``."""
    try:
        return any(not CKPT_NAME.fullmatch(e.name) for e in os.scandir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- workspace


def _load_conftest():
    spec = importlib.util.spec_from_file_location("mmkd_tests_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sentences(n: int, seed: int = 0) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 14))) for _ in range(n)) + "\n"


@dataclass
class Workspace:
    """The teachers, data and uninterrupted reference outputs every trial compares against."""

    root: Path
    quick: bool = False
    refs: dict[str, Outcome] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.bert = self.root / "bert"
        if not (self.bert / "config.json").exists():
            _load_conftest().save_tiny_bert(self.bert)
        # a saved checkpoint, not --random-weights: random weights differ from process to process, so a
        # re-run would finish a store with another teacher
        self.beit = self.root / "tiny_beitv2.pth"
        if not self.beit.exists():
            import timm
            import torch

            torch.manual_seed(0)
            model = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, **TINY_BEIT)
            torch.save({"model": model.state_dict()}, self.beit)
        self.text = self.root / "sentences.txt"
        self.text.write_text(sentences(240 if self.quick else 600))
        self.train_steps = 16 if self.quick else 40
        self._trial = 0

    def trial_dir(self, name: str) -> Path:
        self._trial += 1
        d = self.root / "trials" / f"{self._trial:04d}-{re.sub(r'[^A-Za-z0-9]+', '-', name)[:50]}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    # the commands
    def text_cmd(self, out: Path, *extra: str, weights: Path | None = None, data: Path | None = None) -> list[str]:
        return [
            script("mmkd-extract"),
            "--teacher",
            "bert",
            "--weights",
            str(weights or self.bert),
            "--dataset",
            "text",
            "--data-root",
            str(data or self.text),
            "--out",
            str(out),
            "--chunk-size",
            "4",
            "--shard-size",
            "8",
            "--batch-size",
            "8",
            "--quiet",
            *extra,
        ]

    def beit_args(self, random_weights: bool = False) -> list[str]:
        opts = [a for k, v in TINY_BEIT.items() for a in ("--teacher-option", f"{k}={v}")]
        weights = ["--random-weights"] if random_weights else ["--weights", str(self.beit)]
        return ["--teacher", "beitv2", *weights, *opts]

    def image_cmd(self, out: Path, *extra: str, count: int | None = None, random_weights: bool = False) -> list[str]:
        count = count or (24 if self.quick else 48)
        return [
            script("mmkd-extract"),
            *self.beit_args(random_weights),
            "--dataset",
            "shapes",
            "--dataset-option",
            f"count={count}",
            "--dataset-option",
            "resolution=40",
            "--views",
            "3",
            "--out",
            str(out),
            "--chunk-size",
            "2",
            "--shard-size",
            "4",
            "--batch-size",
            "6",
            "--quiet",
            *extra,
        ]

    def folder_cmd(self, root: Path, out: Path, *extra: str, dataset: str = "imagefolder") -> list[str]:
        return [
            script("mmkd-extract"),
            *self.beit_args(),
            "--dataset",
            dataset,
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--chunk-size",
            "2",
            "--shard-size",
            "4",
            "--batch-size",
            "6",
            "--quiet",
            *extra,
        ]

    def train_cmd(self, store: Path, run_dir: Path, *extra: str, steps: int | None = None) -> list[str]:
        return [
            script("mmkd-train"),
            "--targets",
            str(store),
            "--run-dir",
            str(run_dir),
            "--steps",
            str(steps or self.train_steps),
            "--ckpt-every",
            "2",
            "--batch-size",
            "8",
            "--log-every",
            "2",
            "--quiet",
            *extra,
        ]

    def ref_path(self, name: str) -> Path:
        d = self.root / "ref"
        return {
            "text": d / "text.zarr",
            "image": d / "image.zarr",
            "train": d / "train-run",
            "image-train": d / "image-train-run",
        }[name]

    # the references, built once on first use
    def ref(self, name: str) -> Path:
        d = self.root / "ref"
        d.mkdir(exist_ok=True)
        path = self.ref_path(name)
        if name not in self.refs:
            if name in ("train", "image-train"):
                store = self.ref("text" if name == "train" else "image")
                shutil.rmtree(path, ignore_errors=True)
                extra = ("--init", "random", "--steps", "4") if name == "image-train" else ()
                cmd = self.train_cmd(store, path, *extra)
                o = run_faulted(
                    cmd,
                    d,
                    marker=lambda: (path / "config.json").exists(),
                    done=(path / "student" / "model.safetensors").exists,
                )
            else:
                shutil.rmtree(path, ignore_errors=True)
                cmd = self.text_cmd(path) if name == "text" else self.image_cmd(path)
                o = run_faulted(cmd, d, marker=path.exists, done=marked_complete(path))
            if o.rc != 0:
                raise RuntimeError(f"reference {name} failed: {shell(cmd)}\n{o.text[-2000:]}")
            self.refs[name] = o
        return path

    def window(self, name: str) -> float:
        self.ref(name)
        return max(self.refs[name].window, 0.05)


# -------------------------------------------------------------------------------------------------- trials


@dataclass
class Row:
    fault: str
    trials: int = 0
    whole: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, problem: str | None, note: str | None = None) -> None:
        self.trials += 1
        if problem is None:
            self.whole += 1
            if note:
                self.notes.append(note)
        else:
            self.notes.append(problem)


def continue_extract(ws: Workspace, cmd: list[str], cwd: Path, out: Path) -> tuple[Outcome, str | None]:
    """Re-run the same extraction. A lock the killed writer left is deleted as its message says (noted)."""
    o = run(cmd, cwd)
    note = None
    if o.rc != 0 and "lock" in o.text and "delete" in o.text:
        lock = out.with_name(out.name + ".lock")
        note = f"re-run refused until the dead writer's lock was deleted by hand ({o.brief()})"
        lock.unlink(missing_ok=True)
        o = run(cmd, cwd)
    return o, note


def trial_kill_extract(ws: Workspace, kind: str, rng: random.Random) -> tuple[str | None, str | None]:
    """kill -9 at a random moment of an extraction, re-run, compare with the uninterrupted store."""
    ref = ws.ref(kind)
    d = ws.trial_dir(f"kill-extract-{kind}")
    out = d / "s.zarr"
    cmd = ws.text_cmd(out) if kind == "text" else ws.image_cmd(out)
    delay = rng.uniform(0, 1.1 * ws.window(kind))  # a tenth past the result: its exit
    o = run_faulted(cmd, d, marker=out.exists, delay=delay, sig=signal.SIGKILL, group=True)
    state = store_state(out)
    if not o.signalled:
        note = f"finished before the kill at +{delay:.2f}s"
    else:
        note = None
        if state == "complete":  # killed after it finished writing: it must already be whole
            problem = store_diff(ref, out)
            if problem:
                return f"killed at +{delay:.2f}s: store reads as complete but {problem}", None
        elif state.startswith("unreadable ("):
            return f"killed at +{delay:.2f}s: reading the store crashes: {state}", None
    o2, lock_note = continue_extract(ws, cmd, d, out)
    if o2.rc != 0:
        return f"killed at +{delay:.2f}s (store {state}); re-run failed: {o2.brief()}", None
    problem = store_diff(ref, out)
    if problem:
        return f"killed at +{delay:.2f}s (store {state}); after the re-run {problem}", None
    return None, lock_note or note


def trial_creation(ws: Workspace, sig: int) -> tuple[str | None, str | None]:
    """A signal the moment the store's directory appears, while its arrays are being created."""
    ref = ws.ref("text")
    d = ws.trial_dir(f"creation-{signal.Signals(sig).name}")
    out = d / "s.zarr"
    cmd = ws.text_cmd(out)
    o = run_faulted(cmd, d, marker=out.exists, delay=0.0, sig=sig, group=True)
    made = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    when = f"{signal.Signals(sig).name} when the store held {made}"
    if sig != signal.SIGKILL and o.signalled:
        problem = one_error_line(o, "run the same command again")
        if problem:
            return f"{when}: {problem}", None
    o2, lock_note = continue_extract(ws, cmd, d, out)
    if o2.rc != 0:
        return f"{when}; re-running the same command failed: {o2.brief()}", None
    problem = store_diff(ref, out)
    return (f"{when}; after the re-run {problem}", None) if problem else (None, lock_note)


def continue_train(
    ws: Workspace, cmd: list[str], cwd: Path, run_dir: Path, said: str = ""
) -> tuple[Outcome, str | None]:
    """What a user does after an interrupted mmkd-train: --resume when a checkpoint exists (or the message
    says so), else the same command again."""
    if latest_checkpoint(run_dir) is not None or "--resume" in said:
        o = run([*cmd, "--resume"], cwd)
        if o.rc == 0:
            return o, None
        if latest_checkpoint(run_dir) is None:
            note = f"--resume (as the message said) failed without a checkpoint: {o.brief()}; ran the command again"
            o = run(cmd, cwd)
            return o, note
        return o, None
    return run(cmd, cwd), None


def trial_kill_train(ws: Workspace, rng: random.Random, in_checkpoint: bool) -> tuple[str | None, str | None]:
    ref_run = ws.ref("train")
    store = ws.ref("text")
    d = ws.trial_dir("kill-train" + ("-ckpt" if in_checkpoint else ""))
    run_dir = d / "run"
    cmd = ws.train_cmd(store, run_dir)
    marker = lambda: (run_dir / "config.json").exists()  # noqa: E731
    if in_checkpoint:
        # the n-th checkpoint write of the run, caught while it is in flight
        skip = rng.randrange(0, max(1, ws.train_steps // 2 - 1))
        seen = {"n": 0, "was": False}

        def trigger() -> bool:
            now = checkpoint_in_flight(run_dir)
            if now and not seen["was"]:
                seen["n"] += 1
            seen["was"] = now
            return now and seen["n"] > skip

        o = run_faulted(cmd, d, marker, sig=signal.SIGKILL, group=True, trigger=trigger)
        caught = seen["n"] > skip and seen["was"]
        when = f"in checkpoint write #{skip + 1}" if caught else f"after waiting for checkpoint write #{skip + 1}"
    else:
        delay = rng.uniform(0, 1.1 * ws.window("train"))
        o = run_faulted(cmd, d, marker, delay=delay, sig=signal.SIGKILL, group=True)
        when = f"at +{delay:.2f}s"
    ckpt = latest_checkpoint(run_dir)
    when += f" (last checkpoint {ckpt.name if ckpt else 'none'})"
    note = None if o.signalled else f"finished before the kill {when}"
    o2, how = continue_train(ws, cmd, d, run_dir)
    if o2.rc != 0:
        return f"killed {when}; continuing failed: {shell(o2.cmd[1:])} -> {o2.brief()}", None
    problem = weights_diff(ref_run, run_dir)
    if problem:
        return f"killed {when}; after {shell(o2.cmd[1:])}: {problem}", None
    return None, how or note or (f"killed {when}" if in_checkpoint else None)


def trial_signal(ws: Workspace, command: str, sig: int, rng: random.Random) -> tuple[str | None, str | None]:
    """SIGTERM (to the process, as `kill PID`) or SIGINT (to the group, as Ctrl-C) at a random moment."""
    code = 128 + sig
    d = ws.trial_dir(f"{signal.Signals(sig).name}-{command}")
    if command == "extract":
        ref = ws.ref("text")
        out = d / "s.zarr"
        cmd, marker, window = ws.text_cmd(out), out.exists, ws.window("text")
    else:
        ref_run, store = ws.ref("train"), ws.ref("text")
        run_dir = d / "run"
        cmd, window = ws.train_cmd(store, run_dir), ws.window("train")
        marker = lambda: (run_dir / "config.json").exists()  # noqa: E731
    delay = rng.uniform(0, window)
    o = run_faulted(cmd, d, marker, delay=delay, sig=sig, group=sig == signal.SIGINT)
    note = None
    finished = (
        (store_state(out) == "complete")
        if command == "extract"
        else (run_dir / "student" / "model.safetensors").exists()
    )
    if not o.signalled:
        note = f"finished before the signal at +{delay:.2f}s"
    elif o.rc == 0:
        note = f"signal at +{delay:.2f}s arrived after the work was done (exit 0)"
    elif o.rc == -sig and not o.error_lines() and finished:
        # torch and transformers take a second or two to tear down after the command has returned; a signal
        # then meets Python's default action, after the result was written and printed
        note = (
            "a signal during interpreter exit, after the command had finished and printed its result, ended "
            "the process by its default action"
        )
    else:
        hint = "run the same command again" if command == "extract" else ("--resume", "run the same command again")
        problem = one_error_line(o)
        line = o.error_lines()[0] if not problem else ""
        if problem is None and o.rc != code:
            problem = f"exit code {o.rc}, expected {code}"
        if problem is None and not any(h in line for h in ((hint,) if isinstance(hint, str) else hint)):
            problem = f"the message does not say how to continue: {line}"
        if problem:
            return f"{signal.Signals(sig).name} at +{delay:.2f}s: {problem}", None
    if command == "extract":
        o2, lock_note = continue_extract(ws, cmd, d, out)
        if o2.rc != 0:
            return f"signal at +{delay:.2f}s; re-run failed: {o2.brief()}", None
        problem = store_diff(ref, out)
        return (f"signal at +{delay:.2f}s; after the re-run {problem}", None) if problem else (None, lock_note or note)
    said = o.error_lines()[0] if o.error_lines() else ""
    o2, how = continue_train(ws, cmd, d, run_dir, said)
    if o2.rc != 0:
        return f"signal at +{delay:.2f}s ({said}); continuing failed: {o2.brief()}", None
    problem = weights_diff(ref_run, run_dir)
    return (f"signal at +{delay:.2f}s; after continuing {problem}", None) if problem else (None, how or note)


# ------------------------------------------------------------------------------------------------ disk full

SHIM = '''
"""Test shim: zarr's local writes under MMKD_FAULT_ROOT fail with ENOSPC past MMKD_FAULT_BUDGET bytes."""
import errno, os
_root, _budget = os.environ["MMKD_FAULT_ROOT"], int(os.environ["MMKD_FAULT_BUDGET"])
_used = [0]
try:
    import zarr.storage._local as _local
except ImportError:
    _local = None
if _local is not None:
    _put = _local._put

    def _limited_put(path, value, exclusive=False):
        if str(path).startswith(_root):
            _used[0] += len(value.as_buffer_like())
            if _used[0] > _budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _put(path, value, exclusive)

    _local._put = _limited_put
'''


class DiskFull:
    """A small file system to fill: a tmpfs when this user may mount one, else a write shim."""

    def __init__(self, base: Path, mode: str = "auto") -> None:
        self.base = base
        self.mnt = base / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.mode = "shim"
        if mode != "shim" and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
            p = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(self.mnt)], capture_output=True, text=True
            )
            if p.returncode == 0:
                self.mode = "tmpfs"
        self.shim_dir = base / "shim"
        self.shim_dir.mkdir(exist_ok=True)
        (self.shim_dir / "sitecustomize.py").write_text(SHIM)

    def close(self) -> None:
        if self.mode == "tmpfs":
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)

    def free(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> Path:
        """Ballast so that only ``leave`` bytes stay free."""
        ballast = self.mnt / "ballast"
        size = max(0, self.free() - leave)
        with open(ballast, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError:
                block = b"\0" * (1 << 20)
                while size > 0:
                    size -= f.write(block[: min(size, len(block))])
        return ballast

    def limited_env(self, budget: int) -> dict[str, str]:
        pp = os.pathsep.join(p for p in (str(self.shim_dir), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": pp, "MMKD_FAULT_ROOT": str(self.mnt), "MMKD_FAULT_BUDGET": str(budget)}


def disk_budgets(n: int, need: int, mode: str, rng: random.Random) -> list[int]:
    """Free bytes of each trial: none at all (the lock or the first metadata file fails), room for a few
    metadata files (the store's creation fails midway), then random amounts up to a whole store."""
    page = 4096 if mode == "tmpfs" else 400
    edges = [0, 3 * page]
    return (edges + [int(rng.uniform(0, need)) for _ in range(max(0, n - len(edges)))])[:n]


def trial_disk_full(ws: Workspace, disk: DiskFull, budget: int) -> tuple[str | None, str | None]:
    ref = ws.ref("text")
    d = ws.trial_dir("disk-full")
    for p in disk.mnt.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out = disk.mnt / "s.zarr"
    cmd = ws.text_cmd(out)
    if disk.mode == "tmpfs":
        ballast = disk.fill(budget)
        o = run(cmd, d)
        ballast.unlink()
    else:
        o = run(cmd, d, extra_env=disk.limited_env(budget))
    if o.rc == 0:
        note = f"{budget} bytes sufficed"
    else:
        problem = one_error_line(o)
        line = o.error_lines()[0] if not problem else ""
        if problem is None and "space" not in line.lower():
            problem = f"the error does not say the disk is full: {line}"
        if problem:
            return f"{budget} bytes free: {problem}", None
        hint = "run the same command again" in line
        note = f"{budget:,} bytes free: {line}" if hint else f"{budget:,} bytes free: no hint how to continue: {line}"
    state = store_state(out)
    if state == "complete" and o.rc != 0:
        return f"{budget} bytes free: the failed store reads as complete", None
    o2, lock_note = continue_extract(ws, cmd, d, out)
    if o2.rc != 0:
        return f"{budget} bytes free ({o.brief()}); after freeing space the same command failed: {o2.brief()}", None
    problem = store_diff(ref, out)
    if problem:
        return f"{budget} bytes free; after freeing space and re-running {problem}", None
    return None, lock_note or note


def measure_need(ws: Workspace, disk: DiskFull) -> int:
    """Bytes one store takes on the small file system (the tmpfs counts whole pages)."""
    out = disk.mnt / "s.zarr"
    if disk.mode == "tmpfs":
        before = disk.free()
        o = run(ws.text_cmd(out), ws.root)
        need = before - disk.free()
    else:
        o = run(ws.text_cmd(out), ws.root)
        need = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if o.rc != 0:
        raise RuntimeError(f"extraction onto {disk.mnt} failed: {o.text[-1000:]}")
    for p in disk.mnt.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return need


# ----------------------------------------------------------------------------------------------- bad inputs


def _png_bytes(mode: str = "RGB", seed: int = 0, size=(48, 40)) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (size[1], size[0])).astype(np.uint16)).save(buf, "PNG")
    elif mode == "CMYK":
        im.convert("CMYK").save(buf, "JPEG")
    else:
        im.convert(mode).save(buf, "PNG")
    return buf.getvalue()


def make_folder(root: Path, broken: dict[str, bytes] | None = None, modes: tuple[str, ...] = ("RGB",)) -> Path:
    for c, cls in enumerate(("a", "b")):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            mode = modes[(c * 6 + i) % len(modes)]
            ext = "jpg" if mode == "CMYK" else "png"
            (root / "train" / cls / f"{i:02d}.{ext}").write_bytes(_png_bytes(mode, seed=c * 6 + i))
    for rel, data in (broken or {}).items():
        (root / "train" / rel).write_bytes(data)
    return root


def _idx(shape: tuple[int, ...], magic: bytes | None = None, cut: int = 0) -> bytes:
    import struct

    head = magic or bytes([0, 0, 8, len(shape)])
    body = (
        np.random.default_rng(0)
        .integers(0, 10 if len(shape) == 1 else 255, int(np.prod(shape)), dtype=np.uint8)
        .tobytes()
    )
    data = head + struct.pack(f">{len(shape)}I", *shape) + body
    return data[: len(data) - cut] if cut else data


def make_idx(root: Path, n_images: int = 12, n_labels: int = 12, magic: bytes | None = None, cut: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-images-idx3-ubyte").write_bytes(_idx((n_images, 28, 28), magic, cut))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx((n_labels,)))
    return root


def make_incomplete(ref: Path, out: Path) -> Path:
    """A copy of a finished store as an interrupted extraction leaves it: shards missing, not complete."""
    import zarr

    shutil.copytree(ref, out)
    g = zarr.open_group(str(out), mode="r+")
    attrs = dict(g.attrs["mmkd"])
    attrs["complete"] = False
    g.attrs["mmkd"] = attrs
    done = g["shards_done"]
    done[done.shape[0] // 2 :] = 0
    return out


@dataclass
class Case:
    name: str
    cmd: list[str]
    needles: tuple[str, ...]
    out: Path | None = None  # the store that must not look valid afterwards
    run_dir: Path | None = None  # the run that must not look valid afterwards
    succeed: bool = False  # a fault the tools must absorb (images in other modes)


def make_bad_inputs(ws: Workspace) -> None:
    """The files of ``bad_input_cases``, under ``<root>/bad``."""
    b = ws.root / "bad"
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir(parents=True)
    (b / "empty.txt").write_bytes(b"")
    (b / "blank.txt").write_text("\n   \n\t\n")
    (b / "latin1.txt").write_bytes(b"a cat sat\nthe dog ran\na caf\xe9 on the mat\n")
    (b / "two").mkdir()
    (b / "two" / "a.txt").write_text("a cat\n")
    (b / "two" / "b.txt").write_text("a dog\n")
    good = _png_bytes()
    make_folder(b / "zero", {"b/03.png": b""})
    make_folder(b / "trunc", {"b/03.png": good[: len(good) // 2]})
    make_folder(b / "modes", modes=("CMYK", "RGBA", "L", "LA", "P", "1", "I;16", "RGB"))
    cap = b / "captions"
    cap.mkdir()
    (cap / "one.png").write_bytes(good)
    (cap / "zero.png").write_bytes(b"")
    (cap / "missing.tsv").write_text("one.png\ta red circle\ngone.png\ta blue square\n")
    (cap / "zero.tsv").write_text("one.png\ta red circle\nzero.png\ta blue square\n")
    (cap / "latin1.tsv").write_bytes(b"one.png\ta red circle\none.png\ta blue caf\xe9\n")
    make_idx(b / "idx-magic", magic=b"\x00\x00\x08\x02")
    make_idx(b / "idx-trunc", cut=100)
    make_idx(b / "idx-count", n_labels=11)
    (b / "notastore").mkdir()
    (b / "notastore" / "readme.txt").write_text("not a store\n")
    (b / "plain.txt").write_text("not a store\n")
    (b / "out-is-a-file").write_text("x\n")
    (b / "bad.pth").write_bytes(os.urandom(4096))
    make_incomplete(ws.ref("text"), b / "incomplete.zarr")


def bad_input_cases(ws: Workspace) -> list[Case]:
    """The cases, by paths only: ``make_bad_inputs`` writes their files."""
    b = ws.root / "bad"
    cap = b / "captions"
    incomplete = b / "incomplete.zarr"
    store = ws.ref_path("text")

    def out(name: str) -> Path:
        return b / f"{name}.zarr"

    def text(name: str, *extra: str, data: Path | None = None) -> Case:
        return Case(name, ws.text_cmd(out(name), *extra, data=data), (), out=out(name))

    def case(c: Case, *needles: str) -> Case:
        c.needles = needles
        return c

    cases = [
        case(text("text file missing", data=b / "missing.txt"), "missing.txt"),
        case(text("text file empty (0 bytes)", data=b / "empty.txt"), "empty.txt"),
        case(text("text file of blank lines", data=b / "blank.txt"), "blank.txt"),
        case(text("text file with a non-UTF-8 line", data=b / "latin1.txt"), "latin1.txt:3"),
        case(text("text directory with two .txt files", data=b / "two"), "two"),
        case(Case("zero-byte image (imagefolder)", ws.folder_cmd(b / "zero", out("zero")), (), out("zero")), "03.png"),
        case(
            Case("truncated image (imagefolder)", ws.folder_cmd(b / "trunc", out("trunc")), (), out("trunc")), "03.png"
        ),
        case(
            Case(
                "truncated image, --workers 2",
                ws.folder_cmd(b / "trunc", out("trunc2"), "--workers", "2"),
                (),
                out("trunc2"),
            ),
            "03.png",
        ),
        case(
            Case(
                "captions naming a missing image",
                ws.folder_cmd(cap / "missing.tsv", out("capmiss"), dataset="captions"),
                (),
                out("capmiss"),
            ),
            "missing.tsv:2",
            "gone.png",
        ),
        case(
            Case(
                "captions with a zero-byte image",
                ws.folder_cmd(cap / "zero.tsv", out("capzero"), dataset="captions"),
                (),
                out("capzero"),
            ),
            "zero.png",
        ),
        case(
            Case(
                "captions file with a non-UTF-8 line",
                ws.folder_cmd(cap / "latin1.tsv", out("caplatin"), dataset="captions"),
                (),
                out("caplatin"),
            ),
            "latin1.tsv:2",
        ),
        case(
            Case(
                "bad idx header (mnist)", ws.folder_cmd(b / "idx-magic", out("idxm"), dataset="mnist"), (), out("idxm")
            ),
            "train-images-idx3-ubyte",
        ),
        case(
            Case(
                "truncated idx file (fashion-mnist)",
                ws.folder_cmd(b / "idx-trunc", out("idxt"), dataset="fashion-mnist"),
                (),
                out("idxt"),
            ),
            "train-images-idx3-ubyte",
        ),
        case(
            Case(
                "idx labels fewer than images",
                ws.folder_cmd(b / "idx-count", out("idxc"), dataset="mnist"),
                (),
                out("idxc"),
            ),
            "train-labels-idx1-ubyte",
        ),
        case(text("--layers 12 (2-block teacher)", "--layers", "12"), "--layers", "12"),
        case(text("--layers -1", "--layers", "-1"), "--layers", "-1"),
        case(text("--layers last:0", "--layers", "last:0"), "--layers", "last:0"),
        case(text("--layers garbage", "--layers", "garbage"), "--layers", "garbage"),
        case(text("--batch-size 0 (extract)", "--batch-size", "0"), "--batch-size"),
        case(text("--limit 0", "--limit", "0"), "--limit"),
        case(text("--views 0", "--views", "0"), "--views"),
        case(text("--views 3 with a text teacher", "--views", "3"), "--views"),
        case(text("--shard-size not a multiple of --chunk-size", "--shard-size", "6"), "--shard-size"),
        case(Case("--out is a file", ws.text_cmd(b / "out-is-a-file"), ()), "--out"),
        case(text("--weights that do not exist", "--weights", str(b / "nope")), "nope"),
        case(
            Case(
                "--weights a corrupt checkpoint",
                [
                    script("mmkd-extract"),
                    "--teacher",
                    "beitv2",
                    "--weights",
                    str(b / "bad.pth"),
                    *[a for k, v in TINY_BEIT.items() for a in ("--teacher-option", f"{k}={v}")],
                    "--out",
                    str(out("badw")),
                    "--quiet",
                ],
                (),
                out("badw"),
            ),
            "bad.pth",
        ),
        case(text("--dataset unknown", "--dataset", "nosuch"), "nosuch"),
        case(
            Case(
                "mmkd-train --targets: a directory that is not a store",
                ws.train_cmd(b / "notastore", b / "run-notastore"),
                (),
                run_dir=b / "run-notastore",
            ),
            "notastore",
        ),
        case(
            Case(
                "mmkd-train --targets: a plain file",
                ws.train_cmd(b / "plain.txt", b / "run-plain"),
                (),
                run_dir=b / "run-plain",
            ),
            "plain.txt",
        ),
        case(
            Case(
                "mmkd-train --targets: missing",
                ws.train_cmd(b / "missing.zarr", b / "run-missing"),
                (),
                run_dir=b / "run-missing",
            ),
            "missing.zarr",
        ),
        case(
            Case(
                "mmkd-train --targets: an incomplete store",
                ws.train_cmd(incomplete, b / "run-incomplete"),
                (),
                run_dir=b / "run-incomplete",
            ),
            "incomplete.zarr",
        ),
        case(
            Case(
                "mmkd-train --batch-size 0",
                ws.train_cmd(store, b / "run-bs0", "--batch-size", "0"),
                (),
                run_dir=b / "run-bs0",
            ),
            "--batch-size",
        ),
        case(
            Case(
                "mmkd-train --steps 0",
                ws.train_cmd(store, b / "run-steps0", "--steps", "0"),
                (),
                run_dir=b / "run-steps0",
            ),
            "--steps",
        ),
        Case(
            "CMYK/RGBA/L/LA/P/1/I;16 images are converted and work",
            ws.folder_cmd(b / "modes", out("modes")),
            (),
            out("modes"),
            succeed=True,
        ),
    ]
    return cases


def run_ok_after(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    if (run_dir / "student").exists() or latest_checkpoint(run_dir) is not None:
        return f"{run_dir} holds a student or checkpoint"
    return None


def check_case(c: Case, cwd: Path) -> tuple[str | None, str | None]:
    o = run(c.cmd, cwd)
    if c.succeed:
        if o.rc != 0 or "Traceback" in o.text:
            return f"failed: {o.brief()}", None
        state = store_state(c.out)
        return (None, None) if state == "complete" else (f"store is {state}", None)
    problem = one_error_line(o, *c.needles)
    if problem:
        return problem, None
    if c.out is not None:
        state = store_state(c.out)
        if state == "complete":
            return f"{o.brief()}, but {c.out.name} reads as a complete store", None
    return run_ok_after(c.run_dir), None


# ---------------------------------------------------------------------------------------------------- stale


@dataclass
class Change:
    name: str
    field: str  # what the refusal must name
    kind: str  # "text" or "image": which reference it changes
    extra: tuple[str, ...] = ()
    prepare: Callable[[Workspace], Callable[[], None]] | None = None  # returns an undo


def _change_text(ws: Workspace) -> Callable[[], None]:
    before = ws.text.read_bytes()
    lines = before.decode().splitlines()
    lines[len(lines) // 2] = "a green star sat on the lazy fox"
    ws.text.write_text("\n".join(lines) + "\n")
    return lambda: ws.text.write_bytes(before)


def _change_weights(ws: Workspace) -> Callable[[], None]:
    from safetensors.numpy import load_file, save_file

    f = ws.bert / "model.safetensors"
    before = f.read_bytes()
    state = load_file(str(f))
    key = next(k for k in sorted(state) if k.endswith("weight") and state[k].ndim == 2)
    state[key] = (state[key] + np.float32(1e-3)).astype(state[key].dtype)
    save_file(state, str(f), metadata={"format": "pt"})
    return lambda: f.write_bytes(before)


CHANGES = [
    Change("teacher weights", "weights_sha256", "text", prepare=_change_weights),
    Change("recipe: --layers last:1", "recipe.layers", "text", ("--layers", "last:1")),
    Change("recipe: --no-layer-norm", "recipe.layer_norm", "text", ("--no-layer-norm",)),
    Change("recipe: --no-instance-norm", "recipe.instance_norm", "text", ("--no-instance-norm",)),
    Change("recipe: --pool mean", "recipe.pool", "text", ("--pool", "mean")),
    Change("recipe: --pooled-only", "recipe.tokens", "text", ("--pooled-only",)),
    Change("--dtype float32", "storage.dtype", "text", ("--dtype", "float32")),
    Change("preprocessing: max_length 8", "preprocess.max_length", "text", ("--teacher-option", "max_length=8")),
    Change("dataset content (one line edited)", "dataset.fingerprint", "text", prepare=_change_text),
    Change("--limit 100", "dataset.num_samples", "text", ("--limit", "100")),
    Change("views: --views 2", "views.count", "image", ("--views", "2")),
    Change("views: --seed 1", "views.seed", "image", ("--seed", "1")),
]


def stale_trials(ws: Workspace, ch: Change) -> list[tuple[str | None, str | None]]:
    """Re-run the extraction with the change over a copy of the store (refused, naming the field, the
    copy unchanged); then resume a run trained on the original from a store extracted with the change
    (refused, naming the field)."""
    ref = ws.ref(ch.kind)
    ref_run = ws.ref("train" if ch.kind == "text" else "image-train")
    d = ws.trial_dir(f"stale-{ch.name}")
    copy = d / "s.zarr"
    shutil.copytree(ref, copy)
    changed = d / "changed.zarr"
    undo = ch.prepare(ws) if ch.prepare else (lambda: None)
    try:
        base = ws.text_cmd if ch.kind == "text" else ws.image_cmd
        # --views replaces the image command's own --views 3: typer takes the last value given
        o1 = run(base(copy, *ch.extra), d)
        o2 = run(base(changed, *ch.extra), d)
    finally:
        undo()
    results = []
    problem = one_error_line(o1, ch.field)
    if problem is None and store_diff(ref, copy) is not None:
        problem = f"the refused re-run changed the store: {store_diff(ref, copy)}"
    results.append((f"re-run extraction: {problem}" if problem else None, f"re-run: {o1.error_lines()[0]}"))
    if o2.rc != 0:
        results.append((f"extracting the changed store failed: {o2.brief()}", None))
        return results
    run_dir = d / "run"
    shutil.copytree(ref_run, run_dir)
    extra = ("--init", "random", "--steps", "4") if ch.kind == "image" else ()
    o3 = run([*ws.train_cmd(changed, run_dir, *extra), "--resume"], d)
    problem = one_error_line(o3, ch.field)
    results.append(
        (f"resumed training: {problem}" if problem else None, f"resume: {o3.error_lines()[0]}" if not problem else None)
    )
    return results


RANDOM_WEIGHTS_ROW = "stale store: --random-weights, interrupted and re-run"


def random_weights_trial(ws: Workspace) -> list[tuple[str | None, str | None]]:
    """An interrupted --random-weights extraction, re-run: it must finish with the teacher it began with
    (or refuse). The store records ``weights_sha256: random`` whatever the weights were."""
    d = ws.trial_dir("stale-random-weights")
    full, part = d / "full.zarr", d / "part.zarr"
    o = run(ws.image_cmd(full, random_weights=True), d)
    if o.rc != 0:
        return [(f"extraction failed: {o.brief()}", None)]
    make_incomplete(full, part)  # a copy whose second half of shards is marked not done, as a kill leaves it
    o2 = run(ws.image_cmd(part, random_weights=True), d)
    if o2.rc != 0:
        problem = one_error_line(o2, "weights")
        return [(f"re-run refused, but: {problem}" if problem else None, f"re-run: {o2.error_lines()[0]}")]
    problem = store_diff(full, part)
    return [
        (f"the re-run finished the store with another random teacher, silently: {problem}" if problem else None, None)
    ]


# ------------------------------------------------------------------------------------------------------ main


def print_table(rows: list[Row], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is not None:
        table = Table(title=title)
        table.add_column("fault")
        table.add_column("trials", justify="right")
        table.add_column("nothing lost", justify="right")
        for r in rows:
            ok = r.whole == r.trials
            table.add_row(r.fault, str(r.trials), f"[{'green' if ok else 'bold red'}]{r.whole}[/]")
        Console(width=140).print(table)
    else:
        w = max(len(r.fault) for r in rows)
        print(title)
        print(f"{'fault':<{w}}  trials  nothing lost")
        for r in rows:
            print(f"{r.fault:<{w}}  {r.trials:>6}  {r.whole:>12}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=None, help="trials of each random fault (default 10; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one trial per random fault, smaller data")
    ap.add_argument("--only", default=None, help="run only rows whose name contains this (case-insensitive)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault moments")
    ap.add_argument("--jobs", type=int, default=2, help="bad-input and stale checks run this many at a time")
    ap.add_argument(
        "--disk",
        choices=("auto", "tmpfs", "shim"),
        default="auto",
        help="how to fill the disk: a tmpfs (needs root; auto falls back to the shim) or a write shim",
    )
    ap.add_argument("--verbose", action="store_true", help="print every trial's outcome as it ends")
    ap.add_argument("--keep", type=Path, default=None, help="keep every trial's files in this directory")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows (with notes) to this file")
    args = ap.parse_args(argv)
    trials = args.trials if args.trials is not None else (1 if args.quick else 10)
    if trials < 1:
        ap.error("--trials must be at least 1")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        print("note: HF_HUB_OFFLINE=1 is set for every command this suite runs", file=sys.stderr)
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mmkd-faults-"))
    ws = Workspace(root, quick=args.quick)
    rows: list[Row] = []
    notes: list[str] = []
    started = time.perf_counter()

    def wanted(name: str) -> bool:
        return args.only is None or args.only.lower() in name.lower()

    def trial_row(name: str, n: int, fn: Callable[[], tuple[str | None, str | None]]) -> None:
        if not wanted(name):
            return
        row = Row(name)
        for _ in range(n):
            try:
                problem, note = fn()
            except Exception as e:  # noqa: BLE001 - a trial that crashes the suite lost its answer: count it
                problem, note = f"trial crashed: {type(e).__name__}: {e}", None
            row.add(problem, note)
            if args.verbose:
                print(f"    {'LOST' if problem else 'whole'}: {problem or note or ''}", file=sys.stderr)
        rows.append(row)
        print(f"  {name}: {row.whole}/{row.trials} whole ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    def parallel_rows(items: list[tuple[str, Callable[[], list[tuple[str | None, str | None]]]]]) -> None:
        items = [(n, f) for n, f in items if wanted(n)]

        def guard(f):
            try:
                return f()
            except Exception as e:  # noqa: BLE001
                return [(f"check crashed: {type(e).__name__}: {e}", None)]

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda item: guard(item[1]), items))
        for (name, _), res in zip(items, results, strict=True):
            row = Row(name)
            for problem, note in res:
                row.add(problem, note)
            rows.append(row)
        if items:
            print(f"  {len(items)} checks done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    def kill_rows() -> None:
        trial_row("kill -9 mmkd-extract (text) -> re-run", trials, lambda: trial_kill_extract(ws, "text", rng))
        trial_row(
            "kill -9 mmkd-extract (images, 3 views) -> re-run", trials, lambda: trial_kill_extract(ws, "image", rng)
        )
        n_ckpt = max(1, trials // 2)
        creation = iter([signal.SIGKILL, signal.SIGTERM])
        trial_row(
            "kill -9 / SIGTERM while the store's arrays are created -> re-run",
            2,
            lambda: trial_creation(ws, next(creation)),
        )
        trial_row(
            "kill -9 mmkd-train at a random moment -> --resume",
            trials - n_ckpt if trials > 1 else 1,
            lambda: trial_kill_train(ws, rng, in_checkpoint=False),
        )
        trial_row(
            "kill -9 mmkd-train inside a checkpoint write -> --resume",
            n_ckpt,
            lambda: trial_kill_train(ws, rng, in_checkpoint=True),
        )

    def disk_rows() -> None:
        if not wanted("disk full during mmkd-extract"):
            return
        disk = DiskFull(root / "disk", args.disk)
        try:
            need = measure_need(ws, disk)
            how = (
                "ballast on a 16 MiB tmpfs" if disk.mode == "tmpfs" else "ENOSPC from zarr's writes past a byte budget"
            )
            notes.append(
                f"disk full: {disk.mode} ({how}); a store needs {need:,} bytes there; free space per "
                f"trial: 0, room for a few metadata files, then drawn from 0..{need:,}"
            )
            budgets = iter(disk_budgets(trials, need, disk.mode, rng))
            trial_row(
                f"disk full during mmkd-extract ({disk.mode}) -> free space -> re-run",
                trials,
                lambda: trial_disk_full(ws, disk, next(budgets)),
            )
        finally:
            disk.close()

    def signal_rows() -> None:
        for command in ("extract", "train"):
            for sig, how in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")):
                trial_row(
                    f"{how} during mmkd-{command} -> continue as told",
                    trials,
                    lambda c=command, s=sig: trial_signal(ws, c, s, rng),
                )

    def bad_input_rows() -> None:
        cases = [c for c in bad_input_cases(ws) if wanted(f"bad input: {c.name}")]
        if not cases:
            return
        make_bad_inputs(ws)
        parallel_rows([(f"bad input: {c.name}", lambda c=c: [check_case(c, ws.root)]) for c in cases])

    def stale_rows() -> None:
        changes = [ch for ch in CHANGES if wanted(f"stale store: {ch.name}")]
        for ch in changes:  # the references first, built once: the checks below run side by side
            ws.ref(ch.kind)
            ws.ref("train" if ch.kind == "text" else "image-train")
        # changes that edit shared files (weights, the text) run alone, the others side by side
        for ch in (ch for ch in changes if ch.prepare is not None):
            parallel_rows([(f"stale store: {ch.name}", lambda ch=ch: stale_trials(ws, ch))])
        parallel_rows(
            [(f"stale store: {ch.name}", lambda ch=ch: stale_trials(ws, ch)) for ch in changes if ch.prepare is None]
            + [(RANDOM_WEIGHTS_ROW, lambda: random_weights_trial(ws))]
        )

    try:
        for section in (kill_rows, disk_rows, signal_rows, bad_input_rows, stale_rows):
            try:
                section()
            except Exception as e:  # noqa: BLE001 - a section that cannot run is a row that lost its answer
                rows.append(
                    Row(
                        f"{section.__name__.removesuffix('_rows').replace('_', ' ')}: could not run",
                        1,
                        0,
                        [f"{type(e).__name__}: {str(e)[-1500:]}"],
                    )
                )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    for name, ref in ws.refs.items():
        notes.append(
            f"reference {name}: {ref.seconds:.1f} s, of it {ref.window:.2f} s from the start of the work "
            "to its result (the window faults are drawn from)"
        )
    title = f"fault suite: {trials} trial(s) per random fault, {time.perf_counter() - started:.0f} s" + (
        " (quick)" if args.quick else ""
    )
    print_table(rows, title)
    for r in rows:
        shown = list(dict.fromkeys(r.notes))
        for n in shown[:NOTES_PER_ROW]:
            print(textwrap.fill(f"- {r.fault}: {n}", width=140, subsequent_indent="    "))
        if len(shown) > NOTES_PER_ROW:
            print(f"    ({len(shown) - NOTES_PER_ROW} more notes on this row; --json has them all)")
    for n in notes:
        print(f"- {n}")
    if args.json:
        args.json.write_text(
            json.dumps(
                [{"fault": r.fault, "trials": r.trials, "whole": r.whole, "notes": r.notes} for r in rows], indent=2
            )
        )
    lost = [r for r in rows if r.whole != r.trials]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
