"""`mmkd-extract`: parse options, build an ExtractConfig, call `extract`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mmkd_core.cli_utils import guarded, parse_options, setup_logging
from mmkd_core.progress import console

from .config import ExtractConfig

app = typer.Typer(add_completion=False, help="Run a frozen teacher once over a dataset and store its targets.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
@guarded
def main_command(
    teacher: str = typer.Option(
        "minilm-l6", help="Teacher: beitv2, data2vec-vision, data2vec-text, bert, minilm-l6, clip."
    ),
    weights: str = typer.Option(None, help="Checkpoint file or directory (default: the teacher's own source)."),
    dataset: str = typer.Option(
        "shapes",
        help="Dataset: shapes, text, mrpc, qqp, imagefolder/imagenet, cifar10, "
        "cifar100, mnist, fashion-mnist, captions.",
    ),
    data_root: str = typer.Option(None, help="Dataset file or directory."),
    split: str = typer.Option("train", help="Dataset split."),
    out: Path = typer.Option(None, help="Store path (default: <teacher>-<dataset>-<split>.zarr here)."),
    views: int = typer.Option(1, help="Views per image; view 0 is the eval transform. Text has one."),
    layers: str = typer.Option("all", help="Teacher blocks to average: all, last:K, or indices like 0,5,11."),
    pool: str = typer.Option(
        None,
        help="Pooled target: cls, mean, teacher_cls, teacher_mean, teacher_embed "
        "(default: teacher_mean for text, teacher_cls for images).",
    ),
    layer_norm: bool = typer.Option(True, help="Layer-normalise the averaged targets."),
    instance_norm: bool = typer.Option(True, help="Instance-normalise each layer before averaging."),
    pooled_only: bool = typer.Option(False, help="Store only pooled targets."),
    dtype: str = typer.Option("float16", help="Storage: float16, float32, bfloat16, int8."),
    batch_size: int = typer.Option(64, help="Teacher inputs per forward pass (each view counts)."),
    device: str = typer.Option("cpu", help="torch device."),
    autocast: str = typer.Option("none", help="Teacher compute dtype: none, bfloat16, float16."),
    limit: int = typer.Option(None, help="Use only the first N samples."),
    overwrite: bool = typer.Option(False, help="Replace an existing store with another configuration."),
    workers: int = typer.Option(0, help="Image decoding processes."),
    seed: int = typer.Option(0, help="Seed of the random views."),
    teacher_option: list[str] = typer.Option(None, help="Extra teacher option KEY=VALUE (repeatable)."),
    dataset_option: list[str] = typer.Option(None, help="Extra dataset option KEY=VALUE, e.g. count=2000."),
    random_weights: bool = typer.Option(False, help="Random teacher weights (tests only; recorded in the store)."),
    chunk_size: int = typer.Option(0, help="Samples per chunk (default: ~4 MiB chunks)."),
    shard_size: int = typer.Option(0, help="Samples per shard, the unit of work (default: 16 chunks)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    verbose: bool = typer.Option(False, help="Log what happens (weights loaded, keys dropped, resume)."),
) -> None:
    """Extract teacher targets into a zarr store. With no arguments: minilm-l6 over shapes captions."""
    setup_logging(verbose)
    cfg = ExtractConfig(
        teacher=teacher,
        weights=weights,
        random_weights=random_weights,
        teacher_options=parse_options(teacher_option, "--teacher-option"),
        dataset=dataset,
        data_root=data_root,
        split=split,
        dataset_options=parse_options(dataset_option, "--dataset-option"),
        out=out,
        views=views,
        layers=layers,
        pool=pool,
        instance_norm=instance_norm,
        layer_norm=layer_norm,
        pooled_only=pooled_only,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        limit=limit,
        overwrite=overwrite,
        workers=workers,
        seed=seed,
        chunk_size=chunk_size,
        shard_size=shard_size,
    )
    from .run import extract  # imported here: option mistakes are reported before torch and the teachers load

    s = extract(cfg, show_progress=not quiet)
    table = Table(title=f"store {s.path}" + ("" if s.complete else " (incomplete)"), show_header=False)
    table.add_row("samples", f"{s.samples:,}")
    table.add_row("views", str(s.views))
    table.add_row("shards written now / total", f"{s.shards_written} / {s.shards_total}")
    table.add_row("bytes on disk", _human(s.bytes_on_disk))
    table.add_row("bytes per sample", _human(s.bytes_per_sample))
    table.add_row("throughput", f"{s.samples_per_second:,.1f} samples/s over {s.seconds:.1f} s")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
