"""Loading transformers checkpoints for teachers: config, model, tokenizer and preprocessing."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import MmkdError
from .base import ImagePreprocess, TextPreprocess
from .weights import WeightsLocation, hf_weight_files, report_keys, sha256_of

logger = logging.getLogger(__name__)

# eager and sdpa both keep a sample's outputs independent of padding and batch, and give the same targets
# within float tolerance (tests check); sdpa is faster. None: sdpa where the model class has it, else eager
# (see attention_for)
DEFAULT_ATTN = None
# parts of transformers checkpoints a teacher never runs (pretraining heads, poolers, stale buffers)
DROP = (
    "pooler.*",
    "*.pooler.*",
    "cls.*",
    "lm_head.*",
    "vocab_transform.*",
    "vocab_layer_norm.*",
    "vocab_projector.*",
    "*mask_token",
    "*.position_ids",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def checkpoint_dir(location: WeightsLocation, teacher: str) -> Path:
    """The directory of a transformers checkpoint (``config.json`` + weights)."""
    if not (location.path.is_dir() and (location.path / "config.json").is_file()):
        raise MmkdError(
            f"{location.path}: {teacher} reads a transformers checkpoint directory (config.json + "
            "model.safetensors or pytorch_model.bin, as save_pretrained writes); point --weights at one"
        )
    return location.path


def load_config(
    path: Path | None, config_cls: type, overrides: dict[str, Any], teacher: str, model_type: str | None = None
) -> Any:
    """A model config from ``path`` (class defaults when None) with ``overrides`` applied.

    Args:
        path: Checkpoint directory, or None for the config class's defaults (random init).
        config_cls: A transformers config class, or ``AutoConfig``.
        overrides: Config attributes to set; nested configs take dicts (``vision_config={...}``).
        teacher: Named in errors.
        model_type: Required ``config.model_type`` (None: any).

    Raises:
        MmkdError: Wrong model type, or an override that is not a config attribute.
    """
    if path is None:
        config = config_cls()
    else:
        try:
            config = config_cls.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise MmkdError(f"{path / 'config.json'}: not a usable config for {teacher}: {_first_line(e)}") from None
    if model_type is not None and config.model_type != model_type:
        raise MmkdError(
            f"{path}: holds a {config.model_type!r} checkpoint but {teacher} needs {model_type!r}; "
            "point --weights at the right checkpoint (or pick the teacher for that model)"
        )
    _apply(config, overrides, teacher)
    return config


def _apply(config: Any, overrides: dict[str, Any], teacher: str) -> None:
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        if not hasattr(config, key):
            raise MmkdError(
                f"{teacher}: unknown option {key!r} (neither a teacher option nor a {type(config).__name__} attribute)"
            )
        current = getattr(config, key)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            _apply(current, value, teacher)
        else:
            setattr(config, key, value)


def attention_for(model_cls: type, requested: str | None = None) -> str:
    """The attention implementation a teacher asks transformers for: ``requested`` when given (the teacher
    option ``attn_implementation``), else ``"sdpa"`` where transformers has it for ``model_cls``
    (its ``_supports_sdpa``) and ``"eager"`` where it does not (MPNet, FLAVA)."""
    if requested is not None:
        return requested
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def attention_used(model: Any) -> str | None:
    """The attention implementation a loaded transformers model runs (None for other models)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def load_model(
    model_cls: type,
    config: Any,
    path: Path | None,
    *,
    teacher: str,
    attn: str | None = DEFAULT_ATTN,
    init_kwargs: dict[str, Any] | None = None,
    ignore_missing: Iterable[str] = (),
) -> tuple[Any, str]:
    """Build ``model_cls`` from ``config``: random when ``path`` is None, else with the weights in ``path``.

    Args:
        attn: The attention implementation; None chooses it per architecture (:func:`attention_for`).

    Returns:
        The float32 model and the sha256 of the weight files read (``"random"`` when none).

    Raises:
        MmkdError: Unreadable weights, shape mismatches or missing weights (named with the file).
    """
    init_kwargs = init_kwargs or {}
    attn = attention_for(model_cls, attn)
    if path is None:
        return model_cls._from_config(config, dtype=torch.float32, attn_implementation=attn, **init_kwargs), "random"
    files = hf_weight_files(path)
    file = files[0] if len(files) == 1 else path
    try:
        with quiet_transformers_load():
            # mismatches are collected, not raised, so the error can name them
            model, info = model_cls.from_pretrained(
                str(path),
                config=config,
                dtype=torch.float32,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                attn_implementation=attn,
                **init_kwargs,
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise MmkdError(f"{file}: cannot load it into {model_cls.__name__}: {_first_line(e)}") from None
    if info.get("mismatched_keys"):
        key, in_file, in_model = sorted(info["mismatched_keys"])[0]
        raise MmkdError(
            f"{file}: {key} has shape {tuple(in_file)} but the model expects {tuple(in_model)} "
            f"({len(info['mismatched_keys'])} such keys); drop the config overrides that cause it"
        )
    report_keys(info["missing_keys"], info["unexpected_keys"], file=file, drop=DROP, ignore_missing=ignore_missing)
    return model, sha256_of(files)


@contextlib.contextmanager
def quiet_transformers_load() -> Iterator[None]:
    """Silence transformers' own key report and its loading bar: :func:`report_keys` logs the same keys,
    and a bar per teacher load would interleave with the extraction progress bar."""
    from transformers.utils import logging as hf_logging

    log = logging.getLogger("transformers")
    level, bars = log.level, hf_logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def local_tokenizer(path: str | Path, error: str) -> Any:
    """The transformers tokenizer saved in a local directory (never downloaded), padding on the right.

    Args:
        path: The directory ``save_pretrained`` wrote.
        error: The one-line MmkdError when it cannot be read; ``{reason}`` in it becomes the first line of why
            (replaced as text: braces in a path stay as they are).

    Raises:
        MmkdError: ``error``.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MmkdError(error.replace("{reason}", _first_line(e))) from None
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(path: Path, teacher: str) -> Any:
    """The tokenizer saved in a teacher's checkpoint directory, padding on the right."""
    return local_tokenizer(
        path,
        f"{path}: no usable tokenizer for {teacher} ({{reason}}); save the tokenizer next to the weights "
        "(tokenizer.save_pretrained)",
    )


def text_max_length(requested: Any, limit: int, teacher: str) -> int:
    """The tokens a text teacher reads per text: ``requested`` (``--teacher-option max_length=N``) when it
    is a whole number from 2 (a first and a last special token) to ``limit`` (the position table, the
    tokenizer's limit), else ``limit`` when none is requested.

    Raises:
        MmkdError: one line naming the option and the range.
    """
    if requested is None:
        return int(limit)
    if isinstance(requested, bool) or not isinstance(requested, int) or not 2 <= requested <= limit:
        raise MmkdError(f"--teacher-option max_length={requested!r}: {teacher} reads from 2 to {limit} tokens per text")
    return requested


def text_preprocess(tokenizer: Any, path: Path, max_length: int, **extra: Any) -> TextPreprocess:
    """Provenance of tokenization: tokenizer class, max_length, lowercasing, tokenizer files' sha256."""
    files = [path / n for n in _TOKENIZER_FILES if (path / n).is_file()]
    lowercase = getattr(tokenizer, "do_lower_case", None)
    if lowercase is None:
        normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
        lowercase = "Lowercase" in repr(normalizer) if normalizer is not None else None
    return TextPreprocess(
        tokenizer=type(tokenizer).__name__,
        max_length=max_length,
        lowercase=lowercase,
        extra={
            "vocab_size": len(tokenizer),
            "files_sha256": sha256_of(files) if files else None,
            "padding_side": "right",
            **extra,
        },
    )


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest text, truncated at ``max_length``; long tensors."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def image_preprocess(path: Path | None, size: int, default: ImagePreprocess) -> ImagePreprocess:
    """Image preprocessing from a checkpoint's ``preprocessor_config.json``, else ``default`` at ``size``.

    An HF processor resizing to R then centre-cropping C becomes ``crop_pct = C / R``; without the crop it
    resizes straight to the size (``crop_mode="squash"``).
    """
    file = path / "preprocessor_config.json" if path is not None else None
    if file is None or not file.is_file():
        return ImagePreprocess(
            size=size,
            mean=default.mean,
            std=default.std,
            interpolation=default.interpolation,
            crop_pct=default.crop_pct,
            crop_mode=default.crop_mode,
        )
    cfg = json.loads(file.read_text())

    def edge(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("shortest_edge", value.get("height"))
        return int(value) if value is not None else None

    resize = edge(cfg.get("size")) or size
    crop = edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    if (crop or resize) != size:
        logger.warning("%s: images are processed to %d px but the model takes %d px", file, crop or resize, size)
    return ImagePreprocess(
        size=crop or resize,
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        interpolation=_RESAMPLE.get(cfg.get("resample"), default.interpolation),
        crop_pct=crop / resize if crop else 1.0,
        crop_mode="center" if crop else "squash",
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
