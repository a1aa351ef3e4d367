"""The resolved configuration of one training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmkd.evaluate import check_run_task
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, looks_like_url, store_location

STUDENT_KINDS = ("auto", "text", "vit", "beit", "data2vec2", "multimodal")
# Defaults that depend on the student. The multimodal ones train the embedded default (a 128-wide student on
# 10,000 shapes captions): held-out i2t R@1 rose with epochs, 0.826 at 12, 0.905-0.931 at 16 (two runs), 0.962 at
# 24; 20 leaves a margin above 0.90 and keeps the README's first command (install, extraction, training,
# evaluation) within 10 minutes on two quiet CPU cores (417 s at 16 epochs). README has the measured times.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # contrastive KD takes its negatives from the batch: 128 of them; 2e-4 for a student cut from the teacher
    "text": {"init": "teacher", "batch_size": 128, "lr": 2e-4, "epochs": 1.0},
    "vit": {"init": "teacher", "batch_size": 64, "lr": 5e-4, "epochs": 1.0},
    "beit": {"init": "teacher", "batch_size": 64, "lr": 5e-4, "epochs": 1.0},
    # no teacher has its post-norm blocks: by default it asks for the checkpoint (--init-weights)
    "data2vec2": {"init": "data2vec2", "batch_size": 64, "lr": 5e-4, "epochs": 1.0},
    "multimodal": {"init": "random", "batch_size": 128, "lr": 1e-3, "epochs": 20.0},
}
AUTOCAST = ("none", "bfloat16")


@dataclass
class TrainConfig:
    """Everything `mmkd-train` needs; the CLI only fills this in.

    Attributes:
        targets: The store written by mmkd-extract: a directory or a URL (``s3://bucket/x.zarr``).
        student: text, vit, beit, data2vec2, multimodal, or auto (chosen from the store: text teacher over
            text -> text; over image–caption data -> multimodal; image teacher -> vit, beit for BEiT-like
            teachers or inits; ``init="data2vec2"`` -> data2vec2).
        depth: Student depth (the image tower's for multimodal students); None: half the teacher's.
        student_options: Extra student config (width, heads, ...).
        init: random, teacher (blocks of the store's teacher: the first ones, for text students evenly
            spaced ones ending at the top; ``student_options["init_blocks"]`` picks others), data2vec2 (fairseq's
            data2vec 2.0 image checkpoint in ``init_weights``: a post-norm data2vec2 student) or a teacher
            registry name whose checkpoint (``init_weights``) gives the blocks; None: teacher, except random for
            multimodal students (the caption teacher is wider than a CPU-sized student).
        init_weights: Checkpoint of ``init`` when it names another model.
        init_image: Multimodal students: the model whose patch embedding and first blocks seed the image
            tower (a registered image teacher, or ``teacher``: the store's image teacher); None: ``init``.
        init_image_weights: Checkpoint of ``init_image``.
        init_text: Multimodal students: the BERT-like model whose embeddings and first layers seed the text
            tower (a registered text teacher); it must share the captions' tokenizer. None: ``init``.
        init_text_weights: Checkpoint of ``init_text``.
        freeze_embeddings: Freeze token and position embeddings copied from the teacher (text).
        token_pred: Student token prediction: recipe (its own layers through the target recipe) or head.
        loss: Loss terms and weights, e.g. "token_mse=1,pooled_mse=1"; None picks per student kind.
        loss_options: Loss options (temperature, margin, ...).
        bank_size: Teacher targets of this many other samples, drawn from the store each epoch, as extra
            negatives for contrastive_kd (0: the batch's targets only).
        batch_size: Samples per step (per rank); None: per student kind (KIND_DEFAULTS).
        lr: Peak learning rate; None: per student kind.
        weight_decay: AdamW weight decay (not on biases and norms).
        warmup: Warmup steps (>= 1) or a fraction of all steps (< 1).
        epochs: Passes over the store (ignored when ``steps`` is given); None: per student kind.
        steps: Total optimiser steps.
        grad_clip: Max gradient norm (0: off).
        autocast: none (fp32) or bfloat16.
        workers: DataLoader processes.
        seed: Seed of the student init, data order and view choice.
        run_dir: Output directory.
        resume: Continue the run in ``run_dir`` from its last checkpoint.
        ckpt_every: Checkpoint every N steps (and at the end).
        log_every: Log metrics every N steps.
        data_root: Source dataset location, for stores whose student reads images.
        device: torch device.
        eval: Evaluations to run at the end (e.g. "retrieval", "mrpc:PATH").
        progress: Show a progress bar.
        verify_views: Re-render every stored view and compare it with its checksum before training
            (otherwise a deterministic sample of them).
    """

    targets: Path | StoreURL
    student: str = "auto"
    depth: int | None = None
    student_options: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    init_weights: str | None = None
    init_image: str | None = None
    init_image_weights: str | None = None
    init_text: str | None = None
    init_text_weights: str | None = None
    freeze_embeddings: bool = False
    token_pred: str = "recipe"
    loss: str | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    bank_size: int = 0
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.05
    epochs: float | None = None
    steps: int | None = None
    grad_clip: float = 1.0
    autocast: str = "none"
    workers: int = 0
    seed: int = 0
    run_dir: Path | None = None
    resume: bool = False
    ckpt_every: int = 500
    log_every: int = 10
    data_root: str | None = None
    device: str = "cpu"
    eval: list[str] = field(default_factory=list)
    progress: bool = True
    verify_views: bool = False

    def __post_init__(self) -> None:
        self.targets = store_location(self.targets, "--targets")
        if self.student not in STUDENT_KINDS:
            raise MmkdError(f"--student {self.student!r}: choose one of {', '.join(STUDENT_KINDS)}")
        if self.token_pred not in ("recipe", "head"):
            raise MmkdError(f"--token-pred {self.token_pred!r}: choose recipe or head")
        if self.autocast not in AUTOCAST:
            raise MmkdError(f"--autocast {self.autocast!r}: choose one of {', '.join(AUTOCAST)}")
        for name in ("batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MmkdError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.lr is not None and self.lr <= 0:
            raise MmkdError(f"--lr {self.lr}: must be positive")
        if self.steps is not None and self.steps < 1:
            raise MmkdError(f"--steps {self.steps}: must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise MmkdError(f"--epochs {self.epochs}: must be positive")
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

    def resolved(self, kind: str) -> TrainConfig:
        """A copy with the per-kind defaults filled in where this config leaves them open."""
        defaults = KIND_DEFAULTS[kind]
        values = {k: v for k, v in asdict(self).items()}
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        return TrainConfig(**values)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path | StoreURL) else v for k, v in d.items()}
