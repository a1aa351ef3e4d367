"""Run directories are ours before anything is written into them, and one trainer writes each.

A run directory must be new, empty, or an mmkd run, which its record ``.mmkd-run`` marks (a run written
before the record existed is recognised by its ``config.json``'s ``train`` section and ``metrics.jsonl``).
Anything else (a folder of the user's own files) is refused, naming it. The names a run writes must not be
symbolic links out of the run directory: an export through ``student -> /elsewhere`` would overwrite
``/elsewhere``. A lock ``.mmkd-run.lock`` (pid, host, start) keeps a second trainer out; a dead owner's lock
of this host is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError
from mmkd_core.store.lock import StoreLock, pid_alive, read_lock

RECORD = ".mmkd-run"
LOCK = ".mmkd-run.lock"
# every name a run writes at its top level
OWN_NAMES = ("config.json", "metrics.jsonl", "checkpoints", "student", "tb", "training.png", "report.json", RECORD)


def _is_old_run(run_dir: Path) -> bool:
    """A run directory written before runs carried their record: its config.json is a run's."""
    try:
        record = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("train"), dict) and "targets" in record["train"]


def check_owned(run_dir: Path) -> None:
    """Refuse a run directory that is not new, empty or an mmkd run, and own names that are symlinks.

    Raises:
        MmkdError: one line naming the directory or the link.
    """
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        what = "a symbolic link" if run_dir.is_symlink() else "a file"
        raise MmkdError(f"--run-dir {run_dir}: is {what}, not a run directory; choose another --run-dir")
    for name in OWN_NAMES:
        if (run_dir / name).is_symlink():
            raise MmkdError(
                f"--run-dir {run_dir}: {name} is a symbolic link ({os.readlink(run_dir / name)}); a run writes "
                "only inside its directory: remove the link or choose another --run-dir"
            )
    if run_dir.is_dir():
        entries = [p.name for p in run_dir.iterdir()]
        if entries and RECORD not in entries and LOCK not in entries and not _is_old_run(run_dir):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise MmkdError(
                f"--run-dir {run_dir}: holds files that are not an mmkd run ({shown}); choose a new or empty directory"
            )


def claim(run_dir: Path) -> RunLock:
    """Make ``run_dir`` this process's run: check it is ours, create it and its record, take its lock."""
    check_owned(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir / LOCK)
    lock.acquire(run_dir)
    mark_run(run_dir)
    return lock


def mark_run(run_dir: Path) -> None:
    """Record that ``run_dir`` (an existing directory) is an mmkd run: a tool that prepares a run directory
    before training in it (mmkd-ablate) marks it first, so the trainer recognises it as ours."""
    record = run_dir / RECORD
    if not record.exists():
        record.write_text(json.dumps({"kind": "mmkd-run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


class RunLock(StoreLock):
    """The lock of one run directory: held by the trainer writing it (rank 0) from set-up to the export."""

    def _held_message(self, store: Path) -> str:
        info: Any = read_lock(self.path)
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return (
                f"--run-dir {store}: locked by {self.path}, which is unreadable; if no mmkd-train writes it, delete it"
            )
        pid, host, started = info["pid"], info.get("host"), info.get("started", "?")
        if host == socket.gethostname() and not pid_alive(pid):
            return f"--run-dir {store}: stale lock {self.path} of pid {pid}, no longer running; delete it to continue"
        return (
            f"--run-dir {store}: another mmkd-train (pid {pid} on {host}, since {started}) is writing this run; "
            f"wait for it, or choose another --run-dir (if it is not running, delete {self.path})"
        )
