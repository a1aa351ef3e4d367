"""`mmkd-eval`: parse options, build an EvalConfig, call `run_evaluation`, print the numbers."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from mmkd.data import DATASETS
from mmkd_core.cli_utils import Command, choice, choices, did_you_mean, guarded, parse_options, setup_logging
from mmkd_core.errors import MmkdError
from mmkd_core.progress import console
from mmkd_core.teachers import TEACHERS

from .config import EvalConfig
from .evaluation import EvalReport, finite_or_none, run_evaluation
from .tasks import TASKS

# the registries' names as the options' choices: --help, completion and errors list the same names
Task = choices(TASKS)
Dataset = choices(DATASETS.names())
Teacher = choices(TEACHERS.names())

EXAMPLES = """Examples:

  mmkd-eval --model minilm-l6 --task paraphrase --dataset mrpc --data-root glue/MRPC --json
  mmkd-eval --model runs/wordnet --task paraphrase --dataset mrpc --data-root glue/MRPC
  mmkd-eval --model runs/minilm-l6-shapes-train --task image-text --dataset shapes --dataset-option count=1000
  mmkd-eval --model runs/fmnist --task zero-shot --dataset fashion-mnist --split test
  mmkd-eval --model runs/wordnet --task bias --teacher minilm-l6"""

app = typer.Typer(
    help="Evaluate a teacher or a trained student: paraphrase retrieval, "
    "image-text retrieval, zero-shot classification, linear probe, bias probe.",
)


def _model(option: str) -> Callable[[str], str]:
    """A parser for an option that names a teacher or a directory: a near miss of a teacher's name that is
    no path is refused here, naming the teacher meant."""

    def parse(value: str) -> str:
        if value in TEACHERS or Path(value).expanduser().exists():
            return value
        names = TEACHERS.names()
        raise MmkdError(
            f"{option} {value!r}: not a registered teacher{did_you_mean(value, names)} ({', '.join(names)}) "
            "and no such directory"
        )

    return parse


def _items(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma lists: ``--task a,b --task c`` -> [a, b, c]."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _table(report: EvalReport, title: str) -> Table:
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


@app.command(cls=Command, epilog=EXAMPLES)
@guarded
def main_command(
    model: Teacher = typer.Option(
        ...,
        parser=_model("--model"),
        metavar="NAME|DIR",
        help=f"Teacher name ({', '.join(TEACHERS.names())}), a training run directory (with student/) or a "
        "saved student directory.",
    ),
    weights: str = typer.Option(None, help="Teacher checkpoint file or directory."),
    task: list[Task] = typer.Option(
        None,
        parser=choice("--task", "task", TASKS, comma=True),
        metavar="TASK",
        help=f"Task(s), repeatable or comma list: {', '.join(TASKS)} (default: by what the model embeds).",
    ),
    dataset: list[Dataset] = typer.Option(
        None,
        parser=choice("--dataset", "dataset", DATASETS, comma=True),
        metavar="NAME",
        help=f"Dataset(s), repeatable or comma list: {', '.join(DATASETS.names())} (default: mrpc for "
        "paraphrase, shapes otherwise).",
    ),
    data_root: list[str] = typer.Option(
        None, help="Data file or directory: one for all datasets, or one per dataset in order."
    ),
    split: list[str] = typer.Option(
        None,
        "--split",
        "--splits",
        help="Split(s) to evaluate (default: paraphrase: train and dev/test where present; others: test).",
    ),
    train_split: str = typer.Option("train", help="Split the linear probe is fitted on."),
    limit: int = typer.Option(None, help="Use at most N pairs / images / samples per split."),
    batch_size: int = typer.Option(64, help="Inputs per forward pass."),
    teacher: Teacher = typer.Option(
        None,
        parser=_model("--teacher"),
        metavar="NAME|DIR",
        help="Reference model of the bias probe (teacher name or directory).",
    ),
    teacher_weights: str = typer.Option(None, help="Checkpoint of --teacher."),
    template: list[str] = typer.Option(None, help="Zero-shot prompt template with {} (repeatable)."),
    dataset_option: list[str] = typer.Option(None, help="Dataset option KEY=VALUE, e.g. count=1000 (repeatable)."),
    teacher_option: list[str] = typer.Option(None, help="Option KEY=VALUE of the --model teacher (repeatable)."),
    tokenizer: str = typer.Option(None, help="Tokenizer directory for a student saved without one."),
    preprocess: list[str] = typer.Option(
        None,
        help="Student image preprocessing override KEY=VALUE: size, mean, "
        "std, interpolation, crop_pct, crop_mode (repeatable).",
    ),
    random_weights: bool = typer.Option(False, help="Random teacher weights (tests only)."),
    device: str = typer.Option("cpu", help="torch device."),
    out: Path = typer.Option(
        None, help="Directory for eval-<tasks>.json and plots (default: the run directory when --model is one)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object with every number to stdout."),
    quiet: bool = typer.Option(False, help="No progress bars."),
    verbose: bool = typer.Option(False, help="Log what happens (splits, sizes, times)."),
) -> None:
    """Evaluate a model and print its numbers (a table on stderr, or JSON on stdout with --json)."""
    setup_logging(verbose)
    cfg = EvalConfig(
        model=model,
        tasks=_items(task) or [],
        weights=weights,
        random_weights=random_weights,
        teacher_options=parse_options(teacher_option, "--teacher-option"),
        tokenizer=tokenizer,
        preprocess=parse_options(preprocess, "--preprocess"),
        datasets=_items(dataset),
        data_roots=data_root or None,
        splits=_items(split),
        train_split=train_split,
        limit=limit,
        batch_size=batch_size,
        templates=template or None,
        dataset_options=parse_options(dataset_option, "--dataset-option"),
        teacher=teacher,
        teacher_weights=teacher_weights,
        device=device,
        out=out,
        show_progress=not quiet,
    )
    # --json promises nothing but the JSON on stdout: anything a library prints goes to stderr instead
    with contextlib.redirect_stdout(sys.stderr):
        report = run_evaluation(cfg)
    if json_output:
        typer.echo(json.dumps(finite_or_none(report.results)))
        return
    seconds = sum(report.seconds.values())
    console.print(_table(report, f"{model} ({seconds:.1f} s)"))
    if report.out_file is not None:
        console.print(f"written to {report.out_file}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
