"""What a finished run reports: PNG plots in the run dir, and the evaluation it asked for (through the
evaluation stage's public ``evaluate_run``), printed and saved as JSON."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mmkd.app.progress import console
from mmkd.evaluate import default_run_tasks, evaluate_run
from mmkd_core.store import open_store

from .config import TrainConfig
from .run_log import METRICS_FILE, tensorboard_writer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`~mmkd.train.loop.train` returns.

    Attributes:
        run_dir: The run's directory.
        steps: Steps taken, over every attempt of the run.
        seconds: Wall time of this attempt's training loop.
        final_loss: The last step's loss (NaN without a step).
        losses: This attempt's losses, one per step.
        rank: This process's rank (0 without DDP).
    """

    run_dir: Path
    steps: int
    seconds: float
    final_loss: float = math.nan
    losses: list[float] = field(default_factory=list)
    rank: int = 0


def plot_curves(run_dir: Path) -> Path | None:
    """Loss (and each term) against step, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = [k for k in rows[-1] if k not in ("step", "epoch", "lr", "seconds")]
    for k in keys:
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if lr:  # the schedule beside the loss: warmup and decay explain most of a curve's shape
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr, strict=True), color="grey", linestyle="--", label="lr")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper center")
    ax.legend()
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = run_dir / "training.png"
    fig.savefig(path, dpi=100)
    return path


def plot_results(results: dict[str, float], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [k.rsplit("/", 1)[-1] for k in results]
    bars = ax.bar(names, list(results.values()))
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def report(cfg: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """What mmkd-train prints when a run ends: steps, time and final loss, then :func:`final_report`."""
    table = Table(title=f"run {result.run_dir}", show_header=False)
    table.add_row("steps", f"{result.steps:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("final loss", f"{result.final_loss:.4f}")
    console.print(table)
    return final_report(cfg, result)


def final_report(cfg: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """Plots, then the evaluations the run asked for (or its default), printed and saved."""
    plot_curves(result.run_dir)
    attrs = open_store(cfg.targets).attrs
    kind = json.loads((result.run_dir / "config.json").read_text())["student"]["kind"]
    tasks = cfg.eval or default_run_tasks(kind, attrs)
    results = evaluate_run(result.run_dir, attrs, tasks, show_progress=cfg.progress) if tasks else {}
    if results:
        (result.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        tb = tensorboard_writer(result.run_dir)
        if tb is not None:
            for k, v in results.items():
                tb.add_scalar(f"eval/{k}", v, result.steps)
            tb.close()
        plot_results(results, result.run_dir / "eval.png")
        table = Table(title="evaluation" + (" (1,000 held-out two-object scenes)" if "retrieval" in tasks else ""))
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in results.items():
            table.add_row(k, f"{v:.3f}")
        console.print(table)
    console.print(f"student saved to {result.run_dir / 'student'}; plots and metrics in {result.run_dir}")
    return results
