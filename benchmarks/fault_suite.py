"""Fault suite: kill, interrupt, starve and mislead the CLIs, and count the trials in which nothing was lost.

Every command runs as a user would run it: the installed console scripts (`mmkd-extract`, `mmkd-train`) in
subprocesses with HF_HUB_OFFLINE=1, over tiny random teachers saved to disk (a 2-block BERT, a 2-block BEiT v2
checkpoint: --random-weights would differ from process to process) and small stores cut into many shards, so
a fault lands mid-store and a trial takes seconds. Prints ONE table: each row a fault, its trials, and how
many ended whole:

Random fault moments are drawn uniformly over the whole uninterrupted run, from process start to exit; the
table counts them per fifth of the run.

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
  between an extraction and its re-run or a resumed training -> refused, naming the field;
- damaged shards (flipped data or index bytes, truncated, deleted) -> mmkd-train refuses naming the array,
  mmkd-verify reports it, mmkd-verify --repair restores the pristine arrays; hostile attributes -> one line;
- run directories: a folder of user files kept, a student/ link not followed, two trainers -> one refused;
  disk full during mmkd-train; SIGINT/SIGTERM 0.3 s after each command starts -> one line.

    HF_HUB_OFFLINE=1 python benchmarks/fault_suite.py --trials 10
    HF_HUB_OFFLINE=1 python benchmarks/fault_suite.py --quick          # one trial per row, smaller data

Exits 1 when any row lost something. ``--keep DIR`` keeps every trial's files there for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
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
# the tiny BERT's vocabulary minus the special tokens: every sentence tokenizes fully
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


def save_tiny_bert(root: Path) -> Path:
    """A tiny random 2-block BERT and its tokenizer, saved as users' checkpoints are (the suite runs without
    pytest and the tests' helpers)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    tokenizer.save_pretrained(str(root))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(root))
    return root


def sentences(n: int, seed: int = 0) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 14))) for _ in range(n)) + "\n"


@dataclass
class Workspace:
    """The teachers, data and uninterrupted reference outputs every trial compares against."""

    root: Path
    quick: bool = False
    refs: dict[str, Outcome] = field(default_factory=dict)
    # the moment of the running trial's fault as a fraction of the uninterrupted run's wall time (None when
    # the fault waits for a state instead)
    moment: float | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.bert = self.root / "bert"
        if not (self.bert / "config.json").exists():
            save_tiny_bert(self.bert)
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
        self.samples = 240 if self.quick else 600
        self.text.write_text(sentences(self.samples))
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
            # float32 in every process: --autocast auto probes bf16 per process, and a loaded machine can tell
            # the reference run and a trial apart (a difference that is not a lost trial)
            "--autocast",
            "none",
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
            "--autocast",
            "none",
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

    def wall(self, name: str) -> float:
        """Seconds the uninterrupted command ran, from its process's start to its exit."""
        if name not in self.refs:
            self.ref(name)
        return max(self.refs[name].seconds, 0.05)

    def draw(self, name: str, rng: random.Random) -> float:
        """A fault moment drawn uniformly over the whole uninterrupted run, from process start to exit:
        start-up, lock creation, the teacher's load, each write, checkpoints, the export, the teardown."""
        wall = self.wall(name)
        delay = rng.uniform(0, wall)
        self.moment = delay / wall
        return delay


# -------------------------------------------------------------------------------------------------- trials


@dataclass
class Row:
    fault: str
    trials: int = 0
    whole: int = 0
    notes: list[str] = field(default_factory=list)
    moments: list[float] = field(default_factory=list)  # fault moments, fractions of the uninterrupted run

    def spread(self) -> str:
        """How many trials' faults fell in each fifth of the uninterrupted run ("" when none were drawn)."""
        if not self.moments:
            return ""
        fifths = [0] * 5
        for m in self.moments:
            fifths[min(4, max(0, int(m * 5)))] += 1
        return " ".join(map(str, fifths))

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
    delay = ws.draw(kind, rng)
    o = run_faulted(cmd, d, marker=lambda: True, delay=delay, sig=signal.SIGKILL, group=True)
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


def complete_checkpoints(run_dir: Path) -> int:
    try:
        return sum(1 for e in os.scandir(run_dir / "checkpoints") if CKPT_NAME.fullmatch(e.name))
    except FileNotFoundError:
        return 0


def trial_kill_train(ws: Workspace, rng: random.Random, where: str = "anywhere") -> tuple[str | None, str | None]:
    """kill -9 of mmkd-train ``anywhere`` (a moment drawn over the whole run), inside a ``checkpoint`` write
    (its temporary directory present), or in the ``rotation`` (a new checkpoint renamed into place, the
    oldest not yet deleted); then --resume, and compare with the uninterrupted run."""
    ref_run = ws.ref("train")
    store = ws.ref("text")
    d = ws.trial_dir(f"kill-train-{where}")
    run_dir = d / "run"
    cmd = ws.train_cmd(store, run_dir)
    marker = lambda: (run_dir / "config.json").exists()  # noqa: E731
    if where == "rotation":
        o = run_faulted(
            cmd, d, marker, sig=signal.SIGKILL, group=True, trigger=lambda: complete_checkpoints(run_dir) > 2
        )
        caught = complete_checkpoints(run_dir) > 2
        when = "between a checkpoint's rename and the oldest one's deletion" if caught else "after the rotation"
    elif where == "checkpoint":
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
        delay = ws.draw("train", rng)
        o = run_faulted(cmd, d, lambda: True, delay=delay, sig=signal.SIGKILL, group=True)
        when = f"at +{delay:.2f}s of {ws.wall('train'):.1f}s"
    ckpt = latest_checkpoint(run_dir)
    when += f" (last checkpoint {ckpt.name if ckpt else 'none'})"
    note = None if o.signalled else f"finished before the kill {when}"
    o2, how = continue_train(ws, cmd, d, run_dir)
    if o2.rc != 0:
        return f"killed {when}; continuing failed: {shell(o2.cmd[1:])} -> {o2.brief()}", None
    problem = weights_diff(ref_run, run_dir) or metrics_diff(ref_run, run_dir)
    if problem:
        return f"killed {when}; after {shell(o2.cmd[1:])}: {problem}", None
    return None, how or note or (f"killed {when}" if where != "anywhere" else None)


def metrics_diff(ref_run: Path, run: Path) -> str | None:
    """None when the run's metrics.jsonl logs the reference's steps, each once, in order (a resumed run must
    neither repeat nor skip a row, also one logged exactly at a checkpoint step)."""

    def rows(r: Path) -> list[tuple[int, float]] | str:
        try:
            lines = (r / "metrics.jsonl").read_text().splitlines()
            return [(int(x["step"]), x["loss"]) for x in map(json.loads, lines) if "loss" in x]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable ({type(e).__name__}: {e})"

    a, b = rows(ref_run), rows(run)
    if isinstance(b, str) or a == b:
        return None if a == b else f"metrics.jsonl {b}"
    if [s for s, _ in a] != [s for s, _ in b]:
        return f"metrics.jsonl logs steps {[s for s, _ in b]}, the uninterrupted run {[s for s, _ in a]}"
    return f"metrics.jsonl losses differ at steps {[x[0] for x, y in zip(a, b, strict=True) if x != y]}"


def trial_signal(ws: Workspace, command: str, sig: int, rng: random.Random) -> tuple[str | None, str | None]:
    """SIGTERM (to the process, as `kill PID`) or SIGINT (to the group, as Ctrl-C) at a random moment."""
    code = 128 + sig
    d = ws.trial_dir(f"{signal.Signals(sig).name}-{command}")
    if command == "extract":
        ref = ws.ref("text")
        out = d / "s.zarr"
        cmd = ws.text_cmd(out)
    else:
        ref_run, store = ws.ref("train"), ws.ref("text")
        run_dir = d / "run"
        cmd = ws.train_cmd(store, run_dir)
    delay = ws.draw("text" if command == "extract" else "train", rng)
    o = run_faulted(cmd, d, lambda: True, delay=delay, sig=sig, group=sig == signal.SIGINT)
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

    def __init__(self, base: Path, mode: str = "auto", shim: str = SHIM) -> None:
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
        (self.shim_dir / "sitecustomize.py").write_text(shim)

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

    def run_with_free(self, budget: int, cmd: list[str], cwd: Path) -> Outcome:
        """Run ``cmd`` with ``budget`` bytes free on the small file system (ballast on a tmpfs, else the shim)."""
        if self.mode == "tmpfs":
            ballast = self.fill(budget)
            try:
                return run(cmd, cwd)
            finally:
                ballast.unlink()
        return run(cmd, cwd, extra_env=self.limited_env(budget))


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
    o = disk.run_with_free(budget, cmd, d)
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


# ------------------------------------------------------------------------------------------- damaged stores

DAMAGES = ("flipped data bytes", "flipped index bytes", "truncated shard file", "deleted shard file")
DATA_ARRAYS = ("tokens", "pooled", "lengths", "input_ids", "index")


def shard_index_bytes(array: Path) -> int:
    """Bytes of a shard's index (at the file's end): 16 per inner chunk and a 4-byte crc32c."""
    meta = json.loads((array / "zarr.json").read_text())
    codec = next(c for c in meta["codecs"] if c["name"] == "sharding_indexed")
    inner = codec["configuration"]["chunk_shape"]
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return 16 * int(np.prod([o // i for o, i in zip(outer, inner, strict=True)])) + 4


def damage(store: Path, kind: str, rng: random.Random) -> tuple[str, str]:
    """Damage one shard file of a random data array of ``store``; returns (array, what was done)."""
    array = rng.choice([a for a in DATA_ARRAYS if (store / a / "zarr.json").exists()])
    files = sorted(f for f in (store / array / "c").rglob("*") if f.is_file())
    f = rng.choice(files)
    rel = f.relative_to(store)
    data = bytearray(f.read_bytes())
    index = shard_index_bytes(store / array)
    if kind == "deleted shard file":
        f.unlink()
        return array, f"deleted {rel}"
    if kind == "truncated shard file":
        keep = rng.randrange(1, len(data))
        f.write_bytes(bytes(data[:keep]))
        return array, f"cut {rel} to {keep} of {len(data)} bytes"
    lo, hi = (0, len(data) - index) if kind == "flipped data bytes" else (len(data) - index, len(data))
    at = rng.randrange(lo, max(lo + 1, hi - 4))
    for i in range(at, min(at + 4, len(data))):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return array, f"flipped bytes {at}..{at + 3} of {rel} ({len(data)} bytes, index {index})"


def trial_damage(ws: Workspace, kind: str, rng: random.Random) -> tuple[str | None, str | None]:
    """A damaged shard: mmkd-train refuses in one line naming the array (trained over a whole epoch, so it
    reads every chunk), mmkd-verify reports the array, --repair restores arrays equal to the pristine store."""
    ref = ws.ref("text")
    d = ws.trial_dir(f"damage-{kind}")
    store = d / "s.zarr"
    shutil.copytree(ref, store)
    array, what = damage(store, kind, rng)
    epoch = -(-ws.samples // 8)
    o = run(ws.train_cmd(store, d / "run", steps=epoch + 2), d)
    problem = one_error_line(o, array)
    if problem:
        return f"{what}: mmkd-train: {problem}", None
    o2 = run([script("mmkd-verify"), str(store)], d)
    if o2.rc == 0 or "Traceback" in o2.text or array not in o2.text:
        return f"{what}: mmkd-verify rc={o2.rc} does not report {array}: {o2.text.strip()[-400:]!r}", None
    o3 = run([script("mmkd-verify"), str(store), "--repair", "--quiet"], d)
    if o3.rc != 0:
        return f"{what}: mmkd-verify --repair: {o3.brief()}", None
    problem = store_diff(ref, store)
    if problem:
        return f"{what}: after --repair {problem}", None
    return None, f"{what}: {o.error_lines()[0][:160]}"


# ---------------------------------------------------------------------------------------- hostile attributes


def _set_attr(store: Path, dotted: str, value: object) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    node = meta["attributes"]
    *parents, last = ["mmkd", *dotted.split(".")] if dotted else ["mmkd"]
    for k in parents:
        node = node[k]
    node[last] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def _set_array(store: Path, name: str, value: int) -> None:
    import zarr

    a = zarr.open_group(str(store), mode="r+")[name]
    a[...] = value


# (name, attribute path, value, what the refusal must name); "=lengths" writes the lengths array itself
HOSTILE: list[tuple[str, str, object, str]] = [
    ("storage.chunk_samples 0", "storage.chunk_samples", 0, "chunk_samples"),
    ('storage.chunk_samples "abc"', "storage.chunk_samples", "abc", "chunk_samples"),
    ("storage.shard_samples 6 (chunk 4)", "storage.shard_samples", 6, "shard_samples"),
    ("views.count -1", "views.count", -1, "views.count"),
    ("recipe null", "recipe", None, "recipe"),
    ("recipe.layers [0, 7] of 2 blocks", "recipe.layers", [0, 7], "recipe.layers"),
    ("storage.dtype int8 on a float store", "storage.dtype", "int8", "dtype"),
    ('storage.dtype "float128"', "storage.dtype", "float128", "storage.dtype"),
    ("format_version 99", "format_version", 99, "format_version"),
    ('complete "no"', "complete", "no", "complete"),
    ("dataset.num_samples 10**18", "dataset.num_samples", 10**18, "num_samples"),
    ("mmkd attributes a list", "", [1, 2], "mmkd"),
    ("every length 0", "=lengths", 0, "lengths"),
    ("a negative length", "=lengths", -3, "lengths"),
]


def trial_hostile(ws: Workspace, name: str, dotted: str, value: object, needle: str) -> tuple[str | None, str | None]:
    ref = ws.ref("text")
    d = ws.trial_dir(f"hostile-{name}")
    store = d / "s.zarr"
    shutil.copytree(ref, store)
    if dotted == "=lengths":
        _set_array(store, "lengths", value)
    else:
        _set_attr(store, dotted, value)
    o = run(ws.train_cmd(store, d / "run"), d)
    problem = one_error_line(o, needle) or run_ok_after(d / "run")
    return (f"{name}: {problem}", None) if problem else (None, f"{name}: {o.error_lines()[0][:160]}")


def trial_zarr_v2(ws: Workspace) -> tuple[str | None, str | None]:
    """A zarr v2 group holding a store's attributes is refused."""
    d = ws.trial_dir("zarr-v2")
    store = d / "v2.zarr"
    store.mkdir()
    (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    attrs = json.loads((ws.ref("text") / "zarr.json").read_text())["attributes"]
    (store / ".zattrs").write_text(json.dumps(attrs))
    o = run(ws.train_cmd(store, d / "run"), d)
    problem = one_error_line(o, "v2.zarr")
    return (f"zarr v2 group: {problem}", None) if problem else (None, f"zarr v2: {o.error_lines()[0][:160]}")


# ------------------------------------------------------------------------------------------ run directories


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their targets, not followed) and its bytes."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = f"-> {os.readlink(p)}"
            elif p.is_file():
                out[key] = p.read_bytes()
            else:
                out[key] = "dir"
    return out


def changed(before: dict[str, bytes | str], after: dict[str, bytes | str]) -> str | None:
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return f"changed: {diff[:6]}" if diff else None


def trial_user_folder(ws: Workspace) -> tuple[str | None, str | None]:
    """--run-dir on a folder of the user's own files: refused naming it, every file kept."""
    d = ws.trial_dir("rundir-user-files")
    mine = d / "my-results"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}\n')
    (mine / "training.png").write_bytes(b"\x89PNG not really\n")
    (mine / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(mine)
    o = run(ws.train_cmd(ws.ref("text"), mine), d)
    problem = one_error_line(o, "my-results") or changed(before, snapshot(mine))
    return (f"folder of user files: {problem}", None) if problem else (None, o.error_lines()[0][:160])


def trial_student_link(ws: Workspace) -> tuple[str | None, str | None]:
    """A run whose ``student`` is a link to a folder outside it, resumed: nothing written through the link."""
    d = ws.trial_dir("rundir-student-link")
    run_dir = d / "run"
    shutil.copytree(ws.ref("train"), run_dir)
    outside = d / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text('{"mine": true}\n')
    (outside / "model.safetensors").write_bytes(b"my own weights\n")
    shutil.rmtree(run_dir / "student")
    (run_dir / "student").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    o = run([*ws.train_cmd(ws.ref("text"), run_dir), "--resume"], d)
    problem = changed(before, snapshot(outside))
    if problem is None and o.rc != 0:
        problem = one_error_line(o, "student")
    if problem is None and not (run_dir / "student").is_symlink():
        problem = "the link was replaced"
    how = o.error_lines()[0][:160] if o.rc else "exit 0, the link left alone"
    return (f"student link: {problem}", None) if problem else (None, how)


def trial_two_trainers(ws: Workspace, rng: random.Random) -> tuple[str | None, str | None]:
    """Two mmkd-train into one run directory, the second started at a moment drawn over the first's run:
    one is refused in one line, the other finishes as an uninterrupted run."""
    ref_run = ws.ref("train")
    d = ws.trial_dir("two-trainers")
    run_dir = d / "run"
    cmd = ws.train_cmd(ws.ref("text"), run_dir)
    delay = ws.draw("train", rng)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, cmd, d)
        time.sleep(delay)
        second = pool.submit(run, cmd, d)
        a, b = first.result(), second.result()
    when = f"second started at +{delay:.2f}s"
    if a.rc == 0 and b.rc == 0:
        return f"{when}: both ran to the end in one run directory", None
    refused = b if a.rc == 0 else a
    if a.rc != 0 and b.rc != 0:
        return f"{when}: neither finished: {a.brief()} / {b.brief()}", None
    problem = one_error_line(refused)
    if problem:
        return f"{when}: the refused one: {problem}", None
    problem = weights_diff(ref_run, run_dir) or metrics_diff(ref_run, run_dir)
    return (f"{when}: {problem}", None) if problem else (None, f"{when}: {refused.error_lines()[0][:160]}")


# ------------------------------------------------------------------------------------ disk full in training


TRAIN_SHIM = '''
"""Test shim: files opened for writing under MMKD_FAULT_ROOT fail with ENOSPC once the files there hold more
than MMKD_FAULT_BUDGET bytes, and shutil.disk_usage reports what is left of the budget."""
import errno, os, shutil, sys
from collections import namedtuple
_root, _budget = os.environ["MMKD_FAULT_ROOT"], int(os.environ["MMKD_FAULT_BUDGET"])


def _used():
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(_root) for f in fs)


def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(_root):
        if any(c in str(args[1] or "r") for c in "wax+") and _used() >= _budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), args[0])


sys.addaudithook(_hook)
_usage, _Usage = shutil.disk_usage, namedtuple("usage", "total used free")


def _disk_usage(path):
    if str(path).startswith(_root):
        return _Usage(_budget, _used(), max(0, _budget - _used()))
    return _usage(path)


shutil.disk_usage = _disk_usage
'''


def trial_disk_full_train(ws: Workspace, disk: DiskFull, budget: int) -> tuple[str | None, str | None]:
    """mmkd-train with ``budget`` bytes free for its run directory: one line, then space freed and the run
    continued as the line says ends with the uninterrupted run's weights."""
    ref_run = ws.ref("train")
    d = ws.trial_dir("disk-full-train")
    for p in disk.mnt.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_dir = disk.mnt / "run"
    cmd = ws.train_cmd(ws.ref("text"), run_dir)
    o = disk.run_with_free(budget, cmd, d)
    if o.rc == 0:
        return None, f"{budget:,} bytes sufficed"
    problem = one_error_line(o)
    line = o.error_lines()[0] if not problem else ""
    if problem is None and "space" not in line.lower():
        problem = f"the error does not say the disk is full: {line}"
    if problem:
        return f"{budget:,} bytes free: {problem}", None
    o2, how = continue_train(ws, cmd, d, run_dir, line)
    if o2.rc != 0:
        return f"{budget:,} bytes free ({line}); after freeing space: {o2.brief()}", None
    problem = weights_diff(ref_run, run_dir)
    return (f"{budget:,} bytes free: {problem}", None) if problem else (None, how or f"{budget:,} free: {line[:140]}")


def measure_train_need(ws: Workspace, disk: DiskFull) -> int:
    run_dir = disk.mnt / "run"
    before = disk.free()
    o = run(ws.train_cmd(ws.ref("text"), run_dir), ws.root)
    need = before - disk.free() if disk.mode == "tmpfs" else sum(f.stat().st_size for f in run_dir.rglob("*"))
    if o.rc != 0:
        raise RuntimeError(f"training onto {disk.mnt} failed: {o.text[-1000:]}")
    shutil.rmtree(run_dir)
    return need


# ------------------------------------------------------------------------------------ signals at start-up

EARLY = 0.3  # seconds after the process starts


def early_commands(ws: Workspace, d: Path) -> dict[str, list[str]]:
    store = ws.ref("text")
    return {
        "mmkd-extract": ws.text_cmd(d / "s.zarr"),
        "mmkd-train": ws.train_cmd(store, d / "run"),
        "mmkd-eval": [script("mmkd-eval"), "--model", str(ws.bert), "--task", "paraphrase", "--dataset", "mrpc"],
        "mmkd-ablate": [script("mmkd-ablate"), "--targets", str(store), "--out", str(d / "ab"), "--vary", "lr=1e-3"],
        "mmkd-verify": [script("mmkd-verify"), str(store)],
    }


def trial_early_signal(ws: Workspace, command: str, sig: int) -> tuple[str | None, str | None]:
    d = ws.trial_dir(f"early-{command}-{signal.Signals(sig).name}")
    cmd = early_commands(ws, d)[command]
    o = run_faulted(cmd, d, lambda: True, delay=EARLY, sig=sig, group=sig == signal.SIGINT)
    if not o.signalled:
        return f"{command} ended before {EARLY} s: {o.brief()}", None
    problem = one_error_line(o)
    if o.rc == -sig and not o.text.strip():
        # the default action: the signal came before the entry point installed its handlers
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mmkd.app.entry"], env=env(), check=False)
        problem += f" (killed silently; importing the entry point takes {time.perf_counter() - start:.2f} s now)"
    if problem is None and o.rc != 128 + sig:
        problem = f"exit code {o.rc}, expected {128 + sig}"
    extra = [ln for ln in o.text.strip().splitlines() if ln.strip() and not ln.startswith("error:")]
    if problem is None and extra:
        problem = f"more output than the line: {extra[:3]}"
    return (f"{signal.Signals(sig).name} at {EARLY} s: {problem}", None) if problem else (None, None)


# ------------------------------------------------------------------------------------------------------ main


SPREAD = "fault moments per fifth of the run"


def print_table(rows: list[Row], title: str) -> None:
    if not rows:
        print(f"{title}: no rows")
        return
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
        table.add_column(SPREAD)
        for r in rows:
            ok = r.whole == r.trials
            table.add_row(r.fault, str(r.trials), f"[{'green' if ok else 'bold red'}]{r.whole}[/]", r.spread())
        Console(width=160).print(table)
    else:
        w = max(len(r.fault) for r in rows)
        print(title)
        print(f"{'fault':<{w}}  trials  nothing lost  {SPREAD}")
        for r in rows:
            print(f"{r.fault:<{w}}  {r.trials:>6}  {r.whole:>12}  {r.spread()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=None, help="trials of each random fault (default 10; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one trial per random fault, smaller data")
    ap.add_argument(
        "--only", default=None, help="run only rows whose name contains this (case-insensitive; A|B: either)"
    )
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
        return args.only is None or any(part.lower() in name.lower() for part in args.only.split("|"))

    def trial_row(name: str, n: int, fn: Callable[[], tuple[str | None, str | None]]) -> None:
        if not wanted(name):
            return
        row = Row(name)
        for _ in range(n):
            ws.moment = None
            try:
                problem, note = fn()
            except Exception as e:  # noqa: BLE001 - a trial that crashes the suite lost its answer: count it
                problem, note = f"trial crashed: {type(e).__name__}: {e}", None
            row.add(problem, note)
            if ws.moment is not None:
                row.moments.append(ws.moment)
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
        trial_row("kill -9 mmkd-train at a random moment -> --resume", trials, lambda: trial_kill_train(ws, rng))
        trial_row(
            "kill -9 mmkd-train inside a checkpoint write -> --resume",
            n_ckpt,
            lambda: trial_kill_train(ws, rng, "checkpoint"),
        )
        trial_row(
            "kill -9 mmkd-train between a checkpoint's rename and the oldest one's deletion -> --resume",
            n_ckpt,
            lambda: trial_kill_train(ws, rng, "rotation"),
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

    def damage_rows() -> None:
        for kind in DAMAGES:
            trial_row(
                f"damaged store: {kind} -> refused, reported, repaired", trials, lambda k=kind: trial_damage(ws, k, rng)
            )

    def hostile_rows() -> None:
        items = [
            (f"hostile attribute: {name}", lambda h=(name, dotted, value, needle): [trial_hostile(ws, *h)])
            for name, dotted, value, needle in HOSTILE
        ] + [("hostile store: a zarr v2 group", lambda: [trial_zarr_v2(ws)])]
        if any(wanted(n) for n, _ in items):
            ws.ref("text")
        parallel_rows(items)

    def rundir_rows() -> None:
        trial_row("run dir: a folder of user files as --run-dir -> refused, kept", 1, lambda: trial_user_folder(ws))
        trial_row(
            "run dir: student/ a link out of the run, --resume -> not followed", 1, lambda: trial_student_link(ws)
        )
        trial_row(
            "run dir: two mmkd-train at once -> one refused, one whole", trials, lambda: trial_two_trainers(ws, rng)
        )

    def disk_train_rows() -> None:
        name = "disk full during mmkd-train -> free space -> continue as told"
        if not wanted(name):
            return
        disk = DiskFull(root / "disk-train", args.disk, shim=TRAIN_SHIM)
        try:
            need = measure_train_need(ws, disk)
            notes.append(f"disk full in training: {disk.mode}; a run needs {need:,} bytes there; free space drawn")
            budgets = iter(disk_budgets(trials, need, disk.mode, rng))
            trial_row(f"{name} ({disk.mode})", trials, lambda: trial_disk_full_train(ws, disk, next(budgets)))
        finally:
            disk.close()

    def early_signal_rows() -> None:
        for command in ("mmkd-extract", "mmkd-train", "mmkd-eval", "mmkd-ablate", "mmkd-verify"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                trial_row(
                    f"{signal.Signals(sig).name} {EARLY} s after {command} starts -> one line",
                    1,
                    lambda c=command, s=sig: trial_early_signal(ws, c, s),
                )

    sections = (
        kill_rows,
        disk_rows,
        disk_train_rows,
        signal_rows,
        early_signal_rows,
        damage_rows,
        hostile_rows,
        rundir_rows,
        bad_input_rows,
        stale_rows,
    )
    try:
        for section in sections:
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
            f"reference {name}: {ref.seconds:.1f} s from its process's start to its exit; random fault moments "
            "are drawn uniformly over it"
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
                [
                    {"fault": r.fault, "trials": r.trials, "whole": r.whole, "notes": r.notes, "moments": r.moments}
                    for r in rows
                ],
                indent=2,
            )
        )
    lost = [r for r in rows if r.whole != r.trials]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
