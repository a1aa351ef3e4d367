"""What a run logs as it trains: one JSON row per logged step in ``metrics.jsonl`` and, when tensorboard is
installed, the same scalars in ``tb/``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_tb_warned: list[bool] = []


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter into ``run_dir/tb``, or None (once, a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has the numbers
        if not _tb_warned:
            _tb_warned.append(True)
            log.warning(
                "tensorboard is not installed (pip install 'mmkd[tensorboard]'): metrics go to metrics.jsonl only"
            )
        return None
    return SummaryWriter(str(run_dir / "tb"))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows logged after ``step`` (they are computed again when a run continues from there)."""
    path = run_dir / METRICS_FILE
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))


class MetricsLog:
    """Appends rows to ``run_dir/metrics.jsonl`` (and tensorboard); close it when training ends."""

    def __init__(self, run_dir: Path) -> None:
        self.file = open(run_dir / METRICS_FILE, "a")
        self.tb = tensorboard_writer(run_dir)

    def write(self, row: dict[str, Any]) -> None:
        """One row: ``step`` and ``epoch``, then scalars (each also a tensorboard ``train/`` scalar)."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
