"""What every export format shares: file names, the ``mmkd_student.json`` record, safetensors and tokenizer files,
and the split of a student's heads into the pooled projection and the rest."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import MmkdError
from ..base import Student

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "mmkd_student.json"
HEADS_FILE = "mmkd_heads.safetensors"
STATE_FILE = "mmkd_student.safetensors"
WEIGHTS_FILE = "model.safetensors"  # the weights file of transformers, timm and sentence-transformers' Dense
POOLED_PREFIX = "pooled_head."
TEACHERS_DIR = "teachers"  # a student of several teachers: one student directory per further teacher in here


def versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MmkdError(f"{path} is missing: the student directory is incomplete")
    return load_file(str(path))


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def write_meta(
    student: Student, directory: Path, fmt: str, files: dict[str, str], preprocess: Any = None, **extra: Any
) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "student": student.name,
        "format": fmt,
        "files": files,
        "config": asdict(student.config),
        "init": student.init_info,
        "versions": versions(),
        **extra,
    }
    if preprocess is not None:
        meta["preprocess"] = asdict(preprocess) if is_dataclass(preprocess) else dict(preprocess)
    write_json(directory / META_FILE, meta)


def split_heads(student: Student) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the pooled projection as ``{"weight", "bias"}``, every other head parameter by its heads key)."""
    state = student.heads.state_dict()
    pooled = {k[len(POOLED_PREFIX) :]: v for k, v in state.items() if k.startswith(POOLED_PREFIX)}
    return pooled, {k: v for k, v in state.items() if not k.startswith(POOLED_PREFIX)}


def save_other_heads(heads: dict[str, torch.Tensor], directory: Path, files: dict[str, str]) -> None:
    """Write the heads the library format has no place for; a stale file of an earlier export goes."""
    path = directory / HEADS_FILE
    if heads:
        save_tensors(heads, path)
        files["heads"] = HEADS_FILE
    elif path.exists():
        path.unlink()


def text_max_length(max_position: int, tokenizer: Any = None, requested: int | None = None) -> int:
    """The longest input a text student reads: the smallest of its position table, the tokenizer's limit and
    ``requested`` (e.g. the store's ``preprocess.max_length``, what the teacher was given)."""
    limits = [max_position, getattr(tokenizer, "model_max_length", None), requested]
    return min(int(n) for n in limits if n)


def save_tokenizer(tokenizer: Any, directory: Path, max_length: int | None = None) -> None:
    """``tokenizer.save_pretrained``; its ``model_max_length`` becomes the student's limit, so that
    ``AutoTokenizer.from_pretrained(DIR)(texts, truncation=True)`` never exceeds the position table."""
    if tokenizer is None:
        return
    tokenizer.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    if max_length is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        config["model_max_length"] = int(max_length)
        write_json(config_file, config)


class StudentTokenizer:
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, T) long tensors, right-padded to the longest text and
    truncated at ``max_length``: exactly how ``mmkd-eval`` feeds a student, and how a student with its own
    tokenizer reads a store's source texts in training.

    Attributes:
        tokenizer: The transformers tokenizer saved beside the student.
        max_length: The longest input the student reads.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = int(max_length)

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
