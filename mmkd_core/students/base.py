"""The student interface: registry, output type, prediction heads and the config checks every student shares.

A student is a small trainable model that returns every block's output (as teachers do) plus its two
predictions: ``tokens`` for the per-token targets and ``pooled`` for the whole-sample target.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import MmkdError
from ..registry import Registry
from ..targets import make_targets, masked_mean, select_layers

logger = logging.getLogger(__name__)

STUDENTS: Registry = Registry("student")

TOKEN_PREDS = ("recipe", "head", "none")
STUDENT_POOLS = ("cls", "mean")
POOLED_HEADS = ("linear", "identity")
INIT_PRETRAINED = ("pretrained", "teacher")  # two names for "copy blocks from init_from"


@dataclass
class StudentOutput:
    """What a student returns for one batch (of one modality).

    Attributes:
        hidden_states: One (B, T, D) tensor per block, block 0 first, raw block outputs (no final norm), the
            teacher's convention. For images T includes the CLS token at step 0.
        mask: (B, T) bool, True at valid time steps (all True for images).
        last_hidden_state: (B, T, D) the model's final representation: the last block's output after the final
            norm where the architecture has one (ViT, BEiT, multimodal towers), else the last block's output.
        tokens: (B, T, D_target) the per-token prediction, or None when ``token_pred="none"``.
        pooled: (B, E_target) the whole-sample prediction.
        modality: ``"image"`` or ``"text"``: the modality of the top-level fields.
        image: Multimodal students: the image tower's output when images were given.
        text: Multimodal students: the text tower's output when text was given.
        teachers: A student trained against several teachers: each further teacher's name -> ``(tokens,
            pooled)`` of that teacher's prediction heads (``tokens`` None where it has no token head); the
            fields above are the first teacher's.
    """

    hidden_states: list[torch.Tensor]
    mask: torch.Tensor
    last_hidden_state: torch.Tensor
    tokens: torch.Tensor | None
    pooled: torch.Tensor
    modality: str
    image: StudentOutput | None = None
    text: StudentOutput | None = None
    teachers: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)


@dataclass
class HeadConfig:
    """How a student turns its hidden states into predictions (fields every student config has).

    Attributes:
        token_pred: ``"recipe"``: the student's own ``recipe_layers`` through ``targets.make_targets`` with
            the flags below (the data2vec KD setup), followed by a linear head only when ``target_dim``
            differs from the student's width. ``"head"``: a linear head on ``last_hidden_state``.
            ``"none"``: no token prediction (pooled-only stores).
        target_dim: Width of the token targets; None = the student's width.
        pooled_dim: Width of the pooled target; None = the student's width.
        pool: ``"cls"`` (time step 0) or ``"mean"`` (masked mean) of ``last_hidden_state``, then a plain
            ``nn.Linear`` to ``pooled_dim``; when the widths are equal it starts as the identity, so a
            student cut from the teacher's first blocks begins with the truncated teacher's embedding.
        pooled_head: ``"linear"`` (trained, from the identity) or ``"identity"`` (kept the identity, untrained):
            with ``"identity"`` the student's embedding is its pooled last layer itself, so a user who loads
            the encoder alone (``AutoModel`` + mean pooling) gets exactly what was distilled; needs
            ``pooled_dim`` equal to the width.
        recipe_layers: Student blocks averaged by ``"recipe"``: ``"all"``, ``"last:K"``, an int K or indices.
        instance_norm_layers: As the store recipe's ``instance_norm``.
        layer_norm_targets: As the store recipe's ``layer_norm``.
    """

    token_pred: str = "recipe"
    target_dim: int | None = None
    pooled_dim: int | None = None
    pool: str = "cls"
    pooled_head: str = "linear"
    recipe_layers: str | int | list[int] = "all"
    instance_norm_layers: bool = True
    layer_norm_targets: bool = True

    def check_heads(self) -> None:
        """Reject impossible head settings with a one-line MmkdError."""
        if self.token_pred not in TOKEN_PREDS:
            raise MmkdError(f"student token_pred {self.token_pred!r}: choose one of {', '.join(TOKEN_PREDS)}")
        if self.pool not in STUDENT_POOLS:
            raise MmkdError(f"student pool {self.pool!r}: choose one of {', '.join(STUDENT_POOLS)}")
        if self.pooled_head not in POOLED_HEADS:
            raise MmkdError(f"student pooled_head {self.pooled_head!r}: choose one of {', '.join(POOLED_HEADS)}")
        for name in ("target_dim", "pooled_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MmkdError(f"student {name}={value}: give a positive width or leave it out")


class PredictionHeads(nn.Module):
    """The token and pooled predictions on top of a stack of blocks.

    Args:
        width: The student's hidden width.
        num_layers: How many blocks ``hidden_states`` has (resolves ``recipe_layers``).
        config: The student's config (its HeadConfig fields are read).
        pool: Overrides ``config.pool`` (multimodal towers pool differently).
    """

    def __init__(self, width: int, num_layers: int, config: HeadConfig, pool: str | None = None) -> None:
        super().__init__()
        self.token_pred = config.token_pred
        self.pool = pool or config.pool
        # the settings these heads were built with (what a student with these heads records in its config)
        self.settings = HeadConfig(
            **{**{f.name: getattr(config, f.name) for f in fields(HeadConfig)}, "pool": self.pool}
        )
        self.instance_norm_layers = config.instance_norm_layers
        self.layer_norm_targets = config.layer_norm_targets
        self.recipe_layers = select_layers(config.recipe_layers, num_layers) if config.token_pred == "recipe" else []
        target_dim = config.target_dim or width
        if config.token_pred == "head" or (config.token_pred == "recipe" and target_dim != width):
            self.token_head: nn.Module | None = nn.Linear(width, target_dim)
        elif config.token_pred == "recipe":
            self.token_head = nn.Identity()
        else:
            self.token_head = None
        self.pooled_head = nn.Linear(width, config.pooled_dim or width)
        if (config.pooled_dim or width) == width:
            # start as the plain pooled state: a student cut from the teacher's first blocks then begins with
            # exactly the truncated teacher's embedding, not a random rotation of it
            with torch.no_grad():
                self.pooled_head.weight.copy_(torch.eye(width))
                self.pooled_head.bias.zero_()
        if config.pooled_head == "identity":
            if (config.pooled_dim or width) != width:
                raise MmkdError(
                    f"student pooled_head='identity' needs the pooled target as wide as the student ({width}), "
                    f"not {config.pooled_dim}: use pooled_head=linear"
                )
            self.pooled_head.requires_grad_(False)  # stays the identity; exports keep their Dense layer

    def forward(
        self, hidden_states: Sequence[torch.Tensor], last_hidden_state: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(tokens, pooled)``: (B, T, D_target) or None, and (B, E_target)."""
        if self.token_pred == "recipe":
            tokens = self.token_head(
                make_targets(
                    hidden_states,
                    mask,
                    self.recipe_layers,
                    instance_norm_layers=self.instance_norm_layers,
                    layer_norm_targets=self.layer_norm_targets,
                )
            )
        elif self.token_pred == "head":
            tokens = self.token_head(last_hidden_state)
        else:
            tokens = None
        summary = last_hidden_state[:, 0] if self.pool == "cls" else masked_mean(last_hidden_state, mask)
        return tokens, self.pooled_head(summary.to(last_hidden_state.dtype))


class Student(nn.Module):
    """Base class of students.

    Attributes:
        name: Registry name (``"text"``, ``"vit"``, ``"beit"``, ``"data2vec2"``, ``"multimodal"``).
        modality: ``"text"``, ``"image"`` or ``"multimodal"``.
        config: The student's config dataclass (JSON-serialisable; ``save_student`` records it).
        width: Hidden width of the blocks.
        num_layers: Number of blocks in ``hidden_states`` (per modality for multimodal students).
        init_info: How the weights were initialised (recorded next to saved students).
    """

    name: str = ""
    modality: str = ""
    config: Any
    width: int = 0
    num_layers: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.init_info: dict[str, Any] = {"init": "random"}

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Name, resolved config, init provenance and parameter counts (for run directories)."""
        return {
            "name": self.name,
            "config": asdict(self.config),
            "init": self.init_info,
            "num_parameters": sum(p.numel() for p in self.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }


C = TypeVar("C")


def build_config(cls: type[C], student: str, values: dict[str, Any]) -> C:
    """``cls(**values)``, with unknown keys reported as one MmkdError naming the valid ones."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MmkdError(f"student {student!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**values)


def fill_from_init(
    student: str, values: dict[str, Any], init_values: dict[str, Any], may_differ: Sequence[str] = ()
) -> dict[str, Any]:
    """Config values with those of the init model filled in where the caller gave none.

    Raises:
        MmkdError: A value the caller gave contradicts the init model (except keys in ``may_differ``).
    """
    out = dict(values)
    for key, value in init_values.items():
        if key not in out:
            out[key] = value
        elif out[key] != value and key not in may_differ:
            raise MmkdError(
                f"student {student!r}: {key}={out[key]!r} but the init model has {value!r}; "
                f"leave {key} out to take it from the init model"
            )
    return out


def resolve_init(init_from: Any, weights: str | None) -> Any:
    """``init_from`` as a model: a registered teacher name is built with ``create_teacher(name, weights)``
    (real weights only: missing weights are an error there), anything else is returned as given."""
    if isinstance(init_from, str):
        from ..teachers import create_teacher

        return create_teacher(init_from, weights)
    if weights is not None:
        raise MmkdError("init weights are read only when the init model is given by teacher name")
    return init_from


def unwrap_init(init_model: Any) -> nn.Module:
    """The model inside a teacher adapter (``Teacher.model``), or ``init_model`` itself."""
    from ..teachers.base import Teacher

    if isinstance(init_model, Teacher):
        inner = getattr(init_model, "model", None)
        if not isinstance(inner, nn.Module):
            raise MmkdError(f"teacher {init_model.name!r} has no wrapped model to initialise a student from")
        return inner
    if not isinstance(init_model, nn.Module):
        raise MmkdError(f"init_from must be a teacher name, a Teacher or an nn.Module, got {type(init_model).__name__}")
    return init_model


def describe_init(init_model: Any) -> dict[str, Any]:
    """Provenance of an init model, JSON-serialisable."""
    from ..teachers.base import Teacher

    if isinstance(init_model, Teacher):
        return {"teacher": init_model.describe()}
    config = getattr(init_model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(init_model, "pretrained_cfg", {}).get("architecture", "")
    return {"model": type(init_model).__name__, "name_or_path": name}


def check_init(student: str, init: str, init_from: Any) -> bool:
    """Whether to copy weights from ``init_from``; contradictions are an MmkdError."""
    if init == "random":
        if init_from is not None:
            raise MmkdError(f"student {student!r}: init_from given with init='random'; use init='pretrained'")
        return False
    if init in INIT_PRETRAINED:
        if init_from is None:
            raise MmkdError(f"student {student!r}: init={init!r} needs init_from=<model or teacher>")
        return True
    raise MmkdError(f"student {student!r}: init {init!r}: choose 'random' or 'pretrained' (alias 'teacher')")


BLOCK_RULES = ("first", "last", "ends", "spread")


def resolve_blocks(student: str, init_blocks: str | Sequence[int] | None, depth: int, init_depth: int) -> list[int]:
    """Init-model block indices to copy into student blocks 0..depth-1.

    ``init_blocks`` lists them, or names a rule: ``"first"`` (the default: the first ``depth``; image
    students, whose token targets average the teacher's blocks, found it beats every second one),
    ``"last"`` (the top ``depth``), ``"ends"`` (block 0, then the top ``depth - 1``) or ``"spread"``
    (evenly spaced, the top block last: 1,3,5 of 6 for 3; the text default, see ``kinds.text``).
    """
    if init_blocks is None or isinstance(init_blocks, str):
        rule = "first" if init_blocks is None else init_blocks
        if rule not in BLOCK_RULES:
            raise MmkdError(
                f"student {student!r}: init_blocks={rule!r}: give block indices or one of {', '.join(BLOCK_RULES)}"
            )
        if depth > init_depth:
            raise MmkdError(f"student {student!r}: depth {depth} is deeper than the {init_depth}-block init model")
        top = list(range(init_depth - depth, init_depth))
        spread = [(i + 1) * init_depth // depth - 1 for i in range(depth)]
        blocks = {"first": list(range(depth)), "last": top, "ends": [0, *top[1:]], "spread": spread}[rule]
    else:
        blocks = [int(i) for i in init_blocks]
    if len(blocks) != depth:
        raise MmkdError(f"student {student!r}: init_blocks lists {len(blocks)} blocks for a depth-{depth} student")
    bad = [i for i in blocks if not 0 <= i < init_depth]
    if bad:
        raise MmkdError(f"student {student!r}: init blocks {bad} do not exist in a {init_depth}-block init model")
    return blocks


def copy_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` strictly; any difference is one MmkdError naming the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [
            f"{label} {keys[:4]}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs for", shapes))
            if keys
        ]
        raise MmkdError(f"cannot initialise {what}: " + "; ".join(parts))
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
