"""The text student: the init model's own transformers encoder class (``BertModel``, ``RobertaModel``,
``DistilBertModel``, ``MPNetModel``, ``Data2VecTextModel``, ... whatever ``AutoModel`` builds for its config) at
a chosen depth and without a pooler, initialised randomly or cut from chosen blocks of that model, with its
embedding tables optionally frozen."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import MmkdError
from .base import (
    STUDENTS,
    HeadConfig,
    PredictionHeads,
    Student,
    StudentOutput,
    build_config,
    check_init,
    copy_state,
    describe_init,
    fill_from_init,
    resolve_blocks,
    resolve_init,
    unwrap_init,
)

logger = logging.getLogger(__name__)

# student field -> the transformers config attributes it sets, first present wins (every present one for
# dropout); DistilBERT names its feed-forward width and activation hidden_dim and activation
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "depth": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "num_heads": ("num_attention_heads",),
    "intermediate_size": ("intermediate_size", "hidden_dim"),
    "vocab_size": ("vocab_size",),
    "type_vocab_size": ("type_vocab_size",),
    "layer_norm_eps": ("layer_norm_eps",),
    "hidden_act": ("hidden_act", "activation"),
    "dropout": ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"),
}
# config entries that describe a saved file or a run, not the architecture
NOT_ARCHITECTURE = ("transformers_version", "architectures", "dtype", "torch_dtype", "num_hidden_layers")


@dataclass
class TextStudentConfig(HeadConfig):
    """Architecture of the text student plus its heads (see HeadConfig).

    Attributes:
        depth: Number of encoder layers.
        hidden_size: Width.
        num_heads: Attention heads.
        intermediate_size: Feed-forward width.
        vocab_size: Token vocabulary (must match the teacher's tokenizer).
        max_position: Positions the student reads (its position table has ``position_offset`` more rows).
        type_vocab_size: Rows of the token-type table (architectures that have one).
        layer_norm_eps: Layer-norm epsilon (architectures that set it).
        hidden_act: Feed-forward activation (transformers name).
        dropout: Hidden and attention dropout probability (training only).
        freeze_embeddings: Freeze the token and position tables (``requires_grad`` off); only with weights
            copied from a teacher.
        architecture: The transformers config the encoder is built from (``to_diff_dict()`` with its
            ``model_type``): the init model's, or for a random student the store teacher's. The fields above
            set its depth, widths, vocabulary, position length and dropout. None: a ``BertModel``.
        position_offset: Rows of the position table before position 0's (RoBERTa-family and MPNet models
            number positions from ``pad_token_id + 1``); 0 for BERT.
    """

    pool: str = "mean"
    depth: int = 6
    hidden_size: int = 384
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    dropout: float = 0.1
    freeze_embeddings: bool = False
    architecture: dict[str, Any] | None = None
    position_offset: int = 0

    def __post_init__(self) -> None:
        self.check_heads()
        if self.depth < 1:
            raise MmkdError(f"text student depth={self.depth}: give at least 1 layer")
        if self.hidden_size % self.num_heads:
            raise MmkdError(
                f"text student hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.architecture is not None and "model_type" not in self.architecture:
            raise MmkdError("text student architecture: give a transformers config dict with its model_type")

    def transformers_config(self) -> Any:
        """The transformers config of the encoder: ``architecture`` (a BERT config when None) with this
        student's depth, widths, vocabulary, position length and dropout.

        Raises:
            MmkdError: An unknown model type, or a field set to a value the architecture has no place for.
        """
        from transformers import AutoConfig

        arch = dict(self.architecture or {"model_type": "bert"})
        try:
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        except (ValueError, KeyError) as e:
            raise MmkdError(f"text student architecture: transformers cannot build it ({e})") from None
        defaults = {f.name: f.default for f in fields(TextStudentConfig)}
        for name, keys in CONFIG_KEYS.items():
            value, present = getattr(self, name), [k for k in keys if hasattr(config, k)]
            if not present and value != defaults[name]:
                raise MmkdError(f"text student {name}={value!r}: a {config.model_type} encoder has no such setting")
            for key in present if name == "dropout" else present[:1]:
                setattr(config, key, value)
        config.max_position_embeddings = self.max_position + self.position_offset
        return config


def model_class(config: Any) -> type[nn.Module]:
    """The transformers encoder class ``AutoModel`` builds for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise MmkdError(f"text student: transformers has no encoder model for {config.model_type!r}") from None


def build_encoder(config: Any, pooler: bool = False) -> nn.Module:
    """The encoder class of ``config`` built from it (random weights, float32), with or without its pooler
    where the class has one; attention SDPA where transformers has it for the class, else eager (MPNet)."""
    from ..teachers.hf_common import attention_for

    cls = model_class(config)
    kwargs = {"add_pooling_layer": pooler} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}
    return cls._from_config(config, dtype=torch.float32, attn_implementation=attention_for(cls), **kwargs)


def encoder_layers(model: nn.Module, what: str = "text student") -> tuple[str, nn.ModuleList]:
    """``(name, list)`` of a transformers encoder's layers: its one ModuleList of ``num_hidden_layers`` modules
    (``encoder.layer`` in BERT, RoBERTa, MPNet, data2vec-text; ``transformer.layer`` in DistilBERT)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if n is None or len(found) != 1:
        raise MmkdError(
            f"{what}: cannot find the layer list of {type(model).__name__} (one ModuleList of "
            f"config.num_hidden_layers={n} layers; found {len(found)})"
        )
    return found[0]


class TextStudent(Student):
    """A transformers encoder (no pooler) with prediction heads.

    Attributes:
        bert: The transformers encoder, of the architecture ``config.architecture`` names (a ``BertModel``
            when it names none); ``save_text_student`` writes exactly this model. The attribute keeps the name
            it had when every text student was a ``BertModel``: it is the prefix of the keys of saved training
            checkpoints.
        heads: The PredictionHeads (of the first teacher, when it is trained against several).
        teacher_heads: Each further teacher's name -> its PredictionHeads on the same blocks (empty for a
            student of one teacher; see ``mmkd_core.students.teacher_heads``).
    """

    name = "text"
    modality = "text"

    def __init__(self, config: TextStudentConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.hidden_size
        self.num_layers = config.depth
        self.bert = build_encoder(config.transformers_config())
        self.heads = PredictionHeads(config.hidden_size, config.depth, config)
        self.teacher_heads = nn.ModuleDict()
        if config.freeze_embeddings:
            for table in self.frozen_tables():
                table.weight.requires_grad_(False)

    def frozen_tables(self) -> list[nn.Embedding]:
        """The embedding tables ``freeze_embeddings`` freezes: token and position (not token type)."""
        return [self.bert.get_input_embeddings(), self.bert.embeddings.position_embeddings]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        """Encode right-padded token ids.

        Args:
            pixel_values: Unused; an error if given.
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 at real tokens; None = no padding.
        """
        if input_ids is None or pixel_values is not None:
            raise MmkdError("the text student reads text only: call it with input_ids (and attention_mask)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = list(out.hidden_states[1:])  # [0] is the embedding output
        mask = attention_mask.bool()
        tokens, pooled = self.heads(hidden, out.last_hidden_state, mask)
        return StudentOutput(
            hidden_states=hidden,
            mask=mask,
            last_hidden_state=out.last_hidden_state,
            tokens=tokens,
            pooled=pooled,
            modality="text",
            teachers={name: h(hidden, out.last_hidden_state, mask) for name, h in self.teacher_heads.items()},
        )


def bert_like(init_model: Any, what: str = "text student") -> nn.Module:
    """The BERT-layout encoder in ``init_model`` (``embeddings.word_embeddings`` and ``token_type_embeddings``
    + ``encoder.layer``), which the multimodal student's BERT-layout text tower copies; MPNet has the first and
    the last but keeps its relative position bias in the encoder, which that tower has no place for."""
    model = unwrap_init(init_model)
    if not (
        hasattr(model, "embeddings")
        and hasattr(model.embeddings, "word_embeddings")
        and hasattr(model.embeddings, "token_type_embeddings")
        and hasattr(model, "encoder")
        and hasattr(model.encoder, "layer")
    ):
        raise MmkdError(
            f"{what}: init model {type(model).__name__} is not BERT-like (needs embeddings."
            "word_embeddings and encoder.layer, as BERT, RoBERTa, data2vec-text, MiniLM have)"
        )
    return model


def position_offset(model: nn.Module) -> int:
    """First row of the position table used by position 0: RoBERTa-family and MPNet models start at
    pad_id + 1."""
    padding_idx = getattr(model.embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def encoder_arch(init_model: Any) -> dict[str, Any]:
    """Text-student config values that must (or by default do) match a transformers text encoder: its
    ``architecture`` and ``position_offset``, and the widths, vocabulary and position length it has.

    Raises:
        MmkdError: Not a transformers encoder whose layers and embeddings a student can be cut from.
    """
    model = unwrap_init(init_model)
    config, embeddings = getattr(model, "config", None), getattr(model, "embeddings", None)
    if not (
        hasattr(config, "to_diff_dict")
        and isinstance(model, model_class(config))
        and hasattr(embeddings, "word_embeddings")
        and hasattr(embeddings, "position_embeddings")
    ):
        raise MmkdError(
            f"text student: init model {type(model).__name__} is not a BERT-family text encoder (the class "
            "AutoModel builds for its config, with embeddings.word_embeddings and position_embeddings, as BERT, "
            "RoBERTa, DistilBERT, MPNet, data2vec-text have)"
        )
    encoder_layers(model, f"text student init model {type(model).__name__}")
    offset = position_offset(model)
    values: dict[str, Any] = {
        "architecture": {
            k: v for k, v in config.to_diff_dict().items() if k not in NOT_ARCHITECTURE and not k.startswith("_")
        },
        "position_offset": offset,
        "max_position": config.max_position_embeddings - offset,
    }
    for name, keys in CONFIG_KEYS.items():
        present = [k for k in keys if hasattr(config, k)]
        if present and name not in ("depth", "dropout"):
            values[name] = getattr(config, present[0])
    return values


def init_text_student(student: TextStudent, init_model: Any, blocks: str | Sequence[int] | None = None) -> list[int]:
    """Copy an encoder of the student's own architecture into it: every parameter outside the layer list
    (embeddings, MPNet's ``encoder.relative_attention_bias``, any final norm) and the chosen layers.

    Args:
        student: The text student, built from ``encoder_arch(init_model)``.
        init_model: A transformers text encoder, or a text Teacher wrapping one.
        blocks: Init-model layers to copy into student layers 0..depth-1, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).

    Returns:
        The init model's layer indices copied.
    """
    model = unwrap_init(init_model)
    prefix, init_layers = encoder_layers(model, f"text student init model {type(model).__name__}")
    layers = resolve_blocks("text", blocks, student.config.depth, len(init_layers))
    own = student.bert.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + ".") or (key.startswith("pooler.") and key not in own):
            continue  # layers are copied below; the student has no pooler
        if key in own and "position" in key and value.shape != own[key].shape:
            if any(n > m for n, m in zip(own[key].shape, value.shape, strict=True)):
                raise MmkdError(
                    f"text student max_position={student.config.max_position} is longer than the init model's "
                    f"position table ({key}: {tuple(value.shape)})"
                )
            value = value[tuple(slice(0, n) for n in own[key].shape)]
        state[key] = value
    for i, j in enumerate(layers):
        state.update({f"{prefix}.{i}.{k}": v for k, v in init_layers[j].state_dict().items()})
    copy_state(student.bert, state, f"text student ({type(student.bert).__name__})")
    return layers


@STUDENTS.register("text", "bert")
def create_text_student(
    *,
    init: str = "random",
    init_from: Any = None,
    init_weights: str | None = None,
    init_blocks: str | Sequence[int] | None = None,
    **config: Any,
) -> TextStudent:
    """A text student: a transformers encoder of the init model's architecture (a ``BertModel`` when random
    without an ``architecture``).

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy embeddings and layers from
            ``init_from``.
        init_from: A transformers text encoder (BERT, RoBERTa, DistilBERT, MPNet, data2vec-text, ...), a text
            Teacher, or a text teacher's registered name (e.g. ``"minilm-l6"``, built by
            ``create_teacher(init_from, init_weights)``). Its architecture, widths, vocabulary, position
            length, eps and activation are taken unless given (and must then agree; ``max_position`` may be
            shorter).
        init_weights: Checkpoint for a teacher given by name (None: the teacher's default weights).
        init_blocks: Which init-model layers to copy, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).
        **config: TextStudentConfig fields (a random student of a given architecture: ``architecture``, e.g.
            from :func:`encoder_arch`).

    Raises:
        MmkdError: Unknown option, contradicting options, or an init model that does not fit.
    """
    pretrained = check_init("text", init, init_from)
    init_from = resolve_init(init_from, init_weights)
    if pretrained:
        config = fill_from_init("text", config, encoder_arch(init_from), may_differ=("max_position",))
    elif config.get("freeze_embeddings"):
        raise MmkdError(
            "text student: freeze_embeddings=True freezes tables copied from a teacher; "
            "it needs init='pretrained' with init_from"
        )
    student = TextStudent(build_config(TextStudentConfig, "text", config))
    if pretrained:
        layers = init_text_student(student, init_from, init_blocks)
        student.init_info = {"init": "pretrained", "source": describe_init(init_from), "blocks": layers}
        logger.info("text student: copied embeddings and layers %s from %s", layers, type(student.bert).__name__)
    return student
