"""A student trained against several teachers of one store (``--teachers``, ``--teacher-weight``).

The first teacher is the run's store as a single-teacher run sees it: its model builds the student, its
tokenizer feeds it, its heads are the student's own. Every further teacher gets prediction heads of its own
on the student's blocks (``mmkd_core.students.teacher_heads``): a pooled head to its pooled width and, where
its tokens are the student's (the same tokenizer and length limit), a token head through its recipe. Each
teacher is trained with the run's loss terms, its loss weighted (``mmkd_core.losses.teachers_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmkd_core.errors import MmkdError
from mmkd_core.losses import TOKEN_TERMS, CombinedLoss
from mmkd_core.students.base import HeadConfig
from mmkd_core.students.kinds import Built
from mmkd_core.students.kinds.base import recipe_heads
from mmkd_core.students.kinds.cross import tokenizer_mismatch

from .config import TrainConfig


@dataclass
class RunTeachers:
    """The teachers one run trains against.

    Attributes:
        readers: Name -> the StoreReader of its arrays, the first teacher first.
        weights: Name -> the weight of its loss.
    """

    readers: dict[str, Any]
    weights: dict[str, float]

    @property
    def names(self) -> list[str]:
        return list(self.readers)

    @property
    def further(self) -> list[str]:
        """The teachers after the first (none: a run of one teacher, exactly as before several existed)."""
        return self.names[1:]


def select_teachers(store: Any, cfg: TrainConfig) -> RunTeachers:
    """The teachers ``cfg`` names (default: the store's first), each complete, with their weights.

    Raises:
        MmkdError: An unknown or incomplete teacher, or a weight for a teacher the run does not train against.
    """
    names = cfg.teacher_names or [store.teacher_name]
    readers = {}
    for name in names:
        if name not in store.teachers:
            raise MmkdError(
                f"--teachers {name}: {store.path} holds no such teacher (it holds {', '.join(store.teachers)})"
            )
        reader = store.teacher(name)
        if not reader.complete:
            raise MmkdError(
                f"--teachers {name}: its targets in {store.path} are incomplete; run the same mmkd-extract "
                "--add-teacher command again to finish them"
            )
        readers[name] = reader
    for name, w in cfg.teacher_weights.items():
        if name not in readers:
            raise MmkdError(
                f"--teacher-weight {name}={w}: {name} is not a teacher this run trains against ({', '.join(names)})"
            )
    weights = {n: float(cfg.teacher_weights.get(n, 1.0)) for n in names}
    if not any(weights.values()):
        raise MmkdError(f"--teacher-weight: every teacher ({', '.join(names)}) has weight 0; nothing trains")
    return RunTeachers(readers, weights)


def other_tokens(first: Any, reader: Any, name: str, built: Built) -> str:
    """Why teacher ``name``'s per-token targets are not the student's tokens ("" where they are)."""
    if built.whole_sample_only:
        return built.whole_sample_only
    if "tokens" not in reader.group:
        return f"teacher {name}'s store holds pooled targets only"
    mismatch = tokenizer_mismatch(first.attrs["preprocess"], reader.attrs["preprocess"])
    if mismatch is not None:
        return f"teacher {name}'s tokenizer ({mismatch[1]}) is not the student's ({mismatch[0]})"
    mine, theirs = (r.attrs["preprocess"].get("max_length") for r in (first, reader))
    if mine != theirs:
        return f"teacher {name}'s texts were cut at {theirs} tokens, the student's at {mine}"
    return ""


def further_heads(teachers: RunTeachers, built: Built) -> tuple[dict[str, HeadConfig], dict[str, str]]:
    """Each further teacher's head settings, and why those without a token head have none.

    The pooled head maps the student's width to the teacher's pooled width (a plain linear map, trained; it
    starts as the identity where the widths agree); the token head, where its tokens are the student's,
    predicts its per-token targets through its own recipe, as the student's own heads do the first's.
    """
    student, first = built.student, teachers.readers[teachers.names[0]]
    heads, no_tokens = {}, {}
    for name in teachers.further:
        reader = teachers.readers[name]
        why = other_tokens(first, reader, name, built)
        common = {"pooled_dim": int(reader.group["pooled"].shape[-1]), "pool": student.heads.pool}
        if why or student.heads.token_pred == "none":
            no_tokens[name] = why or "the student predicts no tokens"
            heads[name] = HeadConfig(token_pred="none", **common)
        else:
            token = recipe_heads(reader.attrs, student.num_layers, student.heads.token_pred)
            heads[name] = HeadConfig(target_dim=int(reader.attrs["teacher"]["hidden_size"]), **common, **token)
    return heads, no_tokens


def check_token_terms(loss: CombinedLoss, no_tokens: dict[str, str]) -> None:
    """Refuse per-token loss terms toward a teacher whose tokens are not the student's (one line naming why:
    both tokenizers, where they differ)."""
    token = [t for t in loss.weights if t in TOKEN_TERMS]
    for name, why in no_tokens.items():
        if token:
            raise MmkdError(
                f"--loss {token[0]}: {why}, so its per-token targets cannot be aligned with the student's tokens; "
                f"the run's loss applies to every teacher: use whole-sample terms only, or leave {name} out of "
                "--teachers"
            )


def dataset_teachers(teachers: RunTeachers, heads: dict[str, HeadConfig], loss: CombinedLoss) -> dict[str, tuple]:
    """StoreDataset's ``teachers``: each further teacher's pooled targets, and its tokens where a token term
    trains its token head."""
    token = any(t in TOKEN_TERMS for t in loss.weights)
    return {
        name: ("tokens", "pooled") if token and heads[name].token_pred != "none" else ("pooled",)
        for name in teachers.further
    }
