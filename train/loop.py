"""Stage 2: store -> student. The teacher is never run; only its weights may seed the student."""

from __future__ import annotations

from .config import TrainConfig
from .recipe import TrainRecipe
from .report import TrainResult


def train(cfg: TrainConfig, given: set[str] | None = None) -> TrainResult:
    """Train a student from ``cfg.targets`` into ``cfg.run_dir``; resumes exactly with ``cfg.resume``.

    Args:
        cfg: The run.
        given: With ``cfg.resume``: the fields the caller set explicitly; each must equal the run's recorded
            value (None: the fields that differ from TrainConfig's defaults).
    """
    return run(TrainRecipe(cfg, given))


def run(recipe: TrainRecipe) -> TrainResult:
    """Set up, train, export and clean up ``recipe`` (a TrainRecipe or a variant of it); its locks are given
    back whatever happens."""
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
        recipe.cleanup()
    finally:
        recipe.release()
    return recipe.result()
