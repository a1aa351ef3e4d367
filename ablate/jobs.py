"""The ablation's jobs: every directory it makes (the teacher scored, each init student, each run), checked
and named before anything runs, and the settings each directory is made with."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.app.cli import parse_options
from mmkd.app.options import plain
from mmkd.evaluate import default_run_tasks
from mmkd.train import FREE_FIELDS, TrainConfig, select_teachers, store_record, student_kind
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL
from mmkd_core.store import open_store

from .config import AblateConfig
from .grid import TrainOptions, canonical, run_name
from .scoring import EvalTask, check_fits, parse_eval

EVAL_FILE = "eval.json"
STAMP_FILE = "ablation-run.json"  # what a directory is being made with, written before the work starts

# TrainConfig fields that change training but not the student it starts from: the rest decide the init
TRAINING_ONLY = frozenset(
    {
        "loss",
        "loss_options",
        "bank_size",
        "teacher_weights",
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


# mmkd-train options added after ablation directories were first stamped, and their values that train as
# before: left out of the request there, so a directory stamped by an earlier version is still this ablation's
LATER_OPTIONS = {"teachers": (None,), "teacher_weights": ({},)}


def _request(cfg: TrainConfig, reader, drop: frozenset[str]) -> dict[str, Any]:
    train = {k: v for k, v in cfg.to_json().items() if k not in FREE_FIELDS | drop}
    train = {k: v for k, v in train.items() if v not in LATER_OPTIONS.get(k, ())}
    return plain({"train": train, "store": store_record(reader)})


@dataclass
class Jobs:
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
    def all(self) -> list[Job]:
        return [self.teacher, *self.inits, *self.runs]


def jobs(cfg: AblateConfig) -> Jobs:
    """Check every setting and name every directory before anything runs: a refused value or a name
    clash costs nothing."""
    store, out = cfg.targets.resolve(), cfg.out.resolve()  # absolute: dask workers may start elsewhere
    reader = open_store(store)
    if not reader.complete:
        raise MmkdError(f"{cfg.targets} is incomplete: run the same mmkd-extract command again to finish it")
    attrs = reader.attrs
    options = TrainOptions(store, cfg.train_args)
    entries = [_trains(g) for g in (cfg.grid if isinstance(cfg.grid, list) else [cfg.grid])]
    grids = [(*_grid_values(options, g), trains) for g, trains in entries]
    keys = list(dict.fromkeys(options.option_name(n) for names, _, _ in grids for n in names))
    tasks = _tasks(cfg, options.base, attrs)
    on_dask = bool(cfg.cluster or cfg.scheduler)
    runs: list[Job] = []
    inits: dict[str, Job] = {}
    init_of: dict[str, str] = {}
    combos = [(names, combo, t) for names, columns, t in grids for combo in itertools.product(*columns)]
    seen: set[tuple[str, bool]] = set()
    for names, combo, trains in combos:
        settings = {options.option_name(n): shown for n, (_, shown) in zip(names, combo, strict=True)}
        if (run_name(settings), trains) in seen:  # two grids of a list give this run: it is trained once
            continue
        seen.add((run_name(settings), trains))
        init_keys = {options.option_name(n) for n in names if n not in TRAINING_ONLY}
        init_settings = {k: v for k, v in settings.items() if k in init_keys}
        grid_args = [a for args, _ in combo for a in args]
        for seed in range(cfg.repeat):
            run_cfg = _run_config(cfg, options, grid_args, run_name(settings, seed), seed, out, on_dask)
            _check_run(run_cfg, tasks, reader, on_dask)
            request = _request(run_cfg, reader, frozenset())
            init_name = run_name(init_settings, seed)
            if trains:
                runs.append(
                    Job("run", run_name(settings), settings, seed, run_cfg.run_dir, run_cfg, request, tasks, store)
                )
                init_of[run_cfg.run_dir.name] = init_name
            init_cfg = dataclasses.replace(run_cfg, run_dir=out / "init" / init_name)
            request = _request(init_cfg, reader, TRAINING_ONLY)
            if init_name not in inits:
                row = run_name(init_settings)
                inits[init_name] = Job(
                    "init", row, init_settings, seed, init_cfg.run_dir, init_cfg, request, tasks, store
                )
            elif inits[init_name].request != request:  # the shared options decide the rest: never
                raise MmkdError(
                    f"run {run_cfg.run_dir.name}: its init differs from another run's of the same name ({init_name})"
                )
    teacher_request = plain({"teacher": attrs.get("teacher"), "teacher_build": attrs.get("teacher_build")})
    teacher = Job("teacher", "teacher", {}, None, out / "teacher", None, teacher_request, tasks, store)
    seconds = reader.group.attrs.get("mmkd_extract_seconds")  # recorded by mmkd-extract since mmkd-ablate
    found = Jobs(cfg, attrs, keys, tasks, teacher, list(inits.values()), runs, init_of, seconds)
    for job in found.all:
        job.progress = cfg.progress and not on_dask
        job.check_directory()
    return found


def _trains(grid: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], bool]:
    """A grid entry without its ``train`` key, and whether its runs are trained: ``train: false`` scores the
    students at their initialisation only (the free truncations of a teacher, say)."""
    if "train" not in grid:
        return grid, True
    values = [str(v).lower() for v in grid["train"]]
    if len(values) != 1 or values[0] not in ("true", "false"):
        raise MmkdError(f"--grid train={','.join(values)}: give one value, true or false")
    return {k: v for k, v in grid.items() if k != "train"}, values[0] == "true"


def _run_config(
    cfg: AblateConfig, options: TrainOptions, grid_args: list[str], name: str, seed: int, out: Path, on_dask: bool
) -> TrainConfig:
    """One run's TrainConfig: the shared options, then the grid's, with the run's seed and directory."""
    run_cfg = options.config(grid_args, f"run {name}")
    progress = cfg.progress and run_cfg.progress and not on_dask
    return dataclasses.replace(run_cfg, seed=seed, run_dir=out / name, progress=progress)


def _check_run(run_cfg: TrainConfig, tasks: list[EvalTask], reader: Any, on_dask: bool) -> None:
    """Refuse a run its evaluation cannot score, whose teachers the store does not hold, or that would start
    DataLoader processes in a dask worker."""
    teachers = select_teachers(reader, run_cfg)
    check_fits(tasks, student_kind(run_cfg, teachers.readers[teachers.names[0]].attrs))
    if on_dask and run_cfg.workers:
        raise MmkdError(
            f"--workers {run_cfg.workers}: dask worker processes cannot start DataLoader processes; "
            "leave --workers out with --cluster or --scheduler"
        )


def _grid_values(options: TrainOptions, grid: dict[str, list[Any]]) -> tuple[list[str], list[list[tuple]]]:
    """The grid's keys as TrainConfig fields, and per key its values as (arguments, name in run
    names). Each value is parsed and validated on its own first, so a refusal names the key and value."""
    names = [options.key(k, f"--vary {k}") for k in grid]
    columns = []
    for key, name in zip(grid, names, strict=True):
        if name in options.given and not options.params[name].multiple:
            raise MmkdError(f"--vary {key} and {options.flag(name)} after --: give it in one place")
        column = []
        for value in grid[key]:
            where = f"--vary {key}={value if isinstance(value, str) else canonical(value)}"
            args = options.args_for(name, value, where)
            shown = getattr(options.config(args, where), name)
            if options.params[name].multiple:  # KEY=VALUE options: this value's items, beside the shared ones
                flag, shared = options.flag(name), getattr(options.base, name)
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
