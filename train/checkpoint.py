"""Atomic checkpoints: the student as safetensors, optimiser/schedule/progress/RNG beside it.

``state.pt`` holds tensors and plain types only and is read with ``weights_only=True``: a checkpoint is a
file a user may have downloaded or been sent, and unpickling arbitrary objects would run their code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmkd_core.errors import MmkdError

KEEP = 2
STATE_KEYS = ("optimizer", "scheduler", "step", "rng")


def _dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _complete(run_dir: Path) -> list[Path]:
    return [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if not p.name.endswith(".tmp")]


def write_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write checkpoint ``step``: into a temporary directory first, renamed when complete, so a crash
    mid-write never leaves a checkpoint that looks whole. Keeps the newest KEEP and removes the leftovers
    of interrupted writes."""
    final = _dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    for stale in (run_dir / "checkpoints").glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    check_space(run_dir, model, state)
    tmp.mkdir(parents=True)
    # clone: safetensors refuses tensors that share memory (tied embeddings)
    save_file(
        {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _complete(run_dir)[:-KEEP]:
        shutil.rmtree(old)
    return final


def check_space(run_dir: Path, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Refuse to begin a checkpoint that cannot fit: the model's and the optimiser's tensors (with a margin
    for the files' framing) against the free space of the run directory's file system. The checks of the
    writes themselves remain, as the disk may fill meanwhile."""
    tensors = [*model.state_dict().values()]
    for group in (state.get("optimizer") or {}).get("state", {}).values():
        tensors += [v for v in group.values() if isinstance(v, torch.Tensor)]
    need = int(sum(t.numel() * t.element_size() for t in tensors) * 1.1) + (1 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise MmkdError(
            f"no space left for a checkpoint in {run_dir}: it needs about {need / 2**20:,.0f} MiB, "
            f"{free / 2**20:,.0f} MiB are free; free space and continue with --resume --run-dir {run_dir}"
        )


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = _complete(run_dir)
    return done[-1] if done else None


def read_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights into ``model`` and return the saved state (optimiser, schedule, progress, RNG)."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        model.load_state_dict(weights, strict=True)
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as e:
        raise MmkdError(f"{path}: cannot load checkpoint ({str(e).splitlines()[0]})") from None
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain types
        raise MmkdError(
            f"{path / 'state.pt'}: refused, it holds objects other than tensors and plain types "
            "(not a checkpoint mmkd wrote)"
        ) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise MmkdError(f"{path / 'state.pt'}: not a complete mmkd checkpoint (missing {', '.join(missing)})")
    return state
