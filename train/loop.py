"""Stage 2: store -> student. The teacher is never run; only its weights may seed the student."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.losses import build_loss
from mmkd_core.progress import progress_bar
from mmkd_core.store import config_diff, open_store
from mmkd_core.students import save_student
from mmkd_core.targets import recipe_targets
from mmkd_core.versions import library_versions

from .build import DEFAULT_LOSS, build, loss_inputs, student_kind
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loader import PlanSpec, StoreBatches, make_loader, num_batches

log = logging.getLogger(__name__)

# what a resumed run must find unchanged in the store
RESUME_FIELDS = ("teacher", "recipe", "dataset", "storage")
INPUT_ARRAYS = ("lengths", "input_ids", "view_params", "index")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    rank: int = 0


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched with torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def lr_lambda(total: int, warmup: int):
    """Linear warmup to 1, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _store_record(reader) -> dict[str, Any]:
    return {k: reader.attrs.get(k) for k in RESUME_FIELDS}


def live_targets(teacher, batch: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The batch with its targets computed by ``teacher`` on the batch's own inputs (replayed views or
    token ids) instead of read from the store."""
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask") if k in batch}
    with torch.inference_mode():
        out = teacher(**inputs)
        tokens, pooled = recipe_targets(out.hidden_states, out.mask, out.embed, recipe)
    live = dict(batch, pooled=pooled.clone())
    if tokens is not None:
        live["tokens"] = tokens.clone()
    return live


def memory_bank(reader, size: int, seed: int, epoch: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled teacher targets (view 0) of ``size`` samples in whole chunk runs chosen at random for the
    epoch, with their sample indices."""
    chunk = reader.chunk_size
    starts = np.arange(0, len(reader), chunk)
    rng = np.random.default_rng([seed, epoch, 2])
    picked, rows, idx = rng.permutation(starts), [], []
    for lo in picked:
        if sum(len(i) for i in idx) >= size:
            break
        part = reader.read(int(lo), int(min(lo + chunk, len(reader))), ("pooled", "index"))
        rows.append(part["pooled"][:, 0])
        idx.append(part["index"])
    bank, index = np.concatenate(rows)[:size], np.concatenate(idx)[:size]
    return torch.from_numpy(bank), index


def train(cfg: TrainConfig, online_teacher=None, in_memory: bool = False) -> TrainResult:
    """Train a student from ``cfg.targets`` into ``cfg.run_dir``; resumes exactly with ``cfg.resume``.

    Args:
        cfg: The run.
        online_teacher: Compute targets with this teacher on each batch instead of reading them (the store
            still supplies inputs and views). What caching replaces: tests and benchmarks compare the two.
        in_memory: Read the whole store into memory first instead of streaming it (benchmarks).
    """
    rank, world = _dist()
    reader = open_store(cfg.targets)
    if not reader.complete:
        raise MmkdError(f"{cfg.targets} is incomplete: run the same mmkd-extract command again to finish it")
    run_dir = cfg.run_dir
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if ckpt is not None and not cfg.resume:
        raise MmkdError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if cfg.resume and ckpt is None:
        raise MmkdError(f"--resume: {run_dir} has no checkpoint to continue from")
    if cfg.resume:
        recorded = json.loads((run_dir / "config.json").read_text())["store"]
        diff = config_diff(_store_record(reader), recorded)
        if diff is not None:
            raise MmkdError(f"--resume: {diff} of {cfg.targets} differs from the store this run was trained on")

    cfg = cfg.resolved(student_kind(cfg, reader.attrs))
    torch.manual_seed(cfg.seed)
    built = build(cfg, reader)
    student = built.student.to(cfg.device)
    loss_fn = build_loss(cfg.loss or DEFAULT_LOSS[built.kind], **cfg.loss_options)
    plan = PlanSpec(num_samples=len(reader), chunk_size=reader.chunk_size, batch_size=cfg.batch_size,
                    seed=cfg.seed, rank=rank, world_size=world, by_length=built.kind == "text")
    # every rank takes the same number of steps per epoch, or DDP's gradient all-reduce would wait forever
    per_epoch = min(num_batches(dataclasses.replace(plan, rank=r)) for r in range(world))
    total = cfg.steps or max(1, int(round(cfg.epochs * per_epoch)))
    warmup = int(cfg.warmup if cfg.warmup >= 1 else max(1, round(cfg.warmup * total)))
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))

    step = 0
    if cfg.resume:
        state = load_checkpoint(ckpt, student)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("resumed %s at step %d", run_dir, step)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({
            "train": cfg.to_json(), "student": {"kind": built.kind, **student.describe()},
            "loss": loss_fn.weights, "loss_options": loss_fn.options, "steps": total, "warmup": warmup,
            "steps_per_epoch": per_epoch, "store": _store_record(reader), "versions": library_versions(),
        }, indent=2, default=str))

    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    tb = _tensorboard(run_dir) if rank == 0 else None
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16) if cfg.autocast == "bfloat16" \
        else nullcontext()
    losses: list[float] = []
    image_cache: dict = {}
    start = time.perf_counter()
    student.train()
    try:
        with progress_bar(f"train {built.kind} student", total=total, completed=step, unit="steps",
                          enabled=cfg.progress and rank == 0, extra="loss {task.fields[loss]}",
                          fields={"loss": "-"}) as advance:
            while step < total:
                epoch, start_batch = divmod(step, per_epoch)
                batches = StoreBatches(cfg.targets, plan, source=built.source, epoch=epoch, start_batch=start_batch,
                                       image_spec=built.image_spec, image_cache=image_cache,
                                       names=INPUT_ARRAYS if online_teacher is not None else None,
                                       in_memory=in_memory)
                bank = memory_bank(reader, cfg.bank_size, cfg.seed, epoch) if cfg.bank_size else None
                for batch in make_loader(batches, cfg.workers):
                    if online_teacher is not None:
                        batch = live_targets(online_teacher, batch, reader.attrs["recipe"])
                    if bank is not None:  # the batch's own samples are positives, not negatives
                        batch["bank"] = bank[0][~np.isin(bank[1], batch["index"].numpy())]
                    with autocast:
                        loss, terms = loss_fn(loss_inputs(built, model, batch, cfg.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                    opt.step()
                    sched.step()
                    step += 1
                    value = float(loss.detach())
                    losses.append(value)
                    advance(1, loss=f"{value:.4f}")
                    if metrics is not None and (step % cfg.log_every == 0 or step == total):
                        row = {"step": step, "epoch": epoch, "loss": value, **terms, "lr": sched.get_last_lr()[0],
                               "seconds": round(time.perf_counter() - start, 3)}
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        if tb is not None:
                            for k, v in row.items():
                                if k not in ("step", "epoch"):
                                    tb.add_scalar(f"train/{k}", v, step)
                    if rank == 0 and (step % cfg.ckpt_every == 0 or step == total):
                        save_checkpoint(run_dir, step, student, {
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                            "torch_rng": torch.get_rng_state()})
                    if step >= total or step >= (epoch + 1) * per_epoch:
                        break
    except KeyboardInterrupt:
        raise MmkdError(f"interrupted at step {step}; continue with --resume --run-dir {run_dir}") from None
    finally:
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    seconds = time.perf_counter() - start
    result = TrainResult(run_dir=run_dir, steps=step, seconds=seconds, final_loss=losses[-1] if losses else math.nan,
                         losses=losses, rank=rank)
    if rank == 0:
        student.eval()
        save_student(student, run_dir / "student", tokenizer=built.tokenizer, preprocess=built.preprocess)
    return result


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has the numbers
        log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(run_dir / "tb"))
