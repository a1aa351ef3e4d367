import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    # The environment must say it before Python starts (transformers reads it at import); say so loudly.
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise pytest.UsageError("run the tests with HF_HUB_OFFLINE=1 set in the environment")


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" must never pass silently
    if session.testscollected == 0 and exitstatus == 5:
        session.exitstatus = 1


# vocabulary of the tiny BERT models tests build: enough for their sentences, shapes captions and probes
WORDS = (
    "a the cat dog sat on mat ran far red blue green circle square triangle star cross in at top left right "
    "center bottom and photo of is there are picture shows he she man woman doctor nurse small big runs jumps "
    "over lazy fox"
).split()


def save_tiny_bert(root: Path, layers: int = 2) -> Path:
    """A tiny random BERT and its tokenizer saved to ``root`` with save_pretrained, as users' checkpoints are."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"))
    tokenizer.save_pretrained(str(root))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(root))
    return root


def save_tiny_beitv2(path: Path, **arch) -> Path:
    """A tiny random timm BEiT v2 (architecture options ``arch``) saved as the release does: ``{"model": state}``."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0, **arch)
    torch.save({"model": model.state_dict()}, path)
    return path


def save_tiny_clip(root: Path, image_size: int = 16, patch_size: int = 8, max_position: int = 48) -> Path:
    """A tiny random CLIP with its letter-level tokenizer and image processor, saved as users' checkpoints are."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(vocab_size=len(vocab), max_position_embeddings=max_position, bos_token_id=0, eos_token_id=1)
    config = CLIPConfig(
        text_config=dict(**text, pad_token_id=1, **tiny),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tiny),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    size = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="session")
def minilm():
    from mmkd_core.teachers import create_teacher

    return create_teacher("minilm-l6")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA
