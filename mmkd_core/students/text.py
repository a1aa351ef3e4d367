"""The text student: a transformers ``BertModel`` of a chosen depth, initialised randomly or from the first
blocks of a BERT-family teacher, with the teacher's embedding tables optionally frozen."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class TextStudentConfig(HeadConfig):
    """Architecture of the text student (a ``BertModel``) plus its heads (see HeadConfig).

    Attributes:
        depth: Number of encoder layers.
        hidden_size: Width.
        num_heads: Attention heads.
        intermediate_size: Feed-forward width.
        vocab_size: Token vocabulary (must match the teacher's tokenizer).
        max_position: Length of the position table.
        type_vocab_size: Rows of the token-type table (1 for RoBERTa-family teachers).
        layer_norm_eps: Layer-norm epsilon.
        hidden_act: Feed-forward activation (transformers name).
        dropout: Hidden and attention dropout probability (training only).
        freeze_embeddings: Freeze the token and position tables (``requires_grad`` off); only with weights
            copied from a teacher.
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

    def __post_init__(self) -> None:
        self.check_heads()
        if self.depth < 1:
            raise MmkdError(f"text student depth={self.depth}: give at least 1 layer")
        if self.hidden_size % self.num_heads:
            raise MmkdError(
                f"text student hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )

    def bert_config(self) -> Any:
        """The transformers ``BertConfig`` of this student."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.depth,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
        )


class TextStudent(Student):
    """A ``BertModel`` (no pooler) with prediction heads.

    Attributes:
        bert: The transformers ``BertModel``; ``save_text_student`` writes exactly this model.
        heads: The PredictionHeads.
    """

    name = "text"
    modality = "text"

    def __init__(self, config: TextStudentConfig) -> None:
        super().__init__()
        from transformers import BertModel

        self.config = config
        self.width = config.hidden_size
        self.num_layers = config.depth
        self.bert = BertModel._from_config(
            config.bert_config(), dtype=torch.float32, attn_implementation="sdpa", add_pooling_layer=False
        )
        self.heads = PredictionHeads(config.hidden_size, config.depth, config)
        if config.freeze_embeddings:
            for table in self.frozen_tables():
                table.weight.requires_grad_(False)

    def frozen_tables(self) -> list[nn.Embedding]:
        """The embedding tables ``freeze_embeddings`` freezes: token and position (not token type)."""
        emb = self.bert.embeddings
        return [emb.word_embeddings, emb.position_embeddings]

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
        )


def bert_like(init_model: Any, what: str = "text student") -> nn.Module:
    """The BERT-layout encoder in ``init_model`` (``embeddings.word_embeddings`` and ``token_type_embeddings``
    + ``encoder.layer``; MPNet has the first and the last but keeps its relative position bias in the encoder,
    which a BERT-shaped student has no place for)."""
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
    """First row of the position table used by position 0: RoBERTa-family models start at pad_id + 1."""
    padding_idx = getattr(model.embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def bert_arch(model: nn.Module) -> dict[str, Any]:
    """Text-student config values that must (or by default do) match a BERT-like init model."""
    cfg = model.config
    return {
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position": cfg.max_position_embeddings - position_offset(model),
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
    }


def init_text_from_bert(student: TextStudent, init_model: Any, blocks: str | Sequence[int] | None = None) -> list[int]:
    """Copy embeddings and encoder layers of a BERT-like model into ``student``.

    Args:
        student: The text student; its widths must match the init model's.
        init_model: A transformers BERT-like model, or a text Teacher wrapping one.
        blocks: Init-model layers to copy into student layers 0..depth-1, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).

    Returns:
        The init model's layer indices copied.
    """
    model = bert_like(init_model)
    layers = resolve_blocks("text", blocks, student.config.depth, len(model.encoder.layer))
    src, dst = model.embeddings, student.bert.embeddings
    offset = position_offset(model)
    length = dst.position_embeddings.weight.shape[0]
    if src.position_embeddings.weight.shape[0] < offset + length:
        raise MmkdError(f"text student max_position={length} is longer than the init model's position table")
    copy_state(
        dst,
        {
            "word_embeddings.weight": src.word_embeddings.weight,
            "position_embeddings.weight": src.position_embeddings.weight[offset : offset + length],
            "token_type_embeddings.weight": src.token_type_embeddings.weight,
            "LayerNorm.weight": src.LayerNorm.weight,
            "LayerNorm.bias": src.LayerNorm.bias,
        },
        "text student embeddings",
    )
    for i, j in enumerate(layers):
        copy_state(student.bert.encoder.layer[i], model.encoder.layer[j].state_dict(), f"text student layer {i}")
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
    """A BERT-style text student.

    Args:
        init: ``"random"`` or ``"pretrained"`` (alias ``"teacher"``): copy embeddings and layers from
            ``init_from``.
        init_from: A transformers BERT-like model, a text Teacher, or a text teacher's registered name
            (e.g. ``"minilm-l6"``, built by ``create_teacher(init_from, init_weights)``). Widths, vocabulary,
            position length, eps and activation are taken from it unless given (and must then agree;
            ``max_position`` may be shorter).
        init_weights: Checkpoint for a teacher given by name (None: the teacher's default weights).
        init_blocks: Which init-model layers to copy, or a rule:
            ``"first"`` (default), ``"last"``, ``"ends"`` or ``"spread"`` (see ``base.resolve_blocks``).
        **config: TextStudentConfig fields.

    Raises:
        MmkdError: Unknown option, contradicting options, or an init model that does not fit.
    """
    pretrained = check_init("text", init, init_from)
    init_from = resolve_init(init_from, init_weights)
    if pretrained:
        model = bert_like(init_from)
        config = fill_from_init("text", config, bert_arch(model), may_differ=("max_position",))
    elif config.get("freeze_embeddings"):
        raise MmkdError(
            "text student: freeze_embeddings=True freezes tables copied from a teacher; "
            "it needs init='pretrained' with init_from"
        )
    student = TextStudent(build_config(TextStudentConfig, "text", config))
    if pretrained:
        layers = init_text_from_bert(student, init_from, init_blocks)
        student.init_info = {"init": "pretrained", "source": describe_init(init_from), "blocks": layers}
        logger.info("text student: copied embeddings and layers %s from %s", layers, type(model).__name__)
    return student
