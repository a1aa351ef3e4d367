"""The ablation's grid: ``--vary``/``--grid`` values and the shared mmkd-train options, parsed by mmkd-train's
own command (its option names, types and checks) into validated TrainConfigs, and run names from settings."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from mmkd.app.cli import read_config
from mmkd.app.options import config_kwargs, field_for, options_of
from mmkd.train import TrainConfig, train_command
from mmkd_core.errors import MmkdError

MAX_NAME = 100  # longer run names are cut and end in a hash of the whole name

# what the ablation decides itself for every run, and why it is refused after -- and in the grid
_OWN = {
    "targets": "give --targets to mmkd-ablate itself",
    "run_dir": "mmkd-ablate names every run's directory under --out",
    "resume": "mmkd-ablate resumes interrupted runs itself",
    "seed": "runs are seeded 0..R-1 by --repeat R",
    "eval": "give --eval to mmkd-ablate itself: the teacher and the init students are scored with it too",
    "nproc": "mmkd-ablate trains each run in one process (--cluster runs several at once)",
}
# accepted after -- but not varied: a recorded run's config.json as the base, and how runs are shown
_NOT_VARIED = {"config": "not a setting", "progress": "give --quiet to mmkd-ablate", "verbose": "not a setting"}
_NOT_PASSED = ("--help", "--install-completion", "--show-completion")


class TrainOptions:
    """mmkd-train options shared by every run (``args``, parsed by mmkd-train's own command) and the
    varied ones, turned into TrainConfigs with mmkd-train's parsing and TrainConfig's validation."""

    def __init__(self, store: Any, args: Sequence[str]) -> None:
        self.store = store
        self.args = list(args)
        self.command = train_command()
        self.options = options_of(TrainConfig)
        self.params = {
            p.name: p for p in self.command.params if p.name not in ("install_completion", "show_completion")
        }
        for a in self.args:
            if a.split("=", 1)[0] in _NOT_PASSED:
                raise MmkdError(f"after --: {a} is not passed on (the options after -- are mmkd-train's)")
        ctx = self._context(self.args, "after --")
        self.given = {n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}
        for name in sorted(self.given & set(_OWN)):
            if name != "nproc" or ctx.params[name] != 1:
                raise MmkdError(f"after --: {self.flag(name)}: {_OWN[name]}")
        if ctx.params.get("nproc", 1) != 1:  # from a --config file recording a DDP run
            raise MmkdError(f"after --: --nproc {ctx.params['nproc']} (from --config): {_OWN['nproc']}")
        self.base = self._config(ctx.params)

    def flag(self, name: str) -> str:
        return self.params[name].opts[0]

    def option_name(self, name: str) -> str:
        """A field's option name, as grid keys and run names show it (``student-option``)."""
        return self.options[name].long_flag.lstrip("-")

    def _context(self, args: list[str], where: str) -> Any:
        try:
            return TyperCommand.make_context(
                self.command, "mmkd-train", list(args), default_map={"targets": str(self.store)}
            )
        except MmkdError as e:
            raise MmkdError(f"{where}: {e}") from None
        except typer.TyperException as e:  # click's usage errors (typer carries its own click)
            raise MmkdError(f"{where}: {e.format_message()}") from None

    def _config(self, params: Mapping[str, Any]) -> TrainConfig:
        # a parameter holds what its flag says: an inverted flag's (--quiet) is read under the flag's name
        values = {
            self.options[k].long_flag if self.options[k].invert else k: list(v) if isinstance(v, tuple) else v
            for k, v in params.items()
            if k in self.options and v is not None
        }
        kwargs = config_kwargs(TrainConfig, values, "mmkd-train options")
        kwargs.update(eval=[], targets=self.store, seed=0, resume=False)
        return TrainConfig(**kwargs)

    def key(self, key: str, where: str) -> str:
        """A grid key (an mmkd-train option name: ``batch-size``, ``--batch-size`` or ``batch_size``) as its
        TrainConfig field; unknown keys and what the ablation sets itself are refused."""
        name = key.strip().lstrip("-").replace("-", "_")
        if name not in _OWN and name not in _NOT_VARIED:
            name = field_for(TrainConfig, key.strip(), where)[0]
        if name in _OWN or name in _NOT_VARIED:
            raise MmkdError(f"{where}: {key!r} cannot be varied: {({**_OWN, **_NOT_VARIED})[name]}")
        return name

    def args_for(self, name: str, value: Any, where: str) -> list[str]:
        """The mmkd-train arguments that set ``name`` to ``value`` (a string, or a YAML scalar or mapping)."""
        p = self.params[name]
        if value is None:
            return []
        if getattr(p, "is_flag", False):
            on = value if isinstance(value, bool) else str(value).strip().lower()
            if on in (True, "true", "yes", "on", "1"):
                return [p.opts[0]]
            if on in (False, "false", "no", "off", "0"):
                return [p.secondary_opts[0]]
            raise MmkdError(f"{where}: {value!r} is not true or false")
        if p.multiple:
            if isinstance(value, Mapping):
                items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
            else:
                items = [str(value)]
            return [a for item in items for a in (p.opts[0], item)]
        if isinstance(value, list | Mapping):
            raise MmkdError(f"{where}: {self.flag(name)} takes one value, not {value!r}")
        return [p.opts[0], value if isinstance(value, str) else json.dumps(value)]

    def config(self, grid_args: list[str], where: str) -> TrainConfig:
        """The shared options with ``grid_args`` after them, as a validated TrainConfig."""
        ctx = self._context([*self.args, *grid_args], where)
        try:
            return self._config(ctx.params)
        except MmkdError as e:
            raise MmkdError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------- the grid


def parse_vary(items: Iterable[str]) -> dict[str, list[str]]:
    """``--vary KEY=V1,V2`` (or ``KEY=V1|V2`` when a value holds commas) -> ``{KEY: [V1, V2]}``, in order."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise MmkdError(
                f"--vary {item!r}: expected KEY=VALUE,VALUE,... (KEY=VALUE|VALUE|... when a value holds commas)"
            )
        values = [v.strip() for v in rest.split("|" if "|" in rest else ",")]
        if any(not v for v in values):
            raise MmkdError(f"--vary {item!r}: an empty value")
        _add(grid, key.strip(), values, "--vary")
    return grid


def read_grid(path: Path) -> dict[str, list[Any]] | list[dict[str, list[Any]]]:
    """A grid file (YAML or JSON): a mapping of mmkd-train option names to a list of values (a single value
    is a list of one; a mapping is one value of a KEY=VALUE option such as ``student-option``), or a list of
    such mappings, whose combinations are trained together (a one-factor-at-a-time ablation: ``[{}, {loss:
    [pooled_mse=1, token_mse=1]}, {init: random}]`` is the base run and three variants of it)."""
    try:
        data = read_config(Path(path), lists=True)
    except MmkdError as e:
        raise MmkdError(str(e).replace("--config", "--grid", 1)) from None
    grids = []
    for i, part in enumerate(data if isinstance(data, list) else [data]):
        grid: dict[str, list[Any]] = {}
        where = f"--grid {path}" + (f" (entry {i + 1})" if isinstance(data, list) else "")
        for key, values in part.items():
            _add(grid, str(key), values if isinstance(values, list) else [values], where)
        grids.append(grid)
    return grids if isinstance(data, list) else grids[0]


def merge_grids(*grids: Mapping[str, list[Any]] | list[Mapping[str, list[Any]]]) -> Any:
    """One grid from several (``--vary`` and ``--grid``): their keys together; a list of grids (a grid file
    that is a list) gets every other key in each of its entries."""
    lists = [g for g in grids if isinstance(g, list)]
    out: dict[str, list[Any]] = {}
    for g in grids:
        if not isinstance(g, list):
            for key, values in g.items():
                _add(out, key, list(values), "--vary/--grid")
    if not lists:
        return out
    return [merge_grids(out, entry) for entry in lists[0]]


def _add(grid: dict[str, list[Any]], key: str, values: list[Any], where: str) -> None:
    norm = key.lstrip("-").replace("_", "-")
    if any(k.lstrip("-").replace("_", "-") == norm for k in grid):
        raise MmkdError(f"{where}: {key!r} is varied twice; give all of its values in one place")
    if not values:
        raise MmkdError(f"{where}: {key!r} has no values")
    seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
    dup = next((v for v, s in zip(values, seen, strict=True) if seen.count(s) > 1), None)
    if dup is not None:
        raise MmkdError(f"{where}: {key}={dup} is listed twice")
    grid[key] = values


def canonical(value: Any) -> str:
    """A setting's value as it appears in run names: the parsed value, so ``1e-3`` and ``0.001`` are one run."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return ",".join(f"{k}={canonical(v)}" for k, v in value.items())
    if value is None:
        return "default"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def run_name(settings: Mapping[str, str], seed: int | None = None) -> str:
    """A directory name from settings: ``depth=3,init=teacher,loss=token_mse=1+pooled_mse=1,seed=0``.

    Keys are sorted (the order of ``--vary`` does not rename runs); a comma inside a value is written ``+``
    (so that commas only separate settings); a value with other characters than letters, digits and
    ``._=-`` has them replaced by ``_`` and the name ends in a hash of the original, as does a name longer
    than MAX_NAME: two settings never share a directory.
    """
    pairs = sorted(settings.items())
    if seed is not None:
        pairs.append(("seed", str(seed)))
    raw = ",".join(f"{k}={v}" for k, v in pairs) or "base"
    changed = any("+" in v or _UNSAFE.search(v.replace(",", "+")) for _, v in pairs)
    name = ",".join(f"{k}={_UNSAFE.sub('_', v.replace(',', '+'))}" for k, v in pairs) or "base"
    if changed or len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return name
