"""Each option declared once: a stage's configuration dataclass carries every option's flag, help, choices
and parser in its fields' metadata, and the typer command, ``--config`` files, ``--resume``'s comparison
with a recorded run and the ablation's grids are all derived from it.

    @dataclass
    class TrainConfig:
        targets: str = option(help="Store written by mmkd-extract.", metavar="PATH|URL")
        student_options: dict = option(dict, flag="--student-option", keyvalue=True, help="KEY=VALUE ...")

    build_command(app, TrainConfig, run_train, extra=[Extra("verbose", option(False, help="..."))])
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from mmkd_core.errors import MmkdError

from .cli import Command, choice, choices, config_values, did_you_mean, guarded, parse_options, read_config

REQUIRED: Any = dataclasses.MISSING
_META = "mmkd.option"
_FACTORIES = (dict, list, set, tuple)
_SIMPLE = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Option:
    """One option as declared on its field with :func:`option`.

    Attributes:
        help: The option's help, or a callable giving it (help that lists a registry's names).
        flag: The option's flag when it is not ``--<field-name>`` (``--student-option``; ``--quiet`` for an
            inverted boolean). A boolean flag gets its ``/--no-x`` pair unless one is given.
        choices: The accepted names: a tuple, a registry, a callable returning them, or several of these in
            a list; the flag lists them in ``--help`` and a near miss is named in the error.
        noun: What the choices are, for the error message ("student kind").
        parser: Checks or converts a string value (the error is the parser's MmkdError).
        metavar: The value's placeholder in ``--help``.
        keyvalue: Repeatable ``KEY=VALUE`` on the command line, a mapping in the field and in config files.
        repeat: Repeatable on the command line, a list in the field.
        invert: A boolean flag that sets the field to False (``--quiet`` for ``progress``).
        cli: False for a field with no command-line option.
        show_default: Show the default in ``--help``.
        type: The command-line value's type when the field's annotation does not say it.
        aliases: Further flags of the same option (``--splits`` beside ``--split``).
        argument: The command's positional arguments rather than an option (with ``repeat``: all of them,
            such as the words after ``--``).
        name: The field's name (filled in by :func:`options_of`).
    """

    help: str | Callable[[], str] = ""
    flag: str | None = None
    choices: Any = None
    noun: str | None = None
    parser: Callable[[str], Any] | None = None
    metavar: str | None = None
    keyvalue: bool = False
    repeat: bool = False
    invert: bool = False
    cli: bool = True
    show_default: bool = True
    type: Any = None
    aliases: tuple[str, ...] = ()
    argument: bool = False
    name: str = ""

    @property
    def long_flag(self) -> str:
        """The option's flag (``--student-option``), without a ``/--no-x`` part."""
        return (self.flag or "--" + self.name.replace("_", "-")).split("/")[0]

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help

    def known(self) -> tuple[Any, ...]:
        """The choices as the groups :func:`mmkd.app.cli.choice` takes: tuples of names or registries."""
        c = self.choices() if callable(self.choices) and not hasattr(self.choices, "names") else self.choices
        if c is None:
            return ()
        if hasattr(c, "names") or (isinstance(c, tuple) and all(isinstance(n, str) for n in c)):
            return (c,)
        return tuple(c)

    def names(self) -> list[str]:
        return [n for k in self.known() for n in (k.names() if hasattr(k, "names") else k)]

    def check(self, value: Any) -> Any:
        """A value from the command line, a config file or a grid, as the option's parser accepts it."""
        if self.known() and value is not None:
            choice(self.long_flag, self.noun or self.name.replace("_", " "), *self.known())(str(value))
        if self.parser is not None and isinstance(value, str):
            return self.parser(value)
        return value


def option(default: Any = REQUIRED, **spec: Any) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: The field's default; ``dict``/``list``/``set``/``tuple`` (the type) is a default factory;
            left out: a required option.
        **spec: The option's declaration: :class:`Option`'s attributes (``help``, ``flag``, ``choices``, ...).
    """
    if "aliases" in spec:
        spec["aliases"] = tuple(spec["aliases"])
    meta = Option(**spec)  # an unknown keyword is a TypeError here, where the option is declared
    kwargs: dict[str, Any] = {"metadata": {_META: meta}}
    if default in _FACTORIES:
        kwargs["default_factory"] = default
    elif default is not REQUIRED:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


@dataclass(frozen=True)
class Extra:
    """A command-line option that is not a configuration field (``--verbose``, ``--nproc``).

    Attributes:
        name: The command function's parameter name.
        option: Its declaration, from :func:`option` (a field object).
        after: The field after which it is listed in ``--help``; None: at the end.
    """

    name: str
    option: Any
    after: str | None = None

    def spec(self) -> tuple[Option, Any]:
        meta = dataclasses.replace(self.option.metadata[_META], name=self.name)
        if self.option.default_factory is not dataclasses.MISSING:
            return meta, self.option.default_factory()
        return meta, self.option.default


def options_of(config_cls: type) -> dict[str, Option]:
    """Field name -> its Option, for the fields of ``config_cls`` declared with :func:`option`."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if _META in f.metadata:
            out[f.name] = dataclasses.replace(f.metadata[_META], name=f.name)
    return out


def _keys(config_cls: type) -> dict[str, tuple[str, bool]]:
    """Every key a config file or a grid may use -> (field name, whether the value is inverted): the field's
    own name and its flag's name, with ``-`` or ``_``."""
    out: dict[str, tuple[str, bool]] = {}
    for name, opt in options_of(config_cls).items():
        out[name] = (name, False)
        for flag in (opt.long_flag, *opt.aliases):
            out.setdefault(flag.lstrip("-").replace("-", "_"), (name, opt.invert))
    return out


def field_for(config_cls: type, key: str, source: str) -> tuple[str, bool]:
    """The (field, inverted) a config key names; an unknown key is one line with the nearest name."""
    keys = _keys(config_cls)
    name = str(key).lstrip("-").replace("-", "_")
    if name not in keys:
        raise MmkdError(f"{source}: unknown key {key!r}{did_you_mean(name, keys)} (keys are option names)")
    return keys[name]


def config_kwargs(config_cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A config file's or a grid entry's mapping as ``config_cls`` keyword arguments: keys are field or
    option names, ``KEY=VALUE`` options take a mapping or a list of ``KEY=VALUE`` strings, choices and
    parsers are checked. Unknown keys and bad values are one-line MmkdErrors naming ``source``."""
    opts = options_of(config_cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name, inverted = field_for(config_cls, key, source)
        opt = opts[name]
        if opt.keyvalue and not isinstance(value, Mapping):
            items = value if isinstance(value, list) else [value]
            value = parse_options([v if isinstance(v, str) else json.dumps(v) for v in items], opt.long_flag)
        elif opt.repeat and not isinstance(value, list):
            value = [value]
        if opt.repeat:
            value = [opt.check(v) for v in value]
        elif not opt.keyvalue:
            value = opt.check(value)
        out[name] = (not value) if inverted and value is not None else value
    return out


def plain(value: Any) -> Any:
    """A configuration value as JSON has it (paths and URLs as strings, tuples as lists), for comparing
    a configuration with a recorded one."""
    return json.loads(json.dumps(value, default=str))


def differences(a: Any, b: Any, fields: Iterable[str]) -> list[str]:
    """The ``fields`` whose values differ between configurations ``a`` and ``b`` (compared as JSON)."""
    return [name for name in fields if plain(getattr(a, name)) != plain(getattr(b, name))]


# ------------------------------------------------------------------------------------------ the typer command


def _cli_type(opt: Option, annotation: Any) -> Any:
    if opt.type is not None:
        base = opt.type
    else:
        args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        if typing.get_origin(annotation) is typing.Union:
            args = typing.get_args(annotation)
        kept = [a for a in args if a is not type(None)]
        base = kept[0] if len(kept) == 1 and kept[0] in _SIMPLE else str
    if opt.known():
        base = choices(opt.names())
    return list[base] if (opt.repeat or opt.keyvalue) else base


def _typer_option(opt: Option, default: Any, annotation: Any) -> tuple[Any, Any]:
    """(annotation, typer.Option) of one option."""
    cli_type = _cli_type(opt, annotation)
    if opt.argument:
        return cli_type, typer.Argument(None, metavar=opt.metavar, help=opt.help_text(), show_default=False)
    decls = []
    if opt.flag is not None or opt.aliases:
        flag = opt.flag or "--" + opt.name.replace("_", "-")
        if cli_type is bool and "/" not in flag and not opt.invert:
            flag = f"{flag}/--no-{flag.lstrip('-')}"
        decls += [flag, *opt.aliases]
    kwargs: dict[str, Any] = {"help": opt.help_text(), "show_default": opt.show_default}
    if opt.metavar is not None:
        kwargs["metavar"] = opt.metavar
    if opt.known():
        kwargs["parser"] = choice(opt.long_flag, opt.noun or opt.name.replace("_", " "), *opt.known())
        kwargs.setdefault("metavar", "NAME")
    elif opt.parser is not None:
        kwargs["parser"] = opt.parser
    if opt.invert:
        default = False
    elif opt.repeat or opt.keyvalue or default is REQUIRED:
        default = ... if default is REQUIRED else None
    return cli_type, typer.Option(default, *decls, **kwargs)


def _ordered(config_cls: type, extra: Sequence[Extra]) -> list[tuple[Option, Any]]:
    """(option, default) of the fields in declaration order, each extra placed after its ``after`` field."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    placed: list[tuple[Option, Any]] = []
    for name, opt in options_of(config_cls).items():
        if not opt.cli:
            continue
        f = fields[name]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        placed.append((opt, default))
        placed += [e.spec() for e in extra if e.after == name]
    return placed + [e.spec() for e in extra if e.after is None]


def _field_value(opt: Option, value: Any) -> Any:
    if opt.keyvalue:
        return parse_options(value, opt.long_flag)
    if opt.repeat:
        return list(value or [])
    if opt.invert:
        return not value
    return value


def build_command(
    app: typer.Typer,
    config_cls: type,
    run: Callable[[Any, dict[str, Any], set[str]], Any],
    *,
    extra: Sequence[Extra] = (),
    epilog: str | None = None,
    doc: str | None = None,
    from_file: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    config_file: bool = True,
    cls: type = Command,
) -> Callable[..., Any]:
    """Register ``app``'s command: its options are ``config_cls``'s fields (declared with :func:`option`)
    and ``extra``, plus ``--config FILE``. The command builds the configuration and calls
    ``run(cfg, extras, given)``: ``extras`` maps the extra options' names to their values, ``given`` holds
    the fields set on the command line or by ``--config``.

    Args:
        from_file: Rewrites a ``--config`` file's mapping before it is read as option values (a stage
            reading its own recorded configuration).
        config_file: False for a command without ``--config``.
        cls: The click command class (:class:`mmkd.app.cli.Command` or a subclass).
    """
    hints = typing.get_type_hints(config_cls)
    specs = _ordered(config_cls, extra)
    extras = {e.name for e in extra}
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    if config_file:
        default = config_file_option(config_cls, from_file)
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Path))
    for opt, default in specs:
        annotation, typer_opt = _typer_option(opt, default, hints.get(opt.name, type(default)))
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(opt.name, kind, default=typer_opt, annotation=annotation))
    by_name = {opt.name: opt for opt, _ in specs}

    def command(ctx: typer.Context, config: Path | None = None, **values: Any) -> Any:
        kwargs = {k: _field_value(by_name[k], v) for k, v in values.items() if k not in extras}
        # by name: typer may bring its own copy of click, whose ParameterSource is another enum
        given = {
            p
            for p in ctx.params
            if p in kwargs and getattr(ctx.get_parameter_source(p), "name", None) in ("COMMANDLINE", "DEFAULT_MAP")
        }
        return run(config_cls(**kwargs), {k: values[k] for k in extras}, given)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc or (config_cls.__doc__ or "").split("\n")[0]
    return app.command(cls=cls, epilog=epilog)(guarded(command))


def config_file_option(config_cls: type, from_file: Callable[[dict[str, Any]], dict[str, Any]] | None) -> Any:
    """The ``--config FILE`` option: the file's values become the command's defaults, so options given on
    the command line override them. Keys are field or option names. Eager: read before the options it sets."""

    def load(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
        if value is None or ctx.resilient_parsing:
            return value
        data = read_config(value)
        if from_file is not None:
            data = from_file(data)
        values = config_values(ctx, value, _as_params(ctx, config_cls, value, data))
        ctx.default_map = {**(ctx.default_map or {}), **values}
        ctx.meta["mmkd.config"] = value
        return value

    return typer.Option(
        None,
        "--config",
        metavar="FILE",
        is_eager=True,
        callback=load,
        help="YAML or JSON file of option values, keyed by option name (batch_size: 32); options on the "
        "command line override it.",
    )


def _as_params(ctx: typer.Context, config_cls: type, path: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's keys as the command's parameter names. A parameter holds what its flag says: the
    field of an inverted flag (``progress`` behind ``--quiet``) is read inverted."""
    opts = options_of(config_cls)
    params = {p.name for p in ctx.command.params}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in opts and opts[name].invert:
            out[name] = (not value) if isinstance(value, bool) else value
        elif name in params:
            out[name] = value
        else:
            out[field_for(config_cls, key, f"--config {path}")[0]] = value
    return out
