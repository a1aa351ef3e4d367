"""Finding and reading checkpoints: files, directories, the local HF hub cache. Never downloads.

Shared by teachers and (later) students that initialise from pretrained weights.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import hashlib
import json
import logging
import os
import re
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MmkdError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# transformers' order of preference; safetensors wins when a directory holds both
_HF_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_UNWRAP_KEYS = ("model", "state_dict", "module")


@dataclass(frozen=True)
class WeightsLocation:
    """Where a checkpoint was found.

    Attributes:
        path: A checkpoint file or directory.
        source: Provenance string: an absolute path, ``hf-hub:<repo>@<commit>`` or ``package:<name>``.
    """

    path: Path
    source: str


@dataclass
class LoadReport:
    """Outcome of loading a state dict into a model (all lists of state-dict keys)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def hub_cache_dir() -> Path:
    """The HF hub cache directory, read from the environment at call time (as huggingface_hub does at
    import time): ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def resolve_hub_cache(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot directory of ``repo_id`` in the local HF hub cache, or None if it is not there.

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit hash.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError):
        return None
    path = Path(path)
    return path if path.is_dir() else None


def locate_weights(weights: str | os.PathLike | None, default_repo: str | None) -> WeightsLocation | None:
    """Resolve a ``weights`` argument: an existing path, else a repo id in the hub cache.

    Args:
        weights: A file or directory path, a repo id (``org/name``), or None for ``default_repo``.
        default_repo: Repo id looked up in the hub cache when ``weights`` is None.

    Returns:
        The location, or None when ``weights`` is None and ``default_repo`` is not cached.

    Raises:
        MmkdError: ``weights`` is given but is neither an existing path nor a cached repo.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.exists():
            path = path.resolve()
            return WeightsLocation(path, str(path))
        if not _REPO_ID.match(str(weights)):
            raise MmkdError(f"weights {str(weights)!r} do not exist; pass an existing checkpoint file or directory")
    repo = str(weights) if weights is not None else default_repo
    if repo is None:
        return None
    snapshot = resolve_hub_cache(repo)
    if snapshot is None:
        if weights is not None:
            raise MmkdError(
                f"weights {repo!r} are neither an existing path nor a repo in the local HF hub cache "
                f"({hub_cache_dir()}); pass a checkpoint path or put the repo in the cache"
            )
        return None
    return WeightsLocation(snapshot, f"hf-hub:{repo}@{snapshot.name}")


def missing_weights_error(teacher: str, what: str, default_repo: str | None) -> MmkdError:
    """The one-line error for a teacher created without weights and without ``random_init``."""
    cache = f", or put {default_repo} in the HF hub cache ({hub_cache_dir()})" if default_repo else ""
    return MmkdError(
        f"teacher {teacher!r} has no weights: pass --weights PATH ({what}){cache}; "
        "random weights only with random_init=True"
    )


def sha256_of(paths: Path | str | Iterable[Path | str]) -> str:
    """sha256 of the bytes of ``paths`` read one after the other (for one file: its ``sha256sum``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight file(s) transformers/timm read from a checkpoint directory (shards resolved).

    Raises:
        MmkdError: The directory holds no known weight file.
    """
    for name in _HF_WEIGHT_NAMES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
        return [path]
    raise MmkdError(
        f"{directory} holds no weights ({', '.join(_HF_WEIGHT_NAMES)}); "
        "point --weights at a checkpoint directory or file"
    )


def checkpoint_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` may rebuild besides tensors: the config objects research
    checkpoints carry beside their weights (fairseq's ``args``/``cfg``) — ``argparse.Namespace``, omegaconf's
    ``DictConfig``/``ListConfig`` with their metadata and value nodes (when omegaconf is installed), and the
    plain types those hold (``typing.Any``, ``defaultdict`` and the builtin containers and scalars). None of
    them runs code of the file's choosing."""
    allowed: list[Any] = [argparse.Namespace, collections.defaultdict, typing.Any]
    allowed += [dict, list, tuple, int, float, str, bool, bytes]
    try:
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:  # files whose cfg is a Namespace or a plain dict load all the same
        return allowed
    allowed += [dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata]
    names = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")
    return allowed + [getattr(nodes, n) for n in names if hasattr(nodes, n)]


def safe_torch_load(path: Path | str) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`checkpoint_globals` allowed: the whole object a
    torch checkpoint holds, never unpickling code.

    Raises:
        MmkdError: The file is missing, damaged, or needs a global outside the allow-list (named).
    """
    path = Path(path)
    if not path.is_file():
        raise MmkdError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals(checkpoint_globals()), warnings.catch_warnings():
            # what the unpickler says about a damaged file's "protocol" before failing on it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - on damaged bytes the unpickler raises nearly anything
        raise MmkdError(_torch_load_error(path, e)) from None


def load_state_dict_file(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``, weights only).

    Nested ``model``/``state_dict``/``module`` entries are unwrapped, a DDP ``module.`` prefix is removed and
    non-tensor entries are left out.

    Raises:
        MmkdError: The file is missing, unreadable without unpickling code, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MmkdError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError has no importable base; any failure is the file's
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MmkdError(
                f"{path}: not a readable safetensors file ({first}); damaged, truncated or another format"
            ) from None
    else:
        # research checkpoints often carry their argparse/omegaconf config next to the weights
        obj = safe_torch_load(path)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _UNWRAP_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise MmkdError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise MmkdError(f"{path} holds no tensors; is it a checkpoint?")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _torch_load_error(path: Path, e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, and what to do: only a file that needs code to unpickle
    deserves the advice to re-save it; a damaged or foreign file does not."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours part of its message
    lines = text.splitlines()
    # the unpickler's own reason, not torch's preamble about weights_only defaults
    first = next(
        (ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln),
        lines[0] if lines else type(e).__name__,
    )
    first = first.split(" Please use ")[0] or type(e).__name__
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"{path}: empty file (0 bytes), not a checkpoint"
    # torch files are zip archives (torch >= 1.6) or bare pickles (protocol 2+ starts with 0x80)
    if not head.startswith(b"PK") and head[:1] != b"\x80":
        return f"{path}: not a torch checkpoint (neither a zip archive nor a pickle); damaged or another format"
    # "Unsupported global: GLOBAL x.y was not an allowed global ..." or, for a blocked module such as os,
    # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if refused or "Unsupported global" in text:
        what = f"it refused the global {refused.group(1)}" if refused else first
        if "is blocked" in text:  # os, subprocess, ...: no reason to trust such a file
            return f"cannot read {path} with torch.load(weights_only=True): {what}, which would run code; not loaded"
        return (
            f"cannot read {path} with torch.load(weights_only=True): {what} (only tensors, plain containers and "
            "argparse/omegaconf configs are rebuilt); if you trust the file, re-save its state dict alone: "
            "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')"
        )
    return f"{path}: damaged or truncated torch checkpoint ({first})"


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _summary(keys: list[str], limit: int = 6) -> str:
    """``lm_head.* (2), mask_token``: keys grouped by their first component."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".", 1)[0] + (".*" if "." in k else "")
        groups[head] = groups.get(head, 0) + 1
    parts = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def report_keys(
    missing: Iterable[str],
    unexpected: Iterable[str],
    *,
    file: str | Path,
    drop: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> LoadReport:
    """Log the keys a load did not match and fail on missing weights.

    Args:
        missing: Model keys absent from the checkpoint.
        unexpected: Checkpoint keys the model does not have.
        file: The checkpoint, named in messages.
        drop: Glob patterns of known unused checkpoint parts (pretraining heads): logged at INFO as dropped.
        ignore_missing: Glob patterns of model keys that may be absent (parts the caller never runs).

    Raises:
        MmkdError: A missing key not matched by ``ignore_missing``, naming the key(s) and the file.
    """
    drop, ignore_missing = tuple(drop), tuple(ignore_missing)
    report = LoadReport()
    for key in sorted(unexpected):
        (report.dropped if _matches(key, drop) else report.unexpected).append(key)
    if report.dropped:
        logger.info(
            "%s: dropped %d checkpoint keys the teacher does not use: %s",
            file,
            len(report.dropped),
            _summary(report.dropped),
        )
    if report.unexpected:
        logger.warning(
            "%s: ignored %d unexpected checkpoint keys: %s", file, len(report.unexpected), _summary(report.unexpected)
        )
    report.missing = sorted(missing)
    fatal = [k for k in report.missing if not _matches(k, ignore_missing)]
    if fatal:
        more = f" and {len(fatal) - 5} more" if len(fatal) > 5 else ""
        raise MmkdError(
            f"{file}: missing weights {', '.join(fatal[:5])}{more}; the checkpoint is incomplete "
            "or does not match the model's architecture options"
        )
    if report.missing:
        logger.info(
            "%s: %d model keys not in the checkpoint (unused): %s", file, len(report.missing), _summary(report.missing)
        )
    return report


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    file: str | Path,
    drop: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``model`` non-strictly, then report as :func:`report_keys` does.

    Raises:
        MmkdError: A shape mismatch (naming the key and both shapes) or a missing weight.
    """
    drop = tuple(drop)
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if not (_matches(k, drop) and k not in own)}
    for key, value in kept.items():
        if key in own and own[key].shape != value.shape:
            raise MmkdError(
                f"{file}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)}; set the architecture options to match the checkpoint"
            )
    result = model.load_state_dict(kept, strict=False)
    unexpected = list(result.unexpected_keys) + [k for k in state_dict if k not in kept]
    return report_keys(result.missing_keys, unexpected, file=file, drop=drop, ignore_missing=ignore_missing)
