"""Helpers shared by the thin CLIs: option parsing, choices from the registries, ``--config`` files, and the
one-line error exit."""

from __future__ import annotations

import contextlib
import difflib
import enum
import errno
import functools
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperCommand

from mmkd_core.errors import MmkdError

from .progress import console

# What an interrupted command prints when its stage did not say more: every stage continues where it
# stopped when run again with the same arguments (mmkd-train adds --resume once it has a checkpoint, and
# says so itself).
CONTINUE_HINT = "run the same command again to continue"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LONGEST = 600  # characters of an error line: a message quoting a huge value is cut
# what libraries that write files themselves raise when the disk fills: safetensors' SafetensorError ("No space
# left on device (os error 28)") and torch.save's RuntimeError from its zip writer
_WRITE_FAILED = re.compile(
    r"No space left on device|os error 28|Disk quota exceeded|PytorchStreamWriter failed|"
    r"enforce fail at inline_container"
)
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


# ------------------------------------------------------------------------------------ choices and near misses


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """``", did you mean 'stl10'?"`` when ``value`` is a near miss of one of ``known`` (difflib), else ``""``."""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def choices(names: Iterable[str]) -> Any:
    """An enum of ``names``, the annotation of an option that takes one of them (``list[...]`` of it when the
    option repeats): typer lists them in --help and completes them. Pair it with :func:`choice` as the
    option's ``parser``, which decides what is accepted (aliases too), words the error and passes the plain
    string on."""
    return enum.Enum("Choices", [(n, n) for n in names])


def choice(option: str, kind: str, *known: Any, comma: bool = False) -> Callable[[str], str]:
    """A typer ``parser`` that returns the value unchanged when one of ``known`` holds it, else raises a
    one-line MmkdError naming the option, the nearest name and the choices.

    Args:
        option: The option's flag, for the message (``--dataset``).
        kind: What the names are, for the message (``dataset``).
        *known: Tuples of names, or registries (``names()`` and ``in``, which also knows the aliases).
        comma: The value is a comma list (``--task a,b``): each item is checked.
    """

    def names() -> list[str]:
        return [n for k in known for n in (k.names() if hasattr(k, "names") else k)]

    def parse(value: str) -> str:
        for item in value.split(",") if comma else [value]:
            item = item.strip()
            if comma and not item:
                continue
            if not any(item in k for k in known):
                all_names = names()
                raise MmkdError(
                    f"{option} {item!r}: unknown {kind}{did_you_mean(item, all_names)} (known: {', '.join(all_names)})"
                )
        return value

    return parse


# ------------------------------------------------------------------------------------------- --config FILE


def read_config(path: Path, lists: bool = False) -> Any:
    """The mapping in a YAML or JSON file (``.json``: JSON; otherwise YAML, of which JSON is a subset); with
    ``lists``, a list of mappings is accepted too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MmkdError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MmkdError(f"--config {path}: cannot be read ({e})") from None
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MmkdError(f"--config {path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:  # pyyaml is a dependency; a broken environment still gets told what to do
            raise MmkdError(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give a .json file"
            ) from None
        try:
            data = yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 -- a SafeLoader
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else str(e)
            raise MmkdError(f"--config {path}: not valid YAML ({' '.join(where.split())})") from None
    if data is None:
        return {}
    if lists and isinstance(data, list):
        bad = next((type(d).__name__ for d in data if not isinstance(d, dict)), None)
        if bad is None and data:
            return data
        raise MmkdError(
            f"--config {path}: expected a list of mappings of option names to values, found {bad or 'an empty list'}"
        )
    if not isinstance(data, dict):
        raise MmkdError(f"--config {path}: expected a mapping of option names to values, found {type(data).__name__}")
    return data


def _no_alias_loader() -> type:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """A safe loader that refuses aliases (``*name``): nested aliases expand exponentially (a few hundred
        bytes became a gigabyte), and a configuration of names and numbers never needs them."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not accepted in config files")
            return super().compose_node(parent, index)

    return NoAliasLoader


def excerpt(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about values read from files."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def config_values(ctx: typer.Context, path: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's mapping as the command's ``default_map``: keys are option names (``batch-size`` or
    ``batch_size``); a repeatable option takes a list, or a mapping for ``KEY=VALUE`` options."""
    params = {p.name: p for p in ctx.command.params if p.expose_value and p.name != "config"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        param = params.get(name)
        if param is None:
            raise MmkdError(
                f"--config {path}: unknown key {key!r}{did_you_mean(name, params)} "
                f"(keys are {ctx.info_name}'s option names)"
            )
        if value is None:  # null: the option's default
            continue
        if param.multiple:
            if isinstance(value, Mapping):  # {"width": 192} -> ["width=192"], as parse_options reads it back
                value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
            elif not isinstance(value, list):
                value = [value]
            value = [v if isinstance(v, str) else json.dumps(v) for v in value]
        elif isinstance(value, list | Mapping):
            raise MmkdError(f"--config {path}: {key!r} takes one value, not {type(value).__name__} {excerpt(value)}")
        out[name] = value
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
    message = " ".join(message.split())
    return message if len(message) <= _LONGEST else f"{message[: _LONGEST - 3]}..."


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
        if finishing:
            return
        if frame is not None and frame.f_code.co_name == "__del__":
            # raised inside a finaliser, KeyboardInterrupt is printed as "Exception ignored" and dropped: deliver
            # the signal again once the finaliser has returned
            t = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            t.daemon = True
            t.start()
            return
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


def _library_write_message(e: BaseException) -> str:
    path = _path_in_traceback(e)
    where = f" {path}" if path else " a file"
    reason = "no space left on device" if re.search("space|os error 28|quota", str(e)) else "the write failed"
    return (
        f"could not write{where}: {reason} ({type(e).__name__}); free space and run the same command again to continue"
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


def _settle_io(timeout: float = 10.0) -> None:
    """After an interrupt: let zarr's I/O thread finish what the interrupted call had started. Left pending,
    its coroutines are torn down with the event loop at exit, each printing a traceback ("Event loop is
    closed"). Their writes are whole files, and a shard counts only once marked done, so letting them land
    changes nothing a re-run relies on."""
    import asyncio
    import sys

    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout + 1)


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
                if not received:
                    raise _fail(str(e), 2) from None
                exit_ = _fail(str(e), interrupted_code())
                _settle_io()
                raise exit_ from None
            except KeyboardInterrupt:
                finishing.append(True)
                exit_ = _fail(f"interrupted; {CONTINUE_HINT}", interrupted_code())
                _settle_io()
                raise exit_ from None
            except Exception as e:
                if not isinstance(e, OSError) and _WRITE_FAILED.search(str(e)):
                    finishing.append(True)
                    raise _fail(_library_write_message(e), 1) from None
                if not isinstance(e, OSError):
                    raise
                if e.errno in _DISK_FULL:
                    finishing.append(True)
                    raise _fail(_disk_full_message(e), 1) from None
                if e.filename is None:
                    raise
                # the file system refused a named file (permissions, a directory where a file was expected)
                finishing.append(True)
                raise _fail(f"{e.filename}: {e.strerror or e}", 1) from None

    return wrapper


class Command(TyperCommand):
    """The stages' command class (``@app.command(cls=Command)``): a flag is shown as ``--x/--no-x`` with no
    value type beside it, and a mistake found while the command line or its ``--config`` file is read (a
    bad value, a name no registry knows, an unknown option) ends as one ``error:`` line, exit code 2, like
    the errors the command raises itself."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""  # typer would show <bool> beside --x/--no-x and --help
        return params

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except MmkdError as e:
            raise _fail(str(e), 2) from None
        except typer.TyperException as e:  # click's usage errors (typer carries its own click)
            message = e.format_message()
            param, ctx = getattr(e, "param", None), getattr(e, "ctx", None)
            if param is not None and ctx is not None and "mmkd.config" in ctx.meta:
                if getattr(ctx.get_parameter_source(param.name), "name", None) == "DEFAULT_MAP":
                    message += f" (from --config {ctx.meta['mmkd.config']})"
            raise _fail(f"{message} (see {info_name} --help)", getattr(e, "exit_code", 2)) from None
