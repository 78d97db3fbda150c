"""The public face detector: images in, :class:`Detections` out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .anchors import cached_priors
from .batching import BATCHING_POLICIES, BatchingPolicy, BatchStats, canvas_ladder, ladder_canvases
from .model import RetinaFaceOutput, optimize_for_inference
from .postprocessing import Candidates, Detections, FaceBatch, decode_candidates, select_faces
from .precision import PRECISIONS, network_dtype
from .preprocessing import Image, InputGroup, InputScale, group_batch, to_network_input
from .registry import ResolvedModel, resolve_model
from .runtime import bound_kernel_caches, keep_freed_memory
from .storage import StorageOptions
from .tta import TTA, ViewResult, auto_canvas_sides, detect_with_tta
from .weights import LoadedWeights, load_weights

_NO_CANDIDATES = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass(frozen=True)
class DetectorSettings:
    """Which model a :class:`Detector` runs and how; every job embeds one (its flags, its YAML).

    ``weights`` is a checkpoint (name, path or URI) and ``model`` a model registry (its current
    version) or one of its versions (``REGISTRY/v0003``); give at most one. The rest are the
    :class:`Detector` arguments of the same names. Invalid values raise ``ValueError``.
    """

    weights: str | None = field(
        default=None, metadata={"help": "checkpoint name, path or URI (default: $RETINAFACE_WEIGHTS or mobilenet0.25-1mb)"}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model registry URI (its current version) or REGISTRY/vNNNN, instead of --weights; the version is recorded"},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "architecture/anchor config name, for a checkpoint that is neither published nor made by jobs.train"},
    )
    scale: str = field(default="original", metadata={"help": "network input size: original, long:N, square:N or xF (resized by F)"})
    score_threshold: float = field(default=0.5, metadata={"help": "keep faces with score above this"})
    nms_iou: float = field(default=0.4, metadata={"help": "NMS IoU threshold"})
    top_k: int = field(default=5000, metadata={"help": "candidates per image before NMS"})
    keep_top_k: int = field(default=750, metadata={"help": "faces kept per image after NMS"})
    pad_multiple: int = field(
        default=1,
        metadata={
            "help": "pad network inputs to a multiple of this so near-equal sizes share a forward pass (1: exact size, reference parity)"
        },
    )
    clip: bool = field(default=False, metadata={"help": "clip boxes and landmarks to the image"})
    tta: str = field(
        default="none",
        metadata={
            "help": (
                "test-time augmentation: none, or flip and/or pyramid:SCALE,... or pyramid:auto, merged by vote (default) "
                "or nms, each view keeping the face sizes its anchors cover (sizes:anchors, the default) or all, "
                "e.g. pyramid:auto (see retinaface_core/tta.py)"
            )
        },
    )
    batching: str = field(
        default="exact",
        metadata={
            "help": (
                "exact: one forward pass per input shape (reference parity); bucket: sort by aspect ratio and pad "
                "each batch to one of a few canvases, so every forward pass is full"
            ),
            "choices": list(BATCHING_POLICIES),
        },
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "dtype of weights and activations (post-processing stays fp32); fp16 on CUDA only", "choices": list(PRECISIONS)},
    )

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
            raise ValueError(
                f"batching must be one of {BATCHING_POLICIES} and precision one of {tuple(PRECISIONS)}, "
                f"got {self.batching!r}, {self.precision!r}"
            )

    def resolve(self, storage: StorageOptions | None = None) -> ResolvedModel:
        """The checkpoint to load and its registry version (None unless it came from a registry).

        ``weights`` naming a registry resolves like ``model``, as :func:`registry.resolve_model`
        passes checkpoints through unchanged.
        """
        source = self.model or self.weights
        return resolve_model(source, storage) if source else ResolvedModel(None, None)


class Detector:
    """RetinaFace with inference-time optimisations and batched pre/post-processing on its device.

    Args:
        weights: checkpoint name, path or fsspec URI (see :mod:`weights`), or weights already
            loaded; ``None`` resolves ``settings`` (``$RETINAFACE_WEIGHTS`` or the default
            checkpoint when it names none).
        settings: what to run and how (:class:`DetectorSettings`, validated there); keyword
            arguments named like its fields override single fields, e.g.
            ``Detector(scale="long:640", score_threshold=0.5)``.
        device: torch device to run on (``"cpu"``, ``"cuda:0"``, ...).
        storage: S3 settings for a checkpoint or registry given as a URI.
        optimize: fold BatchNorm into convolutions, merge the heads of each level
            (:func:`model.optimize_for_inference`) and use channels_last; below fp32 also
            correct the biases for the rounding of the weights (:func:`model.correct_rounding_bias`).
            On CPU also set two process-wide things: keep freed memory in the heap
            (:func:`runtime.keep_freed_memory`) and cap the per-shape kernel caches
            (:func:`runtime.bound_kernel_caches`).
        compile: wrap the network in ``torch.compile`` with weights frozen as constants (a
            compilation per input shape on first use; pays off with few canvases).

    On a GPU, bucket batches are padded to ``batch_size`` rows so that every forward pass has
    one of the few shapes of :meth:`canvases`, which :meth:`warm_up` builds before the first
    real pass.
    """

    def __init__(
        self,
        weights: str | LoadedWeights | None = None,
        *,
        settings: DetectorSettings | None = None,
        device: str | torch.device = "cpu",
        storage: StorageOptions | None = None,
        optimize: bool = True,
        compile: bool = False,
        **overrides: Any,
    ) -> None:
        settings = dataclasses.replace(settings or DetectorSettings(), **overrides)
        if isinstance(weights, str):
            settings = dataclasses.replace(settings, weights=weights, model=None)
        self.settings = settings
        if isinstance(weights, LoadedWeights):
            loaded = weights
        else:
            checkpoint, _ = settings.resolve(storage)
            loaded = load_weights(checkpoint, config=settings.model_config, storage=storage)
        self.weights = loaded
        self.config = loaded.config
        self.device = torch.device(device)
        self.scale = InputScale.parse(settings.scale)
        self.tta = TTA.parse(settings.tta)
        self.dtype = network_dtype(settings.precision, self.device)
        # Forward passes run so far, for the batch fill and padding a job reports.
        self.stats = BatchStats()
        # BatchNorm is folded in fp32 first, then the folded weights are cast once.
        network: nn.Module = optimize_for_inference(loaded.model, self.dtype) if optimize else loaded.model.eval()
        network = network.to(self.device, self.dtype)
        if optimize:
            network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
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
        return cls(weights, settings=settings, device=device, storage=storage, optimize=optimize, compile=compile)

    @property
    def _fixed_batch(self) -> bool:
        # Fixed tensor shapes matter where each new one costs kernel selection: on a GPU.
        return self.device.type == "cuda" and self.settings.batching == "bucket"

    def forward(self, pixels: np.ndarray | torch.Tensor) -> RetinaFaceOutput:
        """Raw network outputs (in the detector's dtype) for (n, H, W, 3) uint8 BGR pixels."""
        x = to_network_input(pixels, self.config.mean_bgr, self.config.channel_order, self.device, self.dtype)
        with torch.inference_mode():
            return self.network(x)

    def canvases(self, scales: Sequence[InputScale] = ()) -> list[tuple[int, int]]:
        """The (height, width) network inputs bucket batches at ``scales`` (default: the
        detector's own and its TTA pyramid's; an automatic pyramid's of :func:`tta.auto_canvas_sides`)
        can have, where the set is bounded (a fixed long side); exact batching and other scales
        (``original``, ``xF``) have no such set and contribute nothing."""
        if self.settings.batching != "bucket":
            return []
        shapes: set[tuple[int, int]] = set()
        for scale in scales or self._own_scales():
            if scale.mode == "square" and scale.max_side:
                side = -(-scale.max_side // self.settings.pad_multiple) * self.settings.pad_multiple
                shapes.add((side, side))
            elif scale.max_side:
                shapes.update(ladder_canvases(scale.max_side, canvas_ladder(scale.max_side)))
        return sorted(shapes)

    def _own_scales(self) -> tuple[InputScale, ...]:
        if self.tta.auto is not None:
            return tuple(InputScale("long", side) for side in auto_canvas_sides(self.config.min_sizes, self.tta.auto))
        return self.tta.scales or (self.scale,)

    def warm_up(self, batch_size: int) -> float:
        """Run one forward pass of ``batch_size`` blank images on every canvas of :meth:`canvases`,
        so that no later pass pays for kernel selection on a new shape; returns the seconds taken.
        Nothing to do where shapes cost nothing to meet (a CPU: its bucket canvases are each
        batch's maximum, see :func:`preprocessing.group_batch`)."""
        start = time.perf_counter()
        for height, width in self.canvases() if self._fixed_batch else ():
            self.forward(torch.zeros((batch_size, height, width, 3), dtype=torch.uint8, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def detect(self, images: Image | Sequence[Image], batch_size: int | None = None) -> list[Detections]:
        """Detect faces in one H x W x 3 uint8 BGR image or a list of them (any sizes; numpy
        arrays, or torch tensors on any device).

        ``batch_size`` caps the images per forward pass (None: as many as the batching policy
        puts together). Returns one :class:`Detections` per image, in original-image pixel
        coordinates.
        """
        batch = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else list(images)
        if self.tta.enabled:
            views = partial(self.view_candidates, batch_size=batch_size)
            return detect_with_tta(batch, self.tta, views, self.settings, self.config.min_sizes)
        return self.detect_faces(batch, batch_size).detections()

    def detect_faces(self, images: Sequence[Image], batch_size: int | None = None) -> FaceBatch:
        """The faces of ``images`` as one :class:`FaceBatch` on the detector's device (what the
        per-face work that follows takes without a transfer); as :meth:`detect` otherwise."""
        s = self.settings
        if self.tta.enabled:
            return FaceBatch.from_detections(self.detect(images, batch_size), self.device)
        parts = []
        for group in self._groups(images, self.scale, batch_size):
            candidates = self.candidates(group, batch_size or len(images))
            clip_to = group.original_sizes if s.clip else None
            with torch.inference_mode():
                parts.append((select_faces(candidates, s.score_threshold, s.nms_iou, s.keep_top_k, clip_to), group.indices))
        return FaceBatch.merge(parts, len(images), self.device)

    def view_candidates(self, views: Sequence[Image], scale: InputScale, batch_size: int | None = None) -> list[ViewResult]:
        """Per view, its candidates above the score threshold before NMS, in that view's pixels:
        (M, 4) boxes, (M,) scores, (M, 5, 2) landmarks; the views run in this detector's batches."""
        found = [_NO_CANDIDATES] * len(views)
        for group in self._groups(views, scale, batch_size):
            c = self.candidates(group, batch_size or len(views))
            scores, boxes, landmarks = (t.cpu().numpy() for t in (c.scores, c.boxes, c.landmarks))
            for row, index in enumerate(group.indices):
                valid = int(np.count_nonzero(scores[row] > self.settings.score_threshold))
                found[index] = (boxes[row, :valid], scores[row, :valid], landmarks[row, :valid])
        return found

    def _groups(self, images: Sequence[Image], scale: InputScale, batch_size: int | None) -> list[InputGroup]:
        s = self.settings
        if self.device.type != "cpu":
            # Resizing is per-pixel work: the device does it, from the original pixels.
            images = [torch.from_numpy(i).to(self.device) if isinstance(i, np.ndarray) else i for i in images]
        policy = cast(BatchingPolicy, s.batching)
        return group_batch(images, scale, s.pad_multiple, self.config.mean_bgr, policy, batch_size, False, self._fixed_batch)

    def candidates(self, group: InputGroup, capacity: int | None = None) -> Candidates:
        """The ``top_k`` best anchors above the score threshold of every image of ``group``, decoded
        to original-image pixels (before NMS), on the detector's device; the pass counts in
        :attr:`stats` as a batch of ``capacity`` places (default: the group's size)."""
        cfg = self.config
        height, width = group.host.shape[1:3]
        self.stats.add(len(group.indices), (height, width), group.content_pixels, capacity or len(group.indices))
        output = self.forward(group.host)
        priors = cached_priors(height, width, cfg.min_sizes, cfg.steps, str(self.device))
        with torch.inference_mode():
            return decode_candidates(
                output, priors, cfg.variances, (height, width), group.scales, self.settings.top_k, self.settings.score_threshold
            )
