"""Saving and loading students.

Text and image students are written in their model library's own format so other tools load them without
mmkd: a text student is a transformers ``BertModel`` directory (``AutoModel.from_pretrained``), an image
student a timm directory (``timm.create_model("local-dir:DIR", pretrained=True)``). Next to it go
``mmkd_student.json`` (name, resolved config, init provenance, versions) and ``mmkd_heads.safetensors`` (the
prediction heads), which :func:`load_student` reads to rebuild the whole student. Multimodal students have no
outside format: their whole state is ``mmkd_student.safetensors``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MmkdError
from .base import Student
from .multimodal import MultimodalStudent, MultimodalStudentConfig
from .text import TextStudent, TextStudentConfig
from .vision import BeitStudent, BeitStudentConfig, TimmStudent, VitStudent, VitStudentConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "mmkd_student.json"
HEADS_FILE = "mmkd_heads.safetensors"
STATE_FILE = "mmkd_student.safetensors"
TIMM_WEIGHTS = "model.safetensors"

_CLASSES: dict[str, tuple[type[Student], type]] = {
    "text": (TextStudent, TextStudentConfig),
    "vit": (VitStudent, VitStudentConfig),
    "beit": (BeitStudent, BeitStudentConfig),
    "multimodal": (MultimodalStudent, MultimodalStudentConfig),
}


def _versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MmkdError(f"{path} is missing: the student directory is incomplete")
    return load_file(str(path))


def _write_meta(student: Student, directory: Path, fmt: str, files: dict[str, str], preprocess: Any = None) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "student": student.name,
        "format": fmt,
        "files": files,
        "config": asdict(student.config),
        "init": student.init_info,
        "versions": _versions(),
    }
    if preprocess is not None:
        meta["preprocess"] = asdict(preprocess) if is_dataclass(preprocess) else dict(preprocess)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def save_text_student(student: TextStudent, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a text student as a transformers ``BertModel`` directory plus mmkd's heads and metadata.

    ``AutoModel.from_pretrained(directory)`` gives the student's ``last_hidden_state``. The ``BertModel``
    pooler, which the student does not have, is written as tanh(identity) of the CLS state so that loading
    reports no missing weights; it was never trained.

    Args:
        student: A text student.
        directory: Created if needed; existing files of the same names are replaced.
        tokenizer: A transformers tokenizer to save alongside (the teacher's), or None.

    Returns:
        The directory.
    """
    from transformers import BertModel

    if not isinstance(student, TextStudent):
        raise MmkdError(f"save_text_student: a {student.name!r} student is not a text student")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = BertModel._from_config(student.bert.config, dtype=torch.float32, add_pooling_layer=True)
    result = full.load_state_dict(student.bert.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("pooler.") for k in result.missing_keys):
        raise MmkdError(f"save_text_student: BertModel keys differ: {result}")
    with torch.no_grad():
        nn.init.eye_(full.pooler.dense.weight)
        nn.init.zeros_(full.pooler.dense.bias)
    full.save_pretrained(str(directory))
    _save_tokenizer(tokenizer, directory)
    _save_tensors(student.heads.state_dict(), directory / HEADS_FILE)
    _write_meta(student, directory, "transformers", {"model": "model.safetensors", "heads": HEADS_FILE})
    return directory


def _data_config(preprocess: Any, in_chans: int) -> dict[str, Any] | None:
    """timm data config from an ImagePreprocess (or a dict already in timm's terms)."""
    if preprocess is None or isinstance(preprocess, dict):
        return preprocess
    return {
        "input_size": (in_chans, preprocess.size, preprocess.size),
        "interpolation": preprocess.interpolation,
        "mean": tuple(preprocess.mean),
        "std": tuple(preprocess.std),
        "crop_pct": preprocess.crop_pct,
        "crop_mode": preprocess.crop_mode,
    }


def save_vit_student(student: TimmStudent, directory: str | Path, preprocess: Any = None) -> Path:
    """Write a vit or beit student as a timm directory (``config.json`` with architecture and model args,
    ``model.safetensors``) plus mmkd's heads and metadata. :func:`load_exported_vit` reads it with timm alone.

    Args:
        student: A vit or beit student.
        directory: Created if needed.
        preprocess: The teacher's ImagePreprocess (or a timm data-config dict), recorded as the model's
            ``pretrained_cfg`` so timm's ``resolve_data_config`` gives the student's input pipeline.

    Returns:
        The directory.
    """
    from timm.models import save_for_hf

    if not isinstance(student, TimmStudent):
        raise MmkdError(f"save_vit_student: a {student.name!r} student is not a vit or beit student")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # the arch's own pretrained tag/licence describe weights this student never had
    model_config = {"pretrained_cfg": {"tag": "mmkd_student", "license": None}}
    save_for_hf(
        student.model,
        str(directory),
        model_config=model_config,
        safe_serialization=True,
        data_config=_data_config(preprocess, student.config.in_chans),
    )
    _save_tensors(student.heads.state_dict(), directory / HEADS_FILE)
    _write_meta(student, directory, "timm", {"model": TIMM_WEIGHTS, "config": "config.json", "heads": HEADS_FILE})
    return directory


def save_student(student: Student, directory: str | Path, *, tokenizer: Any = None, preprocess: Any = None) -> Path:
    """Write any student: text and image students in their library's format (see the module docstring),
    multimodal students as one safetensors state dict.

    Args:
        student: The student.
        directory: Created if needed.
        tokenizer: Saved alongside when given (text and multimodal students).
        preprocess: Image preprocessing: in the timm config for image students (see
            :func:`save_vit_student`), in ``mmkd_student.json`` for multimodal students.

    Returns:
        The directory.
    """
    if isinstance(student, TextStudent):
        return save_text_student(student, directory, tokenizer)
    if isinstance(student, TimmStudent):
        return save_vit_student(student, directory, preprocess)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(student.state_dict(), directory / STATE_FILE)
    _save_tokenizer(tokenizer, directory)
    _write_meta(student, directory, "mmkd", {"state": STATE_FILE}, preprocess)
    return directory


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MmkdError(f"{what}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")


def load_student(directory: str | Path) -> Student:
    """Rebuild a student written by :func:`save_student` (or the format-specific savers), in eval mode.

    Raises:
        MmkdError: Not a student directory, an unknown format version or student, or weights that do not fit.
    """
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise MmkdError(f"{directory} is not a saved student: {META_FILE} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise MmkdError(f"{meta_file}: format_version {meta.get('format_version')!r}; this mmkd reads {FORMAT_VERSION}")
    if meta.get("student") not in _CLASSES:
        raise MmkdError(f"{meta_file}: unknown student {meta.get('student')!r}")
    cls, config_cls = _CLASSES[meta["student"]]
    student = cls(config_cls(**meta["config"]))
    student.init_info = meta.get("init", {})
    what = f"{directory}: saved {meta['student']} student"
    if isinstance(student, TextStudent):
        from transformers import BertModel

        from ..teachers.hf_common import quiet_transformers_load

        with quiet_transformers_load():  # the strict load below reports any key that does not fit
            bert = BertModel.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
        state = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
        _strict_load(student.bert, state, what)
    elif isinstance(student, TimmStudent):
        _strict_load(student.model, _load_tensors(directory / TIMM_WEIGHTS), what)
    if isinstance(student, TextStudent | TimmStudent):
        _strict_load(student.heads, _load_tensors(directory / HEADS_FILE), what)
    else:
        _strict_load(student, _load_tensors(directory / STATE_FILE), what)
    return student.eval()


def load_exported_vit(directory: str | Path) -> nn.Module:
    """The timm model of an exported vit/beit student, built by timm alone (eval mode): the equivalent of
    ``timm.create_model(config["architecture"], pretrained=False, **config["model_args"])`` followed by
    ``load_state_dict`` of ``model.safetensors``."""
    import timm

    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise MmkdError(f"{directory} is not an exported image student: config.json is missing")
    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
