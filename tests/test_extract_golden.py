"""The stores mmkd-extract writes, byte for byte: a text, an image, a two-tower pair and a joint store of tiny
random-weight teachers, hashed file by file and compared with digests recorded from the code before issue 18's
restructuring (regenerate with ``python tests/test_extract_golden.py`` only for a deliberate format change).

Every array's metadata and chunk files are hashed as written; a group's ``zarr.json`` is hashed without what
is run-specific (``versions``, ``mmkd_extract_seconds``) and with the temporary directory's path replaced."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_beitv2, save_tiny_bert, save_tiny_clip

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract

BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
SMALL = {"chunk_size": 4, "shard_size": 8, "batch_size": 8, "autocast": "none"}


def _configs(tmp: Path) -> dict[str, ExtractConfig]:
    from test_msd import save_tiny_flava

    bert = save_tiny_bert(tmp / "bert")
    beit = save_tiny_beitv2(tmp / "beit.pth", **BEIT)
    clip = save_tiny_clip(tmp / "clip", image_size=32, patch_size=16, max_position=80)
    flava = save_tiny_flava(tmp / "flava")
    shapes = {"dataset": "shapes", "dataset_options": {"count": 20}}
    return {
        "text": ExtractConfig(teacher="bert", weights=str(bert), **shapes, out=tmp / "text.zarr", **SMALL),
        "text-int8": ExtractConfig(
            teacher="bert", weights=str(bert), **shapes, dtype="int8", layers="last:1", out=tmp / "int8.zarr", **SMALL
        ),
        "image": ExtractConfig(
            teacher="beitv2",
            weights=str(beit),
            teacher_options=BEIT,
            dataset="shapes",
            dataset_options={"count": 10, "resolution": 40},
            views=2,
            out=tmp / "image.zarr",
            **SMALL,
        ),
        "pair": ExtractConfig(
            teacher="clip",
            weights=str(clip),
            teacher_options={"tower": "both"},
            **shapes,
            views=2,
            out=tmp / "pair.zarr",
            **SMALL,
        ),
        "joint": ExtractConfig(
            teacher="flava",
            weights=str(flava),
            **shapes,
            views=2,
            pooled_only=True,
            out=tmp / "joint.zarr",
            **SMALL,
        ),
    }


def _scrub(value, tmp: str):
    if isinstance(value, dict):
        return {k: _scrub(v, tmp) for k, v in value.items() if k not in ("versions", "mmkd_extract_seconds")}
    if isinstance(value, list):
        return [_scrub(v, tmp) for v in value]
    return value.replace(tmp, "<tmp>") if isinstance(value, str) else value


def store_digest(store: Path, tmp: Path) -> dict[str, str]:
    """sha256 of every file of the store, by its path in the store (a group's zarr.json scrubbed)."""
    out = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "zarr.json" and json.loads(data).get("node_type") == "group":
            meta = _scrub(json.loads(data), str(tmp.resolve()))
            data = json.dumps(_scrub(meta, str(tmp)), sort_keys=True).encode()
        out[str(path.relative_to(store))] = hashlib.sha256(data).hexdigest()[:16]
    return out


def digests(tmp: Path) -> dict[str, dict[str, str]]:
    out = {}
    for name, cfg in _configs(tmp).items():
        extract(cfg, show_progress=False)
        out[name] = store_digest(cfg.out, tmp)
    return out


GOLDEN_FILE = Path(__file__).with_name("extract_golden.json")


@pytest.mark.parametrize("name", ["text", "text-int8", "image", "pair", "joint"])
def test_store_is_byte_for_byte_the_recorded_one(name, stores):
    golden = json.loads(GOLDEN_FILE.read_text())[name]
    got = stores[name]
    assert sorted(got) == sorted(golden), "the store's files differ"
    differ = [f for f in golden if got[f] != golden[f]]
    assert not differ, f"files whose bytes differ: {differ}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return digests(tmp_path_factory.mktemp("golden"))


if __name__ == "__main__":  # python tests/test_extract_golden.py [DIR]: record the digests
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as d:
        GOLDEN_FILE.write_text(json.dumps(digests(Path(sys.argv[1] if len(sys.argv) > 1 else d)), indent=1) + "\n")
