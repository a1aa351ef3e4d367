"""``mmkd-ablate``: many students from one store.

Every combination of a grid of mmkd-train settings trains from the same cached targets (the teacher is
never run while they train; ``--init teacher`` copies its weights, as mmkd-train does), is scored by the
evaluation stage, and is set beside two baselines that come for free: the store's teacher itself and each
student at its initialisation (built by the same builder, never trained).

``--out DIR`` holds::

    DIR/teacher/eval.json          the store's teacher, scored (the only time it runs: for scoring)
    DIR/init/<settings>,seed=S/    a student at its initialisation (student/, eval.json)
    DIR/<settings>,seed=S/         one mmkd-train run (config.json, metrics.jsonl, checkpoints/, student/,
                                   eval.json)
    DIR/ablation.{md,csv,json,png} the table (mmkd.ablate.report)

A directory is finished when its ``eval.json`` holds the ablation's evaluation for the settings it was made
with. Running the same command again skips finished directories, continues a run that stopped mid-training
from its last checkpoint (mmkd-train ``--resume``: the same weights as an uninterrupted run) and does the
rest; a run that stopped before its first checkpoint starts over. The table is computed from the files, so
it is the same however often the ablation was interrupted. A directory made with other settings (other
shared options, another store) is refused rather than mixed in.
"""

from .config import AblateConfig
from .grid import merge_grids, parse_vary, read_grid, run_name
from .jobs import Job, Jobs, jobs
from .report import Table, write_table
from .run import ablate, execute, log_done, run_job

__all__ = [
    "AblateConfig",
    "Job",
    "Jobs",
    "Table",
    "ablate",
    "execute",
    "jobs",
    "log_done",
    "merge_grids",
    "parse_vary",
    "read_grid",
    "run_job",
    "run_name",
    "write_table",
]
