"""The resolved configuration of one extraction run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, store_location
from mmkd_core.quant import DTYPES

AUTOCAST = ("auto", "none", "bfloat16", "float16")


@dataclass
class ExtractConfig:
    """Everything `mmkd-extract` needs; the CLI only fills this in.

    Attributes:
        teacher: Teacher registry name.
        weights: Checkpoint file or directory; None uses the teacher's default source (package, hub cache).
        random_weights: Use random weights. For tests only: the store records it.
        teacher_options: Extra teacher options (architecture overrides, CLIP tower, ...).
        dataset: Dataset registry name.
        data_root: Dataset file or directory.
        split: Dataset split.
        dataset_options: Extra dataset options (e.g. ``count`` for shapes).
        out: Store path, or a URL fsspec reaches (``s3://bucket/x.zarr``: a ``StoreURL``); None derives
            ``<teacher>-<dataset>-<split>.zarr`` in the current directory.
        views: Views per image (view 0 is the eval transform); text has one.
        layers: "all", "last:K" or block indices.
        pool: Pooled target; None picks teacher_mean for text teachers and teacher_cls for image teachers.
        instance_norm: Instance-normalise each layer before averaging.
        layer_norm: Layer-normalise the averaged targets.
        pooled_only: Store only pooled targets; None: pooled only for pair stores (an image teacher over
            image–caption data), per-token targets too otherwise.
        text_tokenizer: Pair stores: the tokenizer the student's text tower reads the captions with (a
            registered text teacher or a checkpoint directory); a two-tower teacher uses its own.
        dtype: float16, float32, bfloat16 or int8.
        codec: Compressor of the store's arrays (``mmkd_core.store.parse_codec``: ``lz4``, ``zstd-3``, ``none``,
            ...); None: ``store.DEFAULT_CODEC`` for a new store, a resumed store's own.
        batch_size: Teacher inputs per forward pass (images count each view).
        device: torch device.
        autocast: Teacher compute dtype: auto (what the hardware runs natively, ``mmkd_core.hardware``;
            a resumed store keeps the one it recorded), none (float32), bfloat16 or float16.
        limit: Use only the first N samples.
        overwrite: Replace a store with another configuration.
        plan: Predict the run instead (``plan.plan``: store size per dtype, time, write rate); write nothing.
        workers: DataLoader processes decoding and augmenting images.
        seed: Seed of the random views.
        crop_scale: Area range of random crops.
        chunk_size: Samples per chunk (0: about 4 MiB chunks).
        shard_size: Samples per shard (0: 16 chunks).
        cluster: ``local:N``: the shards spread over N worker processes of a dask.distributed LocalCluster
            (one per GPU with a cuda device).
        scheduler: Address of a running dask.distributed scheduler whose workers take the shards.
        shards: ``K/N``: only the shards k ≡ K (mod N); N such commands fill one store together.
    """

    teacher: str = "minilm-l6"
    weights: str | None = None
    random_weights: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "shapes"
    data_root: str | None = None
    split: str = "train"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    out: Path | StoreURL | None = None
    views: int = 1
    layers: str = "all"
    pool: str | None = None
    instance_norm: bool = True
    layer_norm: bool = True
    pooled_only: bool | None = None
    text_tokenizer: str | None = None
    dtype: str = "float16"
    codec: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    autocast: str = "auto"
    limit: int | None = None
    overwrite: bool = False
    plan: bool = False
    workers: int = 0
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    chunk_size: int = 0
    shard_size: int = 0
    cluster: str | None = None
    scheduler: str | None = None
    shards: str | None = None

    @property
    def cluster_workers(self) -> int | None:
        """N of ``--cluster local:N``."""
        return int(self.cluster.split(":")[1]) if self.cluster else None

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
        if self.data_root is not None and not str(self.data_root).strip():
            raise MmkdError("--data-root is empty: give the dataset's file or directory")
        if self.out is None:
            self.out = Path(f"{self.teacher}-{self.dataset}-{self.split}.zarr")
        self.out = store_location(self.out, "--out")
        if self.out.exists() and not self.out.is_dir():
            raise MmkdError(f"--out {self.out}: is a file, not a store directory; choose another --out")

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
