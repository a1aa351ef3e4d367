"""Resume means the same run: its settings come from the run's ``config.json``, not from the command line.

A resumed run takes every setting that decides what it computes (student, loss, schedule, batch size,
seed, ...) from what the run recorded. Settings given again are accepted only when they equal the
recorded ones; a differing one is refused, naming the flag. Settings that change how a run is executed
but not what it computes (device, workers, checkpoint cadence, progress, where the data lives) may change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from mmkd.app.options import differences, options_of, plain
from mmkd_core.errors import MmkdError
from mmkd_core.store import CONFIG_FIELDS, config_diff

from .config import TrainConfig

# what may differ between the first command and the one that resumes it
FREE_FIELDS = frozenset(
    {
        "targets",
        "run_dir",
        "resume",
        "workers",
        "device",
        "progress",
        "ckpt_every",
        "log_every",
        "data_root",
        "eval",
        "verify_views",
    }
)

log = logging.getLogger(__name__)


def given_fields(cfg: TrainConfig) -> set[str]:
    """The fields a library caller set: those that differ from TrainConfig's defaults."""
    default = TrainConfig(targets=cfg.targets, run_dir=cfg.run_dir)
    return set(differences(cfg, default, [f.name for f in dataclasses.fields(cfg)]))


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MmkdError(f"--resume: {path} is missing; this run directory was not written by mmkd-train") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MmkdError(f"--resume: {path} is not valid JSON ({e})") from None


def resumed_config(cfg: TrainConfig, record: dict[str, Any], given: set[str] | None, world: int) -> TrainConfig:
    """The run's recorded configuration, with only the execution settings of ``cfg`` applied.

    Args:
        cfg: The configuration of the resuming command.
        record: The run's ``config.json``.
        given: Fields the resuming command set explicitly (None: those that differ from the defaults).
        world: Number of ranks now.
    """
    path = cfg.run_dir / "config.json"
    try:
        values = dict(record["train"])
        recorded = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name in values})
    except (KeyError, TypeError, MmkdError) as e:
        raise MmkdError(f"--resume: {path} does not hold a training configuration ({e})") from None
    options = options_of(TrainConfig)
    compared = sorted(((given_fields(cfg) if given is None else given) & set(options)) - FREE_FIELDS)
    differ = differences(cfg, recorded, compared)
    if differ:
        name = differ[0]
        raise MmkdError(
            f"--resume: {options[name].long_flag} {plain(getattr(cfg, name))!r} differs from this run's "
            f"{plain(getattr(recorded, name))!r} ({path}); drop it to continue the same run, or start a new one in "
            "another --run-dir"
        )
    ranks = int(record.get("world_size", 1))
    if ranks != world:  # the loader's state is global: the epoch's rest is shared among the new ranks
        log.warning("--resume: %s was trained on %d rank(s), continues on %d", cfg.run_dir, ranks, world)
    free = {name: getattr(cfg, name) for name in FREE_FIELDS}
    return dataclasses.replace(recorded, **free)


def check_store(reader, record: dict[str, Any]) -> None:
    """Refuse a store that is not the one the run was trained on, naming the first field that differs."""
    recorded = record.get("store") or {}
    now = store_record(reader)
    diff = config_diff({k: now.get(k) for k in recorded}, recorded)
    if diff is not None:
        raise MmkdError(f"--resume: {diff} of {reader.path} differs from the store this run was trained on")


def store_record(reader) -> dict[str, Any]:
    """What a resumed run must find unchanged in the store: its provenance (``CONFIG_FIELDS``)."""
    return {k: reader.attrs.get(k) for k in CONFIG_FIELDS}
