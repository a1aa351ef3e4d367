"""What a finished run reports: evaluation numbers (printed, saved as JSON) and PNG plots in the run dir."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.table import Table

from mmkd_core.errors import MmkdError
from mmkd_core.progress import console
from mmkd_core.store import open_store

from .config import TrainConfig
from .encoders import load_encoder
from .evaluate import eval_image_text, eval_paraphrase
from .loop import TrainResult

log = logging.getLogger(__name__)
HELD_OUT_SCENES = 1000


def default_eval(cfg: TrainConfig) -> list[str]:
    """Held-out image–caption retrieval for a multimodal student trained on shapes; nothing otherwise."""
    student = json.loads((cfg.run_dir / "config.json").read_text())["student"]["kind"]
    dataset = open_store(cfg.targets).attrs["dataset"]["name"]
    return ["retrieval"] if student == "multimodal" and dataset == "shapes" else []


def run_eval(cfg: TrainConfig, tasks: list[str]) -> dict[str, float]:
    """Evaluate the run's saved student. Tasks: ``retrieval`` (held-out shapes scenes, two objects each),
    ``mrpc:PATH`` / ``qqp:PATH`` (zero-shot paraphrase retrieval)."""
    encoder = load_encoder(str(cfg.run_dir))
    results: dict[str, float] = {}
    for task in tasks:
        name, _, root = task.partition(":")
        if name == "retrieval":
            options = dict(open_store(cfg.targets).attrs["dataset"].get("options") or {})
            options.update(count=HELD_OUT_SCENES, min_objects=2, max_objects=2)
            results.update(eval_image_text(encoder, "shapes", split="test", dataset_options=options))
        elif name in ("mrpc", "qqp"):
            if not root:
                raise MmkdError(f"--eval {task}: give the data as {name}:PATH")
            results.update(eval_paraphrase(encoder, name, root))
        else:
            raise MmkdError(f"--eval {task!r}: choose retrieval, mrpc:PATH or qqp:PATH")
    return results


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
    tasks = cfg.eval or default_eval(cfg)
    results = run_eval(cfg, tasks) if tasks else {}
    if results:
        (result.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        plot_results(results, result.run_dir / "eval.png")
        table = Table(title="evaluation" + (" (1,000 held-out two-object scenes)" if "retrieval" in tasks else ""))
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in results.items():
            table.add_row(k, f"{v:.3f}")
        console.print(table)
    console.print(f"student saved to {result.run_dir / 'student'}; plots and metrics in {result.run_dir}")
    return results
