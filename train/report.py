"""What a finished run reports: PNG plots in the run dir, and the evaluation it asked for (through the
evaluation stage's public ``evaluate_run``), printed and saved as JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from mmkd.evaluate import default_run_tasks, evaluate_run
from mmkd_core.progress import console
from mmkd_core.store import open_store

from .config import TrainConfig
from .loop import TrainResult, tensorboard_writer

log = logging.getLogger(__name__)


def plot_curves(run_dir: Path) -> Path | None:
    """Loss (and each term) against step, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
