"""The README's Python blocks run as written, in a folder holding what they name."""

import re
from pathlib import Path

import pytest
import timm
import torch
from conftest import save_tiny_bert

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory, minilm):
    """The stores and runs the README's blocks name, at toy size."""
    root = tmp_path_factory.mktemp("readme")
    q = dict(show_progress=False)
    extract(ExtractConfig(dataset_options={"count": 24}, out=root / "minilm-l6-shapes-train.zarr"), **q)
    bert = save_tiny_bert(root / "bert", layers=2)
    (root / "s.txt").write_text("the cat sat on the mat\na dog ran far\nred circle\nblue square at the top\n" * 4)
    extract(
        ExtractConfig(
            teacher="bert", weights=str(bert), dataset="text", data_root=str(root / "s.txt"), out=root / "wordnet.zarr"
        ),
        **q,
    )
    torch.manual_seed(0)
    beit = root / "beit.pth"
    torch.save({"model": timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY_VIT).state_dict()}, beit)
    extract(
        ExtractConfig(
            teacher="beitv2",
            weights=str(beit),
            teacher_options=TINY_VIT,
            dataset="shapes",
            dataset_options={"count": 8, "resolution": 32},
            out=root / "imagenet.zarr",
        ),
        **q,
    )
    mm = {"width": 32, "num_heads": 2, "text_num_heads": 2}
    for store, run, kw in [
        ("minilm-l6-shapes-train.zarr", "minilm-l6-shapes-train", {"student_options": mm}),
        ("wordnet.zarr", "wordnet", {"depth": 1}),
        ("imagenet.zarr", "imagenet", {"student": "beit", "init": "random", "depth": 1}),
    ]:
        train(
            TrainConfig(targets=root / store, run_dir=root / "runs" / run, steps=1, batch_size=4, progress=False, **kw)
        )
    return root


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(folder, monkeypatch, i):
    monkeypatch.chdir(folder)
    exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), {})
