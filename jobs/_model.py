"""The model a job runs: resolved once on the driver, loaded and verified the same way on every worker.

The driver resolves a registry's current version once (it could move mid-run), loads the
checkpoint to fail fast on a bad one and records its sha256; every worker then loads exactly
that checkpoint and refuses to run if it hashes to anything else, so one output never mixes
two models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from retinaface_core import Detector, DetectorSettings
from retinaface_core.registry import RegistryError, version_label
from retinaface_core.storage import StorageOptions
from retinaface_core.weights import CheckpointError, LoadedWeights, load_weights

from ._exit import JobError


@dataclass(frozen=True)
class ModelIdentity:
    """The checkpoint the driver resolved, its registry version, its name and hash.

    ``checkpoint`` is as given (a name, URI or None for the default), not the driver's local
    file: each worker resolves it on its own node, and the hash proves it found the same bytes.
    """

    checkpoint: str | None
    version: str | None
    name: str
    sha256: str


def resolve_model_identity(settings: DetectorSettings, storage: StorageOptions) -> tuple[ModelIdentity, LoadedWeights]:
    """Resolve and load the model of ``settings`` on the driver; :class:`JobError` names what failed."""
    try:
        checkpoint, version = settings.resolve(storage)
        weights = load_weights(checkpoint, config=settings.model_config, storage=storage)
    except (CheckpointError, RegistryError, OSError) as exc:
        raise JobError(f"model not available: {exc}") from exc
    # A registry's files are all called model.pth: the registry and version name the model.
    name = version_label(checkpoint, version) if version and checkpoint else weights.name
    return ModelIdentity(checkpoint, version, name, weights.sha256), weights


def pick_device(num_gpus: float) -> str:
    """``cuda`` for a worker that was given GPUs (Ray makes them its visible devices), else ``cpu``."""
    if num_gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"this worker was given {num_gpus} GPU(s) but torch sees no CUDA device")
    return "cuda"


def load_detector(settings: DetectorSettings, storage: StorageOptions, model: ModelIdentity, num_gpus: float) -> Detector:
    """The worker's detector: exactly the checkpoint the driver resolved, on the device it was given."""
    pinned = dataclasses.replace(settings, weights=model.checkpoint, model=None)
    detector = Detector.from_settings(pinned, device=pick_device(num_gpus), storage=storage)
    if detector.weights.sha256 != model.sha256:
        # A worker resolving the same name to another file would silently mix two models.
        raise RuntimeError(
            f"worker loaded checkpoint {detector.weights.uri} with sha256 {detector.weights.sha256}, the driver {model.sha256}"
        )
    return detector
