"""BEiT v2 teacher: tiny timm Beit models saved in the layouts users have, loaded back via create_teacher."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from mmkd_core.errors import MmkdError
from mmkd_core.teachers import create_teacher

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PT1K_LAYOUT = dict(
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    use_abs_pos_emb=False,
    global_pool="token",
    num_classes=0,
    init_values=0.1,
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # rel-pos tables start at zero and layer scales at 0.1: perturb so a mis-loaded tensor shows
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _reference(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, CLS first, computed by hand from timm's modules."""
    h = model.patch_embed(x)
    h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], dim=1)
    if model.pos_embed is not None:
        h = h + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    out = []
    for blk in model.blocks:
        h = blk(h, shared_rel_pos_bias=shared)
        out.append(h)
    return out


@pytest.fixture(scope="module")
def pt1k_model() -> torch.nn.Module:
    return _perturbed(timm.create_model("beitv2_base_patch16_224", pretrained=False, **TINY, **PT1K_LAYOUT))


def _pt1k_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BEiT v2 release layout: timm's keys + the index buffer + pretraining-only parts."""
    sd = dict(model.state_dict())
    sd["rel_pos_bias.relative_position_index"] = model.rel_pos_bias.relative_position_index.clone()
    sd["mask_token"] = torch.randn(1, 1, 32)
    sd["lm_head.weight"] = torch.randn(64, 32)
    sd["lm_head.bias"] = torch.randn(64)
    for k, v in model.blocks[0].state_dict().items():
        sd[f"cls_pt_layers.0.{k}"] = v.clone()
    return sd


@pytest.fixture(scope="module")
def pt1k_file(pt1k_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("beit") / "beitv2_tiny_pt1k.pth"
    torch.save({"model": _pt1k_state(pt1k_model)}, path)
    return str(path)


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_matches(teacher, model) -> None:
    x = _images()
    with torch.inference_mode():
        out = teacher(pixel_values=x)
        ref = _reference(model, x)
    assert len(out.hidden_states) == teacher.num_layers == 2
    for h, r in zip(out.hidden_states, ref, strict=True):
        assert h.shape == (3, 1 + 16, 32)
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, 17) and out.mask.all()
    assert out.embed is None


def test_pt1k_release_layout_loads_and_matches(pt1k_model, pt1k_file, caplog):
    with caplog.at_level(logging.INFO, logger="mmkd_core.teachers"):
        teacher = create_teacher("beitv2", weights=pt1k_file, **TINY)
    _assert_matches(teacher, pt1k_model)
    assert teacher.model.rel_pos_bias is not None and teacher.model.pos_embed is None
    dropped = [r for r in caplog.records if r.levelno == logging.INFO and "dropped" in r.getMessage()]
    assert dropped and all(s in dropped[0].getMessage() for s in ("mask_token", "lm_head", "cls_pt_layers"))
    assert teacher.weights_sha256 == hashlib.sha256(open(pt1k_file, "rb").read()).hexdigest()
    assert teacher.source == pt1k_file
    assert teacher.modality == "image" and teacher.hidden_size == 32
    pre = teacher.preprocess
    assert (pre.size, pre.interpolation, pre.mean, pre.std) == (
        32,
        "bicubic",
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )


def test_teacher_is_frozen_float32_eval(pt1k_file):
    teacher = create_teacher("beitv2", weights=pt1k_file, **TINY)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad and p.dtype == torch.float32 for p in params)


def test_outputs_do_not_depend_on_batch(pt1k_file):
    teacher = create_teacher("beitv2", weights=pt1k_file, **TINY)
    x = _images(5)
    with torch.inference_mode():
        full = teacher(pixel_values=x).hidden_states
        assert len(full) == TINY["depth"]
        for i in (0, 3):
            alone = teacher(pixel_values=x[i : i + 1]).hidden_states
            pair = teacher(pixel_values=x[i : i + 2]).hidden_states
            for f, a, p in zip(full, alone, pair, strict=True):
                torch.testing.assert_close(a[0], f[i], atol=1e-5, rtol=0)
                torch.testing.assert_close(p[0], f[i], atol=1e-5, rtol=0)


def test_timm_safetensors_per_block_tables(tmp_path, caplog):
    model = _perturbed(timm.create_model("beitv2_base_patch16_224", pretrained=False, **TINY))
    path = tmp_path / "beitv2_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger="mmkd_core.teachers"):
        teacher = create_teacher("beitv2", weights=str(path), **TINY)
    _assert_matches(teacher, model)
    assert teacher.model.blocks[0].attn.relative_position_bias_table is not None
    assert any("head.*" in r.getMessage() for r in caplog.records)  # the classifier is dropped, not silent


def test_timm_hub_directory_and_hub_cache(tmp_path, monkeypatch):
    model = _perturbed(timm.create_model("beitv2_base_patch16_224", pretrained=False, **TINY))
    save_for_hf(model, tmp_path / "export", safe_serialization=True)
    teacher = create_teacher("beitv2", weights=str(tmp_path / "export"))  # architecture from config.json
    _assert_matches(teacher, model)

    repo = "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k"  # timm's default tag for the model
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(tmp_path / "export", repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cached = create_teacher("beitv2")
    assert cached.source == f"hf-hub:{repo}@{COMMIT}"
    assert cached.weights_sha256 == teacher.weights_sha256
    _assert_matches(cached, model)


def test_missing_block_weight_is_named(pt1k_model, tmp_path):
    sd = _pt1k_state(pt1k_model)
    del sd["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(MmkdError, match=r"blocks\.1\.mlp\.fc2\.weight") as err:
        create_teacher("beitv2", weights=str(path), **TINY)
    assert "broken.pth" in str(err.value)


def test_architecture_mismatch_is_an_error(pt1k_file):
    with pytest.raises(MmkdError, match="cls_token has shape"):
        create_teacher("beitv2", weights=pt1k_file, **{**TINY, "embed_dim": 48})
    with pytest.raises(MmkdError, match="has 2 blocks but the model has depth 1"):
        create_teacher("beitv2", weights=pt1k_file, **{**TINY, "depth": 1})
    with pytest.raises(MmkdError, match="unexpected keyword|cannot build"):
        create_teacher("beitv2", weights=pt1k_file, **TINY, no_such_option=3)


def test_no_weights_is_an_error_unless_random(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MmkdError, match="--weights PATH.*hub cache.*random_init=True"):
        create_teacher("beitv2", **TINY)
    with caplog.at_level(logging.WARNING):
        teacher = create_teacher("beitv2", random_init=True, **TINY)
    assert teacher.source == "random" and teacher.weights_sha256.startswith("random:")
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)
    with torch.inference_mode():
        assert len(teacher(pixel_values=_images(1)).hidden_states) == 2
