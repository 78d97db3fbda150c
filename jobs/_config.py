"""One config dataclass per job, filled from the command line and optionally a YAML file.

Each field of the dataclass becomes a ``--flag`` (underscores become dashes), its help text taken
from ``field(metadata={"help": ...})``. ``--config file.yaml`` supplies values first and flags
given explicitly override them. Booleans are ``--flag/--no-flag``. A field without a default is
required (from either source). ``Optional`` fields accept ``none`` on the command line.

Example::

    @dataclass
    class TrainConfig:
        data: str = field(metadata={"help": "dataset URI"})
        epochs: int = field(default=10, metadata={"help": "passes over the data"})

    config = parse_config(TrainConfig, argv)
    print(format_config(config))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a possibly Optional annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _parser_for(type_: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        return type_(text)

    parse.__name__ = getattr(type_, "__name__", "value")
    return parse


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls``, all defaulting to unset."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML file of settings; flags given here override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        type_, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING:
            help_text += f" (default: {f.default_factory()})"
        else:
            help_text += " (required)"
        if type_ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(
                flag, type=_parser_for(type_, optional), default=argparse.SUPPRESS, choices=choices, help=help_text
            )
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build a ``cls`` from a YAML file (``--config``) and flags; flags win. Exits on bad input."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - names)
        if unknown:
            parser.error(f"{config_file}: unknown settings {unknown}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(args)
    missing = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error(f"missing required settings: {', '.join(missing)}")
    return cls(**values)


def config_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-serialisable dict (what is stored beside a job's output)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def format_config(config: Any) -> str:
    """One ``name: value`` line per setting, for the start of a job's log."""
    items = config_dict(config)
    width = max(map(len, items), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())
