"""Writers' locks: the store lock ``<store>.lock`` that one StoreWriter holds from ``open`` to ``close``, and the
slice locks ``<store>.lock.K-of-N`` of commands that each fill one slice of a store's shards (``--shards K/N``).

Both are files (or, beside a store at a URL, objects) beside the store, created only if absent; a lock left by a
process of this host that no longer runs is taken over (see ``StoreLock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MmkdError
from ..location import Location, StoreURL, store_location

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


def lock_path(path: str | Location) -> Location:
    """The lock file of a store: ``<store>.lock`` beside the store directory (e.g. ``s.zarr.lock``), or the
    object ``<url>.lock`` beside a store at a URL.

    Beside, not inside: it exists before the store does, survives ``--overwrite`` deleting the store, and no
    zarr reader ever sees it. The path is resolved, so two spellings of one store share one lock.
    """
    p = store_location(path).resolve()
    return p.with_name(p.name + LOCK_SUFFIX)


class StoreLock:
    """An exclusive lock on one store, held by one StoreWriter from ``open`` to ``close``.

    The lock file is created atomically (``O_CREAT | O_EXCL``) and holds JSON ``{pid, host, started,
    token}``. A lock left by a process that died on this host (a kill -9, a crash) is taken over with a
    warning that names it, so that re-running the killed command continues it, as the store promises; the
    takeover renames the stale file first, so two re-runs racing for it cannot both win. A lock from
    another host, or from a live process, is refused: its pid cannot be judged from here.

    Beside a store at a URL the lock is an object created only if absent (``StoreURL.create``: S3's
    ``If-None-Match: *``); object storage has no rename, so this host's takeovers take turns instead.
    """

    def __init__(self, path: Location) -> None:
        self.path = path
        self.token: str | None = None

    def acquire(self, store: Location) -> None:
        """Create the lock, or take over a stale one of this host.

        Args:
            store: The store it locks (named in the messages).

        Raises:
            MmkdError: another process holds it (the message says who and what to do), or it cannot be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": secrets.token_hex(8),
        }
        if isinstance(self.path, StoreURL):
            self._acquire_object(store, json.dumps(info).encode())
            self.token = info["token"]
            return
        try:
            fd = self._create(store)
        except FileExistsError:
            raise MmkdError(self._held_message(store)) from None
        except OSError as e:
            raise MmkdError(
                f"cannot create the lock file {self.path} ({e.strerror}); choose an --out in a writable directory"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self.token = info["token"]

    def _acquire_object(self, store: Location, data: bytes) -> None:
        try:
            self.path.create(data)
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise MmkdError(
                f"cannot create the lock object {self.path} ({e}); check that the bucket exists and may be written"
            ) from None
        stale = self._stale()
        if stale is None:
            raise MmkdError(self._held_message(store))
        with _host_mutex(str(self.path)):
            now = self._stale()  # another re-run of this host may have taken it over while this one looked
            try:
                if now is not None and now.get("token") == stale.get("token"):
                    self.path.unlink(missing_ok=True)
                self.path.create(data)
            except FileExistsError:
                raise MmkdError(self._held_message(store)) from None
        log.warning(
            "took over the stale lock %s of pid %s (started %s), which is no longer running; %s continues "
            "from its finished shards",
            self.path,
            stale["pid"],
            stale.get("started", "?"),
            store,
        )

    def _create(self, store: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:
            info = self._stale()
            if info is None:
                raise
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)  # atomic: of two racing re-runs only one moves the stale lock
        except FileNotFoundError:
            raise FileExistsError(self.path) from None
        aside.unlink(missing_ok=True)
        log.warning(
            "took over the stale lock %s of pid %s (started %s), which is no longer running; %s continues "
            "from its finished shards",
            self.path,
            info["pid"],
            info.get("started", "?"),
            store,
        )
        return os.open(self.path, flags, 0o644)

    def _stale(self) -> dict[str, Any] | None:
        """The lock's record if it was left by a process of this host that no longer runs, else None."""
        try:
            info = read_lock(self.path)
        except FileNotFoundError:
            return None
        ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and info.get("host") == socket.gethostname()
        return info if ok and not pid_alive(info["pid"]) else None

    def release(self) -> None:
        """Delete the lock if it is still this one's (a warning otherwise). Idempotent."""
        if self.token is None:
            return
        try:
            held = read_lock(self.path)
            if held is not None and held.get("token") == self.token:
                self.path.unlink()
            else:
                log.warning("lock %s is no longer this writer's (now %s); left in place", self.path, held)
        except FileNotFoundError:
            log.warning("lock %s was deleted while this writer held it", self.path)
        self.token = None

    def _held_message(self, store: Path) -> str:
        info = read_lock(self.path)
        if info is None:  # created but not yet written, or damaged: look again once
            time.sleep(0.2)
            info = read_lock(self.path)
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return (
                f"{store} is locked by {self.path}, which is unreadable; if no extraction of this store is "
                f"running, delete {self.path} and run again"
            )
        pid, host, started = info["pid"], info.get("host"), info.get("started", "?")
        if host != socket.gethostname():
            return (
                f"{store} is locked by pid {pid} on host {host} since {started} ({self.path}); if no "
                f"extraction of this store runs there, delete {self.path} and run again"
            )
        if not pid_alive(pid):
            return (
                f"stale lock {self.path} from pid {pid} (started {started}), which is no longer running; "
                "delete it to continue (finished shards are kept)"
            )
        me = ", this process: another StoreWriter of it is still open" if pid == os.getpid() else ""
        return (
            f"{store} is being written by pid {pid} (since {started}{me}): lock {self.path}; wait for it to "
            f"finish, or if pid {pid} is not writing this store, delete {self.path}"
        )


@contextlib.contextmanager
def _host_mutex(key: str) -> Iterator[None]:
    """Mutual exclusion among this host's processes (stale locks are taken over by their own host only): an
    flock on a file in the temp directory, which the kernel releases when its holder dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): takeovers race as they would without it
        yield
        return
    name = "mmkd-takeover-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    fd = os.open(Path(tempfile.gettempdir()) / name, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_lock(path: Location) -> dict[str, Any] | None:
    """The lock's JSON; None when it is empty or unparseable. FileNotFoundError when it is gone."""
    text = path.read_text()
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates; assume alive, which refuses rather than corrupts
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    try:  # an exited child nobody has reaped yet still answers signal 0, but holds nothing
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


# ---------------------------------------------------------------------------------------- --shards K/N slices

LOCK_WAIT = 120.0  # seconds ``wait_for_lock`` waits by default while another command holds a lock


def wait_for_lock(path: Location, store: Location, wait: float | None = None) -> StoreLock:
    """Take the lock at ``path``, waiting up to ``wait`` seconds (default LOCK_WAIT) while another holds it.

    Args:
        path: The lock (``lock_path(store)`` or a slice's).
        store: The store it locks.
        wait: Seconds to wait at most.

    Raises:
        MmkdError: still held after ``wait`` seconds, or it cannot be created at all.
    """
    wait = LOCK_WAIT if wait is None else wait
    lock = StoreLock(path)
    deadline = time.monotonic() + wait
    absent = 0
    while True:
        try:
            lock.acquire(store)
            return lock
        except MmkdError as e:
            if path.exists():
                absent = 0
            else:  # released just now, or it cannot be created at all
                absent += 1
                if absent > 3:
                    raise
            if time.monotonic() > deadline:
                raise MmkdError(f"{e} (waited {wait:.0f} s)") from None
            log.info("waiting for the lock %s", path)
            time.sleep(0.05 + 0.2 * random.random())


def slice_lock_path(store: str | Location, k: int, n: int) -> Location:
    """The lock of slice K/N of a store: ``<store>.lock.K-of-N`` beside the store lock."""
    lock = lock_path(store)
    return lock.with_name(f"{lock.name}.{k}-of-{n}")


def live_slices(store: str | Location) -> list[tuple[tuple[int, int], Location, dict[str, Any]]]:
    """The slice locks of ``store`` held now: ((K, N), lock path, its record). A lock left by a process of
    this host that no longer runs is not held (the next command of that slice takes it over)."""
    lock = lock_path(store)
    pattern = re.compile(re.escape(lock.name) + r"\.(\d+)-of-(\d+)")
    if not lock.parent.exists():
        return []
    out = []
    for path in lock.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m is None or StoreLock(path)._stale() is not None:
            continue
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except ValueError:  # being written
            info = {}
        out.append(((int(m[1]), int(m[2])), path, info if isinstance(info, dict) else {}))
    return out


def refuse_slices(store: Location, n: int | None) -> None:
    """Refuse a writer beside a live slice it could overlap: any slice for a whole run (``n`` None), a slice
    of another N for a slice of N. Call it under the store lock, which every slice takes to begin.

    Raises:
        MmkdError: such a slice is being written; the message names it.
    """
    for (k2, n2), path, info in live_slices(store):
        if n is not None and n2 == n:
            continue
        who = f"slice {k2}/{n2}, pid {info.get('pid', '?')} on {info.get('host', '?')}: lock {path}"
        if n is None:
            raise MmkdError(
                f"{store} is being filled by --shards commands ({who}); wait for them, or run with --shards K/{n2}"
            )
        raise MmkdError(
            f"--shards K/{n}: {store} is being filled in slices of {n2} ({who}); every command of one store "
            "takes the same N"
        )


def take_slice(store: Location, k: int, n: int) -> StoreLock:
    """Refuse overlapping slices (``refuse_slices``), then take the lock of slice K/N. Call it under the
    store lock.

    Raises:
        MmkdError: an overlapping slice is live, or another command writes this slice.
    """
    refuse_slices(store, n)
    lock = StoreLock(slice_lock_path(store, k, n))
    try:
        lock.acquire(store)
    except MmkdError as e:
        raise MmkdError(f"--shards {k}/{n}: another command writes this slice: {e}") from None
    return lock


# ---------------------------------------------------------------------------------------------- readers' leases

READER = "reader"


def reader_lease_path(store: str | Location) -> Location:
    """This process's lease on a store it reads: ``<store>.lock.reader-<host>-<pid>`` beside the store lock."""
    lock = lock_path(store)
    return lock.with_name(f"{lock.name}.{READER}-{socket.gethostname()}-{os.getpid()}")


def take_reader_lease(store: str | Location) -> StoreLock | None:
    """Record that this process reads ``store`` (a trainer, for its whole run), so that ``--overwrite`` of
    the store is refused meanwhile. Released like a lock; a lease of a process that died is ignored. None for
    a store at a URL (object storage has no listing of leases cheap enough to check)."""
    store = store_location(store)
    if isinstance(store, StoreURL):
        return None
    lease = StoreLock(reader_lease_path(store))
    lease.acquire(store)
    return lease


def live_readers(store: str | Location) -> list[tuple[Location, dict[str, Any]]]:
    """The leases of processes reading ``store`` now: (lease path, its record)."""
    store = store_location(store)
    lock = lock_path(store)
    if isinstance(store, StoreURL) or not lock.parent.exists():
        return []
    out = []
    for path in lock.parent.glob(f"{lock.name}.{READER}-*"):
        if StoreLock(path)._stale() is not None:
            continue
        try:
            info = read_lock(path)
        except FileNotFoundError:
            continue
        out.append((path, info if isinstance(info, dict) else {}))
    return out


def refuse_readers(store: Location, action: str) -> None:
    """Refuse ``action`` (deleting or replacing the store) while a process reads it."""
    for path, info in live_readers(store):
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
        raise MmkdError(
            f"{action}: {store} is being read by a trainer ({who}; lease {path}); wait for it to finish or "
            "choose another --out"
        )
