"""A small name -> factory registry, one instance per kind (teachers, students, datasets, losses)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import MmkdError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names (and aliases) to factories.

    Args:
        kind: What is registered, used in error messages ("teacher", "dataset", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator registering a factory under ``name`` and optional aliases."""

        def deco(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[name] = fn
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return deco

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` (a name or alias) refers to."""
        name = self._aliases.get(name, name)
        if name not in self._entries:
            known = ", ".join(self.names())
            raise MmkdError(f"unknown {self.kind} {name!r}; known: {known}")
        return name

    def get(self, name: str) -> F:
        """The factory for ``name``; an unknown name is an MmkdError listing the known ones."""
        return self._entries[self.canonical(name)]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names (not aliases) matching a glob pattern, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._aliases
