"""Inspect and move the model registry's ``current`` pointer.

::

    python -m jobs.registry list     --registry s3://bucket/models/retinaface
    python -m jobs.registry show     --registry URI [VERSION]      (default: the current one)
    python -m jobs.registry promote  --registry URI VERSION [--force]
    python -m jobs.registry rollback --registry URI [--to VERSION]
    python -m jobs.registry register --registry URI --checkpoint NAME|PATH|URI --val URI [--val-gt DIR] [--val-scale long:640]

``register`` evaluates an existing checkpoint (e.g. the published one, to have a baseline to
promote against; or a training checkpoint folder as ``jobs.train`` prints it) on a validation
set and stores it as the next version; a checkpoint the registry already holds (same sha256)
keeps its version.

Exit status (``docs/exit_codes.md``): 0 done or nothing to do (``promote`` of the current version,
``rollback --to`` the current version); 3 when the gate refuses the version (its val AP is lower
than the current model's on some level, or it was measured on other data; ``--force`` promotes
anyway); 2 on an error, said in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from retinaface_core.registry import ModelRegistry, ModelVersion, RegistryError, resolve_model, validation_record
from retinaface_core.storage import StorageOptions
from retinaface_core.training import (
    ground_truth_from_dataset,
    model_checkpoint_bytes,
    open_wider_dataset,
    validate,
    validation_fingerprint,
)
from retinaface_core.weights import CheckpointError, load_weights
from retinaface_core.widerface import LEVELS, read_ground_truth_mat

from ._config import add_flags, flag_names, from_values
from ._exit import ExitCode


@dataclass
class RegistrySettings:
    """The settings every registry command shares."""

    registry: str = field(metadata={"help": "registry URI (local path, s3://..., any fsspec URI)"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})


def _format_ap(ap: dict[str, float] | None) -> str:
    if not ap:
        return "-"
    return " / ".join(f"{ap[level]:.4f}" for level in LEVELS)


def _list(registry: ModelRegistry, args: argparse.Namespace) -> ExitCode:
    current = registry.current()
    print(f"{'':2}{'version':<9}{'created':<27}{'val AP easy / medium / hard':<30}sha256")
    for version in registry.versions():
        entry = registry.get(version)
        mark = "* " if version == current else "  "
        print(f"{mark}{version:<9}{entry.created:<27}{_format_ap(entry.val_ap):<30}{entry.sha256[:12]}")
    return ExitCode.OK


def _register_checkpoint(
    registry: ModelRegistry, checkpoint: str, val: str, val_gt: str | None, scale: str, storage: StorageOptions
) -> ModelVersion:
    resolved, _ = resolve_model(checkpoint, storage)
    loaded = load_weights(resolved, storage=storage)
    dataset = open_wider_dataset(val, storage=storage)
    ground_truth = read_ground_truth_mat(val_gt, storage) if val_gt else ground_truth_from_dataset(dataset)
    ap = validate(loaded.model, loaded.config, dataset, ground_truth, scale=scale)
    record = validation_record(
        ap, val=val, val_gt=val_gt, scale=scale, fingerprint=validation_fingerprint(dataset, ground_truth), storage=storage
    )
    return registry.register(
        model_checkpoint_bytes(loaded.model),
        config={"model": loaded.config.to_dict(), "source": {"checkpoint": checkpoint, "sha256": loaded.sha256}},
        metrics={"val": record},
        train_data={"init": checkpoint, "val": val, "val_gt": val_gt},
    )


def _show(registry: ModelRegistry, args: argparse.Namespace) -> ExitCode:
    version = args.version or registry.current()
    if version is None:
        raise RegistryError(f"{args.registry}: no current version")
    entry = registry.get(version)
    print(json.dumps({**entry.__dict__, "current": version == registry.current()}, indent=2))
    return ExitCode.OK


def _promote(registry: ModelRegistry, args: argparse.Namespace) -> ExitCode:
    version = args.version
    if version == "latest":
        if not registry.versions():
            raise RegistryError(f"{args.registry}: no registered version")
        version = registry.versions()[-1]
    decision = registry.promote(version, force=args.force)
    if decision.previous == decision.version:
        print(f"unchanged: {decision.reason}")
        return ExitCode.OK
    verdict = "promoted" if decision.promoted else "refused"
    print(f"{verdict} {decision.version} (previous: {decision.previous}): {decision.reason}")
    return ExitCode.OK if decision.promoted else ExitCode.REFUSED


def _rollback(registry: ModelRegistry, args: argparse.Namespace) -> ExitCode:
    previous = registry.current()
    target = registry.rollback(args.to)
    if target == previous:
        print(f"unchanged: {target} is already current, nothing to roll back")
    else:
        print(f"current: {target} (was {previous})")
    return ExitCode.OK


def _register(registry: ModelRegistry, args: argparse.Namespace) -> ExitCode:
    before = set(registry.versions())
    entry = _register_checkpoint(registry, args.checkpoint, args.val, args.val_gt, args.val_scale, registry.storage)
    verb = "already registered as" if entry.version in before else "registered"
    print(f"{verb} {entry.version}: val AP easy / medium / hard {_format_ap(entry.val_ap)}")
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per action, each naming its function (``func``): ``main`` calls it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    add_flags(common, RegistrySettings)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="versions, their val AP; * marks the current one").set_defaults(func=_list)
    show = commands.add_parser("show", parents=[common], help="one version's manifest")
    show.add_argument("version", nargs="?")
    show.set_defaults(func=_show)
    promote = commands.add_parser("promote", parents=[common], help="make a version current if its val AP is not lower on any level")
    promote.add_argument("version", help="a version (v0003) or 'latest', the newest registered one")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    promote.set_defaults(func=_promote)
    rollback = commands.add_parser("rollback", parents=[common], help="make the previously current version (or --to) current again")
    rollback.add_argument("--to", help="version to make current")
    rollback.set_defaults(func=_rollback)
    register = commands.add_parser(
        "register", parents=[common], help="evaluate a checkpoint on a validation set and add it as a new version"
    )
    register.add_argument("--checkpoint", required=True, help="checkpoint name, path or URI")
    register.add_argument("--val", required=True, help="validation dataset URI (images/ + label.txt or *bbx_gt.txt)")
    register.add_argument("--val-gt", help="folder of the official wider_*_val.mat files")
    register.add_argument("--val-scale", default="long:640", help="detector input scale (default: long:640)")
    register.set_defaults(func=_register)
    return parser


def main(argv: Sequence[str] | None = None) -> ExitCode:
    """Run one sub-command; FAILED for a reported error, REFUSED when the gate refuses (``docs/exit_codes.md``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if "registry" not in args:
        parser.error("the following arguments are required: --registry")
    settings = from_values(RegistrySettings, {k: v for k, v in vars(args).items() if k in flag_names(RegistrySettings)})
    registry = ModelRegistry(settings.registry, settings.s3)
    try:
        return args.func(registry, args)
    except (RegistryError, CheckpointError, OSError) as exc:
        print(f"registry: error: {exc}", file=sys.stderr, flush=True)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
