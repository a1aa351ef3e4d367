"""Adding a teacher to an existing store (``mmkd-extract --add-teacher TEACHER --out STORE``).

The added teacher is a run of its own whose store is the group ``teachers/<name>`` inside STORE
(``mmkd_core.store.teachers``): it reads the store's own samples (the dataset, split, options and limit the
store records, checked against the data's fingerprint) and, for images, the store's own views (``replay``:
each view's stored parameters rendered at the new teacher's size and normalisation, and checked against the
stored ``view_checksum`` first). Nothing of the store's existing arrays or attributes is written; the lock is
the store's own. Resuming, ``--shards``, ``--cluster`` and ``--plan`` work as for a first extraction.

Refused, in one line each: a store that is not there or whose first extraction is incomplete, a pair store
or a joint-teacher store, a teacher of another input modality than the store's, the first teacher's name, a
teacher already complete in the store (``--overwrite`` extracts it again), data of another fingerprint, and
views that do not replay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmkd_core.errors import MmkdError
from mmkd_core.location import Location
from mmkd_core.store import StoreReader, config_diff, read_attrs
from mmkd_core.store.teachers import TEACHERS_GROUP, teacher_path

from .config import ExtractConfig

# what an added teacher takes from the store's record: ExtractConfig field -> how the record gives it
RECORDED = ("dataset", "split", "dataset_options", "limit", "views", "seed", "crop_scale")
# the dataset record's keys that say which samples a store holds (its paths may differ: the data may move)
SAME_DATA = ("fingerprint", "name", "split", "options", "num_samples", "limit", "source_size", "modality")


@dataclass
class Root:
    """The store a teacher is added to.

    Attributes:
        reader: Its first teacher's reader (the root's arrays; its other groups are not opened).
        modality: What its teacher reads: ``text`` or ``image``.
    """

    reader: StoreReader
    modality: str

    @property
    def path(self) -> Location:
        return self.reader.path

    @property
    def attrs(self) -> dict[str, Any]:
        return self.reader.attrs


def recorded_options(attrs: dict[str, Any]) -> dict[str, Any]:
    """The RECORDED fields of ExtractConfig as the store at ``attrs`` was extracted with them."""
    dataset, views = attrs["dataset"], attrs["views"]
    out = {
        "dataset": dataset["name"],
        "split": dataset.get("split", "train"),
        "dataset_options": dict(dataset.get("options") or {}),
        "limit": dataset.get("limit"),
        "views": int(views["count"]),
    }
    if "seed" in views:  # images: the views' generator
        out["seed"] = int(views["seed"])
        out["crop_scale"] = tuple(views.get("scale", (0.08, 1.0)))
    return out


def settle(cfg: ExtractConfig, given: set[str] | None = None) -> ExtractConfig:
    """``cfg`` with the store's record filling what an added teacher takes from it: the RECORDED options not
    in ``given`` (the options the user set), and ``--data-root`` when not given. None: every option is taken as
    given, and one that differs from the record is refused (the library's strict form).

    Raises:
        MmkdError: an option given differs from the store's record (naming both), or there is no store.
    """
    attrs = _root_attrs(cfg.out)
    recorded = recorded_options(attrs)
    changes: dict[str, Any] = {}
    for name, value in recorded.items():
        if given is not None and name not in given:
            changes[name] = value
        elif name in ("views", "seed", "crop_scale") and _json(getattr(cfg, name)) != _json(value):
            # the dataset's fields are checked on the data itself (``check_data``), where aliases are resolved
            flag = "--" + name.replace("_", "-")
            raise MmkdError(
                f"{flag} {getattr(cfg, name)!r}: the store {cfg.out} was extracted with {value!r}; a teacher added "
                f"to it reads the store's own views (leave {flag} out)"
            )
    if cfg.data_root is None and attrs.get("data_root"):
        changes["data_root"] = attrs["data_root"]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def open_root(cfg: ExtractConfig) -> Root:
    """The store ``cfg.out`` that ``cfg.add_teacher`` is added to, checked: a complete store of one modality,
    and the name free (or the teacher's own group, incomplete, which the run continues)."""
    _root_attrs(cfg.out)
    reader = StoreReader(cfg.out, teachers=False)  # the other groups are the readers' concern, not this run's
    where = f"--out {cfg.out}"
    if not reader.complete:
        done = reader.group["shards_done"][:] if reader.has("shards_done") else []
        raise MmkdError(
            f"{where}: its first extraction is incomplete ({int(sum(done))} of {len(done)} shards done); "
            "finish it (run its own command again) before adding a teacher"
        )
    if reader.attrs["dataset"].get("captions_group") or reader.has("captions"):
        raise MmkdError(f"{where}: a pair store (images with their captions); teachers are not added to those yet")
    modality = _modality(reader)
    if cfg.teacher_name == reader.teacher_name:
        raise MmkdError(
            f"--add-teacher {cfg.add_teacher}: {cfg.out}'s first teacher is named {cfg.teacher_name!r}; "
            "add it under another name with --teacher-name"
        )
    group = read_attrs(teacher_path(cfg.out, cfg.teacher_name))
    if group is not None and group.get("complete") is True and not cfg.overwrite:
        raise MmkdError(
            f"--add-teacher {cfg.add_teacher}: {cfg.out} already holds teacher {cfg.teacher_name!r} "
            f"({TEACHERS_GROUP}/{cfg.teacher_name}, complete); --overwrite extracts it again, --teacher-name "
            "adds it under another name"
        )
    return Root(reader, modality)


def check_teacher(root: Root, teacher, cfg: ExtractConfig) -> None:
    """Refuse a teacher that reads another modality than the store's teacher (or both)."""
    if teacher.modality not in ("text", "image") or getattr(teacher, "text_tower", None) is not None:
        raise MmkdError(
            f"--add-teacher {cfg.add_teacher}: a teacher of {teacher.modality} pairs or two towers; only text "
            "or image teachers are added to a store"
        )
    if teacher.modality != root.modality:
        raise MmkdError(
            f"--add-teacher {cfg.add_teacher} reads {_inputs(teacher.modality)}, but {root.path} holds "
            f"{_inputs(root.modality)} (its teacher {root.reader.teacher_name} reads {root.modality})"
        )


def check_data(root: Root, record: dict[str, Any], cfg: ExtractConfig) -> None:
    """Refuse data that is not the store's: the dataset record of this run against the store's."""
    stored = {k: root.attrs["dataset"].get(k) for k in SAME_DATA if k in root.attrs["dataset"] or k in record}
    mine = {k: record.get(k) for k in stored}
    diff = config_diff(stored, mine)
    if diff is not None:
        where = f" from --data-root {cfg.data_root}" if cfg.data_root else ""
        raise MmkdError(
            f"--add-teacher {cfg.add_teacher}: the data read{where} is not the store's (dataset.{diff}: the store "
            f"has {_dotted(stored, diff)!r}, this data gives {_dotted(mine, diff)!r}); give --data-root of the data "
            "the store was extracted from"
        )


def _dotted(record: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return "<absent>"
        record = record[part]
    return record


def _root_attrs(path: Location) -> dict[str, Any]:
    if not path.exists():
        raise MmkdError(f"--out {path}: no store there to add a teacher to (extract its first teacher first)")
    attrs = read_attrs(path)
    if attrs is None:
        raise MmkdError(f"--out {path}: not an mmkd store (no zarr.json with an 'mmkd' attribute)")
    if "teacher_group" in attrs:
        raise MmkdError(f"--out {path}: a teacher group; give the store it lies in")
    StoreReader(path, teachers=False)  # the schema: a damaged record is refused here, in one line
    return attrs


def _modality(reader: StoreReader) -> str:
    recorded = reader.attrs["teacher"].get("modality")
    joint = reader.has("view_params") and reader.has("input_ids")
    if recorded == "image_text" or joint or reader.extra_names:
        raise MmkdError(f"--out {reader.path}: a joint-teacher store; teachers are not added to those yet")
    return "image" if reader.has("view_params") else "text"


def _inputs(modality: str) -> str:
    return "images" if modality == "image" else "text"


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
