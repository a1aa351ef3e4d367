"""Several teachers in one store: the first teacher's arrays are the store's root (the one-teacher layout), and
every teacher added later (``mmkd-extract --add-teacher``) is a group ``teachers/<name>`` beside them.

A teacher group is a store of its own, over the same samples and views as the root: its ``mmkd`` attribute has
every field a store has (its own teacher, recipe, preprocessing, views as it rendered them, storage, versions
and completion; the root's dataset record), plus ``teacher_group``, its name. Its arrays are those a store of
that teacher alone holds: its targets, ``lengths``, its own ``input_ids`` (text: its tokenizer) and
``view_checksum`` (images: of its own input), ``shards_done``, and copies of the root's ``index`` and
``view_params`` (the views are the root's, replayed), so that any zarr reader opens a group alone
(``xr.open_zarr(store, group="teachers/<name>")``) and ``open_store`` reads it with the same reader.

The names: the root's teacher by its recorded name (``teacher_build.name``, else ``teacher.name``), then the
groups' in sorted order. Here are the rules every reader relies on: a group's record names it by its
directory, and agrees with the root on the sample count, the views and the dataset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..location import Location
from .schema import SchemaError, _excerpt

TEACHERS_GROUP = "teachers"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_teacher_name(name: str, what: str = "--teacher-name") -> str:
    """``name`` when it can name a teacher group (letters, digits, ``.``, ``_``, ``-``; at most 64)."""
    from ..errors import MmkdError

    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MmkdError(
            f"{what} {name!r}: a teacher's name in a store is 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def teacher_path(root: Location, name: str) -> Location:
    """Where teacher ``name``'s group lies in the store at ``root``."""
    return root / TEACHERS_GROUP / name


def root_teacher_name(attrs: Mapping[str, Any]) -> str:
    """The name the root's teacher is listed by: its registry name (``teacher_build.name``), else
    ``teacher.name`` (validated attributes)."""
    build = attrs.get("teacher_build")
    if isinstance(build, Mapping) and isinstance(build.get("name"), str) and build["name"].strip():
        return build["name"]
    return attrs["teacher"]["name"]


def check_group_record(
    root: Mapping[str, Any], group: Mapping[str, Any], name: str, samples: int, root_samples: int, where: str
) -> None:
    """Refuse (one SchemaError line) a teacher group whose record does not belong beside the root's.

    Args:
        root: The root's validated ``mmkd`` attributes.
        group: The group's validated ``mmkd`` attributes.
        name: The group's directory name.
        samples: The group's sample count (its ``index``).
        root_samples: The root's.
        where: The store, for the message.
    """
    recorded = group.get("teacher_group")
    if recorded != name:
        raise SchemaError(
            f"{where}: teacher group {TEACHERS_GROUP}/{name}: attribute teacher_group is {_excerpt(recorded)}, "
            f"expected {name!r}"
        )
    if samples != root_samples:
        raise SchemaError(
            f"{where}: teacher {name} holds {samples} samples, the store's first teacher {root_samples}: "
            "the teachers of one store must cover the same samples"
        )
    if group["views"]["count"] != root["views"]["count"]:
        raise SchemaError(
            f"{where}: teacher {name} holds {group['views']['count']} views, the store's first teacher "
            f"{root['views']['count']}"
        )
    mine, theirs = (group["dataset"].get("fingerprint"), root["dataset"].get("fingerprint"))
    if mine != theirs:
        raise SchemaError(
            f"{where}: teacher {name} was extracted from data of fingerprint {_excerpt(mine)}, the store's first "
            f"teacher from {_excerpt(theirs)}"
        )
