"""Stage 2: store -> student. The teacher is never run; only its weights may seed the student."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.evaluate import default_run_tasks
from mmkd_core.errors import MmkdError
from mmkd_core.losses import build_loss
from mmkd_core.progress import progress_bar
from mmkd_core.store import open_store
from mmkd_core.students import save_student
from mmkd_core.targets import recipe_targets
from mmkd_core.versions import library_versions

from .build import DEFAULT_LOSS, build, loss_inputs, student_kind
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loader import PlanSpec, StoreBatches, check_plan, make_loader, num_batches
from .resume import check_store, read_record, resumed_config, store_record
from .verify_views import DEFAULT_SAMPLE, verify_views

log = logging.getLogger(__name__)

CONTRASTIVE = {"contrastive_kd", "itc"}
INPUT_ARRAYS = ("lengths", "input_ids", "view_params", "index")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    rank: int = 0


def _dist(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device); initialises the process group when launched with torchrun.

    CUDA ranks use NCCL and the GPU named by ``LOCAL_RANK``; CPU ranks use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, device


def _leave_group() -> None:
    """Wait for rank 0's export, then close the process group on every rank.

    A rank that exits with the group still open can abort in gloo's teardown ("terminate called without an
    active exception"), and the launcher then kills rank 0 in the middle of its export.
    """
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def lr_lambda(total: int, warmup: int):
    """Linear warmup to 1, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by timm's rule: no decay on biases, norms, and what any submodule's
    ``no_weight_decay()`` names (CLS tokens, position tables, BEiT's relative-position bias)."""
    from timm.optim import param_groups_weight_decay

    skip: set[str] = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


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


@dataclass
class Run:
    """What one training process works with, once set up."""

    cfg: TrainConfig
    reader: Any
    built: Any
    model: torch.nn.Module  # the student, or its DDP wrapper
    loss_fn: Any
    opt: torch.optim.Optimizer
    sched: Any
    plan: PlanSpec
    per_epoch: int
    total: int
    warmup: int
    rank: int
    world: int
    device: str
    step: int = 0


def train(cfg: TrainConfig, online_teacher=None, in_memory: bool = False, given: set[str] | None = None) -> TrainResult:
    """Train a student from ``cfg.targets`` into ``cfg.run_dir``; resumes exactly with ``cfg.resume``.

    Args:
        cfg: The run.
        online_teacher: Compute targets with this teacher on each batch instead of reading them (the store
            still supplies inputs and views). What caching replaces: tests and benchmarks compare the two.
        in_memory: Read the whole store into memory first instead of streaming it (benchmarks).
        given: With ``cfg.resume``: the fields the caller set explicitly; each must equal the run's recorded
            value (None: the fields that differ from TrainConfig's defaults).
    """
    rank, world, device = _dist(cfg.device)
    reader = _complete_store(cfg.targets)
    ckpt, cfg = _run_config(cfg, reader, given, world)
    run = _setup(cfg, reader, rank, world, device)
    if ckpt is not None:
        _restore(run, ckpt)
    elif rank == 0:
        _record(run)
    start = time.perf_counter()
    losses = _loop(run, online_teacher, in_memory)
    seconds = time.perf_counter() - start
    if rank == 0:
        run.built.student.eval()
        save_student(
            run.built.student,
            cfg.run_dir / "student",
            tokenizer=run.built.tokenizer,
            preprocess=run.built.preprocess,
            max_seq_length=(reader.attrs.get("preprocess") or {}).get("max_length"),
        )
    if world > 1:
        _leave_group()
    return TrainResult(
        run_dir=cfg.run_dir,
        steps=run.step,
        seconds=seconds,
        final_loss=losses[-1] if losses else math.nan,
        losses=losses,
        rank=rank,
    )


def _complete_store(path: Path):
    reader = open_store(path)
    if not reader.complete:
        raise MmkdError(f"{path} is incomplete: run the same mmkd-extract command again to finish it")
    return reader


def _run_config(cfg: TrainConfig, reader, given: set[str] | None, world: int) -> tuple[Path | None, TrainConfig]:
    """The checkpoint to continue from (None: a new run) and the run's configuration, resolved."""
    run_dir = cfg.run_dir
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if ckpt is not None and not cfg.resume:
        raise MmkdError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if not cfg.resume:
        return None, cfg.resolved(student_kind(cfg, reader.attrs))
    if ckpt is None:
        raise MmkdError(f"--resume: {run_dir} has no checkpoint to continue from")
    record = read_record(run_dir)
    check_store(reader, record)
    cfg = resumed_config(cfg, record, given, world)
    return ckpt, cfg.resolved(student_kind(cfg, reader.attrs))


def _setup(cfg: TrainConfig, reader, rank: int, world: int, device: str) -> Run:
    torch.manual_seed(cfg.seed)
    built = build(cfg, reader)
    # every rank checks the same deterministic sample, so all of them refuse together
    verify_views(reader, built.source, sample=None if cfg.verify_views else DEFAULT_SAMPLE, seed=cfg.seed)
    if cfg.eval and "retrieval" in cfg.eval and built.kind != "multimodal":
        raise MmkdError(f"--eval retrieval scores image-caption students; this store trains a {built.kind} student")
    student = built.student.to(device)
    loss_fn = build_loss(cfg.loss or built.default_loss or DEFAULT_LOSS[built.kind], **cfg.loss_options)
    plan = PlanSpec(
        num_samples=len(reader),
        chunk_size=reader.chunk_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        by_length=built.kind == "text",
        # a contrastive loss on a short batch has fewer negatives: it shows as a spike every epoch
        drop_last=bool(CONTRASTIVE & set(loss_fn.weights)),
    )
    check_plan(plan)
    per_epoch = num_batches(plan)  # the same in every epoch and on every rank: DDP ranks step together
    total = cfg.steps or max(1, int(round(cfg.epochs * per_epoch)))
    warmup = int(cfg.warmup if cfg.warmup >= 1 else max(1, round(cfg.warmup * total)))
    model = student
    if world > 1:
        _freeze_unused(built, plan, cfg, loss_fn, device)
        model = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))
    return Run(
        cfg=cfg,
        reader=reader,
        built=built,
        model=model,
        loss_fn=loss_fn,
        opt=opt,
        sched=sched,
        plan=plan,
        per_epoch=per_epoch,
        total=total,
        warmup=warmup,
        rank=rank,
        world=world,
        device=device,
    )


def _freeze_unused(built, plan: PlanSpec, cfg: TrainConfig, loss_fn, device: str) -> None:
    """Freeze the parameters the loss never reaches (a vit's pooled head under ``token_mse``).

    DDP waits for a gradient of every trainable parameter; ``find_unused_parameters`` does not help, since
    it marks everything that feeds the student's outputs as used, including outputs the loss ignores.
    One probe step on the first batch finds them (a parameter used on any rank stays trainable); frozen,
    they are what they would be anyway: AdamW leaves a parameter without gradient untouched.
    """
    student = built.student
    batches = StoreBatches(cfg.targets, plan, source=built.source, image_spec=built.image_spec, **built.loader_options)
    batch = next(iter(batches))
    params = [p for p in student.parameters() if p.requires_grad]
    loss, _ = loss_fn(loss_inputs(built, student, batch, device))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    used = torch.tensor([g is not None for g in grads], dtype=torch.int32)
    torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    for p, u in zip(params, used.tolist(), strict=True):
        if not u:
            p.requires_grad_(False)
    log.info(
        "DDP: %d of %d parameter tensors get no gradient from the loss and are frozen",
        len(params) - int(used.sum()),
        len(params),
    )


def _record(run: Run) -> None:
    """Write the run's resolved configuration: what --resume continues and what reproduces the run."""
    cfg = run.cfg
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if (cfg.run_dir / "config.json").exists():  # a run of ours stopped before its first checkpoint starts over
        _truncate_metrics(cfg.run_dir / "metrics.jsonl", 0)
    # what ran, in full: the loss and evaluation the defaults chose, paths that work from any folder
    recorded = {
        **cfg.to_json(),
        "loss": cfg.loss or run.built.default_loss or DEFAULT_LOSS[run.built.kind],
        "eval": cfg.eval or default_run_tasks(run.built.kind, run.reader.attrs),
        "targets": str(cfg.targets.resolve()),
        "run_dir": str(cfg.run_dir.resolve()),
    }
    (cfg.run_dir / "config.json").write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "train": recorded,
                "student": {"kind": run.built.kind, **run.built.student.describe()},
                "loss": run.loss_fn.weights,
                "loss_options": run.loss_fn.options,
                "steps": run.total,
                "warmup": run.warmup,
                "steps_per_epoch": run.per_epoch,
                "world_size": run.world,
                "store": store_record(run.reader),
                "versions": library_versions(),
            },
            indent=2,
            default=str,
        )
    )


def _restore(run: Run, ckpt: Path) -> None:
    record = read_record(run.cfg.run_dir)
    if (record.get("steps"), record.get("steps_per_epoch")) != (run.total, run.per_epoch):
        raise MmkdError(
            f"--resume: {run.cfg.run_dir} planned {record.get('steps')} steps of "
            f"{record.get('steps_per_epoch')} per epoch; this mmkd plans {run.total} of {run.per_epoch} "
            "for the same settings, so the run cannot continue exactly: start a new --run-dir"
        )
    state = load_checkpoint(ckpt, run.built.student)
    try:
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        rng = state["rng"][run.rank]
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise MmkdError(f"{ckpt / 'state.pt'}: does not fit this run ({type(e).__name__}: {e})") from None
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.step = int(state["step"])
    if run.rank == 0:  # drop the metrics logged after the checkpoint: they are computed again
        _truncate_metrics(run.cfg.run_dir / "metrics.jsonl", run.step)
    log.info("resumed %s at step %d", run.cfg.run_dir, run.step)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= step))


def _rng_states(run: Run) -> list[dict[str, Any]]:
    """Every rank's RNG state (dropout differs per rank after the first step), gathered for rank 0."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if run.world == 1:
        return [mine]
    states: list[Any] = [None] * run.world
    torch.distributed.all_gather_object(states, mine)
    return states


def _loop(run: Run, online_teacher, in_memory: bool) -> list[float]:
    cfg, built = run.cfg, run.built
    metrics = open(cfg.run_dir / "metrics.jsonl", "a") if run.rank == 0 else None
    tb = tensorboard_writer(cfg.run_dir) if run.rank == 0 else None
    autocast = (
        torch.autocast(torch.device(run.device).type, dtype=torch.bfloat16)
        if cfg.autocast == "bfloat16"
        else nullcontext()
    )
    losses: list[float] = []
    image_cache: dict = {}
    start = time.perf_counter()
    built.student.train()
    try:
        with progress_bar(
            f"train {built.kind} student",
            total=run.total,
            completed=run.step,
            unit="steps",
            enabled=cfg.progress and run.rank == 0,
            extra="loss {task.fields[loss]}",
            fields={"loss": "-"},
        ) as advance:
            while run.step < run.total:
                epoch, start_batch = divmod(run.step, run.per_epoch)
                end = min(run.total, (epoch + 1) * run.per_epoch)
                batches = StoreBatches(
                    cfg.targets,
                    run.plan,
                    source=built.source,
                    epoch=epoch,
                    start_batch=start_batch,
                    image_spec=built.image_spec,
                    **built.loader_options,
                    image_cache=image_cache,
                    names=INPUT_ARRAYS if online_teacher is not None else None,
                    in_memory=in_memory,
                )
                bank = memory_bank(run.reader, cfg.bank_size, cfg.seed, epoch) if cfg.bank_size else None
                for batch in make_loader(batches, cfg.workers):
                    if online_teacher is not None:
                        batch = live_targets(online_teacher, batch, run.reader.attrs["recipe"])
                    if bank is not None:  # the batch's own samples are positives, not negatives
                        batch["bank"] = bank[0][~np.isin(bank[1], batch["index"].numpy())]
                    value, terms = _step(run, batch, autocast)
                    losses.append(value)
                    advance(1, loss=f"{value:.4f}")
                    if metrics is not None and (run.step % cfg.log_every == 0 or run.step == run.total):
                        _log(metrics, tb, run, epoch, value, terms, time.perf_counter() - start)
                    if run.step % cfg.ckpt_every == 0 or run.step == run.total:
                        _checkpoint(run)
                    if run.step >= end:
                        break
                if run.step < end:  # the plan promised more batches than the loader gave: never spin on it
                    raise RuntimeError(
                        f"epoch {epoch}: the loader stopped at step {run.step} of {end}; "
                        f"the plan has {run.per_epoch} batches per epoch"
                    )
    except KeyboardInterrupt:
        if latest_checkpoint(cfg.run_dir) is None:  # nothing saved yet: the same command starts over
            raise MmkdError(
                f"interrupted at step {run.step}, before the first checkpoint; run the same command again"
            ) from None
        raise MmkdError(f"interrupted at step {run.step}; continue with --resume --run-dir {cfg.run_dir}") from None
    finally:
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    return losses


def _step(run: Run, batch: dict[str, Any], autocast) -> tuple[float, dict[str, float]]:
    with autocast:
        loss, terms = run.loss_fn(loss_inputs(run.built, run.model, batch, run.device))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.built.student.parameters(), run.cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    run.step += 1
    return float(loss.detach()), terms


def _log(metrics, tb, run: Run, epoch: int, value: float, terms: dict[str, float], seconds: float) -> None:
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": value,
        **terms,
        "lr": run.sched.get_last_lr()[0],
        "seconds": round(seconds, 3),
    }
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    if tb is not None:
        for k, v in row.items():
            if k not in ("step", "epoch"):
                tb.add_scalar(f"train/{k}", v, run.step)


def _checkpoint(run: Run) -> None:
    rng = _rng_states(run)  # a collective: every rank takes part
    if run.rank == 0:
        save_checkpoint(
            run.cfg.run_dir,
            run.step,
            run.built.student,
            {"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "step": run.step, "rng": rng},
        )


_tb_warned: list[bool] = []


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter into ``run_dir/tb``, or None (once, a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has the numbers
        if not _tb_warned:
            _tb_warned.append(True)
            log.warning(
                "tensorboard is not installed (pip install 'mmkd[tensorboard]'): metrics go to metrics.jsonl only"
            )
        return None
    return SummaryWriter(str(run_dir / "tb"))
