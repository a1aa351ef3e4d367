"""Evaluation tasks on an :class:`~mmkd.evaluate.encoders.Encoder`, one module each, registered in
:data:`EVAL_TASKS` under their ``--task`` names: paraphrase retrieval, image–text retrieval, zero-shot
classification, linear probe, the gender–profession bias probe and the agreement with a reference model.

Each task reads a dataset, embeds it and hands the embeddings to :mod:`mmkd_core.metrics` (which holds all
the metric math), and returns a flat ``{key: float}`` dict. Keys are ``{dataset}/{split}/{metric}``
(``mrpc/train/s1_to_s2_r1``, ``shapes/test/i2t_r5``, ``cifar10/test/zero_shot_top1``,
``cifar10/test/linear_probe_top1``); paraphrase results add ``mean``, the headline of that protocol; bias
numbers are ``bias/{profession}/{group or diff}`` and ``bias/{statistic}``, agreement numbers
``agreement/{dataset}/{split}/{metric}``.
"""

# imported in the order --help lists the tasks: each module registers its task
from .paraphrase import available_paraphrase_splits, eval_paraphrase, eval_paraphrase_many  # isort: skip
from .image_text import eval_image_text  # isort: skip
from .zero_shot import eval_zero_shot  # isort: skip
from .linear_probe import eval_linear_probe  # isort: skip
from .bias import eval_bias  # isort: skip
from .agreement import eval_agreement  # isort: skip
from .base import EVAL_TASKS  # isort: skip

TASKS = EVAL_TASKS.in_order()

__all__ = [
    "EVAL_TASKS",
    "TASKS",
    "available_paraphrase_splits",
    "eval_agreement",
    "eval_bias",
    "eval_image_text",
    "eval_linear_probe",
    "eval_paraphrase",
    "eval_paraphrase_many",
    "eval_zero_shot",
]
