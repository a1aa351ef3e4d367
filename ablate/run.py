"""Doing the ablation's jobs: in this process or as dask.distributed tasks, each writing its directory's
eval.json last, so that an interrupted ablation continues where it stopped."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmkd.app.progress import console, silence_foreign_bars
from mmkd.train import build, latest_checkpoint, mark_run, plot_curves, student_kind, teacher_source, train
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store
from mmkd_core.students import save_student

from .config import AblateConfig
from .jobs import EVAL_FILE, STAMP_FILE, Job, Jobs, jobs
from .report import write_table
from .scoring import evaluate

log = logging.getLogger(__name__)


def run_job(job: Job) -> dict[str, Any]:
    """Do one job (in this process or a dask worker) and write its eval.json; returns what it wrote.

    Raises:
        MmkdError: Naming the job. KeyboardInterrupt: interrupted (a run resumes when the ablation runs again).
    """
    try:
        return _run_job(job)
    except MmkdError as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # mmkd-train's interrupt message names --resume
            raise KeyboardInterrupt from None
        raise MmkdError(f"{job.label}: {e}") from None


def _run_job(job: Job) -> dict[str, Any]:
    import transformers  # noqa: F401  (loaded now, so that its bars can be switched off before any export)

    silence_foreign_bars()  # transformers' "Writing model shards" bars at every export
    job.check_directory()  # the ablation's own check that the directory is this job's
    job.directory.mkdir(parents=True, exist_ok=True)
    mark_run(job.directory)  # a run directory of ours before the ablation writes into it
    _write_json(job.directory / STAMP_FILE, {"request": job.request})
    attrs = open_store(job.store).attrs
    done: dict[str, Any] = {}
    if job.directory.joinpath(EVAL_FILE).is_file():  # trained before; only the evaluation differs
        old = json.loads(job.directory.joinpath(EVAL_FILE).read_text())
        if old.get("request") == job.request:
            done = {k: old[k] for k in ("seconds", "resumed_from_step") if k in old}
    record: dict[str, Any] = {"request": job.request, "tasks": [t.spec for t in job.tasks]}
    start = time.perf_counter()
    if job.kind == "teacher":
        record["results"] = _score_teacher(job, attrs)
        record["seconds"] = {"eval": time.perf_counter() - start}
    else:
        if not done:
            done = _build_init(job) if job.kind == "init" else _train(job)
        start = time.perf_counter()
        record["results"] = evaluate(
            str(job.directory / "student"), job.tasks, attrs, device=job.cfg.device, progress=job.progress
        )
        record.update(done)
        record["seconds"] = {**done.get("seconds", {}), "eval": time.perf_counter() - start}
    _write_json(job.directory / EVAL_FILE, record)  # last: the directory is finished once this file is whole
    return record


def _score_teacher(job: Job, attrs: dict[str, Any]) -> dict[str, Any]:
    """The store's teacher scored, loaded as an encoder by the evaluation stage (never for training)."""
    try:
        name, weights = teacher_source(attrs)
    except MmkdError:
        reason = "the store's teacher had random weights: it cannot be loaded again to be scored"
        return {t.label: {"error": reason} for t in job.tasks}
    built = attrs.get("teacher_build") or {"name": name, "options": {}}
    # a two-tower teacher is scored with both towers (the store may hold one tower's targets)
    options = {k: v for k, v in (built.get("options") or {}).items() if k != "tower"}
    results = evaluate(
        built["name"],
        job.tasks,
        attrs,
        weights=weights,
        teacher_options=options,
        progress=job.progress,
        errors_as_results=True,
    )
    sha = attrs["teacher"].get("weights_sha256")
    for r in results.values():
        towers = (r.get("model") or {}).get("towers") or {}
        if towers and sha not in {t.get("weights_sha256") for t in towers.values()}:
            raise MmkdError(f"{weights or name} is not the checkpoint the store was extracted with (weights_sha256)")
    return results


def _build_init(job: Job) -> dict[str, Any]:
    """The student at its initialisation: what a run of these settings starts from (same builder, same seed),
    exported without a step of training (TrainConfig refuses --steps 0)."""
    # the run's first teacher builds its student (the further teachers' heads come after, from the same seed)
    reader = open_store(job.store).teacher((job.cfg.teacher_names or [None])[0])
    cfg = job.cfg.resolved(student_kind(job.cfg, reader.attrs))
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # as train() seeds before it builds
    built = build(cfg, reader)
    built.student.eval()
    save_student(
        built.student,
        job.directory / "student",
        tokenizer=built.tokenizer,
        preprocess=built.preprocess,
        max_seq_length=(reader.attrs.get("preprocess") or {}).get("max_length"),
    )
    return {"seconds": {"build": time.perf_counter() - start}}


def _train(job: Job) -> dict[str, Any]:
    """Train the run; continue it from its last checkpoint when an earlier attempt stopped mid-training."""
    ckpt = latest_checkpoint(job.directory)
    cfg = dataclasses.replace(job.cfg, resume=ckpt is not None)
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    plot_curves(job.directory)
    resumed = int(ckpt.name.removeprefix("step_")) if ckpt is not None else None
    return {"seconds": {"train": seconds}, "resumed_from_step": resumed, "steps": result.steps}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def execute(
    found: Jobs, on_done: Callable[[Job, dict[str, Any], bool], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Do the unfinished jobs (in order in this process, or as dask.distributed tasks) and return every
    job's eval.json by directory. ``on_done(job, record, skipped)`` is called as each finishes."""
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for job in found.all:
        record = job.recorded()
        if record is None:
            todo.append(job)
            continue
        records[str(job.directory)] = record
        if on_done:
            on_done(job, record, True)
    if not todo:
        return records
    if not (found.cfg.cluster or found.cfg.scheduler):
        for job in todo:
            records[str(job.directory)] = run_job(job)
            if on_done:
                on_done(job, records[str(job.directory)], False)
        return records
    for job, record in _on_dask(found.cfg, todo):
        records[str(job.directory)] = record
        if on_done:
            on_done(job, record, False)
    return records


def _on_dask(cfg: AblateConfig, todo: list[Job]):
    """One dask task per job; each worker runs one at a time (one thread)."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if not log.isEnabledFor(logging.INFO):  # the scheduler's and nannies' INFO lines, unless --verbose
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if cfg.cluster:
        # processes, not threads: each run has its own torch (and interpreter lock); the nanny starts each
        # worker with one OpenMP/MKL thread, so N workers share the machine's cores evenly
        cluster = LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: another cluster on this machine may hold the default
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    else:
        try:
            client = Client(cfg.scheduler, timeout="30s")
        except OSError as e:
            raise MmkdError(f"--scheduler {cfg.scheduler}: cannot connect ({e})") from None
    try:
        futures = {
            client.submit(
                run_job,
                job,
                key=f"mmkd-ablate-{job.directory.name}-{hashlib.sha1(str(job.directory).encode()).hexdigest()[:8]}",
                pure=False,
            ): job
            for job in todo
        }
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    record = fut.result()
                except MmkdError:
                    raise
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # a worker that died (KilledWorker) or a bug in the task
                    raise MmkdError(f"{job.label}: failed on a dask worker ({type(e).__name__}: {e})") from None
                yield job, record
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def ablate(cfg: AblateConfig, on_done: Callable[[Job, dict[str, Any], bool], None] | None = None):
    """List the jobs, do what is not finished, and write the table (``DIR/ablation.{md,csv,json,png}``).

    Returns:
        The :class:`~mmkd.ablate.report.Table`.
    """
    found = jobs(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    records = execute(found, on_done)
    return write_table(found, records)


def log_done(job: Job, record: dict[str, Any], skipped: bool) -> None:
    """``on_done`` of the CLI: one line per job."""
    first = next(iter(record["results"].values()))
    score = f"{first['headline']:.4f}" if "headline" in first else "n/a"
    if skipped:
        console.print(f"[dim]finished before: {job.label} ({score})[/]", highlight=False)
        return
    secs = sum(record.get("seconds", {}).values())
    console.print(f"[green]done[/] {job.label}: {job.tasks[0].label} {score} ({secs:.1f} s)", highlight=False)
