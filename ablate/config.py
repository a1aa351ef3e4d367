"""The ablation's configuration: every mmkd-ablate option declared once, as an AblateConfig field or, for
the options that only the command line has (the grid as ``--vary``/``--grid``, the mmkd-train options after
``--``), as an extra option of the command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.app.options import Extra, option
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, looks_like_url, store_location


@dataclass
class AblateConfig:
    """Everything ``mmkd-ablate`` needs; the CLI only fills this in.

    Attributes:
        targets: The store (mmkd-extract's output) every run trains from: a directory or a URL.
        out: The ablation's directory.
        grid: mmkd-train option name -> values; every combination is trained (an empty grid: one run). Or a
            list of such grids: the union of their combinations (one-factor-at-a-time ablations: a base run
            and one grid per varied factor; a run two grids both give is trained once).
        train_args: mmkd-train options shared by every run, as on its command line (``--steps 1500``).
        eval: Evaluations (``mrpc:PATH``, ``retrieval``, ``zero-shot:DATASET[:ROOT]``, ...); the first one's
            headline is the table's. Empty: mmkd-train's default for the store (retrieval for shapes).
        repeat: Seeds 0..repeat-1 per combination.
        cluster: ``local:N``: N dask.distributed worker processes on this machine, one thread each.
        scheduler: Address of a running dask.distributed scheduler (its workers share this file system).
        progress: Progress bars (runs in dask workers show none).
    """

    targets: Path | StoreURL = option(
        help="Store written by mmkd-extract (a path or a URL): every run trains from it.", metavar="PATH|URL"
    )
    out: Path = option(help="The ablation's directory: one run directory per combination and seed.")
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = option(dict, cli=False)
    train_args: list[str] = option(list, cli=False)
    eval: list[str] = option(
        list,
        repeat=True,
        metavar="TASK",
        help="Score every row on: mrpc:PATH, qqp:PATH, retrieval, zero-shot:DATASET[:ROOT], "
        "linear-probe:DATASET[:ROOT], image-text:DATASET[:ROOT] (repeatable; the first is the headline).",
    )
    repeat: int = option(1, help="Seeds 0..R-1 per combination; the table shows mean ± spread.")
    cluster: str | None = option(
        None, metavar="local:N", help="Run the runs as dask.distributed tasks on N local worker processes."
    )
    scheduler: str | None = option(None, metavar="ADDRESS", help="Run them on a running dask.distributed scheduler.")
    progress: bool = option(True, flag="--quiet/--no-quiet", invert=True, help="No progress bars.")

    def __post_init__(self) -> None:
        self.targets, self.out = store_location(self.targets, "--targets"), Path(self.out)
        if looks_like_url(self.out):
            raise MmkdError(f"--out {self.out}: the ablation's directory is local; the store may be a URL")
        if self.repeat < 1:
            raise MmkdError(f"--repeat {self.repeat}: must be at least 1")
        if self.cluster and self.scheduler:
            raise MmkdError("--cluster and --scheduler: give one (local:N starts workers, an address uses them)")
        if self.cluster is not None:
            n = self.cluster.removeprefix("local:")
            if not self.cluster.startswith("local:") or not n.isdigit() or int(n) < 1:
                raise MmkdError(f"--cluster {self.cluster!r}: give local:N (N worker processes on this machine)")

    @property
    def workers(self) -> int:
        return int(self.cluster.removeprefix("local:")) if self.cluster else 0


# mmkd-ablate's options that are no AblateConfig field: the command line's ways of giving the grid and the
# shared mmkd-train options (AblateConfig.grid and .train_args)
EXTRAS = (
    Extra(
        "vary",
        option(
            list,
            repeat=True,
            metavar="KEY=V1,V2",
            help="An mmkd-train option and its values (repeatable): depth=2,3; use | between values that hold "
            "commas: loss='token_mse=1|token_mse=1,pooled_mse=1'.",
        ),
        after="out",
    ),
    Extra(
        "grid_file",
        option(
            None,
            flag="--grid",
            type=Path,
            metavar="FILE",
            help="YAML or JSON mapping of mmkd-train option names to lists of values.",
        ),
        after="out",
    ),
    Extra(
        "train_args",
        option(
            list,
            repeat=True,
            argument=True,
            metavar="-- [MMKD-TRAIN OPTIONS]",
            help="mmkd-train options shared by every run, after --.",
        ),
    ),
    Extra("verbose", option(False, help="Log what happens.")),
)
