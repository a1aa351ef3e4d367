"""vit and beit students as timm directories whose classifier head is the pooled projection."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import MmkdError
from ..vision import BeitStudent, TimmStudent
from .common import HEADS_FILE, POOLED_PREFIX, WEIGHTS_FILE, save_other_heads, split_heads, write_meta

logger = logging.getLogger(__name__)


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
    pooled, other = split_heads(student)
    why = _save_embedding_model(student, directory, architecture, pooled, preprocess)
    exported = not why
    files = {"model": WEIGHTS_FILE, "config": "config.json"}
    if exported:
        files["pooled_head"] = WEIGHTS_FILE  # as the timm classifier, head.weight / head.bias
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
        other = {**other, **{POOLED_PREFIX + k: v for k, v in pooled.items()}}
        files["pooled_head"] = HEADS_FILE
    save_other_heads(other, directory, files)
    write_meta(student, directory, "timm", files, timm_head=exported, timm_head_note=why or None)
    return directory
