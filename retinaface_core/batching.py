"""Which images share a forward pass, and on what canvas.

Two policies (``DetectorSettings.batching``):

- ``exact``: images are grouped by their exact network input shape; each runs at its own size,
  so its result never depends on its batch mates (reference parity at ``scale="original"``).
  At ``long:N`` nearly every photo has its own shape, so most forward passes carry one image.
- ``bucket``: the images of one call are sorted by aspect ratio (height / width) and cut into
  consecutive batches of ``batch_size``; each batch is padded at the bottom/right to one canvas,
  the largest height and width of its inputs (as torchvision's
  ``GeneralizedRCNNTransform.batch_images`` pads to the batch maximum; ``pad_multiple`` 32 makes
  canvas sides multiples of 32, as torchvision's ``size_divisible``). Every forward pass but
  the last of a call is full, and sorting keeps the padding small when the call holds a few
  batches of images (``docs/annotate.md`` has the measurements that chose this).

Padding only at the bottom/right leaves every detection's coordinates as they are; it changes
activations within the receptive field of the padded border. On the shared WIDER val images
at ``long:640`` that moves AP by at most 0.03 pt with canvases at the batch maximum, and by
up to 0.11 pt with sides rounded up to multiples of 32 (which pads every image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

BatchingPolicy = Literal["exact", "bucket"]
BATCHING_POLICIES: tuple[str, ...] = ("exact", "bucket")

# Images a job hands one detect call, in batches: sorting 4 batches' worth by aspect ratio
# keeps padding at 12-15 % of the computed pixels on the WIDER val size mix (batch 8-32), where
# 1 batch (pad to the batch maximum in arrival order) wastes 29-30 % (docs/annotate.md).
PLAN_WINDOW_BATCHES = 4


@dataclass(frozen=True)
class PlannedBatch:
    """One forward pass: positions of its images in the caller's list, and its (height, width) canvas."""

    indices: list[int]
    canvas: tuple[int, int]


def plan_batches(shapes: Sequence[tuple[int, int]], batch_size: int, policy: BatchingPolicy) -> list[PlannedBatch]:
    """Forward passes for images whose (padded) network inputs are ``shapes`` ((height, width) each).

    ``exact``: one canvas per distinct shape (the shape itself), in first-seen order, each cut
    into passes of at most ``batch_size``. ``bucket``: see the module docstring. Every index
    appears in exactly one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if policy == "exact":
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault(tuple(shape), []).append(i)
        return [
            PlannedBatch(indices[start : start + batch_size], shape)
            for shape, indices in by_shape.items()
            for start in range(0, len(indices), batch_size)
        ]
    if policy != "bucket":
        raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {policy!r}")
    # Ties (equal aspect) by size, so that equal shapes sit together and need no padding.
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] / shapes[i][1], shapes[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batches.append(PlannedBatch(indices, (max(shapes[i][0] for i in indices), max(shapes[i][1] for i in indices))))
    return batches


@dataclass
class BatchStats:
    """Running totals of the forward passes a detector ran.

    ``batch_fill`` = images / (passes x batch size asked for); ``padding_fraction`` = share of
    the computed canvas pixels that hold no image content.
    """

    passes: int = 0
    images: int = 0
    slots: int = 0
    canvas_pixels: int = 0
    content_pixels: int = 0

    def add(self, images: int, canvas: tuple[int, int], content_pixels: int, batch_size: int) -> None:
        """One forward pass of ``images`` on a (height, width) ``canvas``, asked for as ``batch_size``."""
        self.passes += 1
        self.images += images
        self.slots += batch_size
        self.canvas_pixels += images * canvas[0] * canvas[1]
        self.content_pixels += content_pixels

    def __sub__(self, other: BatchStats) -> BatchStats:
        return BatchStats(*(getattr(self, f) - getattr(other, f) for f in ("passes", "images", "slots", "canvas_pixels", "content_pixels")))

    @property
    def batch_fill(self) -> float:
        return self.images / self.slots if self.slots else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.content_pixels / self.canvas_pixels if self.canvas_pixels else 0.0


PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def network_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the network's weights and activations for ``precision`` on ``device``.

    fp16 is for CUDA only: CPU kernels for it are missing or slower than fp32, where bf16 has
    oneDNN kernels (and the range of fp32, so no overflow in the heads' logits).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, not {device.type!r}; use bf16 (or fp32) on a CPU")
    return PRECISIONS[precision]


def detect_window(batch_size: int, batching: str) -> int:
    """Images a job hands one detect call: ``PLAN_WINDOW_BATCHES`` batches with the ``bucket``
    policy, which sorts the call's images by aspect ratio so that each pass is full and padded
    little; one batch with ``exact``, whose passes group images of one shape whatever the call."""
    return batch_size * (PLAN_WINDOW_BATCHES if batching == "bucket" else 1)
