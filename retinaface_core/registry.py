"""A model registry on any fsspec URI: versioned artifacts, a ``current`` pointer, a promotion gate.

Layout under the registry root (``s3://bucket/models/retinaface``, a local folder, ...)::

    v0001/model.pth       {"state_dict": ..., "config": {...}}: loads with Detector(weights=...)
    v0001/config.json     the RetinaFace config and the training job's config
    v0001/metrics.json    training and validation metrics (val AP per level)
    v0001/manifest.json   version, sha256 of model.pth, created time, training data URIs, metrics;
                          written last: a version without it is incomplete and invisible
    current.json          {"version": "v0003", "stack": [...], "history": [...]}

``current.json`` changes with one atomic write (a single PUT on object stores; write and rename
locally), so readers see the old or the new pointer, never a mix. Promotion moves it only when
the candidate's val AP is not lower than the current model's on any level, measured on the same
validation data: the same scale and, by content fingerprint, the same images and ground truth
(records without fingerprints fall back to the URIs in canonical spelling); ``force`` overrides.
Registering bytes the registry already holds returns the existing version. Each promotion pushes onto ``stack``; a rollback pops back
to the version current before, or jumps to a named one. Concurrent registrations into the same
registry are not coordinated (no conditional writes): run one training job per registry at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec

from .storage import StorageOptions, canonical_uri, filesystem, full_uri, write_atomic
from .widerface import LEVELS

MODEL_FILE = "model.pth"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "current.json"
_VERSION = re.compile(r"^v(\d{4,})$")
FINGERPRINT_KEYS = ("images_sha256", "ground_truth_sha256")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, missing metrics, ...)."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model, as its manifest describes it."""

    version: str
    uri: str
    checkpoint_uri: str
    sha256: str
    created: str
    metrics: dict[str, Any]
    train_data: dict[str, Any]

    @property
    def val_ap(self) -> dict[str, float] | None:
        """AP per WIDER level on the validation data, when the model was evaluated."""
        val = self.metrics.get("val") or {}
        return val.get("ap")

    @property
    def val_data(self) -> dict[str, Any]:
        """What the validation AP was measured on: URIs, scale and (since they exist) fingerprints."""
        return (self.metrics.get("val") or {}).get("data") or {}


class PromotionDecision(NamedTuple):
    """Outcome of :meth:`ModelRegistry.promote`: whether ``version`` became current, and why (not)."""

    promoted: bool
    version: str
    previous: str | None
    reason: str


class ResolvedModel(NamedTuple):
    """A checkpoint to load, and the registry version it is (None when not from a registry)."""

    checkpoint_uri: str | None
    version: str | None


def validation_record(
    ap: dict[str, float],
    *,
    val: str,
    val_gt: str | None,
    scale: str,
    fingerprint: dict[str, str] | None = None,
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """The ``metrics["val"]`` entry the gate compares: AP per level and what it was measured on.

    ``fingerprint`` is :func:`training.validation_fingerprint` of the data; the URIs are stored
    in canonical spelling (see :func:`storage.canonical_uri`) for people and for older records.
    """
    data = {
        "val": canonical_uri(val, storage),
        "val_gt": canonical_uri(val_gt, storage) if val_gt else None,
        "scale": scale,
        **(fingerprint or {}),
    }
    return {"data": data, "ap": dict(ap)}


def same_validation_data(a: dict[str, Any], b: dict[str, Any], storage: StorageOptions | None = None) -> bool:
    """Whether two validation records measured on the same thing.

    The same scale, and: the same fingerprints when both records carry them (whatever the URIs
    say); otherwise (a record written before fingerprints existed) the same URIs once spelled
    canonically, so ``s3://b/val/`` and ``s3://b/val`` agree.
    """
    if a.get("scale") != b.get("scale"):
        return False
    if all(key in a and key in b for key in FINGERPRINT_KEYS):
        return all(a[key] == b[key] for key in FINGERPRINT_KEYS)

    def spelled(uri: str | None) -> str | None:
        return canonical_uri(uri, storage) if uri else None

    return all(spelled(a.get(key)) == spelled(b.get(key)) for key in ("val", "val_gt"))


def _describe_data(data: dict[str, Any]) -> str:
    fingerprints = ", ".join(f"{key} {data[key][:12]}" for key in FINGERPRINT_KEYS if key in data) or "no fingerprint"
    return f"{data.get('val')} (gt {data.get('val_gt')}, {fingerprints}) at {data.get('scale')}"


def version_label(checkpoint_uri: str, version: str) -> str:
    """``NAME@vNNNN`` for the checkpoint ``.../NAME/vNNNN/model.pth`` of a registry version, NAME being
    the registry folder's name: what outputs record as the model, where ``model.pth`` says nothing."""
    return f"{posixpath.basename(posixpath.dirname(posixpath.dirname(checkpoint_uri)))}@{version}"


def version_name(number: int) -> str:
    return f"v{number:04d}"


class ModelRegistry:
    """The registry rooted at ``uri`` (created on first registration)."""

    def __init__(self, uri: str, storage: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage or StorageOptions()
        self.fs, self.root = filesystem(self.uri, storage)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _uri(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts)

    def _write(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)

    def _write_json(self, path: str, obj: Any) -> None:
        self._write(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def _read_json(self, path: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def versions(self) -> list[str]:
        """Complete versions (with a manifest), oldest first."""
        self.fs.invalidate_cache()
        found = []
        for manifest in self.fs.glob(self._path("v*", MANIFEST_FILE)):
            name = posixpath.basename(posixpath.dirname(manifest))
            if _VERSION.match(name):
                found.append(name)
        return sorted(found, key=lambda v: int(v[1:]))

    def get(self, version: str) -> ModelVersion:
        manifest = self._read_json(self._path(version, MANIFEST_FILE))
        if manifest is None:
            raise RegistryError(f"{self.uri}: no version {version!r} (have {', '.join(self.versions()) or 'none'})")
        return ModelVersion(
            version=version,
            uri=self._uri(version),
            checkpoint_uri=self._uri(version, MODEL_FILE),
            sha256=manifest["sha256"],
            created=manifest["created"],
            metrics=manifest.get("metrics", {}),
            train_data=manifest.get("train_data", {}),
        )

    def pointer(self) -> dict[str, Any]:
        return self._read_json(self._path(CURRENT_FILE)) or {"version": None, "stack": [], "history": []}

    def current(self) -> str | None:
        """The current version, or None before the first promotion."""
        return self.pointer()["version"]

    def find(self, sha256: str) -> ModelVersion | None:
        """The oldest version whose ``model.pth`` has this sha256, if any."""
        for version in self.versions():
            entry = self.get(version)
            if entry.sha256 == sha256:
                return entry
        return None

    def register(
        self,
        model_bytes: bytes,
        *,
        config: dict[str, Any],
        metrics: dict[str, Any],
        train_data: dict[str, Any],
    ) -> ModelVersion:
        """Store a new version; ``model_bytes`` is a ``{"state_dict", "config"}`` .pth file's content.

        Bytes already registered return their existing version unchanged (a rerun of a finished
        training run registers nothing new); compare ``versions()`` before and after to tell.

        Args:
            config: JSON-able configuration (the RetinaFace config and the job's settings).
            metrics: JSON-able metrics; ``metrics["val"] = {"data": ..., "ap": {level: AP}}``
                is what the promotion gate compares.
            train_data: the training/validation data URIs the model was made from.
        """
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        known = self.find(sha256)
        if known is not None:
            return known
        existing = [int(v[1:]) for v in self.versions()]
        version = version_name(max(existing, default=0) + 1)
        if self.fs.exists(self._path(version, MANIFEST_FILE)):
            raise RegistryError(f"{self.uri}: {version} appeared meanwhile; another job is registering here")
        self._write(self._path(version, MODEL_FILE), model_bytes)
        self._write_json(self._path(version, "config.json"), config)
        self._write_json(self._path(version, "metrics.json"), metrics)
        manifest = {
            "version": version,
            "model": MODEL_FILE,
            "sha256": sha256,
            "created": _now(),
            "metrics": metrics,
            "train_data": train_data,
        }
        self._write_json(self._path(version, MANIFEST_FILE), manifest)
        return self.get(version)

    def check_promotion(self, version: str) -> tuple[bool, str]:
        """(whether ``version`` passes the gate against the current model, the reason)."""
        candidate = self.get(version)
        current_name = self.current()
        if current_name == version:
            return False, f"{version} is already current"
        if candidate.val_ap is None:
            return False, f"{version} has no validation AP"
        if current_name is None:
            return True, "no current model yet"
        current = self.get(current_name)
        if current.val_ap is None:
            return False, f"current {current_name} has no validation AP to compare with"
        if not same_validation_data(candidate.val_data, current.val_data, self.storage):
            return False, (
                f"{version} was validated on {_describe_data(candidate.val_data)}, current {current_name} on "
                f"{_describe_data(current.val_data)}: APs on different data are not comparable"
            )
        worse = [
            f"{level} {candidate.val_ap[level]:.4f} < {current.val_ap[level]:.4f}"
            for level in LEVELS
            if not candidate.val_ap[level] >= current.val_ap[level]
        ]
        if worse:
            return False, f"val AP regressed against current {current_name}: " + ", ".join(worse)
        summary = ", ".join(f"{level} {candidate.val_ap[level]:.4f} >= {current.val_ap[level]:.4f}" for level in LEVELS)
        return True, f"val AP not lower than current {current_name} on any level ({summary})"

    def promote(self, version: str, *, force: bool = False) -> PromotionDecision:
        """Make ``version`` current if it passes the gate (or ``force``); the pointer is untouched otherwise.

        Promoting the current version changes nothing and counts as promoted (``previous ==
        version``): a rerun of the same promotion is not a refusal.
        """
        self.get(version)
        previous = self.current()
        if previous == version:
            return PromotionDecision(True, version, previous, f"{version} is already current: nothing to do")
        passed, reason = self.check_promotion(version)
        if not passed and not force:
            return PromotionDecision(False, version, previous, reason)
        if not passed:
            reason = f"forced: {reason}"
        pointer = self.pointer()
        stack = [v for v in pointer["stack"] if v != version] + [version]
        self._set_pointer(version, stack, pointer["history"], "promote", previous, reason)
        return PromotionDecision(True, version, previous, reason)

    def rollback(self, to: str | None = None) -> str:
        """Make the previously current version (or ``to``) current again; returns it.

        Without ``to`` this undoes the latest promotion. With ``to`` the named version becomes
        current whatever its metrics (an operator's decision), and later promotions are
        dropped from the stack; ``to`` the current version changes nothing.
        """
        pointer = self.pointer()
        current, stack = pointer["version"], list(pointer["stack"])
        if to is not None and to == current:
            return current  # nothing to undo; the history records only moves
        if to is None:
            if len(stack) < 2:
                raise RegistryError(f"{self.uri}: nothing to roll back to (promoted versions: {stack or 'none'})")
            stack.pop()
            target = stack[-1]
        else:
            self.get(to)
            target = to
            stack = stack[: stack.index(to) + 1] if to in stack else stack + [to]
        self._set_pointer(target, stack, pointer["history"], "rollback", current, f"rollback from {current}")
        return target

    def _set_pointer(
        self, version: str, stack: list[str], history: list[dict[str, Any]], action: str, previous: str | None, reason: str
    ) -> None:
        event = {"time": _now(), "action": action, "version": version, "previous": previous, "reason": reason}
        self._write_json(self._path(CURRENT_FILE), {"version": version, "stack": stack, "history": [*history, event]})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def resolve_model(uri: str, storage: StorageOptions | None = None) -> ResolvedModel:
    """Turn a ``--model`` value into a checkpoint to load.

    - a registry root (holds ``current.json``): its current version's ``model.pth``;
    - a version folder ``REGISTRY/v0003``, or its ``model.pth``: that version's ``model.pth``;
    - a training checkpoint folder (holding ``model.pth``): that file; a training run's folder
      (holding ``checkpoint_*/model.pth``): the newest checkpoint's, the folder names sorting by
      time. So the folders the training job prints load as printed;
    - anything else (a checkpoint name, path or URI) passes through with version None.

    Raises :class:`RegistryError` for a registry with versions but none current yet, or a version
    folder without a manifest (an incomplete registration).
    """
    stripped = uri.rstrip("/")
    if "/" not in stripped and "://" not in stripped and not os.path.exists(stripped):
        return ResolvedModel(uri, None)
    fs, path = filesystem(stripped, storage)
    # A version's own model.pth is that version too, so that outputs still say which one.
    folder = posixpath.dirname(stripped) if posixpath.basename(path) == MODEL_FILE else stripped
    name = posixpath.basename(folder)
    if _VERSION.match(name):
        parent = ModelRegistry(posixpath.dirname(folder), storage)
        if _is_registry(parent):
            return ResolvedModel(parent.get(name).checkpoint_uri, name)
    if fs.isdir(path):
        registry = ModelRegistry(stripped, storage)
        if _is_registry(registry):
            current = registry.current()
            if current is None:
                raise RegistryError(f"{uri}: the registry has no current version; promote one first")
            return ResolvedModel(registry.get(current).checkpoint_uri, current)
        found = _checkpoint_in_folder(fs, path)
        if found is not None:
            return ResolvedModel(full_uri(fs, found), None)
    return ResolvedModel(uri, None)


def _checkpoint_in_folder(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """``path/model.pth``, else the newest ``path/checkpoint_*/model.pth``, else None."""
    direct = posixpath.join(path, MODEL_FILE)
    if fs.isfile(direct):
        return direct
    nested = sorted(fs.glob(posixpath.join(path, "checkpoint_*", MODEL_FILE)))
    return nested[-1] if nested else None


def _is_registry(registry: ModelRegistry) -> bool:
    return registry.fs.exists(registry._path(CURRENT_FILE)) or bool(registry.versions())
