"""Helpers shared by the thin CLIs: option parsing and the one-line error exit."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import typer
from rich.logging import RichHandler

from .errors import MmkdError
from .progress import console


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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for typer commands: MmkdError -> one line on stderr, exit code 2 (also under CliRunner)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MmkdError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
