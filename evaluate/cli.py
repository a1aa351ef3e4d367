"""`mmkd-eval`: the command is derived from EvalConfig's fields; it calls `run_evaluation` and prints the
numbers."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import typer
from rich.table import Table

from mmkd.app.cli import setup_logging
from mmkd.app.options import Extra, build_command, option
from mmkd.app.progress import console

from .config import EvalConfig
from .evaluation import EvalReport, finite_or_none, run_evaluation

EXAMPLES = """Examples:

  mmkd-eval --model minilm-l6 --task paraphrase --dataset mrpc --data-root glue/MRPC --json
  mmkd-eval --model runs/wordnet --task paraphrase --dataset mrpc --data-root glue/MRPC
  mmkd-eval --model runs/minilm-l6-shapes-train --task image-text --dataset shapes --dataset-option count=1000
  mmkd-eval --model runs/fmnist --task zero-shot --dataset fashion-mnist --split test
  mmkd-eval --model runs/wordnet --task bias --teacher minilm-l6"""

# options of the command that are no part of the evaluation's configuration
EXTRAS = [
    Extra(
        "json_output",
        option(False, flag="--json", help="Print one JSON object with every number to stdout.", show_default=False),
        after="out",
    ),
    Extra("verbose", option(False, help="Log what happens (splits, sizes, times).")),
]

app = typer.Typer(
    help="Evaluate a teacher or a trained student: paraphrase retrieval, "
    "image-text retrieval, zero-shot classification, linear probe, bias probe.",
)


def _table(report: EvalReport, title: str) -> Table:
    """The numbers as a terminal table, ``mean`` last."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.results.items():
        # per-profession bias cells are in the JSON and bias.png; the terminal shows the summary
        if key.startswith(("bias/", "bias_teacher/")) and key.count("/") == 2:
            continue
        if key != "mean":
            table.add_row(key, f"{value:.4f}")
    if "mean" in report.results:
        table.add_row("[bold]mean[/]", f"[bold]{report.results['mean']:.4f}[/]")
    return table


def evaluate(cfg: EvalConfig, extras: dict[str, Any], given: set[str]) -> None:
    """Evaluate a model and print its numbers (a table on stderr, or JSON on stdout with --json)."""
    setup_logging(extras["verbose"])
    # --json promises nothing but the JSON on stdout: anything a library prints goes to stderr instead
    with contextlib.redirect_stdout(sys.stderr):
        report = run_evaluation(cfg)
    if extras["json_output"]:
        typer.echo(json.dumps(finite_or_none(report.results)))
        return
    seconds = sum(report.seconds.values())
    console.print(_table(report, f"{cfg.model} ({seconds:.1f} s)"))
    if report.out_file is not None:
        console.print(f"written to {report.out_file}", highlight=False)


main_command = build_command(app, EvalConfig, evaluate, extra=EXTRAS, epilog=EXAMPLES, doc=evaluate.__doc__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
