"""Two CPU ranks under torchrun, through the console script users launch: every student kind with its
default loss, a store smaller than ranks x chunk, and a killed 2-rank run resumed to the same weights."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import WORDS, save_tiny_bert
from safetensors.torch import load_file

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MM_STUDENT = [
    "--student-option",
    "width=32",
    "--student-option",
    "num_heads=2",
    "--student-option",
    "text_num_heads=2",
    "--student-option",
    "img_size=32",
]


def torchrun(*args: str, timeout: float = 300, background: bool = False):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(sysconfig.get_path("scripts")) / "mmkd-train"),
        *args,
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:  # its own process group, so that a kill reaches every rank
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), layers=2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("stores")
    torch.manual_seed(0)
    beit = root / "beit.pth"
    torch.save({"model": timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY_VIT).state_dict()}, beit)
    rng = np.random.default_rng(0)
    (root / "s.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(75)) + "\n"
    )
    common = dict(dtype="float32", show_progress=False)
    extract(
        ExtractConfig(
            teacher="beitv2",
            weights=str(beit),
            teacher_options=TINY_VIT,
            dataset="shapes",
            dataset_options={"count": 30, "resolution": 32},
            views=2,
            out=root / "image.zarr",
            chunk_size=4,
            shard_size=8,
            dtype="float32",
        ),
        show_progress=False,
    )
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert_dir),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=root / "text.zarr",
            chunk_size=4,
            shard_size=8,
            dtype="float32",
        ),
        show_progress=False,
    )
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert_dir),
            dataset="shapes",
            dataset_options={"count": 40},
            out=root / "mm.zarr",
            pooled_only=True,
            dtype="float32",
        ),
        show_progress=False,
    )
    del common
    return root


@pytest.mark.parametrize("kind", ["vit", "beit", "text", "multimodal"])
def test_every_student_kind_trains_on_two_ranks_with_its_default_loss(tmp_path, stores, kind):
    store = {"vit": "image", "beit": "image", "text": "text", "multimodal": "mm"}[kind]
    extra = {
        "vit": ["--init", "random"],
        "beit": ["--init", "random"],
        "text": ["--depth", "1"],
        "multimodal": MM_STUDENT,
    }[kind]
    res = torchrun(
        "--targets",
        str(stores / f"{store}.zarr"),
        "--student",
        kind,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--run-dir",
        str(tmp_path / "run"),
        *extra,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert cfg["world_size"] == 2 and rows[-1]["step"] == cfg["steps"] == 2 * cfg["steps_per_epoch"]
    assert (res.stdout + res.stderr).count("student saved to") == 1


def test_store_smaller_than_ranks_times_chunk_with_nproc_from_a_users_folder(tmp_path, stores):
    """40 samples in one chunk of the default size: two ranks still split them and step together. Started
    as ``mmkd-train --nproc 2`` from a folder whose own train.py, data/ and extract.py would shadow bare
    top-level packages."""
    from mmkd_core.store import open_store

    assert open_store(stores / "mm.zarr").chunk_size >= 40
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise ImportError('the user data package')\n")
    for name in ("train.py", "extract.py", "evaluate.py"):
        (tmp_path / name).write_text("raise SystemExit('the user script ran')\n")
    cmd = [
        str(Path(sysconfig.get_path("scripts")) / "mmkd-train"),
        "--nproc",
        "2",
        "--targets",
        str(stores / "mm.zarr"),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--run-dir",
        "run",
        "--quiet",
        *MM_STUDENT,
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    # 20 samples per rank in full batches of 8 (contrastive losses drop the short one)
    assert cfg["steps_per_epoch"] == 2 and cfg["steps"] == 6


def _weights(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_killed_two_rank_run_resumes_to_the_same_weights(tmp_path, stores):
    args = [
        "--targets",
        str(stores / "text.zarr"),
        "--depth",
        "1",
        "--batch-size",
        "4",
        "--steps",
        "60",
        "--ckpt-every",
        "5",
    ]
    full = torchrun(*args, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]

    run_dir = tmp_path / "killed"
    proc = torchrun(*args, "--run-dir", str(run_dir), background=True)
    first = run_dir / "checkpoints" / "step_00000005"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # kill -9 the launcher and every rank (torchrun starts the ranks in sessions of their own)
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
    proc.wait()
    while subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).returncode == 0:
        time.sleep(0.05)
    from mmkd.train.checkpoint import latest_checkpoint

    killed_at = int(latest_checkpoint(run_dir).name.removeprefix("step_"))
    assert killed_at < 60, "the run finished before it could be killed"
    res = torchrun("--targets", str(stores / "text.zarr"), "--run-dir", str(run_dir), "--resume")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
