"""Bias probe (``--task bias``): how similar professions are to male and female terms, and with a reference
model (the teacher), how closely the model reproduces its bias."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd_core.metrics import bias_probe, compare_bias, plot_bias

from ..encoders import Encoder, load_encoder
from .base import EVAL_TASKS

if TYPE_CHECKING:
    from ..config import EvalConfig

logger = logging.getLogger(__name__)

BIAS_PLOT = "bias.png"


def _bias_numbers(prefix: str, table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{p}/{col}": v for p, row in table.items() for col, v in row.items()}


def eval_bias(
    encoder: Encoder, teacher_encoder: Encoder | None = None, out_dir: str | Path | None = None, *, batch_size: int = 64
) -> dict[str, float]:
    """Bias probe: mean cosine similarity of each profession to male and female terms
    (``metrics.bias_probe`` defaults), and with a teacher, how closely the model reproduces its bias.

    Args:
        encoder: The model (it must embed text).
        teacher_encoder: The reference model (usually the teacher the student was distilled from).
        out_dir: Where to write ``bias.png`` (teacher and model side by side; needs ``teacher_encoder``).
        batch_size: Texts per forward pass.

    Returns:
        ``bias/{profession}/{male,female,diff}`` and ``bias/mean_abs_diff``; with a teacher also
        ``bias_teacher/{profession}/...`` and ``bias/diff_correlation``, ``bias/mean_abs_diff_teacher``,
        ``bias/mean_abs_diff_student``.
    """
    encoder.require("text", "bias probe")
    table = bias_probe(lambda texts: encoder.encode_text(texts, batch_size))
    out = _bias_numbers("bias", table)
    out["bias/mean_abs_diff"] = float(np.mean([abs(row["diff"]) for row in table.values()]))
    if teacher_encoder is None:
        if out_dir is not None:
            logger.warning("bias probe: no plot without a reference model (--teacher)")
        return out
    teacher_encoder.require("text", "bias probe reference")
    teacher_table = bias_probe(lambda texts: teacher_encoder.encode_text(texts, batch_size))
    out.update(_bias_numbers("bias_teacher", teacher_table))
    out.update({f"bias/{k}": v for k, v in compare_bias(teacher_table, table).items()})
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        try:
            logger.info("bias plot: %s", plot_bias(teacher_table, table, str(path / BIAS_PLOT)))
        except ImportError:
            logger.warning(
                "bias probe: matplotlib cannot be imported (a dependency of mmkd: pip install matplotlib); "
                "no plot written"
            )
    return out


@EVAL_TASKS.register("bias")
def run(encoder: Encoder, cfg: EvalConfig, out_dir: Path | None) -> dict[str, float]:
    """The bias probe, against ``cfg.teacher`` when there is one (then ``bias.png`` goes to ``out_dir``)."""
    reference = None
    if cfg.teacher:
        reference = load_encoder(cfg.teacher, cfg.teacher_weights, device=cfg.device)
        reference.show_progress = cfg.show_progress
    return eval_bias(encoder, reference, out_dir, batch_size=cfg.batch_size)
