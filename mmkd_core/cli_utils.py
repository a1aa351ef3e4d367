"""Helpers shared by the thin CLIs: option parsing and the one-line error exit."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.logging import RichHandler
from rich.markup import escape

from .errors import MmkdError
from .progress import console

# What an interrupted command prints when its stage did not say more: every stage continues where it
# stopped when run again with the same arguments (mmkd-train adds --resume once it has a checkpoint, and
# says so itself).
CONTINUE_HINT = "run the same command again to continue"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# torch's DataLoader re-raises a worker's exception with the worker's traceback folded into the message
# (the original message is the traceback's last line: "mmkd_core.errors.MmkdError: <message>")
_WORKER_WRAPPED = re.compile(r"Original Traceback \(most recent call last\):.*\n(?:[\w.]*\.)?\w+: ([^\n]*)\n*\Z", re.S)


def parse_options(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["depth=2", "tower=text"]`` -> ``{"depth": 2, "tower": "text"}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MmkdError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def one_line(message: str) -> str:
    """An error message as one line: a DataLoader worker's wrapped message becomes the original one."""
    m = _WORKER_WRAPPED.search(message)
    if m:
        message = m.group(1)
    return " ".join(message.split())


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _signals_as_interrupt(received: list[int], finishing: list[bool]) -> Iterator[None]:
    """For the duration of a command: SIGTERM behaves like Ctrl-C (KeyboardInterrupt in the main thread),
    and the signals that arrived are recorded for the exit code. Once ``finishing`` is set (the error line
    is being printed) further signals are only recorded. A no-op outside the main thread, where Python
    cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        received.append(signum)
        if not finishing:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _disk_full_message(e: OSError) -> str:
    path = e.filename or _path_in_traceback(e)
    where = f" writing {path}" if path else ""
    return (
        f"no space left on device{where} ({os.strerror(e.errno)}); free space and run the same command "
        "again to continue"
    )


def _path_in_traceback(e: BaseException) -> str | None:
    """The innermost ``path``-like local of the failing frames: a write's OSError carries no file name, but
    the function that opened the file (zarr's store, safetensors, our own writers) holds it."""
    tb, found = e.__traceback__, None
    while tb is not None:
        for name in ("path", "tmp_path", "filename", "file", "f"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, str | os.PathLike) and not isinstance(value, bytes):
                found = os.fspath(value)
                break
            if hasattr(value, "name") and isinstance(getattr(value, "name", None), str):
                found = value.name
                break
        tb = tb.tb_next
    return found


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for typer commands: user mistakes and interruptions end as one line on stderr.

    - MmkdError: ``error: <message>``, exit code 2.
    - Ctrl-C or SIGTERM: the stage's own message when it raised one (it says how to continue), else
      ``error: interrupted; run the same command again to continue``; exit code 128 + signal (130, 143).
    - OSError ENOSPC (disk full): one line naming the path when known and saying that re-running the same
      command after freeing space continues; exit code 1. Another OSError naming a file: that file and the
      reason, exit code 1.

    Works under typer's CliRunner too (it runs the command in the calling thread).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        received: list[int] = []
        finishing: list[bool] = []

        def interrupted_code() -> int:
            return 128 + int(received[0] if received else signal.SIGINT)

        with _signals_as_interrupt(received, finishing):
            try:
                return fn(*args, **kwargs)
            except MmkdError as e:
                finishing.append(True)
                raise _fail(str(e), interrupted_code() if received else 2) from None
            except KeyboardInterrupt:
                finishing.append(True)
                raise _fail(f"interrupted; {CONTINUE_HINT}", interrupted_code()) from None
            except OSError as e:
                if e.errno in _DISK_FULL:
                    finishing.append(True)
                    raise _fail(_disk_full_message(e), 1) from None
                if e.filename is None:
                    raise
                # the file system refused a named file (permissions, a directory where a file was expected)
                finishing.append(True)
                raise _fail(f"{e.filename}: {e.strerror or e}", 1) from None

    return wrapper
