"""`mmkd-extract`: parse options, build an ExtractConfig, call `extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmkd.data import DATASETS
from mmkd_core.cli_utils import Command, choice, choices, config_option, guarded, parse_options, setup_logging
from mmkd_core.progress import console
from mmkd_core.quant import DTYPES
from mmkd_core.targets import POOLS
from mmkd_core.teachers import TEACHERS  # registers the teachers (imports torch: about 1.5 s of --help)

from .config import AUTOCAST, ExtractConfig
from .report import summary_table

# the registries' names as the options' choices: --help, completion and errors list the same names
Teacher = choices(TEACHERS.names())
Dataset = choices(DATASETS.names())
Pool = choices(POOLS)
Dtype = choices(DTYPES)
Autocast = choices(AUTOCAST)

EXAMPLES = """Examples:

  mmkd-extract                                    # minilm-l6 over 10,000 shapes captions
  mmkd-extract --teacher minilm-l6 --dataset text --data-root sentences.txt --dtype int8
  mmkd-extract --teacher beitv2 --weights beitv2_base_patch16_224_pt1k.pth \\
               --dataset imagenet --data-root /data/imagenet --views 4 --workers 2
  mmkd-extract --config extract.yaml --limit 1000  # options from a file; the command line overrides it
  mmkd-extract --dataset text --data-root sentences.txt --cluster local:4    # shards over 4 processes
  mmkd-extract --dataset text --data-root sentences.txt --shards $SLURM_ARRAY_TASK_ID/8  # one of 8 jobs

Run an interrupted command again to continue where it stopped."""

app = typer.Typer(help="Run a frozen teacher once over a dataset and store its targets.")


def _from_fields(data: dict[str, Any]) -> dict[str, Any]:
    """ExtractConfig's field names in a config file read as the options they come from."""
    names = {"teacher_options": "teacher_option", "dataset_options": "dataset_option"}
    return {names.get(str(k).replace("-", "_"), k): v for k, v in data.items()}


@app.command(cls=Command, epilog=EXAMPLES)
@guarded
def main_command(
    config: Path = config_option(_from_fields),
    teacher: Teacher = typer.Option(
        "minilm-l6",
        parser=choice("--teacher", "teacher", TEACHERS),
        metavar="NAME",
        help=f"Teacher: {', '.join(TEACHERS.names())} (clip: --teacher-option tower=vision or tower=text).",
    ),
    weights: str = typer.Option(
        None,
        help="Checkpoint file or directory, or a repo id in the local Hugging Face cache (default: the "
        "teacher's own source).",
    ),
    dataset: Dataset = typer.Option(
        "shapes",
        parser=choice("--dataset", "dataset", DATASETS),
        metavar="NAME",
        help=f"Dataset: {', '.join(DATASETS.names())} (imagenet is imagefolder).",
    ),
    data_root: str = typer.Option(None, help="Dataset file or directory."),
    split: str = typer.Option("train", help="Dataset split."),
    out: str = typer.Option(
        None,
        metavar="PATH|URL",
        help="Store path, or a URL fsspec reaches: s3://bucket/x.zarr, gs://..., memory://... (default: "
        "<teacher>-<dataset>-<split>.zarr here).",
    ),
    views: int = typer.Option(1, help="Views per image; view 0 is the eval transform. Text has one."),
    layers: str = typer.Option("all", help="Teacher blocks to average: all, last:K, or indices like 0,5,11."),
    pool: Pool = typer.Option(
        None,
        parser=choice("--pool", "pooled target", POOLS),
        metavar="NAME",
        help="Pooled target: cls or mean of the targets; teacher_cls or teacher_mean of the raw last block; "
        "teacher_embed, the model's own output embedding (default: teacher_mean for text, teacher_cls for images).",
    ),
    layer_norm: bool = typer.Option(True, help="Layer-normalise the averaged targets."),
    instance_norm: bool = typer.Option(True, help="Instance-normalise each layer before averaging."),
    pooled_only: bool = typer.Option(
        None,
        "--pooled-only/--no-pooled-only",
        help="Store only pooled targets, or per-token targets too (default: pooled only for image–caption pair "
        "stores of an image teacher, tokens too otherwise).",
        show_default=False,
    ),
    text_tokenizer: str = typer.Option(
        None,
        help="Pair stores (an image teacher over image–caption data): the tokenizer of the captions the "
        "student's text tower reads, a text teacher (e.g. minilm-l6) or a checkpoint directory.",
    ),
    dtype: Dtype = typer.Option(
        "float16",
        parser=choice("--dtype", "storage dtype", DTYPES),
        metavar="NAME",
        help=f"Storage dtype: {', '.join(DTYPES)} (bfloat16: its bits as uint16; int8: a per-token scale, "
        "outlier channels kept).",
    ),
    codec: str = typer.Option(
        None,
        metavar="NAME",
        help="Compressor of the store (blosc): lz4 (the default: about 4x the speed of zstd-3 for about 10% more "
        "bytes), zstd-3, zstd-1, lz4hc, none; NAME[-LEVEL][-bitshuffle]. Recorded; a resumed store keeps its own.",
        show_default=False,
    ),
    batch_size: int = typer.Option(64, help="Teacher inputs per forward pass (each view counts)."),
    device: str = typer.Option("cpu", help="torch device."),
    autocast: Autocast = typer.Option(
        "auto",
        parser=choice("--autocast", "compute dtype", AUTOCAST),
        metavar="NAME",
        help="Teacher compute dtype: auto (bfloat16 where the hardware runs it natively and a short probe finds "
        "it faster, else float32; a resumed store keeps its own), none (float32), bfloat16, float16.",
    ),
    limit: int = typer.Option(None, help="Use only the first N samples."),
    overwrite: bool = typer.Option(False, help="Replace an existing store with another configuration."),
    plan: bool = typer.Option(
        False,
        help="Only predict the run: the teacher on a few batches spread over the dataset, then the store size "
        "(for every --dtype, compressed as stored), time and write rate it needs. Writes nothing.",
    ),
    workers: int = typer.Option(0, help="Image decoding processes."),
    seed: int = typer.Option(0, help="Seed of the random views."),
    teacher_option: list[str] = typer.Option(None, help="Extra teacher option KEY=VALUE (repeatable)."),
    dataset_option: list[str] = typer.Option(None, help="Extra dataset option KEY=VALUE, e.g. count=2000."),
    random_weights: bool = typer.Option(False, help="Random teacher weights (tests only; recorded in the store)."),
    chunk_size: int = typer.Option(0, help="Samples per chunk (default: ~4 MiB chunks)."),
    shard_size: int = typer.Option(0, help="Samples per shard, the unit of work (default: 16 chunks)."),
    cluster: str = typer.Option(
        None,
        metavar="local:N",
        help="Spread the shards over N worker processes of a dask.distributed LocalCluster started for the run "
        "(with --device cuda: one worker per GPU).",
    ),
    scheduler: str = typer.Option(
        None,
        metavar="ADDRESS",
        help="Spread the shards over the workers of a running dask.distributed cluster (e.g. tcp://host:8786; "
        "mmkd installed on the workers, the store and data at the same paths there).",
    ),
    shards: str = typer.Option(
        None,
        metavar="K/N",
        help="Extract only the shards k ≡ K (mod N): N such commands (a job array) fill one store together, "
        "and the last to finish marks it complete.",
    ),
    quiet: bool = typer.Option(False, help="No progress bar and no summary: only warnings and errors are printed."),
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
        text_tokenizer=text_tokenizer,
        dtype=dtype,
        codec=codec,
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        limit=limit,
        overwrite=overwrite,
        plan=plan,
        workers=workers,
        seed=seed,
        chunk_size=chunk_size,
        shard_size=shard_size,
        cluster=cluster,
        scheduler=scheduler,
        shards=shards,
    )
    if cfg.plan:
        from .plan import plan as predict
        from .plan import plan_tables

        for table in plan_tables(predict(cfg)):
            console.print(table)
        return
    from .run import extract  # imported here: --help need not load zarr, dask and the dataset adapters' readers

    summary = extract(cfg, show_progress=not quiet)
    if not quiet:
        console.print(summary_table(summary))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
