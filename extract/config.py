"""The resolved configuration of one extraction run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.app.options import option
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, store_location
from mmkd_core.quant import DTYPES

AUTOCAST = ("auto", "none", "bfloat16", "float16")


def _teachers():
    from mmkd_core.teachers import TEACHERS  # registers the teachers (imports torch: about 1.5 s of --help)

    return TEACHERS


def _datasets():
    from mmkd.data import DATASETS

    return DATASETS


def _pools():
    from mmkd_core.targets import POOLS

    return POOLS


@dataclass
class ExtractConfig:
    """Everything `mmkd-extract` needs; the CLI only fills this in. Each field's help is its documentation
    (``mmkd.app.options.options_of``); ``mmkd-extract --help`` prints it."""

    teacher: str = option(
        "minilm-l6",
        choices=_teachers,
        noun="teacher",
        help=lambda: f"Teacher: {', '.join(_teachers().names())} (clip: --teacher-option tower=vision or tower=text).",
    )
    add_teacher: str | None = option(
        None,
        metavar="TEACHER",
        noun="teacher",
        choices=_teachers,
        help="Add this teacher to the existing store --out, in its own group teachers/<name>: on the store's own "
        "samples and views (dataset, split, views and seed come from the store; --data-root if the data moved). "
        "--weights, --teacher-option, --random-weights and the target and storage options apply to it.",
    )
    teacher_name: str | None = option(
        None,
        metavar="NAME",
        help="With --add-teacher: the teacher's name in the store (default: the teacher's, e.g. mpnet-base).",
    )
    weights: str | None = option(
        None,
        help="Checkpoint file or directory, or a repo id in the local Hugging Face cache (default: the "
        "teacher's own source).",
    )
    dataset: str = option(
        "shapes",
        choices=_datasets,
        noun="dataset",
        help=lambda: f"Dataset: {', '.join(_datasets().names())} (imagenet is imagefolder).",
    )
    data_root: str | None = option(None, help="Dataset file or directory.")
    split: str = option("train", help="Dataset split.")
    out: Path | StoreURL | None = option(
        None,
        metavar="PATH|URL",
        help="Store path, or a URL fsspec reaches: s3://bucket/x.zarr, gs://..., memory://... (default: "
        "<teacher>-<dataset>-<split>.zarr here).",
    )
    views: int = option(1, help="Views per image; view 0 is the eval transform. Text has one.")
    layers: str = option("all", help="Teacher blocks to average: all, last:K, or indices like 0,5,11.")
    pool: str | None = option(
        None,
        choices=_pools,
        noun="pooled target",
        help="Pooled target: cls or mean of the targets; teacher_cls or teacher_mean of the raw last block; "
        "teacher_embed, the model's own output embedding (default: teacher_mean for text, teacher_cls for images, "
        "teacher_embed for a two-tower teacher).",
    )
    layer_norm: bool = option(True, help="Layer-normalise the averaged targets.")
    instance_norm: bool = option(True, help="Instance-normalise each layer before averaging.")
    pooled_only: bool | None = option(
        None,
        flag="--pooled-only/--no-pooled-only",
        help="Store only pooled targets, or per-token targets too (default: pooled only for image–caption pair "
        "stores of an image teacher, tokens too otherwise).",
        show_default=False,
    )
    text_tokenizer: str | None = option(
        None,
        help="Pair stores (an image teacher over image–caption data): the tokenizer of the captions the "
        "student's text tower reads, a text teacher (e.g. minilm-l6) or a checkpoint directory.",
    )
    dtype: str = option(
        "float16",
        choices=DTYPES,
        noun="storage dtype",
        help=f"Storage dtype: {', '.join(DTYPES)} (bfloat16: its bits as uint16; int8: a per-token scale, "
        "outlier channels kept).",
    )
    codec: str | None = option(
        None,
        metavar="NAME",
        help="Compressor of the store (blosc): lz4 (the default: about 4x the speed of zstd-3 for about 10% more "
        "bytes), zstd-3, zstd-1, lz4hc, none; NAME[-LEVEL][-bitshuffle]. Recorded; a resumed store keeps its own.",
        show_default=False,
    )
    batch_size: int = option(64, help="Teacher inputs per forward pass (each view counts).")
    device: str = option("cpu", help="torch device.")
    autocast: str = option(
        "auto",
        choices=AUTOCAST,
        noun="compute dtype",
        help="Teacher compute dtype: auto (bfloat16 where the hardware runs it natively and a short probe finds "
        "it faster, else float32; a resumed store keeps its own), none (float32), bfloat16, float16.",
    )
    limit: int | None = option(None, help="Use only the first N samples.")
    overwrite: bool = option(False, help="Replace an existing store with another configuration.")
    plan: bool = option(
        False,
        help="Only predict the run: the teacher on a few batches spread over the dataset, then the store size "
        "(for every --dtype, compressed as stored), time and write rate it needs. Writes nothing.",
    )
    workers: int = option(0, help="Image decoding processes.")
    seed: int = option(0, help="Seed of the random views.")
    teacher_options: dict[str, Any] = option(
        dict, flag="--teacher-option", keyvalue=True, help="Extra teacher option KEY=VALUE (repeatable)."
    )
    dataset_options: dict[str, Any] = option(
        dict, flag="--dataset-option", keyvalue=True, help="Extra dataset option KEY=VALUE, e.g. count=2000."
    )
    random_weights: bool = option(False, help="Random teacher weights (tests only; recorded in the store).")
    chunk_size: int = option(0, help="Samples per chunk (default: ~4 MiB chunks).")
    shard_size: int = option(0, help="Samples per shard, the unit of work (default: 16 chunks).")
    cluster: str | None = option(
        None,
        metavar="local:N",
        help="Spread the shards over N worker processes of a dask.distributed LocalCluster started for the run "
        "(with --device cuda: one worker per GPU).",
    )
    scheduler: str | None = option(
        None,
        metavar="ADDRESS",
        help="Spread the shards over the workers of a running dask.distributed cluster (e.g. tcp://host:8786; "
        "mmkd installed on the workers, the store and data at the same paths there).",
    )
    shards: str | None = option(
        None,
        metavar="K/N",
        help="Extract only the shards k ≡ K (mod N): N such commands (a job array) fill one store together, "
        "and the last to finish marks it complete.",
    )
    crop_scale: tuple[float, float] = option((0.08, 1.0), cli=False, help="Area range of random crops.")

    @property
    def cluster_workers(self) -> int | None:
        """N of ``--cluster local:N``."""
        return int(self.cluster.split(":")[1]) if self.cluster else None

    @property
    def target(self) -> Path | StoreURL:
        """The store this run writes: ``out``, or with ``--add-teacher`` its teacher group inside ``out``."""
        if not self.add_teacher:
            return self.out
        from mmkd_core.store.teachers import teacher_path  # here: mmkd-extract --help loads no zarr

        return teacher_path(self.out, self.teacher_name)

    @property
    def shard_slice(self) -> tuple[int, int] | None:
        """(K, N) of ``--shards K/N``."""
        return tuple(map(int, self.shards.split("/"))) if self.shards else None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MmkdError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.codec is not None:
            from mmkd_core.store import codec_name, parse_codec  # here: mmkd-extract --help loads no zarr

            self.codec = codec_name(parse_codec(self.codec))  # refused here with the accepted forms
        if self.autocast not in AUTOCAST:
            raise MmkdError(f"--autocast {self.autocast!r}: choose one of {', '.join(AUTOCAST)}")
        if self.batch_size < 1:
            raise MmkdError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.views < 1:
            raise MmkdError(f"--views {self.views}: must be at least 1 (view 0 is the eval transform)")
        if self.limit is not None and self.limit < 1:
            raise MmkdError(f"--limit {self.limit}: must be at least 1")
        if self.workers < 0:
            raise MmkdError(f"--workers {self.workers}: must be 0 or more")
        for name in ("chunk_size", "shard_size"):
            if getattr(self, name) < 0:
                raise MmkdError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 0 (automatic) or more")
        if self.chunk_size and self.shard_size and self.shard_size % self.chunk_size:
            raise MmkdError(f"--shard-size {self.shard_size}: must be a multiple of --chunk-size {self.chunk_size}")
        self._check_distribution()
        self._check_added()
        if self.data_root is not None and not str(self.data_root).strip():
            raise MmkdError("--data-root is empty: give the dataset's file or directory")
        if self.out is None:
            self.out = Path(f"{self.teacher}-{self.dataset}-{self.split}.zarr")
        self.out = store_location(self.out, "--out")
        if self.out.exists() and not self.out.is_dir():
            raise MmkdError(f"--out {self.out}: is a file, not a store directory; choose another --out")

    def _check_added(self) -> None:
        if self.teacher_name is not None and not self.add_teacher:
            raise MmkdError("--teacher-name names a teacher added to a store: use it with --add-teacher")
        if not self.add_teacher:
            return
        from mmkd_core.store.teachers import check_teacher_name

        if self.out is None:
            raise MmkdError("--add-teacher: give the store to add it to with --out")
        self.teacher = self.add_teacher
        self.teacher_name = check_teacher_name(self.teacher_name or self.add_teacher)
        if self.text_tokenizer:
            raise MmkdError("--add-teacher with --text-tokenizer: teachers are added to stores of one modality only")

    def _check_distribution(self) -> None:
        if self.cluster is not None:
            m = re.fullmatch(r"local:(\d+)", str(self.cluster).strip())
            if not m or int(m[1]) < 1:
                raise MmkdError(f"--cluster {self.cluster!r}: expected local:N, N ≥ 1 worker processes")
            self.cluster = f"local:{int(m[1])}"
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise MmkdError("--scheduler is empty: give the address of a running scheduler, e.g. tcp://host:8786")
        if self.cluster and self.scheduler:
            raise MmkdError("--cluster and --scheduler exclude each other: start a local cluster or use a running one")
        if self.shards is not None:
            m = re.fullmatch(r"(\d+)/(\d+)", str(self.shards).strip())
            if not m or not int(m[1]) < int(m[2]):
                raise MmkdError(f"--shards {self.shards!r}: expected K/N with 0 ≤ K < N, e.g. 0/4")
            self.shards = f"{int(m[1])}/{int(m[2])}"
            if self.overwrite:
                raise MmkdError(
                    "--overwrite with --shards: the N commands would delete each other's shards; delete the "
                    "store once before starting them"
                )
