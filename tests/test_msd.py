"""MSD end to end: a joint-input teacher (FLAVA), its store of per-modality outputs, and training on it."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd_core.errors import MmkdError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WORDS, save_tiny_bert  # noqa: E402

SCRIPTS = Path(sysconfig.get_path("scripts"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MMKD_PROGRESS_SECONDS": "0"}


def save_tiny_flava(root: Path) -> Path:
    """A tiny random FLAVA (image, text and multimodal encoders 32 wide, 2 layers, 32 px images in 16 px
    patches) with its BERT tokenizer and image processor, saved with save_pretrained as users' are."""
    from transformers import BertTokenizer, FlavaConfig, FlavaImageProcessor, FlavaModel

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    tokenizer.save_pretrained(str(root))
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = FlavaConfig(
        image_config={**small, "image_size": 32, "patch_size": 16},
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 64},
        multimodal_config=small,
        hidden_size=32,
        projection_dim=32,
    )
    torch.manual_seed(0)
    FlavaModel(config).save_pretrained(str(root))
    FlavaImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(root)
    )
    return root


@pytest.fixture(scope="module")
def flava_dir(tmp_path_factory) -> Path:
    return save_tiny_flava(tmp_path_factory.mktemp("flava") / "flava")


@pytest.fixture(scope="module")
def flava(flava_dir):
    from mmkd_core.teachers import create_teacher

    return create_teacher("flava", str(flava_dir))


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / script), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


# ---- the teacher -------------------------------------------------------------------------------------


def test_flava_teacher_loads_from_its_directory_and_records_how_it_removes_a_modality(flava, flava_dir):
    d = flava.describe()
    assert flava.modality == "image_text" and d["source"] == str(flava_dir.resolve())
    assert len(d["weights_sha256"]) == 64 and (d["num_layers"], d["hidden_size"]) == (2, 32)
    assert set(d["removal"]) == {"image", "text"} and "blank" in d["removal"]["image"]
    pre = flava.preprocess
    assert (pre.size, pre.crop_mode, pre.text.tokenizer) == (32, "squash", "BertTokenizer")
    assert flava.empty_text_ids.tolist() == [[2, 3]]  # [CLS] [SEP]: the empty caption
    assert "empty_text_ids" not in flava.state_dict()  # the weights hash stays the weights'


def test_flava_outputs_are_the_multimodal_encoders_and_removal_is_one_method_per_modality(flava):
    enc = flava.tokenize(["a red circle", "a blue square at the top left"])
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = flava(px, **enc)
        # multimodal CLS + image CLS + 4 patches + caption tokens; padding is not a valid step
        assert [h.shape for h in out.hidden_states] == [(2, 6 + enc["input_ids"].shape[1], 32)] * 2
        assert out.mask.sum(1).tolist() == [6 + n for n in enc["attention_mask"].sum(1).tolist()]
        # a sample's output does not depend on the padding around it
        alone = flava(px[:1], **flava.tokenize(["a red circle"]))
        torch.testing.assert_close(alone.hidden_states[-1][0], out.hidden_states[-1][0, : alone.mask.shape[1]])
        both = flava.forward_removed(px, **enc)
        direct = {
            "joint": out,
            "without_image": flava(flava.without_image(px), **enc),
            "without_text": flava(px, **flava.without_text(**enc)),
        }
    assert flava.without_image(px).abs().sum() == 0
    for key, want in direct.items():
        torch.testing.assert_close(both[key].hidden_states[-1], want.hidden_states[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[key].mask, want.mask)
    with pytest.raises(MmkdError, match="joint teacher"):
        flava(px)


def test_flava_without_weights_is_an_error_unless_random_is_asked_for(flava_dir, tmp_path, monkeypatch):
    from mmkd_core.teachers import create_teacher

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MmkdError, match="flava.*--weights"):
        create_teacher("flava")
    with pytest.raises(MmkdError, match="tokenizer"):
        create_teacher("flava", random_init=True)
    random = create_teacher("flava", str(flava_dir), random_init=True)
    assert random.describe()["source"] == "random" and random.weights_sha256.startswith("random:")


# ---- extraction --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint_store(flava_dir, tmp_path_factory) -> Path:
    """Through the console script, as a user runs it: 24 shapes pairs, 2 views, float32 targets."""
    root = tmp_path_factory.mktemp("joint")
    args = ["--teacher", "flava", "--weights", str(flava_dir), "--dataset", "shapes", "--dataset-option", "count=24"]
    args += ["--views", "2", "--pooled-only", "--dtype", "float32", "--batch-size", "16", "--out", "joint.zarr"]
    args += ["--autocast", "none"]  # compared with the teacher's own float32 forward pass
    res = run("mmkd-extract", *args, "--quiet", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "joint.zarr"


def test_joint_store_holds_the_teachers_outputs_with_each_modality_removed(joint_store, flava):
    from mmkd.data import create_dataset
    from mmkd_core.store import open_store
    from mmkd_core.targets import recipe_targets
    from mmkd_core.views import render, view_spec

    reader = open_store(joint_store)
    attrs = reader.attrs
    assert attrs["teacher"] == flava.describe()  # the removal convention is part of the provenance
    assert attrs["recipe"]["pool"] == "teacher_cls" and attrs["recipe"]["tokens"] is False
    assert reader.dims("saliency") == ("sample", "view", "modality") and attrs["msd"]["saliency"] == ["image", "text"]
    data = reader.read(0, len(reader))
    assert data["pooled_without_text"].dtype == data["saliency"].dtype == np.float32
    ds = create_dataset("shapes", count=24)
    spec = view_spec(attrs)
    rows = np.arange(len(reader))
    enc = flava.tokenize([ds.text(int(i)) for i in rows])
    assert data["lengths"].tolist() == enc["attention_mask"].sum(1).tolist()
    np.testing.assert_array_equal(data["input_ids"][:, : enc["input_ids"].shape[1]], enc["input_ids"].numpy())
    for v in range(2):  # view 0 is the eval transform; view 1 a random crop, replayed from its parameters
        px = torch.stack([render(ds.image(int(i)), data["view_params"][i, v], spec) for i in rows])
        with torch.inference_mode():
            outs = {
                "pooled": flava(px, **enc),
                "pooled_without_text": flava(px, **flava.without_text(**enc)),
                "pooled_without_image": flava(flava.without_image(px), **enc),
            }
        want = {k: recipe_targets(o.hidden_states, o.mask, o.embed, attrs["recipe"])[1] for k, o in outs.items()}
        for name, w in want.items():
            np.testing.assert_allclose(data[name][:, v], w.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        cos = torch.nn.functional.cosine_similarity
        saliency = [1 - cos(want["pooled"], want[k], dim=-1) for k in ("pooled_without_image", "pooled_without_text")]
        np.testing.assert_allclose(data["saliency"][:, v], torch.stack(saliency, -1).numpy(), rtol=1e-5, atol=1e-6)
    # removing a modality changes the output, by different amounts in different pairs
    assert data["saliency"].min() > 0 and data["saliency"][..., 0].std() > 0.01


def test_joint_store_refuses_token_targets(flava_dir, tmp_path):
    from typer.testing import CliRunner

    from mmkd.extract.cli import app

    args = ["--teacher", "flava", "--weights", str(flava_dir), "--dataset-option", "count=4", "--out"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "t.zarr"), "--quiet"])
    assert res.exit_code == 2 and "--pooled-only" in res.output and "Traceback" not in res.output


# ---- training ----------------------------------------------------------------------------------------

TINY = ["width=32", "num_heads=2", "text_num_heads=2", "image_depth=1"]


def _cfg(store: Path, run_dir: Path, **loss_options):
    from mmkd.train.config import TrainConfig

    return TrainConfig(
        targets=store,
        loss="msd=1",
        loss_options=loss_options,
        student_options={k: int(v) for k, v in (o.split("=") for o in TINY)},
        steps=4,
        batch_size=8,
        run_dir=run_dir,
        progress=False,
    )


def test_mmkd_train_msd_end_to_end(joint_store, tmp_path):
    import json

    from typer.testing import CliRunner

    from mmkd.train.cli import app

    args = ["--targets", str(joint_store), "--loss", "msd=1", "--steps", "4", "--batch-size", "8"]
    for option in TINY:
        args += ["--student-option", option]
    res = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["msd"]) for r in rows)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["student"]["kind"] == "multimodal" and cfg["loss_options"]["msd_mode"] == "sample"
    assert cfg["student"]["config"]["img_size"] == 32  # it reads the stored views at the teacher's size
    assert (tmp_path / "run" / "student" / "tokenizer_config.json").exists()  # the teacher's tokenizer, exported
    assert "i2t_r1" in res.output  # and the exported student was evaluated (held-out shapes retrieval)


@pytest.mark.parametrize(
    "options", [{"msd_mode": "dataset"}, {"msd_mode": "fixed", "msd_fixed": {"image": 3, "text": 1}}]
)
def test_msd_trains_with_each_weighting(joint_store, tmp_path, options):
    from mmkd.train.loop import train

    result = train(_cfg(joint_store, tmp_path / "run", **options))
    assert result.steps == 4 and all(np.isfinite(result.losses))


def test_msd_weights_per_sample_by_the_whole_store_or_fixed(joint_store, tmp_path):
    """The msd value of one real batch, computed by hand from the stored arrays for each rule."""
    from mmkd.train.build import build, loss_inputs
    from mmkd_core.dataset import StoreDataset
    from mmkd_core.losses import build_loss
    from mmkd_core.store import open_store

    reader = open_store(joint_store)
    cfg = _cfg(joint_store, tmp_path / "run").resolved("multimodal")
    built = build(cfg, reader)
    student = built.student.eval()
    batch = next(iter(StoreDataset(joint_store, 8, seed=3, source=built.source, targets="float32")))
    with torch.no_grad():
        b = loss_inputs(built, student, batch, "cpu")
    data = reader.read(0, len(reader))
    i, v = batch["index"].numpy(), batch["view"].numpy()
    # the student's image-only output is taught the teacher's output given the image alone, and so on
    torch.testing.assert_close(b.teacher_by_modality["image"], torch.from_numpy(data["pooled_without_text"][i, v]))
    torch.testing.assert_close(b.teacher_by_modality["text"], torch.from_numpy(data["pooled_without_image"][i, v]))
    with torch.no_grad():
        joint = student.forward_joint(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).pooled
    torch.testing.assert_close(b.joint, joint)

    def mse(s, t):
        return ((s - torch.as_tensor(t)) ** 2).mean(-1)

    l_joint = mse(joint, data["pooled"][i, v]).mean()
    l_image = mse(b.pooled["image"], data["pooled_without_text"][i, v])
    l_text = mse(b.pooled["text"], data["pooled_without_image"][i, v])
    sal = torch.from_numpy(data["saliency"][i, v]).double()
    whole = torch.from_numpy(data["saliency"].reshape(-1, 2)).double().mean(0)  # every sample and view
    want = {}
    for mode, s in (("sample", sal), ("dataset", whole.expand_as(sal)), ("batch", sal.mean(0).expand_as(sal))):
        w = s / s.sum(-1, keepdim=True)
        want[mode] = float(l_joint + (w[:, 0] * l_image + w[:, 1] * l_text).mean())
    want["fixed"] = float(l_joint + (0.75 * l_image + 0.25 * l_text).mean())
    fixed = {"image": 3, "text": 1}
    got = {m: build_loss("msd", msd_mode=m, msd_fixed=fixed)(b)[1]["msd"] for m in ("sample", "dataset", "fixed")}
    for mode in got:
        assert got[mode] == pytest.approx(want[mode], rel=1e-5), mode
    # the rules differ on this batch, so a wrong rule fails above
    assert abs(want["sample"] - want["dataset"]) > 1e-4 * want["sample"]
    assert abs(want["dataset"] - want["batch"]) > 1e-4 * want["dataset"]
    # msd_joint=0: the modality terms alone
    assert build_loss("msd", msd_joint=0)(b)[1]["msd"] == pytest.approx(want["sample"] - float(l_joint), rel=1e-5)


def test_msd_without_per_modality_outputs_names_the_store_that_has_them(tmp_path):
    from typer.testing import CliRunner

    from mmkd.extract.cli import app as extract
    from mmkd.train.cli import app as train

    bert = save_tiny_bert(tmp_path / "bert")
    store = tmp_path / "text.zarr"
    args = ["--teacher", "bert", "--weights", str(bert), "--dataset-option", "count=16", "--pooled-only"]
    res = CliRunner().invoke(extract, [*args, "--out", str(store), "--quiet"])
    assert res.exit_code == 0, res.output
    args = ["--targets", str(store), "--loss", "msd=1", "--steps", "1", "--batch-size", "8"]
    res = CliRunner().invoke(train, [*args, "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "teacher_by_modality" in res.output and "--teacher flava" in res.output
