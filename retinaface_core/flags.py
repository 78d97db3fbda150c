"""Settings dataclasses as command-line flags, for the jobs and the core's own command line alike.

Each field of a dataclass becomes a ``--flag`` (underscores become dashes), its help text taken
from ``field(metadata={"help": ...})`` followed by its default. A field whose type is itself a
settings dataclass (``DetectorSettings``, ``StorageOptions``) is embedded whole and its fields
become flags of their own, named with the prefix given in ``metadata={"flatten": PREFIX}``
(``StorageOptions.endpoint_url`` with prefix ``s3_`` is ``--s3-endpoint-url``); each command
chooses its defaults through the field's ``default_factory``. Booleans are ``--flag/--no-flag``;
``Optional`` fields accept ``none``. Flags are added unset (``argparse.SUPPRESS``), so that the
caller knows which were given; :func:`from_values` builds the dataclass from those.

:data:`ANNOTATION_DEFAULTS` are the detector settings both command lines that annotate photos
(``python -m retinaface_core`` and ``jobs.annotate``) start from, so that they find the same
faces unless told otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any, NamedTuple, TypeVar

from .detector import DetectorSettings

T = TypeVar("T")

ANNOTATION_DEFAULTS = DetectorSettings(scale="long:640", batching="bucket")
"""The detector settings of the command lines: a long side of 640 px and full batches (for
throughput on photos of any size), where the :class:`Detector` API defaults to each image's
original size and exact batching (the reference's results)."""


class Flag(NamedTuple):
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


def setting_flags(cls: type) -> Iterator[Flag]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        prefix = f.metadata.get("flatten")
        if prefix is None:
            yield Flag(f.name, f.name, None, f, hints[f.name], _default(f))
            continue
        inner_cls = hints[f.name]
        defaults = _default(f)
        inner_hints = typing.get_type_hints(inner_cls)
        for inner in dataclasses.fields(inner_cls):
            yield Flag(prefix + inner.name, f.name, inner.name, inner, inner_hints[inner.name], getattr(defaults, inner.name))


def _parser_for(type_: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if type_ is int:
            return _integer(text)
        return type_(text)

    parse.__name__ = getattr(type_, "__name__", "value")
    return parse


def _integer(text: str) -> int:
    """An integer, also written as a float with an integral value (``3e8`` for ``300000000``)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per (flattened) field of the dataclass ``cls``, all defaulting to unset."""
    for flag in setting_flags(cls):
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


def spelling(flag: Any) -> str:
    """How a setting is written on the command line: ``NAME`` (positional) or ``--flag-name``."""
    return flag.name.upper() if flag.field.metadata.get("positional") else "--" + flag.name.replace("_", "-")


def flag_names(cls: type) -> set[str]:
    """The (flattened) setting names of ``cls``, as ``add_flags`` stores them on a namespace."""
    return {flag.name for flag in setting_flags(cls)}


def from_values(cls: type[T], values: dict[str, Any]) -> T:
    """A ``cls`` from flat flag values (``{"s3_endpoint_url": ...}``); unset fields keep their defaults."""
    flags = list(setting_flags(cls))
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
