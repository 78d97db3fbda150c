"""One config dataclass per job, filled from the command line and optionally a YAML file.

Each field of the dataclass becomes a ``--flag`` (underscores become dashes), its help text taken
from ``field(metadata={"help": ...})``. A field whose type is itself a settings dataclass shared
by several jobs (``DetectorSettings``, ``StorageOptions``) is embedded whole and its fields
become flags of their own, named with the prefix given in ``metadata={"flatten": PREFIX}``
(``StorageOptions.endpoint_url`` with prefix ``s3_`` is ``--s3-endpoint-url``); each job chooses
its defaults through the field's ``default_factory``. ``--config file.yaml`` supplies values
first (flat flag names, or a mapping per embedded field) and flags given explicitly override
them. Booleans are ``--flag/--no-flag``. A field with ``metadata={"positional": True}`` is
given without a flag (``NAME``, optional on the command line so that YAML can supply it). A field without a default is required (from either
source). ``Optional`` fields accept ``none`` on the command line.

Flat flags rather than dotted ones (``--detector.scale``): they are what the manifests in
``infra/``, the docs and users' scripts already say, and no two embedded settings share a name.

Example::

    @dataclass
    class TrainConfig:
        data: str = field(metadata={"help": "dataset URI"})
        epochs: int = field(default=10, metadata={"help": "passes over the data"})
        storage: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})

    config = parse_config(TrainConfig, argv)
    print(format_config(config))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from retinaface_core.storage import redact

T = TypeVar("T")


class _Flag(NamedTuple):
    """One command-line flag: which field (and, for an embedded settings object, which of its fields)."""

    name: str
    outer: str
    inner: str | None
    field: dataclasses.Field
    type: Any
    default: Any


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a possibly Optional annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flags(cls: type) -> Iterator[_Flag]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        prefix = f.metadata.get("flatten")
        if prefix is None:
            yield _Flag(f.name, f.name, None, f, hints[f.name], _default(f))
            continue
        inner_cls = hints[f.name]
        defaults = _default(f)
        inner_hints = typing.get_type_hints(inner_cls)
        for inner in dataclasses.fields(inner_cls):
            yield _Flag(prefix + inner.name, f.name, inner.name, inner, inner_hints[inner.name], getattr(defaults, inner.name))


def _parser_for(type_: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        return type_(text)

    parse.__name__ = getattr(type_, "__name__", "value")
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per (flattened) field of the dataclass ``cls``, all defaulting to unset."""
    for flag in _flags(cls):
        type_, optional = _base_type(flag.type)
        help_text = flag.field.metadata.get("help", "")
        if flag.default is dataclasses.MISSING:
            help_text += " (required)"
        elif "(default:" not in help_text:
            help_text += f" (default: {flag.default})"
        option = "--" + flag.name.replace("_", "-")
        if flag.field.metadata.get("positional"):
            parser.add_argument(
                flag.name,
                nargs="?",
                type=_parser_for(type_, optional),
                default=argparse.SUPPRESS,
                metavar=flag.name.upper(),
                help=help_text,
            )
        elif type_ is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                option,
                type=_parser_for(type_, optional),
                default=argparse.SUPPRESS,
                choices=flag.field.metadata.get("choices"),
                help=help_text,
            )


def _spelling(flag: _Flag) -> str:
    """How a setting is written on the command line: ``NAME`` (positional) or ``--flag-name``."""
    return flag.name.upper() if flag.field.metadata.get("positional") else "--" + flag.name.replace("_", "-")


def flag_names(cls: type) -> set[str]:
    """The (flattened) setting names of ``cls``, as ``add_flags`` stores them on a namespace."""
    return {flag.name for flag in _flags(cls)}


def from_values(cls: type[T], values: dict[str, Any]) -> T:
    """A ``cls`` from flat flag values (``{"s3_endpoint_url": ...}``); unset fields keep their defaults."""
    flags = list(_flags(cls))
    unknown = sorted(set(values) - {flag.name for flag in flags})
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    outer: dict[str, Any] = {}
    embedded: dict[str, dict[str, Any]] = {}
    for flag in flags:
        if flag.inner is None:
            if flag.name in values:
                outer[flag.name] = values[flag.name]
        else:
            settings = embedded.setdefault(flag.outer, {})
            settings[flag.inner] = values.get(flag.name, flag.default)
    hints = typing.get_type_hints(cls)
    outer.update({name: hints[name](**settings) for name, settings in embedded.items()})
    return cls(**outer)


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per (flattened) field of the dataclass ``cls``; ``prog``
    names the command in its usage line (default: the script's file name)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags given here override it")
    add_flags(parser, cls)
    return parser


def _yaml_values(cls: type, path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flat flag values from a YAML file of flat names or one mapping per embedded settings field."""
    loaded = yaml.safe_load(path.read_text()) or {}
    flags = {flag.name: flag for flag in _flags(cls)}
    by_field = {(flag.outer, flag.inner): flag.name for flag in flags.values()}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in loaded.items():
        key = key.replace("-", "_")
        if isinstance(value, dict) and any(outer == key for outer, _ in by_field):
            for inner, inner_value in value.items():
                name = by_field.get((key, inner.replace("-", "_")))
                if name is None:
                    unknown.append(f"{key}.{inner}")
                else:
                    values[name] = inner_value
        elif key in flags:
            values[key] = value
        else:
            unknown.append(key)
    if unknown:
        parser.error(f"{path}: unknown settings {sorted(unknown)}")
    return values


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None, prog: str | None = None) -> T:
    """Build a ``cls`` from a YAML file (``--config``) and flags; flags win. Exits on bad input."""
    parser = build_parser(cls, description, prog)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    values = _yaml_values(cls, config_file, parser) if config_file is not None else {}
    values.update(args)
    missing = [_spelling(flag) for flag in _flags(cls) if flag.default is dataclasses.MISSING and flag.name not in values]
    if missing:
        parser.error(f"missing required settings: {', '.join(missing)}")
    try:
        return from_values(cls, values)
    except ValueError as exc:
        parser.error(str(exc))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-serialisable dict, credentials in URLs redacted (what is stored and printed)."""
    return _redacted(json.loads(json.dumps(dataclasses.asdict(config), default=str)))


def format_config(config: Any) -> str:
    """One ``name: value`` line per setting (embedded settings as ``outer.inner``), for a job's log."""
    items: dict[str, Any] = {}
    for key, value in config_dict(config).items():
        if isinstance(value, dict):
            items.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            items[key] = value
    width = max(map(len, items), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())
