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
    DIR/ablation.{md,csv,json,png} the table (ablate_report)

A directory is finished when its ``eval.json`` holds the ablation's evaluation for the settings it was made
with. Running the same command again skips finished directories, continues a run that stopped mid-training
from its last checkpoint (mmkd-train ``--resume``: the same weights as an uninterrupted run) and does the
rest; a run that stopped before its first checkpoint starts over. The table is computed from the files, so
it is the same however often the ablation was interrupted. A directory made with other settings (other
shared options, another store) is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd.evaluate import default_run_tasks
from mmkd_core.cli_utils import parse_options
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, looks_like_url, store_location
from mmkd_core.progress import console, silence_foreign_bars
from mmkd_core.store import open_store

from .ablate_eval import EvalTask, check_fits, evaluate, parse_eval
from .ablate_grid import FIELD_OF, TrainOptions, canonical, merge_grids, parse_vary, read_grid, run_name
from .build import build, student_kind, teacher_source
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .resume import FREE_FIELDS, store_record

__all__ = ["AblateConfig", "ablate", "merge_grids", "parse_vary", "read_grid", "plan", "execute", "run_job"]

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
STAMP_FILE = "ablation-run.json"  # what a directory is being made with, written before the work starts

# --------------------------------------------------------------------------------------------------- jobs

# TrainConfig fields that change training but not the student it starts from: the rest decide the init
TRAINING_ONLY = frozenset(
    {
        "loss",
        "loss_options",
        "bank_size",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup",
        "epochs",
        "steps",
        "grad_clip",
        "autocast",
        "workers",
        "ckpt_every",
        "log_every",
        "device",
        "eval",
        "progress",
        "verify_views",
        "resume",
        "run_dir",
    }
)


@dataclass
class Job:
    """One directory of the ablation: the teacher scored, an init student built and scored, or a run.

    Attributes:
        kind: ``teacher``, ``init`` or ``run``.
        row: The table row it belongs to (its settings without the seed).
        settings: Grid key -> canonical value (those that apply: an init row has no loss).
        seed: The seed (None for the teacher).
        directory: Where it writes.
        cfg: The run's (or the init student's) configuration; None for the teacher.
        request: What the directory is made with; a finished one that recorded another is refused.
        tasks: The evaluation.
        store: The store.
        progress: Progress bars.
    """

    kind: str
    row: str
    settings: dict[str, str]
    seed: int | None
    directory: Path
    cfg: TrainConfig | None
    request: dict[str, Any]
    tasks: list[EvalTask]
    store: Path | StoreURL
    progress: bool = False

    @property
    def label(self) -> str:
        if self.kind == "teacher":
            return "teacher"
        return f"{'init student' if self.kind == 'init' else 'run'} {self.row} (seed {self.seed})"

    def recorded(self) -> dict[str, Any] | None:
        """The directory's eval.json when it finished this job (same request and evaluation), else None."""
        path = self.directory / EVAL_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("request") == self.request and record.get("tasks") == [t.spec for t in self.tasks]:
            return record
        return None

    def check_directory(self) -> None:
        """Refuse a directory made with other settings (or not by an ablation)."""
        stamp = self.directory / STAMP_FILE
        if stamp.is_file():
            theirs = json.loads(stamp.read_text()).get("request")
            if theirs != self.request:
                raise MmkdError(
                    f"{self.directory} was made with other settings ({_first_diff(theirs, self.request)}); "
                    "use another --out or delete that directory"
                )
        elif self.directory.exists() and any(self.directory.iterdir()):
            raise MmkdError(f"{self.directory} exists and was not made by mmkd-ablate; use another --out")


def _first_diff(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {json.dumps(a, default=str)} there, {json.dumps(b, default=str)} now"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _request(cfg: TrainConfig, reader, drop: frozenset[str]) -> dict[str, Any]:
    train = {k: v for k, v in cfg.to_json().items() if k not in FREE_FIELDS | drop}
    return _plain({"train": train, "store": store_record(reader)})


@dataclass
class AblateConfig:
    """Everything ``mmkd-ablate`` needs; the CLI only fills this in.

    Attributes:
        targets: The store (mmkd-extract's output) every run trains from: a directory or a URL.
        out: The ablation's directory.
        grid: mmkd-train option name -> values; every combination is trained (an empty grid: one run). Or a
            list of such grids: the union of their combinations (one-factor-at-a-time ablations: a base run
            and one grid per varied factor; a run two grids both give is trained once).
        train_args: mmkd-train options shared by every run, as on its command line (``--steps 1500``).
        eval: Evaluations (``mrpc:PATH``, ``retrieval``, ``zero-shot:DATASET[:ROOT]``, ...); the first one's
            headline is the table's. Empty: mmkd-train's default for the store (retrieval for shapes).
        repeat: Seeds 0..repeat-1 per combination.
        cluster: ``local:N``: N dask.distributed worker processes on this machine, one thread each.
        scheduler: Address of a running dask.distributed scheduler (its workers share this file system).
        progress: Progress bars (runs in dask workers show none).
    """

    targets: Path | StoreURL
    out: Path
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = field(default_factory=dict)
    train_args: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    repeat: int = 1
    cluster: str | None = None
    scheduler: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.targets, self.out = store_location(self.targets, "--targets"), Path(self.out)
        if looks_like_url(self.out):
            raise MmkdError(f"--out {self.out}: the ablation's directory is local; the store may be a URL")
        if self.repeat < 1:
            raise MmkdError(f"--repeat {self.repeat}: must be at least 1")
        if self.cluster and self.scheduler:
            raise MmkdError("--cluster and --scheduler: give one (local:N starts workers, an address uses them)")
        if self.cluster is not None:
            n = self.cluster.removeprefix("local:")
            if not self.cluster.startswith("local:") or not n.isdigit() or int(n) < 1:
                raise MmkdError(f"--cluster {self.cluster!r}: give local:N (N worker processes on this machine)")

    @property
    def workers(self) -> int:
        return int(self.cluster.removeprefix("local:")) if self.cluster else 0


@dataclass
class Plan:
    """The ablation's jobs, in table order (teacher, inits, runs)."""

    cfg: AblateConfig
    attrs: dict[str, Any]
    keys: list[str]  # grid keys as option names, in the order given
    tasks: list[EvalTask]
    teacher: Job
    inits: list[Job]
    runs: list[Job]
    init_of: dict[str, str]  # run directory name -> its init directory name
    extract_seconds: float | None = None  # the store's extraction time (None: not recorded, older stores)

    @property
    def jobs(self) -> list[Job]:
        return [self.teacher, *self.inits, *self.runs]


def plan(cfg: AblateConfig) -> Plan:
    """Check every setting and name every directory before anything runs: a refused value or a name
    clash costs nothing."""
    store, out = cfg.targets.resolve(), cfg.out.resolve()  # absolute: dask workers may start elsewhere
    reader = open_store(store)
    if not reader.complete:
        raise MmkdError(f"{cfg.targets} is incomplete: run the same mmkd-extract command again to finish it")
    attrs = reader.attrs
    options = TrainOptions(store, cfg.train_args)
    grids = [_grid_values(options, g) for g in (cfg.grid if isinstance(cfg.grid, list) else [cfg.grid])]
    keys = list(dict.fromkeys(n.replace("_", "-") for names, _ in grids for n in names))
    tasks = _tasks(cfg, options.base, attrs)
    on_dask = bool(cfg.cluster or cfg.scheduler)
    runs: list[Job] = []
    inits: dict[str, Job] = {}
    init_of: dict[str, str] = {}
    combos = [(names, combo) for names, columns in grids for combo in itertools.product(*columns)]
    seen: set[str] = set()
    for names, combo in combos:
        grid_keys = [n.replace("_", "-") for n in names]
        settings = {k: shown for k, (_, shown) in zip(grid_keys, combo, strict=True)}
        if run_name(settings) in seen:  # two grids of a list give this run: it is trained once
            continue
        seen.add(run_name(settings))
        init_settings = {
            k: settings[k] for k, n in zip(grid_keys, names, strict=True) if FIELD_OF.get(n, n) not in TRAINING_ONLY
        }
        grid_args = [a for args, _ in combo for a in args]
        for seed in range(cfg.repeat):
            name = run_name(settings, seed)
            run_cfg = options.config(grid_args, f"run {name}")
            progress = cfg.progress and run_cfg.progress and not on_dask
            run_cfg = dataclasses.replace(run_cfg, seed=seed, run_dir=out / name, progress=progress)
            check_fits(tasks, student_kind(run_cfg, attrs))
            if on_dask and run_cfg.workers:
                raise MmkdError(
                    f"--workers {run_cfg.workers}: dask worker processes cannot start DataLoader processes; "
                    "leave --workers out with --cluster or --scheduler"
                )
            request = _request(run_cfg, reader, frozenset())
            runs.append(Job("run", run_name(settings), settings, seed, out / name, run_cfg, request, tasks, store))
            init_name = init_of[name] = run_name(init_settings, seed)
            init_cfg = dataclasses.replace(run_cfg, run_dir=out / "init" / init_name)
            request = _request(init_cfg, reader, TRAINING_ONLY)
            if init_name not in inits:
                row = run_name(init_settings)
                inits[init_name] = Job(
                    "init", row, init_settings, seed, init_cfg.run_dir, init_cfg, request, tasks, store
                )
            elif inits[init_name].request != request:  # the shared options decide the rest: never
                raise MmkdError(f"run {name}: its init differs from another run's of the same name ({init_name})")
    teacher_request = _plain({"teacher": attrs.get("teacher"), "teacher_build": attrs.get("teacher_build")})
    teacher = Job("teacher", "teacher", {}, None, out / "teacher", None, teacher_request, tasks, store)
    seconds = reader.group.attrs.get("mmkd_extract_seconds")  # recorded by mmkd-extract since mmkd-ablate
    p = Plan(cfg, attrs, keys, tasks, teacher, list(inits.values()), runs, init_of, seconds)
    for job in p.jobs:
        job.progress = cfg.progress and not on_dask
        job.check_directory()
    return p


def _grid_values(options: TrainOptions, grid: dict[str, list[Any]]) -> tuple[list[str], list[list[tuple]]]:
    """The grid's keys as mmkd-train parameter names, and per key its values as (arguments, name in run
    names). Each value is parsed and validated on its own first, so a refusal names the key and value."""
    names = [options.key(k, f"--vary {k}") for k in grid]
    columns = []
    for key, name in zip(grid, names, strict=True):
        if name in options.given and not options.params[name].multiple:
            raise MmkdError(f"--vary {key} and {options.flag(name)} after --: give it in one place")
        field_name = FIELD_OF.get(name, name)
        column = []
        for value in grid[key]:
            where = f"--vary {key}={value if isinstance(value, str) else canonical(value)}"
            args = options.args_for(name, value, where)
            shown = getattr(options.config(args, where), field_name)
            if options.params[name].multiple:  # KEY=VALUE options: this value's items, beside the shared ones
                flag, shared = options.flag(name), getattr(options.base, field_name)
                shown = parse_options(args[1::2], flag)
                clash = set(shown) & set(shared)
                if clash:
                    raise MmkdError(f"{where}: {sorted(clash)[0]} is also set after --; give it in one place")
                # on the command line the grid's items would replace those of a --config file: keep both
                args = [a for k, v in shared.items() for a in (flag, f"{k}={json.dumps(v)}")] + args
            column.append((args, canonical(shown)))
        shown_names = [c[1] for c in column]
        dup = next((v for v in shown_names if shown_names.count(v) > 1), None)
        if dup is not None:
            raise MmkdError(f"--vary {key}: two values mean {dup}; list each once")
        columns.append(column)
    return names, columns


def _tasks(cfg: AblateConfig, base: TrainConfig, attrs: dict[str, Any]) -> list[EvalTask]:
    specs = list(cfg.eval) or default_run_tasks(student_kind(base, attrs), attrs)
    if not specs:
        raise MmkdError("--eval: name what the runs are scored on (mrpc:PATH, qqp:PATH, retrieval, zero-shot:DATASET)")
    tasks = [parse_eval(s) for s in specs]
    labels = [t.label for t in tasks]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise MmkdError(f"--eval: {dup} is given twice")
    return tasks


# ------------------------------------------------------------------------------------------------ running


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
    job.check_directory()
    job.directory.mkdir(parents=True, exist_ok=True)
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
    import torch

    from mmkd_core.students import save_student

    reader = open_store(job.store)
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
    from .loop import train
    from .report import plot_curves

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


def execute(p: Plan, on_done: Callable[[Job, dict[str, Any], bool], None] | None = None) -> dict[str, dict[str, Any]]:
    """Do the plan's unfinished jobs (in order in this process, or as dask.distributed tasks) and return every
    job's eval.json by directory. ``on_done(job, record, skipped)`` is called as each finishes."""
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for job in p.jobs:
        record = job.recorded()
        if record is None:
            todo.append(job)
            continue
        records[str(job.directory)] = record
        if on_done:
            on_done(job, record, True)
    if not todo:
        return records
    if not (p.cfg.cluster or p.cfg.scheduler):
        for job in todo:
            records[str(job.directory)] = run_job(job)
            if on_done:
                on_done(job, records[str(job.directory)], False)
        return records
    for job, record in _on_dask(p.cfg, todo):
        records[str(job.directory)] = record
        if on_done:
            on_done(job, record, False)
    return records


def _on_dask(cfg: AblateConfig, jobs: list[Job]):
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
            for job in jobs
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
    """Plan, run what is not finished, and write the table (``DIR/ablation.{md,csv,json,png}``).

    Returns:
        The :class:`~mmkd.train.ablate_report.Table`.
    """
    from .ablate_report import write_table

    p = plan(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    records = execute(p, on_done)
    return write_table(p, records)


def log_done(job: Job, record: dict[str, Any], skipped: bool) -> None:
    """``on_done`` of the CLI: one line per job."""
    first = next(iter(record["results"].values()))
    score = f"{first['headline']:.4f}" if "headline" in first else "n/a"
    if skipped:
        console.print(f"[dim]finished before: {job.label} ({score})[/]", highlight=False)
        return
    secs = sum(record.get("seconds", {}).values())
    console.print(f"[green]done[/] {job.label}: {job.tasks[0].label} {score} ({secs:.1f} s)", highlight=False)
