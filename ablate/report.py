"""The ablation's table: every metric of every row (teacher, init students, runs), each row's share of the
teacher's headline ("of teacher") and of the init→teacher gap it closed, wall times, a plot of the headline,
and what the cache saved in teacher passes. Computed from the directories' eval.json files alone, so an
ablation interrupted and continued gives the table an uninterrupted one gives."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .jobs import Job, Jobs

SPREAD = "sample standard deviation over seeds"


def of_teacher(student: float, teacher: float | None) -> float:
    """The student's headline as a share of the teacher's."""
    if teacher is None or teacher == 0:
        return math.nan
    return student / teacher


def gap_closed(student: float, init: float, teacher: float | None) -> float:
    """The share of the init→teacher gap the student closed: (student − init) / (teacher − init).

    The same in either direction: from an init that scores above the teacher, a student back at the
    teacher's score has closed 100 % and one further above a negative share. NaN without a gap."""
    if teacher is None or teacher == init:
        return math.nan
    return (student - init) / (teacher - init)


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value); NaN values make both NaN."""
    values = list(values)
    if not values:
        return math.nan, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Row:
    """One table row: the teacher, an init student or a grid combination, over its seeds.

    Attributes:
        kind: ``teacher``, ``init`` or ``run``.
        name: The row's settings as a name (``depth=2,init=teacher``).
        settings: Grid key -> value (the init rows have only the keys that decide the init).
        seeds: The seeds it holds.
        metrics: Every metric, one value per seed.
        headlines: Per task label, one value per seed.
        of_teacher: The first task's headline over the teacher's, per seed.
        gap_closed: Share of the init→teacher gap closed on the first task's headline, per seed (each seed
            against the init student of the same seed).
        seconds: Training wall time per seed (runs only; an init student's build time is in its eval.json).
        resumed: Seeds whose run continued from a checkpoint.
        errors: Per task label, why the row has no number (a text teacher cannot do image-text retrieval).
    """

    kind: str
    name: str
    settings: dict[str, str]
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    headlines: dict[str, list[float]] = field(default_factory=dict)
    of_teacher: list[float] = field(default_factory=list)
    gap_closed: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The settings as a reader writes them (``init=teacher; loss=token_mse=1,pooled_mse=1``)."""
        settings = "; ".join(f"{k}={v}" for k, v in self.settings.items())
        if self.kind == "run":
            return settings or "base"
        return self.kind if not settings or self.kind == "teacher" else f"{self.kind}: {settings}"


@dataclass
class Table:
    """What ``write_table`` wrote, for printing and for callers."""

    rows: list[Row]
    keys: list[str]
    tasks: list[str]
    headline_names: dict[str, str]
    metrics: list[str]
    passes: dict[str, Any]
    files: dict[str, Path]
    repeat: int

    @property
    def headline(self) -> str:
        return self.tasks[0]

    def header(self) -> list[str]:
        short = _short_names(self.metrics, len(self.tasks))
        return [
            "model",
            *self.keys,
            *[short[m] for m in self.metrics],
            *[f"{t} {self.headline_names[t]}" for t in self.tasks],
            "of teacher",
            "gap closed",
            "train s",
        ]

    def cells(self, row: Row) -> list[str]:
        first = self.tasks[0]
        return [
            {"teacher": "teacher", "init": "init"}.get(row.kind, "trained"),
            *[row.settings.get(k, "") for k in self.keys],
            *[_fmt(row.metrics.get(m), "{:.3f}") for m in self.metrics],
            *[_fmt(row.headlines.get(t), "{:.4f}") if t in row.headlines else "n/a" for t in self.tasks],
            _fmt(row.of_teacher, "{:.2%}") if first in row.headlines else "n/a",
            _fmt(row.gap_closed, "{:.0%}") if first in row.headlines else "n/a",
            _fmt(row.seconds, "{:.1f}") + ("*" if row.resumed else "") if row.seconds else "",
        ]

    def _inits_above_teacher(self) -> list[str]:
        """A note per init that scores at or above the teacher: its runs' gap is then one downwards."""
        t = self.tasks[0]
        scores = [mean_spread(r.headlines[t])[0] for r in self.rows if r.kind == "teacher" and t in r.headlines]
        if not scores:
            return []
        teacher = scores[0]
        out = []
        for r in self.rows:
            score = mean_spread(r.headlines.get(t, []))[0]
            if r.kind == "init" and score >= teacher:
                out.append(
                    f"init {r.name} scores {score:.4f}, at or above the teacher's {teacher:.4f}: for its runs the "
                    f"gap (of {score - teacher:.4f}) is the way back to the teacher's score."
                )
        return out

    def notes(self) -> list[str]:
        t = self.tasks[0]
        lines = [
            f"Headline: {t} {self.headline_names[t]}. of teacher = row / teacher; gap closed = (row − init) / "
            "(teacher − init), each seed against the init student of the same seed."
        ]
        lines += self._inits_above_teacher()
        if self.repeat > 1:
            lines.append(f"{self.repeat} seeds per row: mean ± {SPREAD}.")
        for r in self.rows:
            who = "the teacher" if r.kind == "teacher" else f"{r.kind} {r.name}"
            lines += [f"n/a: {task} for {who}: {why}" for task, why in r.errors.items()]
        if any(r.resumed for r in self.rows):
            lines.append("* a run continued from its checkpoint: the time is that of the part after it.")
        lines.append(passes_sentence(self.passes))
        return lines

    def markdown(self) -> str:
        header = self.header()
        out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in self.cells(r)) + " |" for r in self.rows]
        return "\n".join(out) + "\n\n" + "\n\n".join(self.notes()) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        numbers = [*self.metrics, *[f"{t} {self.headline_names[t]}" for t in self.tasks], "of_teacher", "gap_closed"]
        head = ["model", *self.keys, "seeds"]
        for n in numbers:
            head += [n, f"{n} spread"]
        w.writerow([*head, "train_seconds"])
        for r in self.rows:
            values = [*(r.metrics.get(m) for m in self.metrics), *(r.headlines.get(t) for t in self.tasks)]
            values += [r.of_teacher, r.gap_closed]
            line = [r.kind, *[r.settings.get(k, "") for k in self.keys], len(r.seeds) or ""]
            for v in values:
                mean, spread = mean_spread(v) if v else (None, None)
                line += [_num(mean), _num(spread)]
            w.writerow([*line, _num(mean_spread(r.seconds)[0]) if r.seconds else ""])
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "tasks": self.tasks,
            "keys": self.keys,
            "repeat": self.repeat,
            "spread": SPREAD,
            "rows": [{"label": r.label, **_finite(asdict(r))} for r in self.rows],
            "teacher_passes": self.passes,
        }


def _short_names(metrics: list[str], n_tasks: int) -> dict[str, str]:
    """Metric keys without their dataset when one task gives them all (``train/s1_to_s2_r1``)."""
    if n_tasks != 1:
        return {m: m for m in metrics}
    return {m: m.split("/", 1)[1] if "/" in m else m for m in metrics}


def _fmt(values: Sequence[float] | None, spec: str) -> str:
    if not values:
        return ""
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "n/a"
    if spread is None:
        return spec.format(mean)
    return f"{spec.format(mean)} ± {spec.format(spread)}"


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- the rows


def _add_seed(row: Row, job: Job, record: dict[str, Any]) -> None:
    row.seeds.append(job.seed if job.seed is not None else 0)
    for label, result in record["results"].items():
        if "error" in result:
            row.errors[label] = result["error"]
            continue
        row.headlines.setdefault(label, []).append(result["headline"])
        for k, v in result["metrics"].items():
            row.metrics.setdefault(k, []).append(v)
    seconds = record.get("seconds") or {}
    if job.kind == "run":
        row.seconds.append(seconds.get("train", math.nan))
        if record.get("resumed_from_step") is not None:
            row.resumed.append(row.seeds[-1])


def build_rows(found: Jobs, records: dict[str, dict[str, Any]]) -> list[Row]:
    first = found.tasks[0].label
    teacher = Row("teacher", "teacher", {})
    _add_seed(teacher, found.teacher, records[str(found.teacher.directory)])
    t = teacher.headlines.get(first, [None])[0]
    if t is not None:
        teacher.of_teacher, teacher.gap_closed = [1.0], [1.0]
    rows: dict[tuple[str, str], Row] = {}
    init_headline: dict[str, float] = {}
    for job in [*found.inits, *found.runs]:
        row = rows.setdefault((job.kind, job.row), Row(job.kind, job.row, dict(job.settings)))
        record = records[str(job.directory)]
        _add_seed(row, job, record)
        s = record["results"][first]["headline"]
        if job.kind == "init":
            init_headline[job.directory.name] = s
            i = s
        else:
            i = init_headline[found.init_of[job.directory.name]]
        row.of_teacher.append(of_teacher(s, t))
        row.gap_closed.append(gap_closed(s, i, t))
    return [teacher, *rows.values()]


# --------------------------------------------------------------------------------------- teacher passes


def samples_seen(run_dir: Path, num_samples: int) -> int:
    """Samples a run drew from the store (steps × batch × ranks; a whole epoch draws each sample once):
    what an online teacher would have had to run on."""
    record = json.loads((run_dir / "config.json").read_text())
    steps, per_epoch = int(record["steps"]), int(record["steps_per_epoch"])
    batch = int(record["train"]["batch_size"]) * int(record.get("world_size", 1))
    epochs, rest = divmod(steps, per_epoch)
    return epochs * min(num_samples, per_epoch * batch) + rest * batch


def teacher_passes(found: Jobs) -> dict[str, Any]:
    """The teacher passes the cache made (samples × views, once, at extraction) against those an online
    ablation would have made (every sample every run drew), with their times: the extraction's as recorded
    in the store (``mmkd_extract_seconds``), the online one estimated at the extraction's time per pass."""
    n = int(found.attrs["dataset"]["num_samples"])
    views = int(found.attrs["views"]["count"])
    made = n * views
    seconds = found.extract_seconds
    online = sum(samples_seen(job.directory, n) for job in found.runs)
    per_pass = seconds / made if seconds is not None and made else None
    return {
        "samples": n,
        "views": views,
        "made": made,
        "extract_seconds": seconds,
        "runs": len(found.runs),
        "online": online,
        "online_seconds_estimated": online * per_pass if per_pass is not None else None,
        "seconds_per_pass": per_pass,
    }


def passes_sentence(d: dict[str, Any]) -> str:
    views = f"{d['views']} view{'s' if d['views'] > 1 else ''}"
    made = f"{d['made']:,} ({d['samples']:,} samples × {views}, once, at extraction"
    if d["extract_seconds"] is None:
        made += "; its time is not recorded in this store)"
        online = f"{d['online']:,}"
    else:
        made += f": {d['extract_seconds']:.1f} s)"
        online = (
            f"{d['online']:,} (≈ {d['online_seconds_estimated']:.1f} s at {d['seconds_per_pass'] * 1000:.2f} ms "
            "per pass, the extraction's)"
        )
    saved = d["online"] - d["made"]
    per_run = d["online"] / max(d["runs"], 1)
    if saved >= 0:
        verdict = f"the cache saved {saved:,} passes"
    else:  # short runs draw fewer samples than the store holds
        runs = math.ceil(d["made"] / per_run) if per_run else "no number of"
        verdict = f"the cache made {-saved:,} more; it pays off from {runs} such runs on"
    return f"Teacher passes: {made}; an online ablation would have made {online} over its {d['runs']} runs: {verdict}."


# ------------------------------------------------------------------------------------------------ output


def plot(table: Table, path: Path) -> Path:
    """The first task's headline per row, with the spread over seeds; the teacher as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = table.tasks[0]
    rows = [r for r in table.rows if first in r.headlines]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    stats = [mean_spread(r.headlines[first]) for r in rows]
    colours = {"teacher": "tab:green", "init": "tab:grey", "run": "tab:blue"}
    labels = [r.label for r in rows]
    y = list(range(len(rows)))[::-1]
    spread = [s or 0.0 for _, s in stats] if any(s for _, s in stats) else None
    bars = ax.barh(y, [m for m, _ in stats], xerr=spread, color=[colours[r.kind] for r in rows], capsize=3)
    ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
    ax.set_yticks(y, labels, fontsize=8)
    teacher = next((m for r, (m, _) in zip(rows, stats, strict=True) if r.kind == "teacher"), None)
    if teacher is not None:
        ax.axvline(teacher, color="tab:green", linestyle="--", linewidth=1)
    lo = min(m for m, _ in stats)
    ax.set_xlim(max(0.0, lo - 0.1 * (1 - lo) - 0.02), min(1.0, max(m for m, _ in stats) + 0.05) + 0.01)
    ax.set_xlabel(f"{first} {table.headline_names[first]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_table(found: Jobs, records: dict[str, dict[str, Any]]) -> Table:
    """Build the table from the records and write ablation.md, .csv, .json and .png into the ablation's directory."""
    rows = build_rows(found, records)
    metrics: list[str] = []
    for r in rows:
        metrics += [m for m in r.metrics if m not in metrics]
    out = found.cfg.out
    files = {ext: out / f"ablation.{ext}" for ext in ("md", "csv", "json", "png")}
    table = Table(
        rows=rows,
        keys=found.keys,
        tasks=[t.label for t in found.tasks],
        headline_names={t.label: t.headline_name for t in found.tasks},
        metrics=metrics,
        passes=teacher_passes(found),
        files=files,
        repeat=found.cfg.repeat,
    )
    files["md"].write_text(table.markdown())
    files["csv"].write_text(table.csv())
    record = {
        **table.to_json(),
        "targets": str(found.cfg.targets.resolve()),
        "grid": _grid_record(found.cfg.grid),
        "train_args": found.cfg.train_args,
        "eval": [t.spec for t in found.tasks],
        "directories": {"teacher": str(found.teacher.directory), **{j.label: str(j.directory) for j in found.runs}},
    }
    files["json"].write_text(json.dumps(record, indent=2) + "\n")
    plot(table, files["png"])
    return table


def _grid_record(grid: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> Any:
    """The grid as ablation.json records it: a mapping of values as text, or a list of such mappings."""
    if isinstance(grid, list):
        return [_grid_record(g) for g in grid]
    return {k: [str(v) for v in vs] for k, vs in grid.items()}
