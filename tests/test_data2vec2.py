"""data2vec 2.0 image students: fairseq's checkpoint layout (tiny, random values) read safely into a post-norm
ViT whose blocks compute what a from-the-keys reference (plain torch ops, written here) computes; then
mmkd-extract (a tiny random BEiT v2) and mmkd-train --init data2vec2 through the console scripts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmkd_core.errors import MmkdError
from mmkd_core.students import create_student, load_data2vec2, load_student, save_student
from mmkd_core.students.data2vec2 import sincos_positions

D, HEADS, PRENET, MAIN, IMG, PATCH = 32, 4, 2, 2, 32, 16
P = "modality_encoders.IMAGE."
BLOCK_PREFIXES = [f"{P}context_encoder.blocks.{i}." for i in range(PRENET)] + [f"blocks.{i}." for i in range(MAIN)]
SCRIPTS = Path(sysconfig.get_path("scripts"))


def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's / fairseq's get_2d_sincos_pos_embed(dim, grid, cls_token=False), as written there (numpy)."""

    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)
    g = g.reshape([2, 1, grid, grid])
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def fairseq_state(seed: int = 0) -> dict[str, object]:
    """A data2vec 2.0 image model's state dict in fairseq's key layout, random values, with the pretraining
    parts the loader must drop (EMA teacher, decoder)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, object] = {
        P + "local_encoder.proj.weight": r(D, 3, PATCH, PATCH, scale=0.05),
        P + "local_encoder.proj.bias": r(D),
        P + "extra_tokens": r(1, 1, D, scale=1.0),
        P + "fixed_positional_encoder.positions": torch.from_numpy(mae_sincos(D, IMG // PATCH)).float()[None],
        P + "context_encoder.norm.weight": 1 + r(D),
        P + "context_encoder.norm.bias": r(D),
    }
    for pre in BLOCK_PREFIXES:
        for name, shape in (
            ("attn.qkv", (3 * D, D)),
            ("attn.proj", (D, D)),
            ("mlp.fc1", (4 * D, D)),
            ("mlp.fc2", (D, 4 * D)),
        ):
            sd[pre + name + ".weight"] = r(*shape)
            sd[pre + name + ".bias"] = r(shape[0])
        for norm in ("norm1", "norm2"):
            sd[pre + norm + ".weight"] = 1 + r(D)
            sd[pre + norm + ".bias"] = r(D)
    sd[P + "decoder.blocks.0.0.weight"] = r(D, D, 3, 3)
    sd[P + "decoder.proj.weight"] = r(D, D)
    sd["_ema"] = {"blocks.0.norm1.weight": r(D)}  # fairseq stores the EMA teacher's fp32 params under one key
    return sd


def save_checkpoint(path: Path, state: dict[str, object] | None = None, **beside: object) -> Path:
    if not beside:
        beside = {"args": argparse.Namespace(num_heads=HEADS, depth=MAIN, norm_eps=1e-6, layer_norm_first=False)}
    torch.save({"model": fairseq_state() if state is None else state, **beside}, path)
    return path


def reference_blocks(sd: dict[str, object], x: torch.Tensor, pre_norm: bool = False) -> list[torch.Tensor]:
    """Every block's output, from the checkpoint's keys with plain torch ops (pre_norm: what a pre-norm
    implementation of the same weights would give)."""

    def w(key: str) -> torch.Tensor:
        return sd[key]

    def ln(h: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(h, (D,), w(key + ".weight"), w(key + ".bias"), eps=1e-6)

    def attn(h: torch.Tensor, pre: str) -> torch.Tensor:
        b, t, _ = h.shape
        qkv = h @ w(pre + "attn.qkv.weight").T + w(pre + "attn.qkv.bias")
        q, k, v = qkv.reshape(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(dim=-1)
        return (a @ v).transpose(1, 2).reshape(b, t, D) @ w(pre + "attn.proj.weight").T + w(pre + "attn.proj.bias")

    def mlp(h: torch.Tensor, pre: str) -> torch.Tensor:
        h = F.gelu(h @ w(pre + "mlp.fc1.weight").T + w(pre + "mlp.fc1.bias"))
        return h @ w(pre + "mlp.fc2.weight").T + w(pre + "mlp.fc2.bias")

    h = F.conv2d(x, w(P + "local_encoder.proj.weight"), w(P + "local_encoder.proj.bias"), stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + w(P + "fixed_positional_encoder.positions")
    h = torch.cat([w(P + "extra_tokens").expand(x.shape[0], -1, -1), h], dim=1)
    h = ln(h, P + "context_encoder.norm")
    out = []
    for pre in BLOCK_PREFIXES:
        if pre_norm:
            h = h + attn(ln(h, pre + "norm1"), pre)
            h = h + mlp(ln(h, pre + "norm2"), pre)
        else:
            h = h + attn(h, pre)
            r = ln(h, pre + "norm1")
            h = ln(r + mlp(r, pre), pre + "norm2")
        out.append(h)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("d2v2") / "base_imagenet.pt")


def _images(n: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dim,grid", [(32, 2), (32, 3), (768, 14)])
def test_sincos_positions_are_fairseqs(dim, grid):
    np.testing.assert_array_equal(sincos_positions(dim, grid).numpy(), mae_sincos(dim, grid).astype(np.float32))


def test_checkpoint_gives_a_post_norm_student_that_computes_it(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="mmkd_core.students.data2vec2"):
        student = create_student("data2vec2", init="pretrained", init_from=str(ckpt), depth=PRENET + MAIN).eval()
    dropped = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert "_ema" in dropped and P + "decoder.proj.weight" in dropped  # logged, not silent
    c = student.config
    assert (c.embed_dim, c.num_heads, c.patch_size, c.img_size, c.mlp_ratio) == (D, HEADS, PATCH, IMG, 4.0)
    assert student.init_info["blocks"] == [0, 1, 2, 3]
    x = _images()
    sd = fairseq_state()
    want = reference_blocks(sd, x)
    with torch.no_grad():
        out = student(pixel_values=x)
    assert len(out.hidden_states) == PRENET + MAIN and out.hidden_states[0].shape == (2, 1 + (IMG // PATCH) ** 2, D)
    for got, ref in zip(out.hidden_states, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, want[-1], atol=1e-5, rtol=0)  # no norm after the last block
    # a pre-norm reading of the same weights computes something else: the test tells the two apart
    pre = reference_blocks(sd, x, pre_norm=True)
    assert all((got - p).abs().max() > 0.1 for got, p in zip(out.hidden_states, pre, strict=True))


def test_first_k_blocks_are_prenet_then_blocks(ckpt):
    """Depth 3 takes both prenet blocks and the first top-level block, in that order."""
    state, info = load_data2vec2(ckpt)
    assert info["num_blocks"] == PRENET + MAIN and info["prenet_depth"] == PRENET and info["sincos_positions"]
    sd = fairseq_state()
    student = create_student("data2vec2", init="pretrained", init_from=(state, info), depth=3)
    blocks = student.model.blocks
    torch.testing.assert_close(
        blocks[1].mlp.fc2.weight, sd[f"{P}context_encoder.blocks.1.mlp.fc2.weight"], atol=0, rtol=0
    )
    torch.testing.assert_close(blocks[2].attn.qkv.bias, sd["blocks.0.attn.qkv.bias"], atol=0, rtol=0)
    picked = create_student("data2vec2", init="pretrained", init_from=(state, info), depth=1, init_blocks=[3])
    torch.testing.assert_close(picked.model.blocks[0].norm2.weight, sd["blocks.1.norm2.weight"], atol=0, rtol=0)


def test_config_forms_beside_the_weights_load(tmp_path):
    cfg = {"model": {"num_heads": HEADS, "depth": MAIN, "modalities": {"image": {"prenet_depth": PRENET}}}}
    _, info = load_data2vec2(save_checkpoint(tmp_path / "dict.pt", cfg=cfg, args=None))
    assert info["num_heads"] == HEADS and info["num_blocks"] == PRENET + MAIN
    _, info = load_data2vec2(save_checkpoint(tmp_path / "bare.pt", cfg=None))
    assert info["num_heads"] is None
    with pytest.raises(MmkdError, match="records no num_heads.*num_heads=N"):
        create_student("data2vec2", init="pretrained", init_from=str(tmp_path / "bare.pt"), depth=1)
    assert create_student("data2vec2", init="pretrained", init_from=str(tmp_path / "bare.pt"), depth=1, num_heads=4)


def test_omegaconf_cfg_loads(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"model": {"num_heads": HEADS, "depth": MAIN, "modalities": {"image": {"prenet_depth": PRENET}}}}
    )
    _, info = load_data2vec2(save_checkpoint(tmp_path / "omega.pt", cfg=cfg))
    assert info["num_heads"] == HEADS


class Config:  # a class the unpickler must not rebuild
    pass


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_files_with_other_globals_are_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "cls.pt", cfg=Config())
    with pytest.raises(MmkdError) as e:
        load_data2vec2(tmp_path / "cls.pt")
    assert "\n" not in str(e.value) and "cls.pt" in str(e.value) and "Config" in str(e.value)
    Exploit.marker = tmp_path / "ran"
    save_checkpoint(tmp_path / "exploit.pt", cfg=Exploit())
    with pytest.raises(MmkdError) as e:
        load_data2vec2(tmp_path / "exploit.pt")
    assert "\n" not in str(e.value) and "exploit.pt" in str(e.value) and "system" in str(e.value)
    assert not Exploit.marker.exists()  # refused before anything ran


def test_a_missing_block_weight_is_named(tmp_path):
    state = fairseq_state()
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(MmkdError, match=r"missing weights blocks\.1\.mlp\.fc2\.bias"):
        load_data2vec2(save_checkpoint(tmp_path / "hole.pt", state))
    state = fairseq_state()
    state["norm.weight"] = torch.ones(D)  # layer_norm_first's final norm: a pre-norm model
    with pytest.raises(MmkdError, match="pre-norm"):
        load_data2vec2(save_checkpoint(tmp_path / "prenorm.pt", state))


def test_another_image_size_recomputes_the_sincos_positions(ckpt, tmp_path):
    student = create_student("data2vec2", init="pretrained", init_from=str(ckpt), depth=2, img_size=48)
    torch.testing.assert_close(student.model.pos_embed[0], torch.from_numpy(mae_sincos(D, 3)).float())
    assert student(pixel_values=_images(size=48)).hidden_states[0].shape == (2, 10, D)
    state = fairseq_state()
    state[P + "fixed_positional_encoder.positions"] = torch.randn(1, 4, D)  # learned, not the fixed table
    path = save_checkpoint(tmp_path / "learned.pt", state)
    with pytest.raises(MmkdError, match="not the fixed sin-cos table.*img_size=32"):
        create_student("data2vec2", init="pretrained", init_from=str(path), depth=2, img_size=48)


def test_saved_student_loads_back(ckpt, tmp_path):
    from mmkd_core.teachers.base import ImagePreprocess

    student = create_student("data2vec2", init="pretrained", init_from=str(ckpt), depth=2, pooled_dim=16).eval()
    save_student(student, tmp_path / "s", preprocess=ImagePreprocess(size=IMG))
    back = load_student(tmp_path / "s")
    assert back.name == "data2vec2" and back.init_info["blocks"] == [0, 1]
    x = _images()
    with torch.no_grad():
        a, b = student(pixel_values=x), back(pixel_values=x)
    torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
    assert json.loads((tmp_path / "s" / "mmkd_student.json").read_text())["preprocess"]["size"] == IMG


def test_train_from_a_beitv2_store_with_init_data2vec2(ckpt, tmp_path):
    """A BEiT v2 store with the checkpoint's patch grid (32 px in 16 px patches: 4 patches + CLS), then the
    mmkd-train console script: a data2vec2 student from the checkpoint's first two blocks, exported and
    loaded back."""
    from typer.testing import CliRunner

    from mmkd.evaluate.encoders import student_preprocess
    from mmkd.extract.config import ExtractConfig
    from mmkd.extract.run import extract
    from mmkd.train.build import build
    from mmkd.train.cli import app
    from mmkd.train.config import TrainConfig
    from mmkd_core.store import open_store

    store = tmp_path / "beit.zarr"
    beit = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)  # mmkd-extract --teacher-option
    extract(
        ExtractConfig(
            teacher="beitv2",
            random_weights=True,
            teacher_options=beit,
            dataset="shapes",
            dataset_options={"count": 8, "resolution": 32},
            dtype="float32",
            out=store,
        ),
        show_progress=False,
    )
    run = tmp_path / "run"
    common = ["--targets", str(store), "--init", "data2vec2", "--init-weights", str(ckpt), "--depth", "2"]
    # so small a learning rate that three steps leave the copied blocks as they were
    args = [*common, "--steps", "3", "--batch-size", "4", "--lr", "1e-12", "--run-dir", str(run), "--quiet"]
    res = subprocess.run(
        [str(SCRIPTS / "mmkd-train"), *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 0, res.stderr
    record = json.loads((run / "config.json").read_text())
    assert record["student"]["kind"] == "data2vec2" and record["student"]["init"]["blocks"] == [0, 1]
    exported = load_student(run / "student")
    assert student_preprocess(exported, run / "student").size == IMG  # what mmkd-eval renders for it
    sd = fairseq_state()
    for i, pre in enumerate(BLOCK_PREFIXES[:2]):
        for key, value in exported.model.blocks[i].state_dict().items():
            torch.testing.assert_close(value, sd[pre + key], atol=1e-8, rtol=0)
    # the builder's init is the checkpoint's exactly
    cfg = TrainConfig(targets=store, depth=2, init="data2vec2", init_weights=str(ckpt), run_dir=tmp_path / "b")
    built = build(cfg.resolved("data2vec2"), open_store(store))
    assert built.kind == "data2vec2"
    for i, pre in enumerate(BLOCK_PREFIXES[:2]):
        for key, value in built.student.model.blocks[i].state_dict().items():
            torch.testing.assert_close(value, sd[pre + key], atol=0, rtol=0)
    # a pre-norm vit student would compute something else from these blocks: one line, no traceback
    res = CliRunner().invoke(app, [*common, "--student", "vit", "--steps", "1", "--run-dir", str(tmp_path / "v")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    out = res.output.strip().splitlines()
    assert len(out) == 1 and "post-norm" in out[0] and "--student data2vec2" in out[0], out
