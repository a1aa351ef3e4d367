"""The ``text`` kind: a student in the teacher's own transformers architecture, cut from its blocks (or random
with its architecture, vocabulary and widths), exported as a sentence-transformers directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import MmkdError
from ..export.sentence_transformers import save_text_student
from ..text import TextStudent, TextStudentConfig, bert_like, create_text_student, encoder_arch
from .base import Built, Context, StudentKind, token_heads
from .cross import own_tokenizer_fields

logger = logging.getLogger(__name__)

# the best free truncation of a sentence encoder keeps its first block and its top blocks. MRPC mean at init of
# every rule's cut (docs/results.md): all-MiniLM-L6-v2 to 3 blocks: 0.9492 for 0,4,5 ("ends"), 0.9483 for 3,4,5,
# 0.9392 for 1,3,5 ("spread"), 0.9290 for 0,1,2; all-mpnet-base-v2 (12 blocks) to 6: 0.9407 ends, 0.9365 first,
# 0.9349 spread, 0.8657 last; to 3: 0.9421 ends, 0.9412 first, 0.9203 last, 0.9007 spread. A student is judged
# against the best free cut, and starts from it: from "spread" the MiniLM student reached 0.9473 after an epoch,
# from "ends" 0.9484 (the teacher's score)
INIT_BLOCKS = "ends"
# the sentence embedding is what text students are used for: its direction (cosine) and its place among the
# batch's teacher embeddings (contrastive KD); token targets carry nothing of it (zero mean over tokens). WordNet
# ablation from blocks 0,4,5 (0.9492 at init), 300 steps of 128, MRPC mean: 0.9497 for this pair, 0.9488 for
# token_mse + pooled_mse, 0.9487 for pooled_mse, 0.9394 for token_mse alone, which pulls the last block toward the
# average of all the teacher's (docs/results.md, "Real text distillation")
DEFAULT_LOSS = "pooled_cosine=1,contrastive_kd=1"
# contrastive KD takes its negatives from the batch: 128 of them; 2e-4 for a student cut from the teacher
DEFAULTS = {"init": "teacher", "batch_size": 128, "lr": 2e-4, "epochs": 1.0}

# why a teacher's blocks cannot seed a text student (text kind) or a BERT-layout text tower (multimodal kind)
NOT_BERT = {"clip-text": "a causal, pre-norm CLIP text tower with quick_gelu"}
NOT_TEXT_STUDENT = {"clip-text": "a causal CLIP text tower, pooled at its end-of-text token"}


def check_bert_init(model: Any, flag: str, kind: str = "multimodal") -> None:
    """Refuse, in one line naming an init that works, a text model whose blocks a BERT-layout tower (the
    multimodal student's) would not compute as the model does (image models pass: their kinds check them when
    they copy).

    Args:
        model: The init model (a Teacher).
        flag: The option that named it (``--init teacher``), for the message.
        kind: The student kind, for the message.
    """
    if getattr(model, "modality", "") != "text":
        return
    try:
        bert_like(model)
    except MmkdError:
        what = NOT_BERT.get(model.name, f"{type(model.model).__name__}, not BERT-like")
        raise MmkdError(
            f"{flag}: the blocks of {model.name} ({what}) are not what the {kind} student's BERT blocks "
            "compute; use --init random"
        ) from None


def check_text_init(model: Any, flag: str) -> None:
    """Refuse, in one line, a text model a text student cannot be cut from (it is built as the model's own
    encoder class, so any transformers encoder with embeddings and one list of layers passes)."""
    if getattr(model, "modality", "") != "text":
        return
    reason = NOT_TEXT_STUDENT.get(model.name)
    if reason is None:
        try:
            encoder_arch(model)
            return
        except MmkdError as e:
            reason = str(e)
    raise MmkdError(f"{flag}: a text student cannot be cut from {model.name} ({reason}); use --init random")


def random_text_arch(model: Any) -> dict[str, Any]:
    """Text-student config values a randomly initialised student takes from the store's teacher: all of
    ``encoder_arch`` (its architecture) where a text student can be one, else (CLIP's text tower) a
    ``BertModel`` with the widths and vocabulary of the teacher's config."""
    try:
        return encoder_arch(model)
    except MmkdError:
        c = model.model.config
        logger.info("text student: %s cannot be a text student's architecture; a BertModel of its widths", model.name)
        return {
            "hidden_size": c.hidden_size,
            "num_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position": c.max_position_embeddings,
        }


def text_width(ctx: Context, opts: dict[str, Any]) -> int:
    """The width the text student will have: given, the init model's, or the config's default."""
    if "hidden_size" in opts:
        return int(opts["hidden_size"])
    if ctx.init_model is not None:
        return int(encoder_arch(ctx.init_model)["hidden_size"])
    return TextStudentConfig.hidden_size


def build_text(ctx: Context) -> Built:
    """A text student over the store's token ids, in the teacher's architecture: its blocks (``INIT_BLOCKS``)
    or random with its architecture, vocabulary and widths, mean pooled. Cut from another model with another
    tokenizer, it has that model's architecture and width, a linear pooled head to the store's pooled width,
    and reads the source texts through its own tokenizer."""
    opts: dict[str, Any] = dict(ctx.cfg.student_options)
    if ctx.cfg.init == "random" and ctx.arch_model is not None:
        opts = {**random_text_arch(ctx.arch_model), **opts}
    if "pooled_head" not in opts and text_width(ctx, opts) == ctx.heads["pooled_dim"]:
        # the distilled embedding is the encoder's own mean-pooled output, so every way a user loads the export
        # (AutoModel + mean pooling, sentence-transformers, mmkd) gives what was trained
        opts["pooled_head"] = "identity"
    if ctx.init_model is not None:
        opts.setdefault("init_blocks", INIT_BLOCKS)
    # an init model with another tokenizer than the store's: its own tokens, from the source texts (cross.py)
    feed = own_tokenizer_fields(ctx)
    heads = token_heads(ctx)
    if feed.get("whole_sample_only"):
        heads["token_pred"] = "none"  # the per-token targets are another tokenizer's tokens
    student = create_text_student(
        depth=ctx.depth,
        init=ctx.init,
        init_from=ctx.init_model,
        freeze_embeddings=ctx.cfg.freeze_embeddings,
        pool="mean",
        **heads,
        **opts,
    )
    return Built(
        student=student,
        kind="text",
        tokenizer=getattr(ctx.arch_model, "tokenizer", None),
        image_spec=None,
        preprocess=None,
        **feed,
    )


def export_text(
    student: TextStudent, directory: str | Path, *, tokenizer: Any, preprocess: Any, max_seq_length: int | None
) -> Path:
    """A sentence-transformers directory (``preprocess`` is not used: text students read no images)."""
    return save_text_student(student, directory, tokenizer, max_seq_length)


TEXT = StudentKind(
    name="text",
    model=TextStudent,
    config=TextStudentConfig,
    defaults=DEFAULTS,
    default_loss=DEFAULT_LOSS,
    build=build_text,
    export=export_text,
    init_blocks=INIT_BLOCKS,
    check_init=check_text_init,
)
