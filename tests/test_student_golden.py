"""Every student kind, built by mmkd-train's builder from a tiny store with a fixed seed, has the weights it had
before the student kinds were reorganised (issue 18): hashes of the state dict and of the default loss on one
batch, recorded from the code as it was. ``MMKD_GOLDEN_PRINT=1`` prints the current values instead."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WORDS, save_tiny_beitv2, save_tiny_bert  # noqa: E402
from test_data2vec2 import fairseq_state  # noqa: E402
from test_msd import save_tiny_flava  # noqa: E402

GOLDEN = {
    "beit-teacher": {
        "kind": "beit",
        "state": "8c03a7d80a121009",
        "init": "[0]",
        "loss": "1.53001e-05",
        "terms": ["token_mse"],
        "default_loss": None,
        "tokenizer": "NoneType",
        "source": "ShapesDataset",
        "preprocess": 32,
        "loader_options": [],
    },
    "data2vec2": {
        "kind": "data2vec2",
        "state": "b7941d671eca56a8",
        "init": "[0, 1]",
        "loss": "2.18936",
        "terms": ["token_mse"],
        "default_loss": None,
        "tokenizer": "NoneType",
        "source": "ShapesDataset",
        "preprocess": 32,
        "loader_options": [],
    },
    "multimodal-captions": {
        "kind": "multimodal",
        "state": "843740005b5b20ad",
        "init": "null",
        "loss": "3.01678",
        "terms": ["contrastive_kd", "itc"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "ShapesDataset",
        "preprocess": 48,
        "loader_options": [],
    },
    "multimodal-captions-text-init": {
        "kind": "multimodal",
        "state": "1c43dc5a4921aa12",
        "init": "null",
        "loss": "2.87055",
        "terms": ["contrastive_kd", "itc"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "ShapesDataset",
        "preprocess": 48,
        "loader_options": [],
    },
    "multimodal-joint": {
        "kind": "multimodal",
        "state": "560e2813a88adbc4",
        "init": "null",
        "loss": "1.97348",
        "terms": ["contrastive_kd", "msd"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "ShapesDataset",
        "preprocess": 32,
        "loader_options": [],
    },
    "multimodal-pairs": {
        "kind": "multimodal",
        "state": "843740005b5b20ad",
        "init": "null",
        "loss": "1.3872",
        "terms": ["contrastive_kd", "itc"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "PairImages",
        "preprocess": 48,
        "loader_options": ["captions", "render_spec"],
    },
    "text-random": {
        "kind": "text",
        "state": "fccbe36749f1d905",
        "init": "null",
        "loss": "3.44322",
        "terms": ["contrastive_kd", "pooled_cosine"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "NoneType",
        "preprocess": None,
        "loader_options": [],
    },
    "text-teacher": {
        "kind": "text",
        "state": "32ca48832f7875b2",
        "init": "[1]",
        "loss": "0.647521",
        "terms": ["contrastive_kd", "pooled_cosine"],
        "default_loss": None,
        "tokenizer": "BertTokenizer",
        "source": "NoneType",
        "preprocess": None,
        "loader_options": [],
    },
    "vit-random": {
        "kind": "vit",
        "state": "b37842deedfc6640",
        "init": "null",
        "loss": "1.27753",
        "terms": ["token_mse"],
        "default_loss": None,
        "tokenizer": "NoneType",
        "source": "ShapesDataset",
        "preprocess": 32,
        "loader_options": [],
    },
}
TINY_MM = {"width": 32, "num_heads": 2, "text_num_heads": 2, "image_depth": 1}


def _hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _extract(out: Path, **options) -> Path:
    from mmkd.extract.config import ExtractConfig
    from mmkd.extract.run import extract

    extract(ExtractConfig(out=out, dtype="float32", chunk_size=4, shard_size=8, **options), show_progress=False)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("golden")
    bert = save_tiny_bert(root / "bert")
    (root / "s.txt").write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(16)) + "\n")
    beit = save_tiny_beitv2(root / "beit.pth", img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    beit_arch = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
    ckpt = root / "d2v.pt"
    torch.save({"model": fairseq_state()}, ckpt)
    shapes = {"dataset": "shapes", "dataset_options": {"count": 8, "resolution": 32}}
    return {
        "ckpt": ckpt,
        "text": _extract(
            root / "text.zarr", teacher="bert", weights=str(bert), dataset="text", data_root=str(root / "s.txt")
        ),
        "image": _extract(
            root / "image.zarr", teacher="beitv2", weights=str(beit), teacher_options=beit_arch, **shapes
        ),
        "captions": _extract(root / "captions.zarr", teacher="bert", weights=str(bert), **shapes),
        "pairs": _extract(
            root / "pairs.zarr",
            teacher="beitv2",
            weights=str(beit),
            teacher_options=beit_arch,
            text_tokenizer=str(bert),
            **shapes,
        ),
        "joint": _extract(
            root / "joint.zarr",
            teacher="flava",
            weights=str(save_tiny_flava(root / "flava")),
            pooled_only=True,
            autocast="none",
            **shapes,
        ),
    }


CASES = {
    "text-teacher": ("text", {"student_options": {"init_blocks": "spread"}}),  # the cut it was recorded with
    "text-random": ("text", {"init": "random"}),
    "beit-teacher": ("image", {}),
    "vit-random": ("image", {"student": "vit", "init": "random"}),
    "data2vec2": (
        "image",
        {"init": "data2vec2", "init_weights": "ckpt", "depth": 2, "student_options": {"num_heads": 4}},
    ),
    "multimodal-captions": ("captions", {"student_options": TINY_MM}),
    "multimodal-captions-text-init": (
        "captions",
        {"init": "teacher", "student_options": {"image_depth": 1, "num_heads": 2}},
    ),
    "multimodal-pairs": ("pairs", {"student_options": TINY_MM}),
    "multimodal-joint": ("joint", {"student_options": TINY_MM, "loss": "msd=1,contrastive_kd=1"}),
}


def _golden(stores: dict[str, Path], store: str, options: dict, tmp_path: Path) -> dict:
    from mmkd.train.build import build, default_loss, loss_inputs, student_kind
    from mmkd.train.config import TrainConfig
    from mmkd_core.dataset import StoreDataset
    from mmkd_core.losses import build_loss
    from mmkd_core.store import open_store

    options = {k: str(stores[v]) if k == "init_weights" else v for k, v in options.items()}
    reader = open_store(stores[store])
    cfg = TrainConfig(targets=stores[store], run_dir=tmp_path / "run", **options)
    kind = student_kind(cfg, reader.attrs)
    cfg = cfg.resolved(kind)
    torch.manual_seed(0)
    built = build(cfg, reader)
    student = built.student.eval()
    batches = StoreDataset(
        cfg.targets, 4, seed=0, source=built.source, image_spec=built.image_spec, targets="float32",
        **built.loader_options,
    )  # fmt: skip
    batch = next(iter(batches))
    loss = build_loss(cfg.loss or built.default_loss or default_loss(built.kind), **cfg.loss_options)
    with torch.no_grad():
        total, terms = loss(loss_inputs(built, student, batch, "cpu"))
    return {
        "kind": built.kind,
        "state": _hash(student.state_dict()),
        "init": json.dumps(student.init_info.get("blocks")),
        "loss": f"{float(total):.6g}",
        "terms": sorted(terms),
        "default_loss": built.default_loss,
        "tokenizer": type(built.tokenizer).__name__,
        "source": type(built.source).__name__,
        "preprocess": None if built.preprocess is None else built.preprocess.size,
        "loader_options": sorted(built.loader_options),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_student_kinds_build_the_weights_they_built_before(stores, case, tmp_path):
    store, options = CASES[case]
    got = _golden(stores, store, options, tmp_path)
    if os.environ.get("MMKD_GOLDEN_PRINT"):
        print(f"GOLDEN {case!r}: {json.dumps(got)}")
        return
    assert np.isfinite(float(got["loss"]))
    assert got == GOLDEN[case]
