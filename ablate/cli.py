"""`mmkd-ablate`: the command derived from AblateConfig's declarations (and the grid's and mmkd-train's
options it adds); it builds an AblateConfig, calls `ablate` and prints the table."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.table import Table as RichTable

from mmkd.app.cli import Command, setup_logging
from mmkd.app.options import build_command
from mmkd.app.progress import console
from mmkd.train import train_command
from mmkd_core.errors import MmkdError

from .config import EXTRAS, AblateConfig
from .grid import merge_grids, parse_vary, read_grid
from .run import ablate, log_done

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


def run(cfg: AblateConfig, extras: dict[str, Any], given: set[str]) -> None:
    """The grid from --vary and --grid, the mmkd-train options after --, then the ablation and its table."""
    setup_logging(extras["verbose"])
    grid = merge_grids(parse_vary(extras["vary"] or []), read_grid(extras["grid_file"]) if extras["grid_file"] else {})
    cfg = dataclasses.replace(cfg, grid=grid, train_args=list(extras["train_args"] or []))
    table = ablate(cfg, on_done=log_done)
    console.print(_rich_table(table, f"ablation {cfg.out}"))
    for line in table.notes():
        console.print(line, highlight=False)
    console.print(f"written: {', '.join(str(p) for p in table.files.values())}", highlight=False)


main_command = build_command(
    app,
    AblateConfig,
    run,
    extra=EXTRAS,
    epilog=EXAMPLES,
    doc="Train a grid of students from one store; the teacher and each student's init are scored beside them.",
    # after --, --config is mmkd-train's (a recorded run as the shared options): mmkd-ablate takes no file itself
    config_file=False,
    cls=AblateCommand,
)


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
