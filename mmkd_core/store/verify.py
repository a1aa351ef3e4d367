"""Checking a whole store, as ``git fsck`` checks a repository: its attributes against their schema, its
arrays against the attributes, every chunk of every array read back (zarr checks each chunk's crc32c), the
shards it records as done present with all their chunks, the stored lengths in range, and its completion
record consistent with them; then each added teacher's group (``teachers``) the same way, and its record against
the store's. The result names each damaged shard, which a repair re-extracts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MmkdError
from ..location import Location, store_location
from .provenance import FORMAT_VERSION
from .schema import SchemaError
from .teachers import TEACHERS_GROUP, check_group_record, teacher_path


@dataclass
class Problem:
    """One thing wrong with a store.

    Attributes:
        what: The array (or ``attributes``) at fault.
        shard: The shard it is in (None: the store as a whole).
        samples: Its sample range [lo, hi).
        reason: What is wrong, in one line.
    """

    what: str
    shard: int | None
    samples: tuple[int, int] | None
    reason: str

    def line(self) -> str:
        where = f"shard {self.shard} (samples {self.samples[0]}-{self.samples[1] - 1})" if self.samples else "store"
        return f"{self.what}: {where}: {self.reason}"


@dataclass
class Report:
    """What :func:`verify` found.

    Attributes:
        path: The store.
        samples: Samples in the store (0 when its attributes are unreadable).
        shards: Its shards.
        done: Shards recorded as done.
        complete: Whether the store records itself complete.
        format_version: The store's format (1: no per-chunk checksums to check).
        arrays: Arrays read back.
        bytes_read: Stored bytes read.
        problems: Everything wrong, in the order found.
        teachers: The reports of the store's added teachers (``teachers``), by name.
    """

    path: Location
    samples: int = 0
    shards: int = 0
    done: int = 0
    complete: bool = False
    format_version: int | None = None
    arrays: list[str] = field(default_factory=list)
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    teachers: dict[str, Report] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No problem in the store or in any of its teachers."""
        return not self.problems and all(t.ok for t in self.teachers.values())

    @property
    def damaged_shards(self) -> list[int]:
        """Shards whose data is damaged or missing: what a repair re-extracts."""
        return sorted({p.shard for p in self.problems if p.shard is not None})

    @property
    def repairable(self) -> bool:
        """Whether re-extracting the damaged shards can mend the store and its teachers (their attributes and
        layout are sound)."""
        return all(p.shard is not None for p in self.problems) and all(t.repairable for t in self.teachers.values())


def verify(path: str | Location) -> Report:
    """Read and check every byte of the store at ``path`` and of its added teachers' groups; never raises for
    damage, which the report holds.

    Raises:
        MmkdError: nothing is at ``path``.
    """
    path = store_location(path)
    if not path.exists():
        raise MmkdError(f"{path}: no such store")
    report, reader = _verify_one(path)
    groups = path / TEACHERS_GROUP
    names = sorted(e.name for e in groups.iterdir() if e.is_dir()) if groups.is_dir() else []
    for name in names:
        report.teachers[name], group = _verify_one(teacher_path(path, name))
        if reader is not None and group is not None:
            try:
                check_group_record(reader.attrs, group.attrs, name, len(group), len(reader), str(path))
            except SchemaError as e:
                report.teachers[name].problems.append(
                    Problem("attributes", None, None, str(e).removeprefix(f"{path}: "))
                )
    return report


def _verify_one(path: Location) -> tuple[Report, Any]:
    """One store's (or teacher group's) report, and its reader (None when its attributes are unreadable)."""
    from .reader import StoreReader

    report = Report(path)
    try:
        reader = StoreReader(path, teachers=False)
    except MmkdError as e:
        report.problems.append(Problem("attributes", None, None, str(e).removeprefix(f"{path}: ")))
        return report, None
    report.samples, report.complete = len(reader), reader.complete
    report.format_version = int(reader.attrs["format_version"])
    done = reader.group["shards_done"][:] if "shards_done" in reader.group else np.zeros(0, np.uint8)
    report.shards, report.done = len(done), int(np.count_nonzero(done))
    if report.complete and report.done < report.shards:
        report.problems.append(
            Problem(
                "shards_done",
                None,
                None,
                f"the store says complete, but {report.shards - report.done} shards are not done",
            )
        )
    for name in reader.array_names():
        if name == "shards_done":
            continue
        report.arrays.append(name)
        _check_array(reader, name, done, report)
    return report, reader


def _check_array(reader: Any, name: str, done: np.ndarray, report: Report) -> None:
    """Read array ``name`` shard by shard: each done shard present, its chunks' checksums (the reader's own
    checks) and, for lengths, their values. Every chunk of a shard is written (``write_empty_chunks``), and the
    shard index has its own checksum, so a chunk missing from a present shard shows as a damaged index."""
    size, n = reader.shard_size, len(reader)
    for k in range(len(done)):
        if not done[k]:
            continue
        lo, hi = k * size, min((k + 1) * size, n)
        try:
            values = reader.raw(name, lo, hi)
        except MmkdError as e:
            report.problems.append(Problem(name, k, (lo, hi), _reason(str(e))))
            continue
        report.bytes_read += int(values.nbytes)
        if name == "lengths":
            try:
                reader.check_lengths(values, lo)
            except MmkdError as e:
                report.problems.append(Problem(name, k, (lo, hi), _reason(str(e))))


def _reason(message: str) -> str:
    """An error line without the store path and the repair hint the report says once."""
    _, _, rest = message.partition(": ")
    rest = rest.split("; mmkd-verify")[0]
    return rest[:200]


def describe(report: Report) -> list[str]:
    """The report as lines for a terminal: one screen, the first problems named, the rest counted; then each
    added teacher's, indented."""
    lines = _describe_one(report, f"store {report.path}")
    for name, sub in report.teachers.items():
        lines += ["  " + line for line in _describe_one(sub, f"teacher {name} ({TEACHERS_GROUP}/{name})")]
    if not report.ok and report.repairable:
        shards = len(report.damaged_shards) + sum(len(t.damaged_shards) for t in report.teachers.values())
        lines.append(f"  {shards} damaged shard(s): mmkd-verify {report.path} --repair re-extracts them")
    elif not report.ok:
        if any(p.shard is None for p in report.problems):
            lines.append("  the store's attributes or layout are damaged: extract it again (--overwrite)")
        for name, sub in report.teachers.items():
            if not sub.repairable:
                lines.append(
                    f"  teacher {name}'s attributes or layout are damaged: add it again "
                    f"(mmkd-extract --add-teacher ... --teacher-name {name} --out {report.path} --overwrite)"
                )
    return lines


def _describe_one(report: Report, title: str) -> list[str]:
    lines = [title]
    if report.format_version is not None:
        lines.append(
            f"  {report.samples:,} samples, {report.shards} shards ({report.done} done), "
            f"{'complete' if report.complete else 'incomplete'}, format {report.format_version}"
            + ("" if report.format_version >= FORMAT_VERSION else " (chunks carry no checksums: damage may go unseen)")
        )
        lines.append(f"  read {len(report.arrays)} arrays, {report.bytes_read / 2**20:,.1f} MiB of values")
    if not report.problems:
        lines.append("  ok: every chunk read back and matched its checksum")
        if not report.complete:
            lines.append(
                f"  {report.shards - report.done} shard(s) not written yet: the extraction's own command continues it"
            )
        return lines
    shown = report.problems[:12]
    lines += [f"  DAMAGED {p.line()}" for p in shown]
    if len(report.problems) > len(shown):
        lines.append(f"  ... and {len(report.problems) - len(shown)} more problems")
    return lines
