"""Training from the store gives the losses of training with the teacher run live on the same views:
the proof that stored views replay exactly and stored targets are the teacher's."""

import importlib.util
from pathlib import Path

import timm
import torch

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train
from mmkd_core.teachers import create_teacher

# the benchmarks' recipe variants (a script folder, not a package)
_spec = importlib.util.spec_from_file_location(
    "recipes", Path(__file__).resolve().parents[1] / "benchmarks" / "recipes.py"
)
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def test_cached_equals_online(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny_beitv2.pth"
    torch.save({"model": timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY).state_dict()}, weights)
    store = tmp_path / "views.zarr"
    extract(
        ExtractConfig(
            teacher="beitv2",
            weights=str(weights),
            teacher_options=TINY,
            dataset="shapes",
            dataset_options={"count": 24, "resolution": 40},
            views=4,
            dtype="float32",
            autocast="none",  # the online teacher below runs in float32: the same targets to 1e-5
            out=store,
            chunk_size=4,
            shard_size=8,
        ),
        show_progress=False,
    )

    def cfg(name):
        return TrainConfig(
            targets=store,
            student="beit",
            init="random",
            depth=2,
            batch_size=8,
            steps=20,
            lr=1e-3,
            loss="token_mse=1,pooled_mse=1",
            run_dir=tmp_path / name,
            progress=False,
            student_options={"num_heads": 2},
        )

    cached = train(cfg("cached"))
    online = recipes.run(recipes.OnlineTeacherRecipe(cfg("online"), create_teacher("beitv2", str(weights), **TINY)))
    assert len(cached.losses) == len(online.losses) == 20
    # 20 steps over 4 views: batches draw different views of the same images
    for a, b in zip(cached.losses, online.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
