"""Stage 3: ``mmkd-eval`` — retrieval, zero-shot, linear probe and bias probe, for teachers and students
alike. Training calls it only through ``evaluate_run`` at the end of a run."""

from .config import EvalConfig
from .encoders import Encoder, load_encoder
from .evaluation import EvalReport, run_evaluation
from .run import RUN_TASKS, check_run_task, default_run_tasks, evaluate_run
from .tasks import EVAL_TASKS, TASKS

__all__ = [
    "Encoder",
    "load_encoder",
    "RUN_TASKS",
    "check_run_task",
    "default_run_tasks",
    "evaluate_run",
    "EVAL_TASKS",
    "TASKS",
    "EvalConfig",
    "EvalReport",
    "run_evaluation",
]
