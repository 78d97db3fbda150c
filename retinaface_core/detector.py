"""The public face detector: images in, :class:`Detections` out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .anchors import cached_priors
from .batching import BATCHING_POLICIES, PRECISIONS, BatchingPolicy, BatchStats, network_dtype
from .config import RetinaFaceConfig
from .model import RetinaFaceOutput, optimize_for_inference
from .postprocessing import Candidates, Detections, decode_candidates, select
from .preprocessing import InputGroup, InputScale, group_batch, to_network_input
from .registry import ResolvedModel, resolve_model
from .runtime import bound_kernel_caches, keep_freed_memory
from .storage import StorageOptions
from .tta import TTA, detect_with_tta
from .weights import LoadedWeights, load_weights


@dataclass(frozen=True)
class DetectorSettings:
    """Which model a :class:`Detector` runs and how; every job embeds one (its flags, its YAML).

    ``weights`` is a checkpoint (name, path or URI) and ``model`` a model registry (its current
    version) or one of its versions (``REGISTRY/v0003``); give at most one. The rest are the
    :class:`Detector` arguments of the same names. Invalid values raise ``ValueError``.
    """

    weights: str | None = field(default=None, metadata={"help": "checkpoint name, path or URI (default: $RETINAFACE_WEIGHTS or mobilenet0.25-1mb)"})
    model: str | None = field(default=None, metadata={"help": "model registry URI (its current version) or REGISTRY/vNNNN, instead of --weights; the version is recorded"})
    model_config: str | None = field(default=None, metadata={"help": "architecture/anchor config name, for a checkpoint that is neither published nor made by jobs.train"})
    scale: str = field(default="original", metadata={"help": "network input size: original, long:N or square:N"})
    score_threshold: float = field(default=0.5, metadata={"help": "keep faces with score above this"})
    nms_iou: float = field(default=0.4, metadata={"help": "NMS IoU threshold"})
    top_k: int = field(default=5000, metadata={"help": "candidates per image before NMS"})
    keep_top_k: int = field(default=750, metadata={"help": "faces kept per image after NMS"})
    pad_multiple: int = field(default=1, metadata={"help": "pad network inputs to a multiple of this so near-equal sizes share a forward pass (1: exact size, reference parity)"})
    clip: bool = field(default=False, metadata={"help": "clip boxes and landmarks to the image"})
    tta: str = field(default="none", metadata={"help": "test-time augmentation: none, or flip and/or pyramid:SCALE,... merged by vote (default) or nms, e.g. flip+pyramid:long:640,long:1024,long:1600 (see retinaface_core/tta.py)"})
    batching: str = field(default="exact", metadata={"help": "exact: one forward pass per input shape (reference parity); bucket: sort by aspect ratio and pad each batch to a shared canvas, so every forward pass is full", "choices": list(BATCHING_POLICIES)})
    precision: str = field(default="fp32", metadata={"help": "dtype of weights and activations (post-processing stays fp32); fp16 on CUDA only", "choices": list(PRECISIONS)})

    def __post_init__(self) -> None:
        InputScale.parse(self.scale)
        # The canonical spelling, so that equal settings compare (and fingerprint) equal.
        object.__setattr__(self, "tta", str(TTA.parse(self.tta)))
        if self.weights and self.model:
            raise ValueError("give a model registry (model) or a checkpoint (weights), not both")
        if not 0 <= self.score_threshold <= 1 or not 0 < self.nms_iou <= 1:
            raise ValueError(f"score_threshold must be in [0, 1] and nms_iou in (0, 1], got {self.score_threshold}, {self.nms_iou}")
        if min(self.top_k, self.keep_top_k, self.pad_multiple) < 1:
            raise ValueError("top_k, keep_top_k and pad_multiple must be >= 1")
        if self.batching not in BATCHING_POLICIES or self.precision not in PRECISIONS:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES} and precision one of {tuple(PRECISIONS)}, got {self.batching!r}, {self.precision!r}")

    def resolve(self, storage: StorageOptions | None = None) -> ResolvedModel:
        """The checkpoint to load and its registry version (None unless it came from a registry).

        ``weights`` naming a registry resolves like ``model``, as :func:`registry.resolve_model`
        passes checkpoints through unchanged.
        """
        source = self.model or self.weights
        return resolve_model(source, storage) if source else ResolvedModel(None, None)


class Detector:
    """RetinaFace with inference-time optimisations and vectorised pre/post-processing.

    Args:
        weights: checkpoint name, path or fsspec URI (see :mod:`weights`); ``None`` uses
            ``$RETINAFACE_WEIGHTS`` or the default checkpoint.
        config: architecture/anchor config name, when the checkpoint is not a known one.
        device: torch device to run on (``"cpu"``, ``"cuda:0"``, ...).
        scale: ``"original"``, ``"long:N"`` or ``"square:N"`` (see :class:`InputScale`).
        score_threshold: keep detections with score > this.
        nms_iou: IoU above which NMS suppresses the lower-scoring box.
        top_k: candidates per image kept before NMS; keep_top_k: detections kept after it.
        clip: clip boxes and landmarks to the image.
        pad_multiple: pad network inputs up to a multiple of this, so that images of nearly
            equal size share one forward pass. 1 (the default) runs every image at its exact
            size like the reference; padding moves detections near the bottom/right border
            by up to ~12 px (measured on the shared photos with 32), so use it knowingly.
        batching: ``"exact"`` (each image at its own input shape: reference parity, results
            independent of batch mates) or ``"bucket"`` (the images of a :meth:`detect` call
            sorted by aspect ratio and padded per batch to a shared canvas, so that every
            forward pass is full); see :mod:`batching`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only): the dtype of the weights
            and activations; decoding and NMS run in fp32 whatever it is. With ``optimize``,
            biases are corrected for the rounding of the weights (:func:`model.correct_rounding_bias`).
        optimize: fold BatchNorm into convolutions, merge the heads of each level
            (:func:`model.optimize_for_inference`) and use channels_last. On CPU also set two
            process-wide things: keep freed memory in the heap (:func:`runtime.keep_freed_memory`)
            and cap the per-shape kernel caches (:func:`runtime.bound_kernel_caches`).
        compile: wrap the network in ``torch.compile`` with weights frozen as constants (about
            10 s of compilation per input shape on first use; pays off at a fixed ``square:N``).
        tta: test-time augmentation, e.g. ``"flip+pyramid:original,long:640"`` (see :class:`TTA`);
            ``None`` or ``"none"`` runs one plain pass at ``scale``.
    """

    def __init__(
        self,
        weights: str | LoadedWeights | None = None,
        *,
        config: str | RetinaFaceConfig | None = None,
        device: str | torch.device = "cpu",
        scale: str | InputScale = "original",
        score_threshold: float = 0.5,
        nms_iou: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
        clip: bool = False,
        pad_multiple: int = 1,
        batching: BatchingPolicy = "exact",
        precision: str = "fp32",
        optimize: bool = True,
        compile: bool = False,
        tta: str | TTA | None = None,
    ) -> None:
        loaded = weights if isinstance(weights, LoadedWeights) else load_weights(weights, config=config)
        self.weights = loaded
        self.config = loaded.config
        self.device = torch.device(device)
        self.scale = InputScale.parse(scale)
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.top_k = top_k
        self.keep_top_k = keep_top_k
        self.clip = clip
        self.pad_multiple = pad_multiple
        self.tta = TTA.parse(tta or "none")
        self.batching = batching
        self.dtype = network_dtype(precision, self.device)
        # Forward passes run so far, for the batch fill and padding a job reports.
        self.stats = BatchStats()
        # BatchNorm is folded in fp32 first, then the folded weights are cast once.
        network: nn.Module = optimize_for_inference(loaded.model, self.dtype) if optimize else loaded.model.eval()
        network = network.to(self.device, self.dtype)
        if optimize:
            network = network.to(memory_format=torch.channels_last)
            if self.device.type == "cpu":
                keep_freed_memory()
                bound_kernel_caches()
        self.network = torch.compile(network, options={"freezing": True}) if compile else network

    @classmethod
    def from_settings(
        cls,
        settings: DetectorSettings,
        *,
        device: str | torch.device = "cpu",
        storage: StorageOptions | None = None,
        weights: LoadedWeights | None = None,
        optimize: bool = True,
        compile: bool = False,
    ) -> Detector:
        """The detector ``settings`` describe; ``weights`` already loaded skips resolving them again."""
        if weights is None:
            checkpoint, _ = settings.resolve(storage)
            weights = load_weights(checkpoint, config=settings.model_config, storage=storage)
        return cls(
            weights,
            device=device,
            scale=settings.scale,
            score_threshold=settings.score_threshold,
            nms_iou=settings.nms_iou,
            top_k=settings.top_k,
            keep_top_k=settings.keep_top_k,
            clip=settings.clip,
            pad_multiple=settings.pad_multiple,
            batching=settings.batching,  # type: ignore[arg-type]
            precision=settings.precision,
            optimize=optimize,
            compile=compile,
            tta=settings.tta,
        )

    def forward(self, pixels: np.ndarray | torch.Tensor) -> RetinaFaceOutput:
        """Raw network outputs (in the detector's dtype) for (n, H, W, 3) uint8 BGR pixels."""
        x = to_network_input(pixels, self.config.mean_bgr, self.config.channel_order, self.device, self.dtype)
        with torch.inference_mode():
            return self.network(x)

    def detect(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int | None = None) -> list[Detections]:
        """Detect faces in one H x W x 3 uint8 BGR image or a list of them (any sizes).

        ``batch_size`` caps the images per forward pass (None: as many as the batching policy
        puts together). Returns one :class:`Detections` per image, in original-image pixel
        coordinates.
        """
        batch = [images] if isinstance(images, np.ndarray) else list(images)
        if self.tta.enabled:
            return detect_with_tta(self, batch, self.tta)
        results: list[Detections] = [Detections.empty()] * len(batch)
        pin = self.device.type == "cuda"
        for group in group_batch(batch, self.scale, self.pad_multiple, self.config.mean_bgr, self.batching, batch_size, pin):
            candidates = self.candidates(group, batch_size or len(batch))
            for row, index in enumerate(group.indices):
                clip_to = tuple(group.original_sizes[row]) if self.clip else None
                results[index] = select(candidates, row, self.score_threshold, self.nms_iou, self.keep_top_k, clip_to)
        return results

    def candidates(self, group: InputGroup, capacity: int | None = None) -> Candidates:
        """The ``top_k`` best anchors above the score threshold of every image of ``group``, decoded
        to original-image pixels (before NMS); the pass counts in :attr:`stats` as a batch of
        ``capacity`` places (default: the group's size)."""
        cfg = self.config
        height, width = group.host.shape[1:3]
        self.stats.add(len(group.indices), (height, width), group.content_pixels, capacity or len(group.indices))
        output = self.forward(group.host)
        priors = cached_priors(height, width, cfg.min_sizes, cfg.steps, str(self.device))
        with torch.inference_mode():
            return decode_candidates(
                output, priors, cfg.variances, (height, width), group.scales, self.top_k, self.score_threshold
            )
