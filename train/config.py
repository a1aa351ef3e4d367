"""The resolved configuration of one training run: every mmkd-train option declared once, as a field.

Each field's ``option()`` carries its flag, help, choices and parser; the command, ``--config`` files,
``--resume``'s comparison with the recorded run and mmkd-ablate's grids are derived from them
(``mmkd.app.options``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmkd.app.cli import did_you_mean
from mmkd.app.options import Extra, option
from mmkd.evaluate import RUN_TASKS, check_run_task
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, looks_like_url, store_location
from mmkd_core.losses import LOSSES, parse_loss_spec
from mmkd_core.students.kinds import STUDENT_KINDS, kind_names
from mmkd_core.teachers import TEACHERS

# --student: a registered kind (each kind's defaults live in its own file, mmkd_core/students/kinds/), or auto
STUDENT_CHOICES = ("auto", *kind_names())
AUTOCAST = ("none", "bfloat16")
INITS = ("teacher", "random", "data2vec2")
TOKEN_PREDS = ("recipe", "head")


def _loss(value: str) -> str:
    """--loss: every term a registered loss (a near miss is named)."""
    for name in parse_loss_spec(value):
        if name not in LOSSES:
            known = LOSSES.names()
            raise MmkdError(f"--loss: unknown term {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")
    return value


def _teachers(value: str | list[str] | tuple[str, ...]) -> str:
    """--teachers: a comma-separated list of teacher names (a list in config files and grids), each once."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    if not names or not all(names):
        raise MmkdError(f"--teachers {value!r}: give teacher names separated by commas, e.g. minilm-l6,mpnet-base")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MmkdError(f"--teachers {value!r}: teacher {twice[0]} is named twice")
    return ",".join(names)


def _eval_task(value: str) -> str:
    """--eval: the task's name checked here, for the near miss; TrainConfig checks the rest (paths)."""
    name = value.partition(":")[0]
    if name not in RUN_TASKS:
        raise MmkdError(
            f"--eval {value!r}: unknown task{did_you_mean(name, RUN_TASKS)} (choose retrieval, mrpc:PATH or qqp:PATH)"
        )
    return value


def _init_help() -> str:
    return (
        "teacher (its first blocks; for text students evenly spaced ones ending at the top, see --student-option "
        "init_blocks), random, data2vec2 (fairseq's data2vec 2.0 image checkpoint in "
        "--init-weights: a post-norm data2vec2 student), or a teacher name whose checkpoint (--init-weights) "
        f"gives the blocks: {', '.join(TEACHERS.names())}. Default: teacher; random for multimodal; data2vec2 for "
        "data2vec2 students."
    )


def _loss_help() -> str:
    return (
        f"Loss terms with weights, e.g. token_mse=1,pooled_mse=1; terms: {', '.join(LOSSES.names())} "
        "(default per student: text pooled_cosine+contrastive_kd, image token_mse, multimodal contrastive_kd+itc)."
    )


@dataclass
class TrainConfig:
    """Everything `mmkd-train` needs; the CLI only fills this in.

    Each field's ``help`` is its documentation; beyond it: ``student`` auto chooses from the store (text
    teacher over text -> text; over image–caption data -> multimodal; image teacher -> vit, beit for BEiT-like
    teachers or inits; ``init="data2vec2"`` -> data2vec2). ``init`` None is the student kind's default (each
    kind's ``defaults`` in mmkd_core/students/kinds/): the teacher's blocks (``student_options["init_blocks"]``
    picks others), except random for multimodal students (the caption teacher is wider than a CPU-sized
    student) and data2vec2 for data2vec2 students. ``batch_size``, ``lr`` and ``epochs`` None are per student
    kind as well; ``batch_size`` is per rank.
    """

    targets: Path | StoreURL = option(help="Store written by mmkd-extract (a path or a URL).", metavar="PATH|URL")
    teachers: str | None = option(
        None,
        parser=_teachers,
        metavar="NAME,NAME,...",
        help="Train against these teachers of the store (names as the store lists them, the first teacher's "
        "model builds the student; each further one gets its own prediction heads). Default: the store's first.",
    )
    teacher_weights: dict[str, Any] = option(
        dict,
        flag="--teacher-weight",
        keyvalue=True,
        metavar="NAME=W",
        help="Weight of one teacher's loss in the total (default 1 each; 0: logged, not trained).",
    )
    student: str = option(
        "auto",
        help=f"Student kind: {', '.join(STUDENT_CHOICES)} (auto: from the store).",
        choices=STUDENT_CHOICES,
        noun="student kind",
    )
    depth: int | None = option(None, help="Student depth (image tower for multimodal); default half the teacher's.")
    student_options: dict[str, Any] = option(
        dict, flag="--student-option", keyvalue=True, help="Student option KEY=VALUE, e.g. width=192."
    )
    init: str | None = option(None, help=_init_help, choices=(INITS, TEACHERS), noun="init")
    init_weights: str | None = option(None, help="Checkpoint for --init <teacher name> or --init data2vec2.")
    init_image: str | None = option(
        None,
        metavar="NAME",
        help="Multimodal: seed the image tower from this image teacher's first blocks (teacher: the store's).",
    )
    init_image_weights: str | None = option(None, help="Checkpoint for --init-image.")
    init_text: str | None = option(
        None,
        metavar="NAME",
        help="Multimodal: seed the text tower from this BERT-like teacher's first layers (it must read the "
        "captions' tokenizer).",
    )
    init_text_weights: str | None = option(None, help="Checkpoint for --init-text.")
    freeze_embeddings: bool = option(False, help="Freeze token/position embeddings copied from the teacher.")
    token_pred: str = option(
        "recipe",
        help="Student token prediction: recipe (own layers through the target recipe) or head (linear head on "
        "the last layer).",
        choices=TOKEN_PREDS,
        noun="token prediction",
    )
    loss: str | None = option(None, help=_loss_help, parser=_loss, metavar="TERM=W,...")
    loss_options: dict[str, Any] = option(
        dict, flag="--loss-option", keyvalue=True, help="Loss option KEY=VALUE, e.g. temperature=0.05."
    )
    bank_size: int = option(
        0, help="Memory bank: teacher targets of this many other samples per epoch as extra contrastive_kd negatives."
    )
    batch_size: int | None = option(None, help="Samples per step (default 64; text and multimodal 128).")
    lr: float | None = option(None, help="Peak learning rate (default 5e-4; text 2e-4; multimodal 1e-3).")
    weight_decay: float = option(0.01, help="AdamW weight decay.")
    warmup: float = option(0.05, help="Warmup steps, or a fraction of all steps when < 1.")
    epochs: float | None = option(None, help="Passes over the store (default 1; multimodal 20).")
    steps: int | None = option(None, help="Total steps (overrides --epochs).")
    grad_clip: float = option(1.0, help="Max gradient norm (0: off).")
    autocast: str = option(
        "none", help=f"Student compute dtype: {', '.join(AUTOCAST)}.", choices=AUTOCAST, noun="compute dtype"
    )
    workers: int = option(0, help="DataLoader processes.")
    seed: int = option(0, help="Seed of init, data order and views.")
    run_dir: Path | None = option(None, help="Output directory (default runs/<store name>).")
    resume: bool = option(False, help="Continue the run in --run-dir from its last checkpoint.")
    ckpt_every: int = option(500, help="Checkpoint every N steps.")
    log_every: int = option(10, help="Log metrics every N steps.")
    data_root: str | None = option(
        None,
        help="Source data, for students that read images (default: where the store was extracted from).",
    )
    device: str = option("cpu", help="torch device.")
    eval: list[str] = option(
        list,
        repeat=True,
        parser=_eval_task,
        metavar="TASK",
        help="Evaluate at the end: retrieval (image-text, held-out), mrpc:PATH, qqp:PATH (repeatable). "
        "Default: retrieval for image-caption stores.",
    )
    progress: bool = option(True, flag="--quiet/--no-quiet", invert=True, help="No progress bar.")
    verify_views: bool = option(
        False,
        help="Re-render every stored view and compare it with its checksum before training (default: a sample of 64).",
    )

    def __post_init__(self) -> None:
        self.targets = store_location(self.targets, "--targets")
        if self.student not in STUDENT_CHOICES:
            raise MmkdError(f"--student {self.student!r}: choose one of {', '.join(STUDENT_CHOICES)}")
        if self.token_pred not in ("recipe", "head"):
            raise MmkdError(f"--token-pred {self.token_pred!r}: choose recipe or head")
        if self.autocast not in AUTOCAST:
            raise MmkdError(f"--autocast {self.autocast!r}: choose one of {', '.join(AUTOCAST)}")
        for name in ("batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MmkdError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        self._check_numbers()
        self._check_teachers()
        if self.steps is not None and self.steps < 1:
            raise MmkdError(f"--steps {self.steps}: must be at least 1")
        if self.bank_size < 0:
            raise MmkdError(f"--bank-size {self.bank_size}: must be 0 or more")
        if self.depth is not None and self.depth < 1:
            raise MmkdError(f"--depth {self.depth}: must be at least 1")
        for task in self.eval:
            check_run_task(task)
        if self.run_dir is None:
            self.run_dir = Path("runs") / self.targets.name.removesuffix(".zarr")
        if looks_like_url(self.run_dir):
            raise MmkdError(f"--run-dir {self.run_dir}: run directories are local; the store may be a URL")
        self.run_dir = Path(self.run_dir)

    def _check_numbers(self) -> None:
        """Real-valued options: finite (``nan`` and ``inf`` parse as floats), and in their range."""
        ranges = {"lr": (0, False), "epochs": (0, False), "weight_decay": (0, True), "warmup": (0, True),
                  "grad_clip": (0, True)}  # fmt: skip
        for name, (low, inclusive) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if not math.isfinite(value):
                raise MmkdError(f"{flag} {value}: must be a finite number")
            if value < low or (value == low and not inclusive):
                raise MmkdError(f"{flag} {value}: must be {'0 or more' if inclusive else 'positive'}")

    @property
    def teacher_names(self) -> list[str]:
        """The teachers ``--teachers`` names, first first; empty: the store's first teacher alone."""
        return self.teachers.split(",") if self.teachers else []

    def _check_teachers(self) -> None:
        """--teachers and --teacher-weight on their own (the store checks the names): weights finite and 0
        or more, not all 0, for teachers the run trains against; no memory bank beside further teachers."""
        if self.teachers is not None:
            self.teachers = _teachers(self.teachers)
        names = self.teacher_names
        for name, w in self.teacher_weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise MmkdError(f"--teacher-weight {name}={w}: a teacher's weight is a finite number, 0 or more")
            if names and name not in names:
                raise MmkdError(
                    f"--teacher-weight {name}={w}: {name} is not a teacher this run trains against "
                    f"(--teachers {self.teachers})"
                )
        weights = [self.teacher_weights.get(n, 1) for n in names]
        if names and not any(weights):
            raise MmkdError(
                f"--teacher-weight: every teacher of --teachers {self.teachers} has weight 0; nothing trains"
            )
        if len(names) > 1 and self.bank_size:
            raise MmkdError(
                f"--bank-size {self.bank_size}: the memory bank holds the first teacher's targets only; with several "
                "--teachers leave it 0"
            )

    def resolved(self, kind: str) -> TrainConfig:
        """A copy with the per-kind defaults filled in where this config leaves them open."""
        defaults = STUDENT_KINDS.get(kind).defaults
        values = {k: v for k, v in asdict(self).items()}
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        return TrainConfig(**values)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path | StoreURL) else v for k, v in d.items()}


# mmkd-train's options that are no TrainConfig field
EXTRAS = (
    Extra(
        "nproc",
        option(
            1,
            help="Train with N DDP ranks on this machine (torchrun started for you); "
            "or launch `torchrun --nproc-per-node N $(which mmkd-train) ...` yourself.",
        ),
        after="workers",
    ),
    Extra("verbose", option(False, help="Log what happens.")),
)
