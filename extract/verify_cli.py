"""`mmkd-verify`: read every chunk of a store and check it (``mmkd_core.store.verify``); ``--repair``
extracts the damaged shards again with the store's recorded configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer

from mmkd.app.cli import setup_logging
from mmkd.app.options import Extra, build_command, option
from mmkd.app.progress import console
from mmkd_core.store.verify import describe, verify

from .repair import repair

app = typer.Typer(help="Check a store's bytes, attributes and completion; repair damaged shards.")

EXAMPLES = """Examples:

  mmkd-verify minilm-l6-shapes-train.zarr            # read back every chunk, one screen of findings
  mmkd-verify wordnet.zarr --repair                  # extract the damaged shards again (needs the teacher)"""


@dataclass
class VerifyConfig:
    """What `mmkd-verify` checks and whether it repairs."""

    store: str = option(help="The store to check (a directory or a URL).", metavar="STORE", argument=True)
    repair: bool = option(False, help="Extract the damaged shards again with the store's recorded configuration.")
    weights: str | None = option(None, help="The teacher's weights, when no longer where the store records them.")
    device: str = option("cpu", help="torch device of the repair's teacher.")


def run(cfg: VerifyConfig, extras: dict[str, Any], given: set[str]) -> None:
    setup_logging(extras["verbose"])
    report = verify(cfg.store)
    for line in describe(report):
        console.print(line, highlight=False, soft_wrap=True)
    if report.ok:
        return
    if not cfg.repair:
        raise typer.Exit(1)
    repair(report, cfg.weights, cfg.device, show_progress=not extras["quiet"])
    after = verify(cfg.store)
    for line in describe(after):
        console.print(line, highlight=False, soft_wrap=True)
    if not after.ok:
        raise typer.Exit(1)


EXTRAS = (
    Extra("quiet", option(False, help="No progress bar while repairing.")),
    Extra("verbose", option(False, help="Log what happens.")),
)
main_command = build_command(app, VerifyConfig, run, extra=EXTRAS, epilog=EXAMPLES, config_file=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
