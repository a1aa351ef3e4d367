"""mmkd-train as one recipe, read top to bottom: the store, the run's configuration, the student, the loss,
the data, the optimiser; then the epochs and their steps, the checkpoints, the export.

Only the store's targets are read: the teacher never runs here (``--init teacher`` copies its weights into
the student, that is all). Variants subclass the recipe rather than add flags to it: the benchmarks' online
teacher and in-RAM store override :meth:`TrainRecipe.batches` and :meth:`TrainRecipe.batch_targets`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mmkd.app.progress import progress_bar
from mmkd.evaluate import default_run_tasks
from mmkd_core.batch_order import StepSpec, num_steps
from mmkd_core.dataset import StoreDataset
from mmkd_core.errors import MmkdError
from mmkd_core.loader import StoreLoader, to_device
from mmkd_core.losses import TOKEN_TERMS, LossInputs, build_loss, teachers_loss
from mmkd_core.store import open_store, take_reader_lease
from mmkd_core.students import save_student
from mmkd_core.students.teacher_heads import add_teacher_heads
from mmkd_core.versions import library_versions

from .bank import memory_bank, without_batch
from .build import build, default_loss, loss_inputs, student_kind, teachers_inputs
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from .config import TrainConfig
from .ddp import distributed, freeze_unused, init_ranks, leave_group, rng_states, set_rng_state
from .optim import adamw
from .report import TrainResult
from .resume import check_store, read_record, resumed_config, store_record
from .run_log import MetricsLog, truncate_metrics
from .rundir import check_owned, claim
from .teachers import check_token_terms, dataset_teachers, further_heads, select_teachers
from .verify_views import DEFAULT_SAMPLE, verify_views

log = logging.getLogger(__name__)

# a contrastive loss on a short batch has fewer negatives: it shows as a spike every epoch
CONTRASTIVE = {"contrastive_kd", "itc"}


class TrainRecipe:
    """One training run: ``setup()``, ``train()``, ``export()``, ``cleanup()``, then ``result()``.

    Args:
        cfg: The run.
        given: With ``cfg.resume``: the fields the caller set explicitly; each must equal the run's recorded
            value (None: the fields that differ from TrainConfig's defaults).
    """

    def __init__(self, cfg: TrainConfig, given: set[str] | None = None) -> None:
        self.cfg = cfg
        self.given = given
        self.step = 0  # optimiser steps taken, over every attempt of the run
        self.losses: list[float] = []  # of this attempt's steps
        self.seconds = 0.0
        self._image_cache: dict = {}  # images decoded once, kept across the epochs of train()
        self.locks: list[Any] = []  # the run directory's lock and the store's reader lease (rank 0)

    # ------------------------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Everything before the first step; continues from the last checkpoint with ``cfg.resume``."""
        self.rank, self.world, self.device = init_ranks(self.cfg.device)
        if self.rank == 0:  # the run directory is ours (new, empty or a run) and this trainer's alone
            self.locks.append(claim(self.cfg.run_dir))
        self.store = self._setup_store()
        if self.rank == 0:  # no --overwrite of the store while this run reads it
            self.locks.append(take_reader_lease(self.cfg.targets))
        ckpt = self._setup_config()
        torch.manual_seed(self.cfg.seed)
        self._setup_model()
        self._setup_loss()
        self._setup_data()
        self._setup_ddp()
        self._setup_optimizer()
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        elif self.rank == 0:
            self._record()

    def _setup_store(self):
        reader = open_store(self.cfg.targets)
        if not reader.complete:
            raise MmkdError(f"{self.cfg.targets} is incomplete: run the same mmkd-extract command again to finish it")
        return reader

    def _recorded_reader(self, record: dict[str, Any]) -> Any:
        """The reader of the teacher a run records as its first (the store's first teacher when it records none)."""
        first = str((record.get("train") or {}).get("teachers") or "").split(",")[0]
        return self.store.teacher(first) if first in self.store.teachers else self.store

    def _setup_config(self) -> Path | None:
        """Resolve the run's configuration (a resumed run's is the recorded one); returns the checkpoint to
        continue from (None: a new run)."""
        cfg, run_dir = self.cfg, self.cfg.run_dir
        ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
        if ckpt is not None and not cfg.resume:
            raise MmkdError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        if cfg.resume:
            if ckpt is None:
                raise MmkdError(f"--resume: {run_dir} has no checkpoint to continue from")
            record = read_record(run_dir)
            # the store first: another store makes every other difference moot
            check_store(self._recorded_reader(record), record)
            cfg = resumed_config(cfg, record, self.given, self.world)
        # the first teacher's arrays are the run's store: its teacher builds the student
        self.teachers = select_teachers(self.store, cfg)
        self.reader = self.teachers.readers[self.teachers.names[0]]
        kind = student_kind(cfg, self.reader.attrs)
        if self.teachers.further and kind != "text":
            raise MmkdError(
                f"--teachers {cfg.teachers}: a student against several teachers is a text student; this store "
                f"trains a {kind} student"
            )
        self.cfg = dataclasses.replace(cfg.resolved(kind), teachers=",".join(self.teachers.names))
        return ckpt

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.built = build(cfg, self.reader)
        self.heads, self.no_tokens = further_heads(self.teachers, self.built)
        if self.heads:  # one set of prediction heads per further teacher, on the same blocks
            add_teacher_heads(self.built.student, self.heads)
        # every rank checks the same deterministic sample, so all of them refuse together
        sample = None if cfg.verify_views else DEFAULT_SAMPLE
        verify_views(self.reader, self.built.source, sample=sample, seed=cfg.seed)
        if cfg.eval and "retrieval" in cfg.eval and self.built.kind != "multimodal":
            raise MmkdError(
                f"--eval retrieval scores image-caption students; this store trains a {self.built.kind} student"
            )
        self.student = self.built.student.to(self.device)
        self.model: torch.nn.Module = self.student  # what the steps run: the student, or its DDP wrapper
        device_type, bf16 = torch.device(self.device).type, cfg.autocast == "bfloat16"
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _setup_loss(self) -> None:
        self.loss_spec = self.cfg.loss or self.built.default_loss or default_loss(self.built.kind)
        self.loss_fn = build_loss(self.loss_spec, **self.cfg.loss_options)
        token = [t for t in self.loss_fn.weights if t in TOKEN_TERMS]
        if token and self.built.whole_sample_only:
            raise MmkdError(f"--loss {token[0]}: {self.built.whole_sample_only}")
        check_token_terms(self.loss_fn, self.no_tokens)

    def _setup_data(self) -> None:
        """The store as a dataset (one global order per epoch, shared by the ranks), and the number of steps."""
        cfg = self.cfg
        # contrastive losses train on full batches only: the epoch's remainder is dropped, else split
        remainder = "drop" if CONTRASTIVE & set(self.loss_fn.weights) else "split"
        self.dataset = self.dataset_for(remainder)
        self.loader = StoreLoader(self.dataset, workers=cfg.workers)
        steps = StepSpec(cfg.batch_size, self.world, remainder)
        self.per_epoch = num_steps(len(self.reader), steps)  # the same on every rank: DDP ranks step together
        if self.per_epoch == 0:
            raise MmkdError(
                f"--batch-size {cfg.batch_size}: no full batch of the store's {len(self.reader)} samples on "
                f"{self.world} rank(s) (contrastive losses train on full batches only); use a smaller batch"
            )
        self.total = cfg.steps or max(1, int(round(cfg.epochs * self.per_epoch)))
        self.warmup = int(cfg.warmup if cfg.warmup >= 1 else max(1, round(cfg.warmup * self.total)))

    def dataset_for(self, remainder: str, **options: Any) -> StoreDataset:
        """The run's StoreDataset (``options``: further StoreDataset arguments, for subclasses)."""
        built = self.built
        return StoreDataset(
            self.cfg.targets,
            self.cfg.batch_size,
            seed=self.cfg.seed,
            rank=self.rank,
            world_size=self.world,
            remainder=remainder,
            by_length=built.kind == "text",
            source=built.source,
            image_spec=built.image_spec,
            **built.loader_options,
            image_cache=self._image_cache,
            teacher=self.teachers.names[0],
            teachers=dataset_teachers(self.teachers, self.heads, self.loss_fn),
            **options,
        )

    def _setup_ddp(self) -> None:
        if not distributed():
            return

        def first_batch_loss() -> torch.Tensor:
            probe = self.dataset_for(self.dataset.steps.remainder)
            batch = to_device(self.batch_targets(next(iter(probe))), self.device)
            return self.objective(self.student, batch)[0]

        freeze_unused(self.student, first_batch_loss)
        self.model = torch.nn.parallel.DistributedDataParallel(self.student)

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.opt, self.sched = adamw(self.student, cfg.lr, cfg.weight_decay, self.total, self.warmup)

    def _record(self) -> None:
        """Write the run's resolved configuration: what --resume continues and what reproduces the run."""
        cfg, built = self.cfg, self.built
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if (cfg.run_dir / "config.json").exists():  # a run of ours stopped before its first checkpoint starts over
            truncate_metrics(cfg.run_dir, 0)
        # what ran, in full: the loss and evaluation the defaults chose, paths that work from any folder
        recorded = {
            **cfg.to_json(),
            "loss": self.loss_spec,
            "eval": cfg.eval or default_run_tasks(built.kind, self.reader.attrs),
            "targets": str(cfg.targets.resolve()),
            "run_dir": str(cfg.run_dir.resolve()),
        }
        record = {
            "argv": sys.argv,
            "train": recorded,
            "student": {"kind": built.kind, **built.student.describe()},
            "loss": self.loss_fn.weights,
            "loss_options": self.loss_fn.options,
            "steps": self.total,
            "warmup": self.warmup,
            "steps_per_epoch": self.per_epoch,
            "world_size": self.world,
            "store": store_record(self.reader),
            "versions": library_versions(),
        }
        (cfg.run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))

    # -------------------------------------------------------------------------------------------------- data

    def batch_targets(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its teacher targets: those the store holds, as read."""
        return batch

    # ------------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        """Step until the planned number of steps, checkpointing and logging as configured."""
        cfg = self.cfg
        metrics = MetricsLog(cfg.run_dir) if self.rank == 0 else None
        self.student.train()
        start = time.perf_counter()
        try:
            with progress_bar(
                f"train {self.built.kind} student",
                total=self.total,
                completed=self.step,
                unit="steps",
                enabled=cfg.progress and self.rank == 0,
                extra="loss {task.fields[loss]}",
                fields={"loss": "-"},
            ) as advance:
                while self.step < self.total:
                    self._epoch(advance, metrics, start)
        except KeyboardInterrupt:
            if latest_checkpoint(cfg.run_dir) is None:  # nothing saved yet: the same command starts over
                raise MmkdError(
                    f"interrupted at step {self.step}, before the first checkpoint; run the same command again"
                ) from None
            raise MmkdError(
                f"interrupted at step {self.step}; continue with --resume --run-dir {cfg.run_dir}"
            ) from None
        finally:
            if metrics is not None:
                metrics.close()
        self.seconds = time.perf_counter() - start

    def _epoch(self, advance, metrics: MetricsLog | None, start: float) -> None:
        """The rest of the current epoch (all of it, unless the run continues from inside it)."""
        cfg = self.cfg
        epoch = self.dataset.epoch
        left = len(self.loader)
        end = min(self.total, self.step + left)
        bank = memory_bank(self.reader, cfg.bank_size, cfg.seed, epoch) if cfg.bank_size else None
        for batch in self.loader:  # the rest of this epoch; the loader's state advances with each batch
            batch = to_device(self.batch_targets(batch), self.device)  # targets widened on the device
            if bank is not None:
                batch["bank"] = without_batch(bank, batch["index"])
            value, terms = self.train_step(batch)
            self.losses.append(value)
            advance(1, loss=f"{value:.4f}")
            if metrics is not None and (self.step % cfg.log_every == 0 or self.step == self.total):
                metrics.write(self._row(epoch, value, terms, time.perf_counter() - start))
            if self.step % cfg.ckpt_every == 0 or self.step == self.total:
                self.save_checkpoint()
            if self.step >= end:
                break
        if self.step < end:  # the order promised more batches than the loader gave: never spin on it
            raise RuntimeError(f"epoch {epoch}: the loader stopped at step {self.step} of {end} ({left} were left)")

    def objective(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``batch`` through ``model`` (the student or its DDP wrapper), and its terms for logging:
        the run's loss terms toward its teacher, or toward each of several, weighted (``teachers_loss``)."""
        if not self.teachers.further:
            return self.loss_fn(loss_inputs(self.built, model, batch, self.device))
        inputs: dict[str, LossInputs] = teachers_inputs(self.built, model, batch, self.device, self.teachers.names)
        return teachers_loss(self.loss_fn, inputs, self.teachers.weights)

    def train_step(self, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """One optimiser step on ``batch``; returns the loss and its terms."""
        with self.autocast:
            loss, terms = self.objective(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return float(loss.detach()), terms

    def _row(self, epoch: int, value: float, terms: dict[str, float], seconds: float) -> dict[str, Any]:
        lr = self.sched.get_last_lr()[0]
        return {"step": self.step, "epoch": epoch, "loss": value, **terms, "lr": lr, "seconds": round(seconds, 3)}

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """Checkpoint the student, optimiser, schedule, step and every rank's RNG (rank 0 writes it)."""
        rng = rng_states(self.world)  # a collective: every rank takes part
        if self.rank == 0:
            state = {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "step": self.step,
                "loader": self.loader.state_dict(),  # epoch, global samples consumed, seed: any world size
            }
            write_checkpoint(self.cfg.run_dir, self.step, self.student, {**state, "rng": rng})

    def load_checkpoint(self, path: Path) -> None:
        """Continue from checkpoint ``path`` exactly: weights, optimiser, schedule, step and this rank's RNG."""
        run_dir = self.cfg.run_dir
        record = read_record(run_dir)
        state = read_checkpoint(path, self.student)
        elastic = int(record.get("world_size") or 1) != self.world
        if elastic:
            self._replan(record, state, path)
        elif (record.get("steps"), record.get("steps_per_epoch")) != (self.total, self.per_epoch):
            raise MmkdError(
                f"--resume: {run_dir} planned {record.get('steps')} steps of "
                f"{record.get('steps_per_epoch')} per epoch; this mmkd plans {self.total} of {self.per_epoch} "
                "for the same settings, so the run cannot continue exactly: start a new --run-dir"
            )
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            # another number of ranks draws other dropout masks anyway: each takes a recorded rank's stream
            rng = state["rng"][self.rank % len(state["rng"]) if elastic else self.rank]
            if "loader" in state:
                self.loader.load_state_dict(state["loader"])
            else:  # a checkpoint of a run before the loader kept its state: its position, from the step
                epoch, step_in_epoch = divmod(int(state["step"]), self.per_epoch)
                consumed = step_in_epoch * self.world * self.cfg.batch_size
                self.loader.load_state_dict({**self.loader.state_dict(), "epoch": epoch, "consumed": consumed})
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise MmkdError(f"{path / 'state.pt'}: does not fit this run ({type(e).__name__}: {e})") from None
        set_rng_state(rng)
        self.step = int(state["step"])
        if self.rank == 0:  # drop the metrics logged after the checkpoint: they are computed again
            truncate_metrics(run_dir, self.step)
        log.info("resumed %s at step %d", run_dir, self.step)

    def _replan(self, record: dict[str, Any], state: dict[str, Any], path: Path) -> None:
        """A run continued on another number of ranks: the same epochs (the recorded steps of the recorded
        per-epoch count), whose remaining samples are now taken in steps of this world size. The schedule
        keeps its warmup and ends at the new last step."""
        if "loader" not in state:
            raise MmkdError(
                f"--resume: {path} was written before runs could change their number of ranks; resume it with "
                f"{record.get('world_size')} rank(s)"
            )
        loader, n = state["loader"], len(self.reader)
        # the run's end and where it stands, in samples of the global order (epochs may end mid-epoch)
        end = float(record["steps"]) / max(1, int(record["steps_per_epoch"])) * n
        pos = int(loader["epoch"]) * n + int(loader["consumed"])
        now = StepSpec(self.cfg.batch_size, self.world, self.dataset.steps.remainder)
        in_epoch = num_steps(n, now, int(loader["consumed"]))
        if end - pos <= n - int(loader["consumed"]):  # it ends in this epoch
            left = min(in_epoch, math.ceil(max(0.0, end - pos) / (self.world * self.cfg.batch_size)))
        else:
            left = in_epoch + int(round((end - (int(loader["epoch"]) + 1) * n) / n * self.per_epoch))
        self.total = int(state["step"]) + left
        self.opt, self.sched = adamw(self.student, self.cfg.lr, self.cfg.weight_decay, self.total, self.warmup)
        log.info("resumed on %d rank(s): %d steps in all (recorded %s)", self.world, self.total, record["steps"])

    # ------------------------------------------------------------------------------------------ export, end

    def export(self) -> None:
        """Rank 0 saves the trained student in its library's format (``run_dir/student``)."""
        if self.rank != 0:
            return
        self.student.eval()
        check_owned(self.cfg.run_dir)  # a link planted while it trained is not written through either
        try:
            save_student(
                self.student,
                self.cfg.run_dir / "student",
                tokenizer=self.built.tokenizer,
                preprocess=self.built.preprocess,
                max_seq_length=self.built.max_seq_length
                or (self.reader.attrs.get("preprocess") or {}).get("max_length"),
                teacher=self.teachers.names[0] if self.teachers.further else None,
            )
        except KeyboardInterrupt:
            raise MmkdError(
                f"interrupted while exporting the student; continue with --resume --run-dir {self.cfg.run_dir}"
            ) from None

    def cleanup(self) -> None:
        """Leave the process group (every rank waits for rank 0's export first)."""
        if distributed():
            leave_group()
        self.release()

    def release(self) -> None:
        """Give back the run directory's lock and the store's lease (idempotent; also after a failure)."""
        while self.locks:
            lock = self.locks.pop()
            if lock is not None:
                lock.release()

    def result(self) -> TrainResult:
        return TrainResult(
            run_dir=self.cfg.run_dir,
            steps=self.step,
            seconds=self.seconds,
            final_loss=self.losses[-1] if self.losses else math.nan,
            losses=self.losses,
            rank=self.rank,
        )
