"""Saving and loading students.

An exported student gives the embedding ``mmkd-eval`` scores when its own ecosystem's library loads it,
without mmkd:

- **text**: a sentence-transformers directory around a transformers ``BertModel``: Transformer -> Pooling
  (the student's ``mean`` or ``cls``) -> Dense (the trained pooled projection, identity activation) ->
  Normalize. ``SentenceTransformer(DIR).encode(texts)`` is the (unit-length) embedding mmkd evaluates;
  ``AutoModel.from_pretrained(DIR)`` loads the encoder alone (``last_hidden_state``).
- **vit / beit**: a timm directory whose classifier head *is* the pooled projection:
  ``timm.create_model("local-dir:DIR", pretrained=True)(x)`` is the student's pooled prediction (teacher
  space, not normalised) and after ``reset_classifier(0)`` the pooled features. Settings timm cannot
  reproduce exactly (a beit student with ``pool="mean"``: timm's Beit averages the patch tokens without
  CLS; a final norm timm applies after pooling) are exported as features only (``num_classes=0``), with a
  warning; the pooled projection then stays in ``mmkd_heads.safetensors``.
- **multimodal**: no outside format; :func:`load_multimodal` returns ``(model, image_transform, tokenizer)``
  as open_clip's ``create_model_and_transforms`` does.
- **data2vec2**: no outside format either (timm and transformers have no post-norm ViT): the whole student
  as one safetensors state dict, its preprocessing in ``mmkd_student.json``; :func:`load_student` rebuilds it.

Beside the library files go ``mmkd_student.json`` (name, resolved config, init provenance, versions, where
each part lives) and, when there is one, ``mmkd_heads.safetensors`` with the heads the library format has no
place for (the token head). :func:`load_student` reads them to rebuild the whole student. Directories of
format version 1 (every head in ``mmkd_heads.safetensors``) still load.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MmkdError
from .base import Student
from .data2vec2 import Data2Vec2Student, Data2Vec2StudentConfig
from .multimodal import MultimodalStudent, MultimodalStudentConfig
from .text import TextStudent, TextStudentConfig
from .vision import BeitStudent, BeitStudentConfig, TimmStudent, VitStudent, VitStudentConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "mmkd_student.json"
HEADS_FILE = "mmkd_heads.safetensors"
STATE_FILE = "mmkd_student.safetensors"
TIMM_WEIGHTS = "model.safetensors"
ST_POOLING = "1_Pooling"
ST_DENSE = "2_Dense"
ST_NORMALIZE = "3_Normalize"
ST_FORMAT_VERSION = "3.0.0"  # the sentence-transformers layout written here (read by 3.x through 6.x)
_POOLED = "pooled_head."

_CLASSES: dict[str, tuple[type[Student], type]] = {
    "text": (TextStudent, TextStudentConfig),
    "vit": (VitStudent, VitStudentConfig),
    "beit": (BeitStudent, BeitStudentConfig),
    "multimodal": (MultimodalStudent, MultimodalStudentConfig),
    "data2vec2": (Data2Vec2Student, Data2Vec2StudentConfig),  # mmkd's own format, as multimodal
}


def _versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MmkdError(f"{path} is missing: the student directory is incomplete")
    return load_file(str(path))


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def _write_meta(
    student: Student, directory: Path, fmt: str, files: dict[str, str], preprocess: Any = None, **extra: Any
) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "student": student.name,
        "format": fmt,
        "files": files,
        "config": asdict(student.config),
        "init": student.init_info,
        "versions": _versions(),
        **extra,
    }
    if preprocess is not None:
        meta["preprocess"] = asdict(preprocess) if is_dataclass(preprocess) else dict(preprocess)
    _write_json(directory / META_FILE, meta)


def _split_heads(student: Student) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the pooled projection as ``{"weight", "bias"}``, every other head parameter by its heads key)."""
    state = student.heads.state_dict()
    pooled = {k[len(_POOLED) :]: v for k, v in state.items() if k.startswith(_POOLED)}
    return pooled, {k: v for k, v in state.items() if not k.startswith(_POOLED)}


def _save_other_heads(heads: dict[str, torch.Tensor], directory: Path, files: dict[str, str]) -> None:
    """Write the heads the library format has no place for; a stale file of an earlier export goes."""
    path = directory / HEADS_FILE
    if heads:
        _save_tensors(heads, path)
        files["heads"] = HEADS_FILE
    elif path.exists():
        path.unlink()


def text_max_length(max_position: int, tokenizer: Any = None, requested: int | None = None) -> int:
    """The longest input a text student reads: the smallest of its position table, the tokenizer's limit and
    ``requested`` (e.g. the store's ``preprocess.max_length``, what the teacher was given)."""
    limits = [max_position, getattr(tokenizer, "model_max_length", None), requested]
    return min(int(n) for n in limits if n)


def _save_tokenizer(tokenizer: Any, directory: Path, max_length: int | None = None) -> None:
    """``tokenizer.save_pretrained``; its ``model_max_length`` becomes the student's limit, so that
    ``AutoTokenizer.from_pretrained(DIR)(texts, truncation=True)`` never exceeds the position table."""
    if tokenizer is None:
        return
    tokenizer.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    if max_length is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        config["model_max_length"] = int(max_length)
        _write_json(config_file, config)


def _write_sentence_transformers(student: TextStudent, directory: Path, max_length: int) -> None:
    """modules.json (Transformer -> Pooling -> Dense -> Normalize) and each module's files, in the layout
    sentence-transformers writes (its legacy ``sentence_transformers.models.*`` names, which every release
    from 2.x to 6.x resolves)."""
    width = student.width
    weight_bias, _ = _split_heads(student)
    out_dim = int(weight_bias["weight"].shape[0])
    modules = [
        ("", "sentence_transformers.models.Transformer"),
        (ST_POOLING, "sentence_transformers.models.Pooling"),
        (ST_DENSE, "sentence_transformers.models.Dense"),
        (ST_NORMALIZE, "sentence_transformers.models.Normalize"),  # mmkd-eval compares unit vectors
    ]
    _write_json(
        directory / "modules.json",
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)],
    )
    _write_json(directory / "sentence_bert_config.json", {"max_seq_length": int(max_length), "do_lower_case": False})
    _write_json(
        directory / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": ST_FORMAT_VERSION,
                "transformers": _versions()["transformers"],
                "pytorch": torch.__version__,
            },
            "model_type": "SentenceTransformer",
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    pool = student.heads.pool
    _write_json(
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
    _write_json(
        directory / ST_DENSE / "config.json",
        {
            "in_features": width,
            "out_features": out_dim,
            "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        },
    )
    _save_tensors(
        {"linear.weight": weight_bias["weight"], "linear.bias": weight_bias["bias"]},
        directory / ST_DENSE / TIMM_WEIGHTS,
    )
    (directory / ST_NORMALIZE).mkdir(exist_ok=True)


def save_text_student(
    student: TextStudent, directory: str | Path, tokenizer: Any = None, max_seq_length: int | None = None
) -> Path:
    """Write a text student as a sentence-transformers directory around a transformers ``BertModel``.

    ``SentenceTransformer(directory).encode(texts)`` gives the student's sentence embedding exactly as
    ``mmkd-eval`` computes it (pooled as trained, the pooled projection, L2 normalisation), and
    ``AutoModel.from_pretrained(directory)`` the ``BertModel`` (``last_hidden_state``). The ``BertModel``
    pooler, which the student does not have, is written as tanh(identity) of the CLS state so that loading
    reports no missing weights; it was never trained and the sentence embedding does not use it.

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
    from transformers import BertModel

    if not isinstance(student, TextStudent):
        raise MmkdError(f"save_text_student: a {student.name!r} student is not a text student")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the caller's random stream
        full = BertModel._from_config(student.bert.config, dtype=torch.float32, add_pooling_layer=True)
    result = full.load_state_dict(student.bert.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("pooler.") for k in result.missing_keys):
        raise MmkdError(f"save_text_student: BertModel keys differ: {result}")
    with torch.no_grad():
        nn.init.eye_(full.pooler.dense.weight)
        nn.init.zeros_(full.pooler.dense.bias)
    full.save_pretrained(str(directory))
    max_length = text_max_length(student.config.max_position, tokenizer, max_seq_length)
    _save_tokenizer(tokenizer, directory, max_length)
    if tokenizer is None:
        logger.warning(
            "save_text_student: no tokenizer given; %s loads with AutoModel and load_student, but "
            "sentence-transformers needs the tokenizer files beside it",
            directory,
        )
    _write_sentence_transformers(student, directory, max_length)
    files = {"model": TIMM_WEIGHTS, "pooled_head": f"{ST_DENSE}/{TIMM_WEIGHTS}"}
    _, other = _split_heads(student)
    _save_other_heads(other, directory, files)
    _write_meta(student, directory, "sentence-transformers", files, max_seq_length=max_length)
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


# timm's named sizes by width; the exported ``architecture`` is the registered builder of the nearest one
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_BEIT_SIZES = {768: "base", 1024: "large"}


def timm_architecture(student: TimmStudent) -> str:
    """The timm entrypoint an exported vit/beit student names in ``config.json``.

    timm can only build registered names and every one names a size, so this is the builder of the named
    size nearest the student's width (``vit_tiny_patch8_224`` for a narrow ViT with 8 px patches,
    ``vit_small_patch16_224`` for a 384-wide one); ``model_args`` override every value it fixes (depth,
    width, heads, patch and image size), and ``pretrained_cfg.description`` states what the model is. A
    student built under another entrypoint than its kind's default (a CLIP-flavoured ViT: the norm eps and
    activation come from the entrypoint) names that one.
    """
    import timm

    c = student.config
    if c.arch != type(c).__dataclass_fields__["arch"].default:
        return c.arch
    beit = isinstance(student, BeitStudent)
    sizes = _BEIT_SIZES if beit else _VIT_SIZES
    family = "beitv2" if beit else "vit"
    for width in sorted(sizes, key=lambda w: (abs(w - c.embed_dim), w)):
        size = sizes[width]
        for name in (
            f"{family}_{size}_patch{c.patch_size}_{c.img_size}",
            f"{family}_{size}_patch{c.patch_size}_224",
            f"{family}_{size}_patch16_224",
            f"{family}_{size}_patch14_224",
        ):
            if timm.is_model(name):
                return name
    return type(c).arch


def _timm_description(student: TimmStudent, architecture: str, embedding: int | None) -> str:
    c = student.config
    what = (
        f"mmkd {student.name} student: {c.depth} blocks, width {c.embed_dim}, {c.num_heads} heads, "
        f"{c.img_size} px images in {c.patch_size} px patches, built by timm's {architecture} entrypoint "
        "with model_args (not that pretrained model). "
    )
    if embedding is None:
        return what + (
            "num_classes=0 (features only): the distilled projection is in mmkd_heads.safetensors, which "
            "mmkd's load_student applies."
        )
    return what + (
        f"The classifier head is the distilled {student.heads.pool}-pooled projection into the teacher's "
        f"{embedding}-d embedding space, not a classifier: reset_classifier(0) gives the pooled features."
    )


def _embedding_args(student: TimmStudent, out_dim: int) -> tuple[dict[str, Any] | None, str]:
    """timm arguments whose forward is the student's pooled prediction, or (None, why timm cannot)."""
    model, pool = student.model, student.heads.pool
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        return None, "its timm model normalises after pooling (fc_norm), mmkd pools the un-normalised tokens"
    args = dict(student.config.model_args(), num_classes=out_dim)
    if pool == "cls":
        args["global_pool"] = "token"
    elif isinstance(student, BeitStudent):
        return None, "timm's Beit averages the patch tokens without CLS, mmkd's mean pooling includes CLS"
    else:  # mean of every token, CLS included, after the final norm (as mmkd's masked mean of last_hidden_state)
        args.update(global_pool="avg", pool_include_prefix=True, fc_norm=False)
    args.pop("drop_path_rate", None)
    return args, ""


def _probe(student: TimmStudent) -> torch.Tensor:
    c = student.config
    return torch.randn(2, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))


def _student_pooled(student: TimmStudent, x: torch.Tensor) -> torch.Tensor:
    twin = copy.deepcopy(student).to("cpu", torch.float32).eval()
    with torch.no_grad():
        return twin(pixel_values=x).pooled


def _save_timm(student: TimmStudent, directory: Path, model: nn.Module, preprocess: Any, description: str) -> None:
    from timm.models import save_for_hf

    # the entrypoint's own pretrained tag, licence and origin describe weights this student never had
    model_config = {"pretrained_cfg": {"tag": "mmkd_student", "license": None, "description": description}}
    save_for_hf(
        model,
        str(directory),
        model_config=model_config,
        safe_serialization=True,
        data_config=_data_config(preprocess, student.config.in_chans),
    )


def _save_embedding_model(
    student: TimmStudent, directory: Path, architecture: str, pooled: dict[str, torch.Tensor], preprocess: Any
) -> str:
    """Write the timm model whose classifier head is the pooled projection and check, by loading it back
    through ``local-dir:``, that its forward is the student's pooled prediction. Returns "" when it is, else
    why timm cannot give it (nothing usable is left written then)."""
    import timm

    out_dim = int(pooled["weight"].shape[0])
    args, why = _embedding_args(student, out_dim)
    if args is None:
        return why
    with torch.random.fork_rng(devices=[]):  # random init of the copy must not move the caller's stream
        model = timm.create_model(architecture, pretrained=False, **args).eval()
    state = {**student.model.state_dict(), "head.weight": pooled["weight"], "head.bias": pooled["bias"]}
    own = model.state_dict()
    if set(own) != set(state) or any(own[k].shape != v.shape for k, v in state.items()):
        return f"timm's {architecture} with {args} holds other weights ({sorted(set(own) ^ set(state))[:4]})"
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    _save_timm(student, directory, model, preprocess, _timm_description(student, architecture, out_dim))
    x = _probe(student)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        got = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=True).eval()(x)
    want = _student_pooled(student, x)
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        return f"timm's forward differs from mmkd's pooled prediction ({diff})"
    return ""


def _features_model(student: TimmStudent, architecture: str) -> nn.Module:
    """The student's timm model as it is (``num_classes=0``), rebuilt under ``architecture`` when that
    entrypoint takes its weights, else under the one the student was built with."""
    import timm

    state = {k: v.detach().cpu() for k, v in student.model.state_dict().items()}
    for name in dict.fromkeys((architecture, type(student.config).arch)):
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(name, pretrained=False, **student.config.model_args()).eval()
        try:
            model.load_state_dict(state)
        except RuntimeError:
            continue
        return model
    raise MmkdError(f"save_vit_student: timm cannot rebuild the {student.name} student under {architecture}")


def save_vit_student(student: TimmStudent, directory: str | Path, preprocess: Any = None) -> Path:
    """Write a vit or beit student as a timm directory (``config.json`` with architecture and model args,
    ``model.safetensors``) whose classifier head is the pooled projection, plus mmkd's metadata.

    ``timm.create_model("local-dir:DIR", pretrained=True)`` then returns the student's pooled prediction (the
    embedding mmkd evaluates, before normalisation) and, after ``reset_classifier(0)``, the pooled features.
    This is verified at export on a probe batch; a setting timm cannot reproduce (see the module docstring)
    is written as features only with a warning, and :func:`load_student` still rebuilds the whole student.

    Args:
        student: A vit or beit student.
        directory: Created if needed.
        preprocess: The teacher's ImagePreprocess (or a timm data-config dict), recorded as the model's
            ``pretrained_cfg`` so timm's ``resolve_data_config`` gives the student's input pipeline.

    Returns:
        The directory.
    """
    if not isinstance(student, TimmStudent):
        raise MmkdError(f"save_vit_student: a {student.name!r} student is not a vit or beit student")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = timm_architecture(student)
    pooled, other = _split_heads(student)
    why = _save_embedding_model(student, directory, architecture, pooled, preprocess)
    exported = not why
    files = {"model": TIMM_WEIGHTS, "config": "config.json"}
    if exported:
        files["pooled_head"] = TIMM_WEIGHTS  # as the timm classifier, head.weight / head.bias
    else:
        logger.warning(
            "save_vit_student: %s is written with num_classes=0 (pooled features only): %s. "
            "load_student(%s) gives the student's embedding",
            directory,
            why,
            directory,
        )
        features = _features_model(student, architecture)
        built_by = features.pretrained_cfg.get("architecture") or architecture
        _save_timm(student, directory, features, preprocess, _timm_description(student, built_by, None))
        other = {**other, **{_POOLED + k: v for k, v in pooled.items()}}
        files["pooled_head"] = HEADS_FILE
    _save_other_heads(other, directory, files)
    _write_meta(student, directory, "timm", files, timm_head=exported, timm_head_note=why or None)
    return directory


def save_student(
    student: Student,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    preprocess: Any = None,
    max_seq_length: int | None = None,
) -> Path:
    """Write any student: text and vit/beit students in their library's format (see the module docstring),
    multimodal and data2vec2 students as one safetensors state dict.

    Args:
        student: The student.
        directory: Created if needed.
        tokenizer: Saved alongside when given (text and multimodal students).
        preprocess: Image preprocessing: in the timm config for vit/beit students (see
            :func:`save_vit_student`), in ``mmkd_student.json`` for multimodal and data2vec2 students.
        max_seq_length: Text: the longest input the student should read (e.g. the store's
            ``preprocess.max_length``), capped by its position table and the tokenizer; None: those alone.

    Returns:
        The directory.
    """
    if isinstance(student, TextStudent):
        return save_text_student(student, directory, tokenizer, max_seq_length)
    if isinstance(student, TimmStudent):
        return save_vit_student(student, directory, preprocess)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(student.state_dict(), directory / STATE_FILE)
    extra = {}
    if isinstance(student, MultimodalStudent):
        extra["max_seq_length"] = text_max_length(student.config.max_position, tokenizer, max_seq_length)
    _save_tokenizer(tokenizer, directory, extra.get("max_seq_length"))
    _write_meta(student, directory, "mmkd", {"state": STATE_FILE}, preprocess, **extra)
    return directory


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MmkdError(f"{what}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``mmkd_student.json`` of a saved student, checked for a format version this mmkd reads."""
    meta_file = Path(directory) / META_FILE
    if not meta_file.is_file():
        raise MmkdError(f"{directory} is not a saved student: {META_FILE} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise MmkdError(
            f"{meta_file}: format_version {meta.get('format_version')!r}; this mmkd reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if meta.get("student") not in _CLASSES:
        raise MmkdError(f"{meta_file}: unknown student {meta.get('student')!r}")
    return meta


def _head_state(directory: Path, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every head parameter: ``mmkd_heads.safetensors`` plus, from format 2, the pooled projection where
    the library format keeps it (``state``: the timm weights, already read)."""
    files = meta.get("files", {})
    heads = _load_tensors(directory / HEADS_FILE) if meta["format_version"] == 1 or "heads" in files else {}
    if meta["format_version"] == 1 or files.get("pooled_head") == HEADS_FILE:
        return heads
    if meta["student"] == "text":
        dense = _load_tensors(directory / files["pooled_head"])
        return {**heads, _POOLED + "weight": dense["linear.weight"], _POOLED + "bias": dense["linear.bias"]}
    return {**heads, _POOLED + "weight": state.pop("head.weight"), _POOLED + "bias": state.pop("head.bias")}


def load_student(directory: str | Path) -> Student:
    """Rebuild a student written by :func:`save_student` (or the format-specific savers), in eval mode,
    with all its prediction heads. Exports of format version 1 load too.

    Raises:
        MmkdError: Not a student directory, an unknown format version or student, or weights that do not fit.
    """
    directory = Path(directory)
    meta = read_meta(directory)
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
        _strict_load(student.heads, _head_state(directory, meta, {}), what)
    elif isinstance(student, TimmStudent):
        state = _load_tensors(directory / TIMM_WEIGHTS)
        heads = _head_state(directory, meta, state)  # takes the timm classifier (the pooled head) out of state
        _strict_load(student.model, state, what)
        _strict_load(student.heads, heads, what)
    else:
        _strict_load(student, _load_tensors(directory / STATE_FILE), what)
    return student.eval()


def load_exported_vit(directory: str | Path) -> nn.Module:
    """The timm model of an exported vit/beit student, built by timm alone (eval mode): the equivalent of
    ``timm.create_model(config["architecture"], pretrained=False, **config["model_args"])`` followed by
    ``load_state_dict`` of ``model.safetensors``. Its forward is the student's pooled prediction (unless the
    export was written as features only; ``mmkd_student.json`` says so in ``timm_head``)."""
    import timm

    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise MmkdError(f"{directory} is not an exported image student: config.json is missing")
    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


# ---------------------------------------------------------------------------------------------------------
# preprocessing of saved students: what mmkd-eval applies, as callables


class StudentTokenizer:
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, T) long tensors, right-padded to the longest text and
    truncated at ``max_length``: exactly how ``mmkd-eval`` feeds a student.

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


class ImageTransform:
    """PIL image -> (C, size, size) float32 tensor: the eval view (view 0 of :mod:`mmkd_core.views`) at the
    size, crop, interpolation, mean and std the student records, which ``mmkd-eval`` applies.

    Attributes:
        preprocess: The ImagePreprocess.
        spec: Its ViewSpec.
    """

    def __init__(self, preprocess: Any) -> None:
        from ..views import view_spec

        self.preprocess = preprocess
        self.spec = view_spec(preprocess)

    def __call__(self, image: Any) -> torch.Tensor:
        from ..views import eval_params, render

        spec = self.spec
        return render(image, eval_params(*image.size, spec.crop_pct, spec.crop_mode), spec)


def saved_max_length(directory: str | Path, student: Student, tokenizer: Any = None) -> int:
    """The text length limit of a saved student: what its export recorded, else (format 1) the smallest of
    its position table and the tokenizer's limit."""
    recorded = read_meta(directory).get("max_seq_length")
    return int(recorded) if recorded else text_max_length(student.config.max_position, tokenizer)


def saved_image_preprocess(directory: str | Path) -> Any:
    """The ImagePreprocess a saved multimodal student records (``save_student(preprocess=...)``), or None."""
    from ..teachers.base import ImagePreprocess

    record = read_meta(directory).get("preprocess")
    if record is None:
        return None
    return ImagePreprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def load_multimodal(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[MultimodalStudent, ImageTransform, StudentTokenizer]:
    """A saved multimodal student with its preprocessing, as open_clip's ``create_model_and_transforms``::

        model, transform, tokenizer = load_multimodal("runs/minilm-l6-shapes-train/student")
        image_emb = model.encode_image(torch.stack([transform(im) for im in images]), normalize=True)
        text_emb = model.encode_text(**tokenizer(["a red circle"]), normalize=True)

    With ``normalize=True`` these are the embeddings ``mmkd-eval`` compares (cosine similarity); without it,
    the raw pooled predictions in the teacher's space.

    Args:
        directory: The student directory (``<run>/student``).
        device: Where the model goes.

    Returns:
        ``(model, image_transform, tokenizer)``: the MultimodalStudent in eval mode, a PIL image -> tensor
        callable (:class:`ImageTransform`) and a texts -> ``{"input_ids", "attention_mask"}`` callable
        (:class:`StudentTokenizer`).

    Raises:
        MmkdError: Not a multimodal student, or no tokenizer / image preprocessing saved beside it.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = read_meta(directory)
    if meta["student"] != "multimodal":
        raise MmkdError(
            f"{directory} holds a {meta['student']} student, not a multimodal one: load it with load_student "
            "(or sentence-transformers / timm, see mmkd_core.students.export)"
        )
    preprocess = saved_image_preprocess(directory)
    if preprocess is None:
        raise MmkdError(
            f"{directory}: the saved student records no image preprocessing; save it with "
            "save_student(..., preprocess=ImagePreprocess(...))"
        )
    if not (directory / "tokenizer_config.json").is_file():
        raise MmkdError(
            f"{directory}: no tokenizer saved beside the student; save it with save_student(..., tokenizer=...)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MmkdError(f"{directory}: cannot read the saved tokenizer ({str(e).strip().splitlines()[0]})") from None
    student = load_student(directory).to(device)
    tokenize = StudentTokenizer(tokenizer, saved_max_length(directory, student, tokenizer))
    return student, ImageTransform(preprocess), tokenize
