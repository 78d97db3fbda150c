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

Bucket canvases are rounded up to a small fixed set (:func:`canvas_ladder`): every new canvas
shape costs a GPU process a round of kernel selection and compilation, so a long run must meet
a handful of shapes that an actor can build once, before its first shard
(:meth:`Detector.warm_up`). With a fixed long side N (``long:N``, ``square:N``) each canvas side
is one of a few rungs between N / 2 and N, so one side of every bucket canvas is N and the set
is small whatever the photos; without one (``original``, sizes relative to the photo) sides are
rounded up to a coarse multiple, which bounds the shapes per size band.

Padding only at the bottom/right leaves every detection's coordinates as they are; it changes
activations within the receptive field of the padded border (``docs/annotate.md`` has what
that costs in AP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

BatchingPolicy = Literal["exact", "bucket"]
BATCHING_POLICIES: tuple[str, ...] = ("exact", "bucket")

# Images a job hands one detect call, in batches: sorting a few batches' worth by aspect ratio
# lets each batch gather images of one shape class, where a single batch in arrival order pads
# every image to the widest and the tallest of a random mix (docs/annotate.md).
PLAN_WINDOW_BATCHES = 4

CANVAS_RUNGS = 6
"""Canvas sides per fixed long side N: N and rungs below it, down to N / 2."""

COARSE_MULTIPLE = 64
"""Canvas sides are rounded up to a multiple of this where the scale has no fixed long side."""


def detect_window(batch_size: int, batching: BatchingPolicy | str) -> int:
    """Images per detect call: the bucket policy sorts a window of a few batches by aspect ratio,
    so that each forward pass is full and padded little; exact needs one batch."""
    return batch_size * (PLAN_WINDOW_BATCHES if batching == "bucket" else 1)


def canvas_ladder(max_side: int | None) -> tuple[int, ...]:
    """The canvas sides allowed for inputs whose long side is at most ``max_side``, ascending.

    Rungs are N, N - step, ... down to N / 2 (step a multiple of 32, N / (2 * (CANVAS_RUNGS - 1))
    rounded), so a side below N / 2 is padded to the lowest rung: rare panoramas pay padding so
    that every photo maps to one of few shapes. Empty for ``max_side`` None (no fixed long side).
    """
    if max_side is None:
        return ()
    step = max(32, 32 * round(max_side / (2 * (CANVAS_RUNGS - 1) * 32)))
    rungs = [max_side - i * step for i in range(CANVAS_RUNGS) if max_side - i * step >= max_side / 2]
    return tuple(sorted(rungs))


def round_side(side: int, ladder: Sequence[int]) -> int:
    """``side`` rounded up to the smallest rung of ``ladder`` that holds it, or to a multiple of
    :data:`COARSE_MULTIPLE` beyond the ladder (or without one)."""
    for rung in ladder:
        if rung >= side:
            return rung
    return -(-side // COARSE_MULTIPLE) * COARSE_MULTIPLE


def ladder_canvases(max_side: int, ladder: Sequence[int]) -> list[tuple[int, int]]:
    """Every (height, width) canvas a bucket batch can get when each input's long side is
    ``max_side``: one side is ``max_side``, the other any rung (no more than 2 x rungs - 1)."""
    return sorted({(max_side, rung) for rung in ladder} | {(rung, max_side) for rung in ladder})


@dataclass(frozen=True)
class PlannedBatch:
    """One forward pass: positions of its images in the caller's list, and its (height, width) canvas."""

    indices: list[int]
    canvas: tuple[int, int]


def plan_batches(
    shapes: Sequence[tuple[int, int]], batch_size: int, policy: BatchingPolicy, ladder: Sequence[int] | None = None
) -> list[PlannedBatch]:
    """Forward passes for images whose (padded) network inputs are ``shapes`` ((height, width) each).

    ``exact``: one canvas per distinct shape (the shape itself), in first-seen order, each cut
    into passes of at most ``batch_size``. ``bucket``: see the module docstring; with ``ladder``
    (see :func:`canvas_ladder`; ``()`` for coarse multiples) each canvas side is rounded up by
    :func:`round_side`, None keeps the batch maximum. Every index appears in exactly one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if policy == "exact":
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault((shape[0], shape[1]), []).append(i)
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
        height, width = max(shapes[i][0] for i in indices), max(shapes[i][1] for i in indices)
        if ladder is not None:
            height, width = round_side(height, ladder), round_side(width, ladder)
        batches.append(PlannedBatch(indices, (height, width)))
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
