"""One config dataclass per job, filled from the command line and optionally a YAML file.

Each field of the dataclass becomes a ``--flag`` (:mod:`retinaface_core.flags`, shared with the
core's own command line): underscores become dashes, the help text is the field's
``metadata={"help": ...}``, a field whose type is itself a settings dataclass shared by several
jobs (``DetectorSettings``, ``StorageOptions``) is embedded whole and its fields become flags of
their own, named with the prefix given in ``metadata={"flatten": PREFIX}``
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from retinaface_core.flags import add_flags, flag_names, from_values, setting_flags, spelling
from retinaface_core.storage import redact

__all__ = ["add_flags", "build_parser", "config_dict", "flag_names", "format_config", "from_values", "parse_config"]

T = TypeVar("T")


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
    flags = {flag.name: flag for flag in setting_flags(cls)}
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
    missing = [spelling(flag) for flag in setting_flags(cls) if flag.default is dataclasses.MISSING and flag.name not in values]
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
