"""Stores are written byte for byte as they always were: every array's decoded bytes, every node's metadata
(attributes, dtype, chunks, shards, codecs, dimension names) and the list of files, hashed and compared with
digests recorded from stores written by earlier code. A digest that changes means the store format changed:
readers of stores written before (and other tools, the format being a public contract) would see it."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from mmkd_core.store import Layout, StoreWriter, encode_targets, parse_codec

CONFIG = {
    "teacher": {"name": "t", "source": "random", "weights_sha256": "abc", "num_layers": 2, "hidden_size": 8},
    "recipe": {"layers": [0, 1], "instance_norm": True, "layer_norm": True, "pool": "mean", "tokens": True},
    "preprocess": {"max_length": 6},
    "views": {"count": 2},
    "dataset": {"name": "d", "split": "train", "fingerprint": "f", "num_samples": 23},
}
VERSIONS = {"mmkd": "0", "zarr": "3"}

CASES = {
    "float16_text": dict(dtype="float16", input_ids=True),
    "bfloat16_views_extras": dict(
        dtype="bfloat16",
        view_params=3,
        extras=(("image", (), "int64", ("sample",)), ("aux", (2, 5), "float32", ("sample", "view", "aux_channel"))),
        codec=parse_codec("zstd-3"),
    ),
    "int8_text": dict(dtype="int8", input_ids=True, codec=parse_codec("none")),
    "float32_pooled_only": dict(dtype="float32", store_tokens=False, codec=parse_codec("zstd-1-bitshuffle")),
}

# recorded from the stores the code wrote before the store became a package (mmkd_core/store.py), then again when
# format 2 added a crc32c checksum to every chunk (metadata and format_version changed; every array's values did not)
GOLDEN = {
    "float16_text": "527093ad4d0e6100cb0213b47705179ef133a82d04ff8c6bb436d86898ef8004",
    "bfloat16_views_extras": "286987c731d4d962150797bf5a54d61c800ab584050efec4b1aab4c9018a44d1",
    "int8_text": "a5ff1739f2f2beb8f2858fb9065c5fc6b8f9ae771531fca9a0e493d53d38be88",
    "float32_pooled_only": "15614f9bfb2c3f0430ca7fae949d2f2da17a474119ec9724d8070098ee7caf5a",
}


def shard_data(layout: Layout, lo: int, hi: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([7, lo])
    n, v, t = hi - lo, layout.views, layout.time_steps
    lengths = rng.integers(1, t + 1, n).astype(np.int32)
    tokens = rng.standard_normal((n, v, t, layout.dim)).astype(np.float32)
    tokens[:, :, :, 3] *= 30  # an outlier channel (int8 keeps it apart)
    tokens *= np.arange(t)[None, None, :, None] < lengths[:, None, None, None]
    out = {
        "tokens": tokens,
        "pooled": rng.standard_normal((n, v, layout.pooled_dim)).astype(np.float32),
        "lengths": lengths,
        "input_ids": rng.integers(0, 100, (n, t)).astype(np.int32),
        "view_params": rng.standard_normal((n, v, 3)).astype(np.float32),
        "view_checksum": rng.integers(0, 2**63, (n, v), dtype=np.uint64),
        "index": np.arange(lo, hi, dtype=np.int64) * 3,
        "image": rng.integers(0, 9, n).astype(np.int64),
        "aux": rng.standard_normal((n, 2, 5)).astype(np.float32),
    }
    if not layout.store_tokens:
        del out["tokens"]
    return out


def write_case(path: Path, name: str) -> None:
    """A store written as extraction writes one: interrupted after shard 1, resumed, shard 0 passed through
    ``encode_targets`` when the dtype allows (the extraction's buffers), then finished."""
    layout_args = dict(num_samples=23, views=2, time_steps=6, dim=8, pooled_dim=5, chunk_size=4, shard_size=8)
    order = [1, 0, 2]
    for first, shards in ((True, order[:1]), (False, order[1:])):
        layout = Layout(**layout_args, **CASES[name])
        with StoreWriter.open(path, layout, CONFIG, VERSIONS, extra={"source": {"where": "here"}}) as w:
            assert w.done_shards() == (set() if first else {1})
            for k in shards:
                lo, hi = layout.shard_range(k)
                data = shard_data(layout, lo, hi)
                if k == 0 and layout.buffer_dtype != "float32":
                    for t in ("tokens", "pooled"):
                        if t in data:
                            x = data[t].reshape(-1, *data[t].shape[2:])
                            enc = encode_targets(t, x, layout.dtype, lambda row, v=layout.views: divmod(row, v))
                            data[t] = enc.reshape(data[t].shape)
                w.write_shard(k, data)
            if not first:
                assert w.finish()


def digests(path: Path) -> dict[str, str]:
    """sha256 of each array's decoded bytes, of each node's zarr.json (canonical JSON) and of the file list."""
    out = {}
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    out["files"] = hashlib.sha256("\n".join(files).encode()).hexdigest()
    for f in files:
        if f.endswith("zarr.json"):
            meta = json.loads((path / f).read_text())
            out[f] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    group = zarr.open_group(str(path), mode="r")
    for name in sorted(group.array_keys()):
        a = group[name][...]
        out[name] = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()
    return out


def combined(d: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", list(CASES))
def test_store_bytes_are_unchanged(tmp_path, name):
    write_case(tmp_path / "s.zarr", name)
    got = digests(tmp_path / "s.zarr")
    assert combined(got) == GOLDEN[name], json.dumps(got, indent=1)
