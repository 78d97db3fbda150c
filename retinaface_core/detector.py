"""The public face detector: images in, :class:`Detections` out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .anchors import cached_priors
from .config import RetinaFaceConfig
from .model import RetinaFaceOutput, optimize_for_inference
from .postprocessing import Candidates, Detections, decode_candidates, select
from .preprocessing import InputGroup, InputScale, group_batch, to_network_input
from .runtime import bound_kernel_caches, keep_freed_memory
from .tta import TTA, detect_with_tta
from .weights import LoadedWeights, load_weights


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
        network: nn.Module = optimize_for_inference(loaded.model) if optimize else loaded.model.eval()
        network = network.to(self.device)
        if optimize:
            network = network.to(memory_format=torch.channels_last)
            if self.device.type == "cpu":
                keep_freed_memory()
                bound_kernel_caches()
        self.network = torch.compile(network, options={"freezing": True}) if compile else network

    def forward(self, pixels: np.ndarray) -> RetinaFaceOutput:
        """Raw network outputs for (n, H, W, 3) uint8 BGR pixels."""
        x = to_network_input(pixels, self.config.mean_bgr, self.config.channel_order, self.device)
        with torch.inference_mode():
            return self.network(x)

    def detect(self, images: np.ndarray | Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in one H x W x 3 uint8 BGR image or a list of them (any sizes).

        Returns one :class:`Detections` per image, in original-image pixel coordinates.
        """
        batch = [images] if isinstance(images, np.ndarray) else list(images)
        if self.tta.enabled:
            return detect_with_tta(self, batch, self.tta)
        results: list[Detections] = [Detections.empty()] * len(batch)
        for group in group_batch(batch, self.scale, self.pad_multiple, self.config.mean_bgr):
            candidates = self.candidates(group)
            for row, index in enumerate(group.indices):
                clip_to = tuple(group.original_sizes[row]) if self.clip else None
                results[index] = select(candidates, row, self.score_threshold, self.nms_iou, self.keep_top_k, clip_to)
        return results

    def candidates(self, group: InputGroup) -> Candidates:
        """The ``top_k`` best anchors above the score threshold of every image of ``group``, decoded
        to original-image pixels (before NMS)."""
        cfg = self.config
        height, width = group.pixels.shape[1:3]
        output = self.forward(group.pixels)
        priors = cached_priors(height, width, cfg.min_sizes, cfg.steps, str(self.device))
        with torch.inference_mode():
            return decode_candidates(
                output, priors, cfg.variances, (height, width), group.scales, self.top_k, self.score_threshold
            )
