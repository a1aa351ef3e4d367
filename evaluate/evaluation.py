"""The whole evaluation: load the model, run each task, add the overall ``mean`` and record the results."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmkd_core.errors import MmkdError
from mmkd_core.versions import library_versions

from .config import EvalConfig
from .encoders import Encoder, load_encoder
from .tasks import EVAL_TASKS

logger = logging.getLogger(__name__)


def finite_or_none(results: dict[str, float]) -> dict[str, float | None]:
    """Results with NaN/inf as None, so they serialise as valid JSON (``null``)."""
    return {k: (v if math.isfinite(v) else None) for k, v in results.items()}


@dataclass
class EvalReport:
    """What :func:`run_evaluation` returns.

    Attributes:
        results: Every number, flat; ``mean`` is the mean of all scores (bias and agreement statistics excluded), for
            paraphrase alone the protocol's headline.
        seconds: Wall time per task.
        out_file: The JSON written, or None.
        model: The evaluated model's provenance.
    """

    results: dict[str, float]
    seconds: dict[str, float]
    out_file: Path | None
    model: dict[str, Any]


def _is_score(key: str) -> bool:
    return key != "mean" and not key.startswith(("bias/", "bias_teacher/", "agreement/"))


def default_tasks(encoder: Encoder) -> list[str]:
    """Tasks run when none are asked for, by what the model embeds."""
    if encoder.modalities == {"text"}:
        return ["paraphrase"]
    if encoder.modalities == {"image"}:
        return ["linear-probe"]
    return ["image-text", "zero-shot"]


def run_task(task: str, encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """One task of ``cfg`` on ``encoder``: every dataset and split it asks for."""
    return EVAL_TASKS.get(task)(encoder, cfg, out_dir)


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """Load the model, run every task, add ``mean`` and write ``eval-<tasks>.json`` (config, model
    provenance, times and results) to the output directory when there is one."""
    encoder = load_encoder(
        cfg.model,
        cfg.weights,
        random_weights=cfg.random_weights,
        device=cfg.device,
        tokenizer=cfg.tokenizer,
        preprocess=cfg.preprocess,
        **cfg.teacher_options,
    )
    encoder.show_progress = cfg.show_progress
    tasks = cfg.tasks or default_tasks(encoder)
    out_dir = cfg.out if cfg.out is not None else encoder.run_dir
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        start = time.perf_counter()
        part = run_task(task, encoder, cfg, out_dir)
        seconds[task] = time.perf_counter() - start
        logger.info("%s: %.1f s", task, seconds[task])
        part.pop("mean", None)  # recomputed over every task's scores below
        clash = sorted(set(part) & set(results))
        if clash:
            raise MmkdError(f"--task {task}: result {clash[0]!r} was already produced by another task")
        results.update(part)
    scores = [v for k, v in results.items() if _is_score(k)]
    if scores:
        results["mean"] = float(np.mean(scores))
    out_file = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out_file = out_dir / f"eval-{'+'.join(tasks)}.json"
        record = {
            "config": asdict(cfg) | {"tasks": tasks},
            "model": encoder.describe(),
            "seconds": seconds,
            "versions": library_versions(),
            "results": finite_or_none(results),
        }
        out_file.write_text(json.dumps(record, indent=2, default=str) + "\n")
        logger.info("results written to %s", out_file)
    return EvalReport(results=results, seconds=seconds, out_file=out_file, model=encoder.describe())
