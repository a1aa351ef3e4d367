"""Where a store lives: a local directory (a ``Path``, as always) or a URL that fsspec reaches.

``store_location`` turns what a user gave (``--out``, ``--targets``, ``open_store``'s argument) into one of
the two: ``s3://bucket/x.zarr``, ``gs://…``, ``memory://x.zarr`` and other fsspec URLs become a
``StoreURL``; plain paths stay ``Path``; ``file://`` URLs are local paths (the same bytes, and the local
lock's ``O_EXCL`` is stronger than any object store's). Only a ``str`` is read as a URL: ``Path`` would
have collapsed its ``//`` already.

zarr opens either kind through ``str(location)`` (a URL through its own ``FsspecStore.from_url``).
``StoreURL`` has the few ``Path`` operations the store code uses (``name``, ``/``, ``with_name``,
``exists``, ``is_dir``, ``iterdir``, ``read_text``, ``unlink``), so that code does not branch on URLs;
``remove``, ``size``, ``stamp`` and ``StoreURL.create`` (atomic create-if-absent) do the rest.

Storage options come from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL`` and other
``FSSPEC_<PROTOCOL>_<OPTION>`` variables, ``~/.config/fsspec/*.json``) and from the filesystem's
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, ... for s3fs).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from .errors import MmkdError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = ("file", "local")
# memory:// is one process's dict: its create-if-absent is made atomic by this process's lock
_MEMORY_LOCK = threading.Lock()
_warned: set[str] = set()


def is_url(spec: Any) -> bool:
    """Whether ``spec`` names a store by URL (a ``StoreURL``, or a ``str`` with a scheme other than file)."""
    if isinstance(spec, StoreURL):
        return True
    m = _SCHEME.match(spec) if isinstance(spec, str) else None
    return bool(m) and m.group(1).lower() not in _LOCAL


def looks_like_url(spec: Any) -> bool:
    """A URL, or one that ``Path`` has collapsed (``s3:/bucket/x``): for options that take local paths only."""
    return is_url(str(spec)) or bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/[^/]", str(spec)))


def store_location(spec: str | Path | StoreURL, what: str = "store") -> Path | StoreURL:
    """A store's location: a ``StoreURL`` for a URL, else a ``Path`` (``file://`` URLs included).

    Args:
        spec: Path or URL.
        what: How errors name it (``--out``, ``--targets``).

    Raises:
        MmkdError: the URL's protocol is unknown to fsspec, its package is not installed, or it names no
            key inside a bucket.
    """
    if isinstance(spec, Path | StoreURL):
        return spec
    spec = str(spec)
    m = _SCHEME.match(spec)
    if m is None:
        return Path(spec)
    if m.group(1).lower() in _LOCAL:
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(spec))
    return StoreURL(spec, what)


def _translated(fn: Callable) -> Callable:
    """A StoreURL operation whose storage errors end as one line naming the URL. FileNotFoundError and
    FileExistsError pass: the store code reads them as answers."""

    @functools.wraps(fn)
    def wrapper(self: StoreURL, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (FileNotFoundError, FileExistsError, MmkdError):
            raise
        except Exception as e:  # noqa: BLE001 — credentials, endpoint, permissions: the user's to fix
            first = (str(e).strip().splitlines() or [""])[0]
            raise MmkdError(
                f"{self.url}: {type(e).__name__}: {first} (check the URL, the credentials and the endpoint: "
                "AWS_* or FSSPEC_* environment variables)"
            ) from None

    return wrapper


class StoreURL:
    """A store, or an object beside one, at an fsspec URL; compares and hashes as its URL.

    Args:
        url: ``protocol://...``; a trailing ``/`` is dropped.
        what: How errors name it.
    """

    def __init__(self, url: str, what: str = "store", _checked: bool = False) -> None:
        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.protocol = _SCHEME.match(url).group(1).lower()
        self._fs: Any = None
        self._pid = 0
        if not _checked:
            self._check(what)

    def _check(self, what: str) -> None:
        import fsspec

        try:
            fsspec.get_filesystem_class(self.protocol)
        except ImportError as e:
            extra = " (pip install 'mmkd[s3]')" if self.protocol in ("s3", "s3a") else ""
            raise MmkdError(f"{what} {self.url}: {e}{extra}") from None
        except ValueError:
            raise MmkdError(f"{what} {self.url}: fsspec knows no protocol {self.protocol!r}") from None
        rest = self.url[len(self.protocol) + 3 :].strip("/")
        if not rest or (self.protocol != "memory" and "/" not in rest):
            raise MmkdError(
                f"{what} {self.url}: name a store inside the bucket, e.g. {self.protocol}://{rest or 'bucket'}/"
                "name.zarr (its lock object goes beside it)"
            )

    def __reduce__(self):  # the filesystem is not pickled: each process connects its own
        return (StoreURL, (self.url, "store", True))

    def __deepcopy__(self, memo) -> StoreURL:
        return self

    def __copy__(self) -> StoreURL:
        return self

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreURL({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreURL) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> StoreURL:
        sep = "" if self.url.endswith("://") else "/"
        return StoreURL(f"{self.url}{sep}{name}", _checked=True)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> StoreURL:
        head, sep, _ = self.url[len(self.protocol) + 3 :].rpartition("/")
        return StoreURL(f"{self.protocol}://{head if sep else ''}", _checked=True)

    def with_name(self, name: str) -> StoreURL:
        return self.parent / name

    def resolve(self) -> StoreURL:
        return self

    def is_symlink(self) -> bool:
        return False

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing: object stores have no directories, and a missing bucket is the user's to create."""

    @property
    def fs(self) -> Any:
        # a DataLoader worker forked from a process that connected must connect anew (s3fs is not fork-safe)
        if self._fs is None or self._pid != os.getpid():
            from fsspec import url_to_fs

            self._fs, self._path = url_to_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    @property
    def path(self) -> str:
        """The filesystem's own path of the URL (``bucket/x.zarr``)."""
        self.fs  # noqa: B018 — sets _path
        return self._path

    def _fresh(self) -> Any:
        # another process (or zarr's own async filesystem) may have changed the listing since it was cached
        self.fs.invalidate_cache()
        return self.fs

    @_translated
    def exists(self) -> bool:
        return bool(self._fresh().exists(self.path))

    @_translated
    def is_dir(self) -> bool:
        return bool(self._fresh().isdir(self.path))

    @_translated
    def is_file(self) -> bool:
        return bool(self._fresh().isfile(self.path))

    @_translated
    def iterdir(self) -> Iterator[StoreURL]:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fresh().ls(self.path, detail=False)]
        return iter([self / n for n in sorted(set(names))])

    @_translated
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    @_translated
    def unlink(self, missing_ok: bool = False) -> None:
        fs = self._fresh()
        if not fs.exists(self.path):
            if missing_ok:
                return
            raise FileNotFoundError(self.url)
        try:
            fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    @_translated
    def create(self, data: bytes) -> None:
        """Write the object only if it does not exist, atomically where the storage can: S3 and s3fs by a
        conditional write (``If-None-Match: *``, ``open(..., "xb")``), memory:// under this process's lock.
        A filesystem without exclusive creation gets check-then-write, with a warning (two writers starting
        at the same moment could both proceed).

        Raises:
            FileExistsError: it exists.
        """
        fs = self._fresh()
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if fs.exists(self.path):
                    raise FileExistsError(self.url)
                fs.pipe_file(self.path, data)
            return
        try:
            with fs.open(self.path, "xb") as f:
                f.write(data)
            return
        except (ValueError, NotImplementedError, TypeError) as e:
            if self.protocol not in _warned:
                _warned.add(self.protocol)
                log.warning(
                    "%s:// has no exclusive create (%s): the lock %s is checked, then written", self.protocol, e, self
                )
        if fs.exists(self.path):
            raise FileExistsError(self.url)
        fs.pipe_file(self.path, data)

    @_translated
    def rmtree(self) -> None:
        self._fresh().rm(self.path, recursive=True)
        self.fs.invalidate_cache()

    @_translated
    def du(self) -> int:
        return int(self._fresh().du(self.path, total=True))

    @_translated
    def stamp(self) -> tuple[str, ...]:
        """What changes when the object is rewritten: its ETag, modification time and size, as listed."""
        info = self._fresh().info(self.path)
        return tuple(str(info.get(k)) for k in ("ETag", "LastModified", "mtime", "created", "size"))


Location: TypeAlias = Path | StoreURL


def remove(loc: Location) -> None:
    """Delete a directory tree, or every object under a URL's prefix (never the objects beside it)."""
    if isinstance(loc, StoreURL):
        loc.rmtree()
    else:
        shutil.rmtree(loc)


def size(loc: Location) -> int:
    """Bytes stored under a directory or a URL's prefix."""
    if isinstance(loc, StoreURL):
        return loc.du()
    return sum(f.stat().st_size for f in loc.rglob("*") if f.is_file())


def stamp(loc: Location) -> Any:
    """What changes when the file or object is rewritten (a local file's modification time)."""
    return loc.stamp() if isinstance(loc, StoreURL) else loc.stat().st_mtime_ns
