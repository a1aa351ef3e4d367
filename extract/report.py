"""What ``mmkd-extract`` prints: the run's summary table, sizes in binary units."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:  # the summary's module loads zarr and the teachers; --help needs neither
    from .run import ExtractSummary


def human_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(s: ExtractSummary) -> Table:
    """The table ``mmkd-extract`` prints after a run."""
    table = Table(title=f"store {s.path}" + ("" if s.complete else " (incomplete)"), show_header=False)
    table.add_row("samples", f"{s.samples:,}")
    if s.distinct_inputs is not None:
        table.add_row("distinct teacher inputs", f"{s.distinct_inputs:,} (identical inputs computed once)")
    table.add_row("views", str(s.views))
    if s.autocast is not None:
        table.add_row("autocast", str(s.autocast))
    if s.codec is not None:
        table.add_row("codec", s.codec)
    table.add_row("shards written now / total", f"{s.shards_written} / {s.shards_total}")
    table.add_row("bytes on disk", human_bytes(s.bytes_on_disk))
    table.add_row("bytes per sample", human_bytes(s.bytes_per_sample))
    table.add_row("throughput", f"{s.samples_per_second:,.1f} samples/s over {s.seconds:.1f} s")
    return table
