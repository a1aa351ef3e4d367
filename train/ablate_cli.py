"""`mmkd-ablate`: parse the grid and the shared mmkd-train options, build an AblateConfig, call `ablate`,
print the table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table as RichTable

from mmkd_core.cli_utils import Command, guarded, setup_logging
from mmkd_core.errors import MmkdError
from mmkd_core.progress import console

from .ablate import AblateConfig, ablate, log_done, merge_grids, parse_vary, read_grid

EXAMPLES = """Examples:

  mmkd-ablate --targets wordnet.zarr --out runs/ablate --eval mrpc:../shared/data/mrpc --vary init=teacher,random \\
      --vary loss='token_mse=1|pooled_mse=1|token_mse=1,pooled_mse=1' -- --depth 3 --steps 1500
  mmkd-ablate --targets wordnet.zarr --out runs/ablate --grid grid.yaml --repeat 3 --eval mrpc:glue/MRPC -- --steps 400
  mmkd-ablate --targets wordnet.zarr --out runs/ablate --vary depth=2,3 --cluster local:2 --eval mrpc:glue/MRPC
  mmkd-ablate --targets shapes.zarr --out runs/mm --vary lr=1e-3,3e-4 --scheduler tcp://10.0.0.5:8786"""


class AblateCommand(Command):
    """mmkd-ablate's command: an mmkd-train option given before ``--`` is refused saying where it goes,
    rather than as an unknown option."""

    def parse_args(self, ctx, args):
        from .ablate_grid import train_command

        own = {o for p in self.params for o in (*p.opts, *p.secondary_opts)}
        theirs = {o for p in train_command().params for o in (*p.opts, *p.secondary_opts)}
        for a in args:
            if a == "--":
                break
            flag = a.split("=", 1)[0]
            if flag not in own and flag in theirs:
                raise MmkdError(f"{flag} is an mmkd-train option: give it after --, as in mmkd-ablate ... -- {a}")
        return super().parse_args(ctx, args)


app = typer.Typer(help="Train every combination of a grid of mmkd-train settings from one store, and tabulate them.")


@app.command(cls=AblateCommand, epilog=EXAMPLES)
@guarded
def main_command(
    targets: str = typer.Option(
        ..., metavar="PATH|URL", help="Store written by mmkd-extract (a path or a URL): every run trains from it."
    ),
    out: Path = typer.Option(..., help="The ablation's directory: one run directory per combination and seed."),
    vary: list[str] = typer.Option(
        None,
        metavar="KEY=V1,V2",
        help="An mmkd-train option and its values (repeatable): depth=2,3; use | between values that hold "
        "commas: loss='token_mse=1|token_mse=1,pooled_mse=1'.",
    ),
    grid: Path = typer.Option(
        None, metavar="FILE", help="YAML or JSON mapping of mmkd-train option names to lists of values."
    ),
    eval: list[str] = typer.Option(
        None,
        metavar="TASK",
        help="Score every row on: mrpc:PATH, qqp:PATH, retrieval, zero-shot:DATASET[:ROOT], "
        "linear-probe:DATASET[:ROOT], image-text:DATASET[:ROOT] (repeatable; the first is the headline).",
    ),
    repeat: int = typer.Option(1, help="Seeds 0..R-1 per combination; the table shows mean ± spread."),
    cluster: str = typer.Option(
        None, metavar="local:N", help="Run the runs as dask.distributed tasks on N local worker processes."
    ),
    scheduler: str = typer.Option(None, metavar="ADDRESS", help="Run them on a running dask.distributed scheduler."),
    train_args: list[str] = typer.Argument(
        None, metavar="-- [MMKD-TRAIN OPTIONS]", help="mmkd-train options shared by every run, after --."
    ),
    quiet: bool = typer.Option(False, help="No progress bars."),
    verbose: bool = typer.Option(False, help="Log what happens."),
) -> None:
    """Train a grid of students from one store; the teacher and each student's init are scored beside them."""
    setup_logging(verbose)
    cfg = AblateConfig(
        targets=targets,
        out=out,
        grid=merge_grids(parse_vary(vary or []), read_grid(grid) if grid else {}),
        train_args=list(train_args or []),
        eval=list(eval or []),
        repeat=repeat,
        cluster=cluster,
        scheduler=scheduler,
        progress=not quiet,
    )
    table = ablate(cfg, on_done=log_done)
    console.print(_rich_table(table, f"ablation {cfg.out}"))
    for line in table.notes():
        console.print(line, highlight=False)
    console.print(f"written: {', '.join(str(p) for p in table.files.values())}", highlight=False)


def _rich_table(table, title: str) -> RichTable:
    """Every column when the terminal is wide enough; else without the single metrics (ablation.md has them)."""
    header, rows = table.header(), [table.cells(r) for r in table.rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    if sum(widths) + 3 * len(widths) + 1 <= console.width:  # cells, padding and borders
        return _build(title, header, rows, table.keys)
    keep = [i for i, h in enumerate(header) if i < 1 + len(table.keys) or i >= 1 + len(table.keys) + len(table.metrics)]
    caption = f"{len(table.metrics)} metric columns left out for the terminal's width: see {table.files['md']}"
    narrow = _build(title, [header[i] for i in keep], [[r[i] for i in keep] for r in rows], table.keys)
    narrow.caption = caption
    return narrow


def _build(title: str, header: list[str], rows: list[list[str]], keys: list[str]) -> RichTable:
    shown = RichTable(title=title)
    for h in header:
        shown.add_column(h, justify="left" if h == "model" or h in keys else "right")
    for row in rows:
        shown.add_row(*row)
    return shown


def main() -> None:
    app()


if __name__ == "__main__":
    main()
