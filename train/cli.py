"""`mmkd-train`: the command derived from TrainConfig's declarations; it builds a TrainConfig, calls `train`
and reports (the evaluation the run asks for)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from mmkd.app.cli import read_config, setup_logging
from mmkd.app.options import build_command
from mmkd.app.progress import console
from mmkd_core.errors import MmkdError

from .config import EXTRAS, TrainConfig
from .loop import train
from .report import report

EXAMPLES = """Examples:

  mmkd-train --targets minilm-l6-shapes-train.zarr             # the embedded default: a multimodal student
  mmkd-train --targets wordnet.zarr --depth 3 --loss token_mse=1,pooled_mse=1 --eval mrpc:glue/MRPC
  mmkd-train --targets imagenet.zarr --student beit --depth 6 --data-root /data/imagenet --workers 2
  mmkd-train --targets wordnet.zarr --run-dir runs/wordnet --resume   # continue an interrupted run exactly
  mmkd-train --config runs/wordnet/config.json --run-dir runs/again   # a recorded run, repeated
  mmkd-train --nproc 2 --targets wordnet.zarr                       # DDP: 2 ranks on this machine"""

app = typer.Typer(help="Train a student from a target store; the teacher is never run.")


def recorded_run(data: dict[str, Any]) -> dict[str, Any]:
    """A --config file's values: a recorded run's ``config.json`` gives its ``train`` section (what it was
    run with, resolved) and its number of ranks; any other file is option values as it stands."""
    if isinstance(data.get("train"), dict):
        return {**data["train"], "nproc": data.get("world_size")}
    return data


def run(cfg: TrainConfig, extras: dict[str, Any], given: set[str]) -> None:
    """Train; rank 0 then reports. ``given``: the fields set on the command line or by --config, which
    --resume compares with the run's recorded values."""
    setup_logging(extras["verbose"])
    if (
        extras["nproc"] > 1 and "WORLD_SIZE" not in os.environ
    ):  # main() launches the ranks; only a library call lands here
        raise MmkdError("--nproc: start ranks through the mmkd-train command, or call it under torchrun")
    result = train(cfg, given=given)
    if result.rank == 0:
        report(cfg, result)


main_command = build_command(
    app,
    TrainConfig,
    run,
    extra=EXTRAS,
    epilog=EXAMPLES,
    doc="Train a student from cached targets.",
    from_file=recorded_run,
)


def _nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """``--nproc N`` taken out of the arguments: (N, the rest). Without it, N comes from the --config file
    (a recorded run's number of ranks), else None (one plain process)."""
    n, rest, i, config = None, [], 0, None
    while i < len(argv):
        a = argv[i]
        if a in ("--nproc", "--config") and i + 1 < len(argv):
            if a == "--nproc":
                n = argv[i + 1]
            else:
                config = argv[i + 1]
                rest += argv[i : i + 2]
            i += 2
            continue
        if a.startswith("--nproc="):
            n = a.partition("=")[2]
        else:
            rest.append(a)
            if a.startswith("--config="):
                config = a.partition("=")[2]
        i += 1
    if n is None and config is not None:  # a recorded run of one rank ran as a plain process
        recorded = recorded_run(read_config(Path(config))).get("nproc")
        n = None if recorded in (None, 1) else recorded
    try:
        return (None if n is None else int(n)), rest
    except ValueError:
        raise MmkdError(f"--nproc {n!r}: expected a number of ranks") from None


def main() -> None:
    """The console script: with ``--nproc N`` it runs itself under torchrun with N ranks (N = 1 too: the
    single-GPU DDP path, NCCL on CUDA); without it, as one plain process."""
    try:
        n, rest = _nproc(sys.argv[1:])
    except MmkdError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(2) from None
    if n is not None and n < 1:
        console.print(f"[bold red]error:[/] --nproc {n}: expected at least one rank", highlight=False)
        raise SystemExit(2)
    if n is not None and "WORLD_SIZE" not in os.environ:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(n),
            "-m",
            "mmkd.train.cli",
            *rest,
        ]
        os.execv(sys.executable, cmd)  # torchrun takes this process's place: signals reach it and its ranks
    app()


if __name__ == "__main__":
    main()
