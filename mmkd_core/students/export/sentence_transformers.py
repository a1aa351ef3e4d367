"""Text students as sentence-transformers directories around their transformers encoder (``BertModel``,
``MPNetModel``, ... the student's own architecture)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import MmkdError
from ..text import TextStudent, build_encoder
from .common import (
    WEIGHTS_FILE,
    save_other_heads,
    save_tensors,
    save_tokenizer,
    split_heads,
    text_max_length,
    versions,
    write_json,
    write_meta,
)

logger = logging.getLogger(__name__)

ST_POOLING = "1_Pooling"
ST_DENSE = "2_Dense"
ST_NORMALIZE = "3_Normalize"
ST_FORMAT_VERSION = "3.0.0"  # the sentence-transformers layout written here (read by 3.x through 6.x)


def _write_sentence_transformers(student: TextStudent, directory: Path, max_length: int) -> None:
    """modules.json (Transformer -> Pooling -> Dense -> Normalize) and each module's files, in the layout
    sentence-transformers writes (its legacy ``sentence_transformers.models.*`` names, which every release
    from 2.x to 6.x resolves)."""
    width = student.width
    weight_bias, _ = split_heads(student)
    out_dim = int(weight_bias["weight"].shape[0])
    modules = [
        ("", "sentence_transformers.models.Transformer"),
        (ST_POOLING, "sentence_transformers.models.Pooling"),
        (ST_DENSE, "sentence_transformers.models.Dense"),
        (ST_NORMALIZE, "sentence_transformers.models.Normalize"),  # mmkd-eval compares unit vectors
    ]
    write_json(
        directory / "modules.json",
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)],
    )
    write_json(directory / "sentence_bert_config.json", {"max_seq_length": int(max_length), "do_lower_case": False})
    write_json(
        directory / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": ST_FORMAT_VERSION,
                "transformers": versions()["transformers"],
                "pytorch": torch.__version__,
            },
            "model_type": "SentenceTransformer",
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    pool = student.heads.pool
    write_json(
        directory / ST_POOLING / "config.json",
        {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": pool == "cls",
            "pooling_mode_mean_tokens": pool == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    write_json(
        directory / ST_DENSE / "config.json",
        {
            "in_features": width,
            "out_features": out_dim,
            "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        },
    )
    save_tensors(
        {"linear.weight": weight_bias["weight"], "linear.bias": weight_bias["bias"]},
        directory / ST_DENSE / WEIGHTS_FILE,
    )
    (directory / ST_NORMALIZE).mkdir(exist_ok=True)


def save_text_student(
    student: TextStudent, directory: str | Path, tokenizer: Any = None, max_seq_length: int | None = None
) -> Path:
    """Write a text student as a sentence-transformers directory around its transformers encoder.

    ``SentenceTransformer(directory).encode(texts)`` gives the student's sentence embedding exactly as
    ``mmkd-eval`` computes it (pooled as trained, the pooled projection, L2 normalisation), and
    ``AutoModel.from_pretrained(directory)`` the encoder, of the student's own architecture (``BertModel``,
    ``MPNetModel``, ...; ``last_hidden_state``). Where the architecture has a pooler, which the student does
    not, it is written as tanh(identity) of the CLS state so that loading reports no missing weights; it was
    never trained and the sentence embedding does not use it.

    Args:
        student: A text student.
        directory: Created if needed; existing files of the same names are replaced.
        tokenizer: A transformers tokenizer to save alongside (the teacher's). Without it the directory loads
            with ``AutoModel`` and :func:`load_student`, not with sentence-transformers.
        max_seq_length: The longest input the student should read (e.g. the store's ``preprocess.max_length``);
            capped by the position table and the tokenizer's limit. None: those two alone.

    Returns:
        The directory.
    """
    if not isinstance(student, TextStudent):
        raise MmkdError(f"save_text_student: a {student.name!r} student is not a text student")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the caller's random stream
        full = build_encoder(student.bert.config, pooler=True)
    result = full.load_state_dict(student.bert.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("pooler.") for k in result.missing_keys):
        raise MmkdError(f"save_text_student: {type(full).__name__} keys differ: {result}")
    pooler = getattr(full, "pooler", None)
    if pooler is not None:
        with torch.no_grad():
            nn.init.eye_(pooler.dense.weight)
            nn.init.zeros_(pooler.dense.bias)
    full.save_pretrained(str(directory))
    max_length = text_max_length(student.config.max_position, tokenizer, max_seq_length)
    save_tokenizer(tokenizer, directory, max_length)
    if tokenizer is None:
        logger.warning(
            "save_text_student: no tokenizer given; %s loads with AutoModel and load_student, but "
            "sentence-transformers needs the tokenizer files beside it",
            directory,
        )
    _write_sentence_transformers(student, directory, max_length)
    files = {"model": WEIGHTS_FILE, "pooled_head": f"{ST_DENSE}/{WEIGHTS_FILE}"}
    _, other = split_heads(student)
    save_other_heads(other, directory, files)
    write_meta(student, directory, "sentence-transformers", files, max_seq_length=max_length)
    return directory
