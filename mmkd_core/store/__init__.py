"""The target store: a zarr v3 group, chunked and sharded along the sample axis only.

Layout (the public contract, described in docs/store.md): ``tokens`` (N, V, T, D), ``pooled`` (N, V, E), for
int8 ``tokens_scale`` (N, V, T), ``pooled_scale`` (N, V) and their outlier arrays (see ``quant``), ``lengths``
(N,), ``input_ids`` (N, T), ``view_params`` (N, V, P), ``index`` (N,), and ``shards_done`` (num_shards,)
uint8 — one chunk per shard, so writers of different shards never touch the same file. Group
attribute ``mmkd`` holds the provenance and ``complete``.

Every array carries zarr v3 ``dimension_names`` (``DIMS``), so the store is ordinary array data:
``xarray.open_zarr(path, consolidated=False)`` opens it as one Dataset, and ``StoreReader.to_dask`` /
``to_xarray`` give the same arrays lazily with the targets decoded. Target arrays say in their attributes
how they decode (bfloat16: ``quant.BFLOAT16_RULE``; int8: the rule in ``mmkd.storage.dequantize``).
Readers never require ``dimension_names``: stores written before them read as before.

A shard is the unit of work: it is checked whole, written, then marked done. Resume skips done shards.

One writer at a time: ``StoreWriter`` holds the lock file ``<store>.lock`` beside the store directory (see
``lock_path``) from ``open`` to ``close``/``finish``. ``--overwrite`` deletes only an mmkd store.

A store is a local directory or an fsspec URL (``s3://bucket/x.zarr``, ``memory://x.zarr``; see
``location``): the same rules hold on both, the lock being an object beside the store created only if absent.

The parts: ``layout`` (arrays, shapes, chunking), ``codecs`` (compressors and zarr's codec pipelines),
``provenance`` (the ``mmkd`` attribute and its comparison), ``encode`` (targets into the stored dtype, with
their checks), ``lock`` (the store lock and the slice locks of ``--shards K/N``), ``writer`` and ``reader``.
"""

from .codecs import (
    CODEC_NAMES,
    DEFAULT_CODEC,
    DEFAULT_PIPELINE,
    LEGACY_CODEC,
    ZARRS_ENV,
    ZARRS_PIPELINE,
    codec_name,
    codec_pipeline,
    compressors,
    parse_codec,
    recorded_codec,
    use_zarrs,
)
from .encode import encode_targets
from .layout import (
    CHUNKS_PER_SHARD,
    DIMS,
    INT8_POINTER,
    OUTLIER_DIMS,
    TARGET_CHUNK_BYTES,
    TARGETS,
    Layout,
    array_attrs,
    dimension_names,
)
from .lock import (
    LOCK_SUFFIX,
    LOCK_WAIT,
    StoreLock,
    live_readers,
    live_slices,
    lock_path,
    refuse_slices,
    slice_lock_path,
    take_reader_lease,
    take_slice,
    wait_for_lock,
)
from .provenance import CONFIG_FIELDS, FORMAT_VERSION, LATER_STORAGE_KEYS, config_diff, read_attrs
from .reader import StoreReader, open_store
from .writer import StoreWriter

__all__ = [
    "CHUNKS_PER_SHARD",
    "CODEC_NAMES",
    "CONFIG_FIELDS",
    "DEFAULT_CODEC",
    "DEFAULT_PIPELINE",
    "DIMS",
    "FORMAT_VERSION",
    "INT8_POINTER",
    "LATER_STORAGE_KEYS",
    "LEGACY_CODEC",
    "LOCK_SUFFIX",
    "LOCK_WAIT",
    "OUTLIER_DIMS",
    "TARGETS",
    "TARGET_CHUNK_BYTES",
    "ZARRS_ENV",
    "ZARRS_PIPELINE",
    "Layout",
    "StoreLock",
    "StoreReader",
    "StoreWriter",
    "array_attrs",
    "codec_name",
    "codec_pipeline",
    "compressors",
    "config_diff",
    "dimension_names",
    "encode_targets",
    "live_readers",
    "live_slices",
    "lock_path",
    "open_store",
    "parse_codec",
    "read_attrs",
    "recorded_codec",
    "refuse_slices",
    "slice_lock_path",
    "take_reader_lease",
    "take_slice",
    "use_zarrs",
    "wait_for_lock",
]
