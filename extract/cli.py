"""`mmkd-extract`: the command is derived from ExtractConfig's fields (``mmkd.app.options``); it builds the
configuration and calls `extract` (or `plan` with ``--plan``)."""

from __future__ import annotations

from typing import Any

import typer

from mmkd.app.cli import setup_logging
from mmkd.app.options import Extra, build_command, option
from mmkd.app.progress import console
from mmkd_core.errors import MmkdError

from .config import ExtractConfig
from .report import summary_table

EXAMPLES = """Examples:

  mmkd-extract                                    # minilm-l6 over 10,000 shapes captions
  mmkd-extract --teacher minilm-l6 --dataset text --data-root sentences.txt --dtype int8
  mmkd-extract --teacher beitv2 --weights beitv2_base_patch16_224_pt1k.pth \\
               --dataset imagenet --data-root /data/imagenet --views 4 --workers 2
  mmkd-extract --config extract.yaml --limit 1000  # options from a file; the command line overrides it
  mmkd-extract --dataset text --data-root sentences.txt --cluster local:4    # shards over 4 processes
  mmkd-extract --dataset text --data-root sentences.txt --shards $SLURM_ARRAY_TASK_ID/8  # one of 8 jobs
  mmkd-extract --add-teacher mpnet-base --out minilm-l6-text-train.zarr   # a second teacher, same samples

Run an interrupted command again to continue where it stopped."""

app = typer.Typer(help="Run a frozen teacher once over a dataset and store its targets.")

EXTRAS = (
    Extra("quiet", option(False, help="No progress bar and no summary: only warnings and errors are printed.")),
    Extra("verbose", option(False, help="Log what happens (weights loaded, keys dropped, resume).")),
)


def run_command(cfg: ExtractConfig, extras: dict[str, Any], given: set[str]) -> None:
    """What ``mmkd-extract`` does with its configuration: predict the run (``--plan``) or extract, then print
    the result unless ``--quiet``."""
    setup_logging(extras["verbose"])
    if cfg.add_teacher:
        from .added import settle  # the store's record gives the data and the views

        if "teacher" in given:
            raise MmkdError("--teacher and --add-teacher: --add-teacher names the teacher added to the store --out")
        cfg = settle(cfg, given)
    if cfg.plan:
        from .plan import plan as predict
        from .plan import plan_tables

        for table in plan_tables(predict(cfg)):
            console.print(table)
        return
    from .run import extract  # imported here: --help need not load zarr, dask and the dataset adapters' readers

    summary = extract(cfg, show_progress=not extras["quiet"])
    if not extras["quiet"]:
        console.print(summary_table(summary))


build_command(
    app,
    ExtractConfig,
    run_command,
    extra=EXTRAS,
    epilog=EXAMPLES,
    doc="Extract teacher targets into a zarr store. With no arguments: minilm-l6 over shapes captions.",
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
