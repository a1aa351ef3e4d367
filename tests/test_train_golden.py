"""The same trained weights for the same seed: a tiny text student and a tiny image student trained for a few
steps must export exactly the weights, and log exactly the metrics, recorded in ``golden_train.json``.

The recorded values were computed by the training code as it stood before training became one recipe
(issue 18); a refactoring that changes what training computes fails here. The hashes are exact on the
platform that recorded them (torch version, CPU capability and number of threads, also recorded); elsewhere
float rounding may differ in the last bits, so the losses and per-tensor sums are compared to a tolerance.

Record again (only for an intended change of what training computes):
``MMKD_WRITE_GOLDEN=1 python -m pytest tests/test_train_golden.py``.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import WORDS, save_tiny_bert
from safetensors.torch import load_file

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train

GOLDEN = Path(__file__).with_name("golden_train.json")
WRITE = os.environ.get("MMKD_WRITE_GOLDEN") == "1"
TINY_BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def _platform() -> dict[str, str]:
    # the number of threads changes how sums are split, so the last bits of the weights
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_text")
    bert = save_tiny_bert(root / "bert", layers=4)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(64)]
    (root / "s.txt").write_text("\n".join(lines) + "\n")
    out = root / "t.zarr"
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=out,
            dtype="float32",
            chunk_size=8,
            shard_size=16,
        ),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_image")
    torch.manual_seed(0)
    weights = root / "tiny_beitv2.pth"
    model = timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY_BEIT)
    torch.save({"model": model.state_dict()}, weights)
    out = root / "views.zarr"
    extract(
        ExtractConfig(
            teacher="beitv2",
            weights=str(weights),
            teacher_options=TINY_BEIT,
            dataset="shapes",
            dataset_options={"count": 24, "resolution": 40},
            views=2,
            dtype="float32",
            autocast="none",
            out=out,
            chunk_size=4,
            shard_size=8,
        ),
        show_progress=False,
    )
    return out


def _fingerprint(run_dir: Path) -> dict:
    """Hashes of the exported student's tensors and of the logged metrics (wall times left out), with the
    numbers a tolerant comparison needs."""
    tensors = {}
    for path in sorted((run_dir / "student").rglob("*.safetensors")):
        for name, t in sorted(load_file(str(path)).items()):
            tensors[f"{path.relative_to(run_dir / 'student')}:{name}"] = t
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row.pop("seconds")
    return {
        "weights_sha256": h.hexdigest(),
        "metrics_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "losses": [r["loss"] for r in rows],
        "sums": {name: float(t.double().sum()) for name, t in tensors.items() if t.is_floating_point()},
    }


def _check(case: str, got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if WRITE:
        golden["platform"] = _platform()
        golden[case] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    want = golden[case]
    if golden["platform"] == _platform():
        assert got["weights_sha256"] == want["weights_sha256"], f"{case}: the trained weights changed"
        assert got["metrics_sha256"] == want["metrics_sha256"], f"{case}: the logged metrics changed"
        return
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-4, err_msg=f"{case}: losses")
    assert got["sums"].keys() == want["sums"].keys(), f"{case}: other tensors exported"
    np.testing.assert_allclose(
        [got["sums"][k] for k in want["sums"]], list(want["sums"].values()), rtol=1e-3, atol=1e-3
    )


def test_text_student_weights_unchanged(tmp_path, text_store):
    cfg = TrainConfig(
        targets=text_store,
        depth=2,
        batch_size=16,
        steps=6,
        ckpt_every=4,
        log_every=1,
        bank_size=12,
        run_dir=tmp_path / "run",
        progress=False,
        lr=1e-3,
        seed=3,
        student_options={"init_blocks": "spread"},  # the cut the golden was recorded with (not the default)
    )
    result = train(cfg)
    assert result.steps == 6
    _check("text", _fingerprint(tmp_path / "run"))


def test_image_student_weights_unchanged(tmp_path, image_store):
    cfg = TrainConfig(
        targets=image_store,
        depth=2,
        batch_size=8,
        steps=5,
        log_every=1,
        lr=1e-3,
        loss="token_mse=1,pooled_mse=1",
        run_dir=tmp_path / "run",
        progress=False,
        student_options={"num_heads": 2},
        seed=1,
    )
    result = train(cfg)
    assert result.steps == 5
    _check("image", _fingerprint(tmp_path / "run"))
