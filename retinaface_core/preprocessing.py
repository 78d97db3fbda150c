"""Input scaling and batching: uint8 BGR images -> padded network input tensors.

Images come as H x W x 3 uint8 BGR numpy arrays (resized with OpenCV on the host, stacked in
host memory) or as torch uint8 tensors of that shape on any device (resized and stacked where
they are, so that pixels decoded on a GPU never leave it, with OpenCV's integer arithmetic:
:func:`resize_tensor`). Both give the same canvas.

Which images share a forward pass, and on what canvas, is :mod:`batching`'s choice. With the
``exact`` policy the tensor an image runs through depends only on that image and the scale
mode, never on the other images of the batch: images are grouped by their padded input shape
and each group is one stacked tensor, so batched and one-at-a-time detection agree exactly.
With ``bucket`` an image is padded (bottom/right, mean colour) to its batch's shared canvas,
which fills every forward pass at the cost of small changes near the padded border.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

from .batching import BatchingPolicy, PlannedBatch, canvas_ladder, plan_batches

Image = np.ndarray | Tensor
"""An H x W x 3 uint8 BGR image: a numpy array, or a torch tensor on any device."""


class InvalidImageError(ValueError):
    """An input array that is not an H x W x 3 uint8 BGR image."""


# Bounds of a relative scale's factor: below, a photo of a few hundred pixels vanishes; above,
# a phone photo becomes a canvas no accelerator holds.
MIN_FACTOR, MAX_FACTOR = 0.05, 16.0


@dataclass(frozen=True)
class InputScale:
    """How an image is sized for the network.

    ``original``: as is. ``long:N``: resized (aspect kept) so that its long side is N.
    ``square:N``: letterboxed: resized (aspect kept) to fit N x N, then padded to N x N.
    ``xF`` (mode ``relative``): resized by the factor F (aspect kept), e.g. ``x0.5``, ``x2``:
    relative to each photo, so a pyramid of them treats a thumbnail and a 12 MP photo alike.
    """

    mode: Literal["original", "long", "square", "relative"]
    size: int | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if self.mode == "relative":
            if self.factor is None or self.size is not None or not MIN_FACTOR <= self.factor <= MAX_FACTOR:
                raise ValueError(f"relative input scale needs a factor in [{MIN_FACTOR}, {MAX_FACTOR}] and no size, got {self!r}")
        elif self.factor is not None:
            raise ValueError(f"input scale {self.mode!r} takes no factor, got {self.factor!r}")

    @classmethod
    def parse(cls, text: str | InputScale) -> InputScale:
        if isinstance(text, InputScale):
            return text
        if text == "original":
            return cls("original")
        relative = re.fullmatch(r"x(\d+(?:\.\d+)?)", text)
        if relative and MIN_FACTOR <= float(relative.group(1)) <= MAX_FACTOR:
            return cls("relative", factor=float(relative.group(1)))
        match = re.fullmatch(r"(long|square):(\d+)", text)
        if not match or int(match.group(2)) < 32:
            raise ValueError(
                f"input scale must be 'original', 'long:N' or 'square:N' with N >= 32, "
                f"or 'xF' with F in [{MIN_FACTOR}, {MAX_FACTOR}], got {text!r}"
            )
        return cls(match.group(1), int(match.group(2)))  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.mode == "relative":
            # The shortest text that parses back to the same float: x2, x0.5, x0.3333333.
            return "x" + repr(self.factor).removesuffix(".0")
        return self.mode if self.mode == "original" else f"{self.mode}:{self.size}"

    @property
    def max_side(self) -> int | None:
        """The long side of every network input at this scale, where it is fixed (``long:N``,
        ``square:N``); None where it follows each image's own size (``original``, ``xF``)."""
        return self.size if self.mode in ("long", "square") else None

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the image content inside the network input."""
        if self.factor is not None:
            factor = self.factor
        elif self.size is not None:
            factor = self.size / max(height, width)
        else:
            return height, width
        return max(1, round(height * factor)), max(1, round(width * factor))

    def input_shape(self, height: int, width: int, pad_multiple: int) -> tuple[int, int]:
        """(height, width) of the padded network input for an image of the given size."""
        if self.mode == "square" and self.size is not None:
            height = width = self.size
        else:
            height, width = self.resized_shape(height, width)
        return math.ceil(height / pad_multiple) * pad_multiple, math.ceil(width / pad_multiple) * pad_multiple


def validate_image(image: object, index: int = 0) -> Image:
    """Check that ``image`` is an H x W x 3 uint8 array or tensor; returns it unchanged."""
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise InvalidImageError(f"image {index}: expected an (H, W, 3) uint8 BGR tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"image {index}: expected a numpy array or a torch tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"image {index}: expected dtype uint8 (BGR 0..255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"image {index}: expected shape (H, W, 3) BGR, got {image.shape}; convert grey or BGRA with cv2.cvtColor")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidImageError(f"image {index}: empty image of shape {image.shape}")
    return image


@dataclass
class InputGroup:
    """Images of a batch that share one forward pass and its padded input shape.

    host: (m, H, W, 3) uint8 BGR tensor, padded with the mean colour (zero after
        normalisation) at the bottom/right; m >= n when the batch is padded to a fixed size
        with blank rows. In host memory for numpy images (pinned when asked, for asynchronous
        copies to a GPU), on the images' device for tensors. pixels: the same as a numpy array.
    indices: position of each of the n images in the caller's batch (rows 0..n-1).
    scales: (n, 2) float64 (sx, sy) = resized size / original size, to map results back.
    original_sizes: (n, 2) int (height, width) of each original image.
    content_pixels: pixels of the resized images, without padding (for :class:`BatchStats`).
    """

    host: Tensor
    indices: list[int]
    scales: np.ndarray
    original_sizes: np.ndarray
    content_pixels: int

    @property
    def pixels(self) -> np.ndarray:
        return self.host.cpu().numpy()


def group_batch(
    images: Sequence[Image],
    scale: InputScale,
    pad_multiple: int,
    mean_bgr: Sequence[float],
    batching: BatchingPolicy = "exact",
    batch_size: int | None = None,
    pin_memory: bool = False,
    fixed_batch: bool = False,
) -> list[InputGroup]:
    """Resize each image per ``scale`` and stack them into the forward passes that
    :func:`batching.plan_batches` plans (``batch_size`` None: no limit per pass).

    ``fixed_batch`` is for a device where every new tensor shape costs kernel selection: with
    ``bucket`` batching each canvas is rounded up to :func:`batching.canvas_ladder` of the scale
    and every pass is padded to ``batch_size`` rows (the blank rows are computed and ignored),
    so that the device meets few shapes. Without it a bucket canvas is its batch's maximum,
    which computes the fewest pixels.
    """
    for i, image in enumerate(images):
        validate_image(image, i)
    shapes = [scale.input_shape(int(image.shape[0]), int(image.shape[1]), pad_multiple) for image in images]
    ladder = canvas_ladder(scale.max_side) if batching == "bucket" and fixed_batch else None
    plans = plan_batches(shapes, batch_size or max(1, len(images)), batching, ladder)
    fill = tuple(int(v) for v in np.clip(np.rint(mean_bgr), 0, 255))
    rows = batch_size if fixed_batch and batch_size else 0
    return [_stack(images, plan, scale, fill, pin_memory, rows) for plan in plans]


def _stack(
    images: Sequence[Image], plan: PlannedBatch, scale: InputScale, fill: tuple[int, ...], pin_memory: bool, rows: int
) -> InputGroup:
    height, width = plan.canvas
    count = len(plan.indices)
    first = images[plan.indices[0]]
    on_device = isinstance(first, Tensor)
    shape = (max(rows, count), height, width, 3)
    if on_device:
        host = torch.empty(shape, dtype=torch.uint8, device=first.device)
        host[...] = torch.tensor(fill, dtype=torch.uint8, device=first.device)
    else:
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=pin_memory)
        host.numpy()[count:] = fill
    scales = np.empty((count, 2), dtype=np.float64)
    sizes = np.empty((count, 2), dtype=np.int64)
    content = 0
    for slot, i in enumerate(plan.indices):
        image = images[i]
        h, w = int(image.shape[0]), int(image.shape[1])
        rh, rw = scale.resized_shape(h, w)
        if isinstance(image, Tensor):
            host[slot, :rh, :rw] = resize_tensor(image, rh, rw)
        else:
            _resize_into(image, host.numpy()[slot], rh, rw, fill)
        scales[slot] = (rw / w, rh / h)
        sizes[slot] = (h, w)
        content += rh * rw
    return InputGroup(host, plan.indices, scales, sizes, content)


def _resize_into(image: np.ndarray, out: np.ndarray, rh: int, rw: int, fill: tuple[int, ...]) -> None:
    """Resize an H x W x 3 array to rh x rw into the top left of ``out``, the rest filled."""
    if (rh, rw) != image.shape[:2]:
        image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR)
    # One pass that copies and pads, straight into the batch (cheaper than numpy's slice
    # assignment with a broadcast fill colour).
    height, width = out.shape[:2]
    cv2.copyMakeBorder(image, 0, height - rh, 0, width - rw, cv2.BORDER_CONSTANT, dst=out, value=fill)


def resize_tensor(image: Tensor, height: int, width: int) -> Tensor:
    """(H, W, C) uint8 tensor -> (height, width, C) uint8 on its device, as ``cv2.resize`` with
    ``INTER_LINEAR`` computes it for uint8 images.

    OpenCV's bilinear resize of 8-bit images is fixed-point: each output pixel takes two taps
    per axis at pixel-centre-aligned positions, with weights rounded to 1/2048; the horizontal
    sums are kept as integers and the vertical pass is done in 16-bit lanes (the horizontal sums
    shifted right by 4, products' high halves, a final rounding shift by 2). Doing the same integer
    arithmetic here gives the host's pixels on the device (bit-exact when shrinking on the CPUs
    tried, off by one level in a few pixels when enlarging), so detections do not depend on
    where an image was decoded. An exact halving, which OpenCV does as an area average, is one.
    """
    in_height, in_width = int(image.shape[0]), int(image.shape[1])
    if (in_height, in_width) == (height, width):
        return image
    x = image.to(torch.int32)
    if (in_height, in_width) == (2 * height, 2 * width):
        return ((x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2] + 2) >> 2).to(torch.uint8)
    rows0, rows1, row_w0, row_w1 = _linear_taps(in_height, height, image.device)
    cols0, cols1, col_w0, col_w1 = _linear_taps(in_width, width, image.device)
    horizontal = x[:, cols0] * col_w0[None, :, None] + x[:, cols1] * col_w1[None, :, None]
    vertical = ((horizontal[rows0] >> 4) * row_w0[:, None, None] >> 16) + ((horizontal[rows1] >> 4) * row_w1[:, None, None] >> 16)
    return ((vertical + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def _linear_taps(size: int, out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """OpenCV's bilinear taps along an axis of ``size`` pixels resized to ``out``: first and
    second source index and their weights in 1/2048 (int32), edges clamped as OpenCV does."""
    position = ((torch.arange(out, dtype=torch.float64, device=device) + 0.5) * (size / out) - 0.5).float()
    first = torch.floor(position)
    fraction = position - first
    first = first.long()
    outside = (first < 0) | (first >= size - 1)
    fraction = torch.where(outside, torch.zeros_like(fraction), fraction)
    first = first.clamp(0, size - 1)
    second = (first + 1).clamp(max=size - 1)
    return first, second, torch.round((1 - fraction) * 2048).int(), torch.round(fraction * 2048).int()


def to_network_input(
    pixels: np.ndarray | Tensor,
    mean_bgr: Sequence[float],
    channel_order: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(n, H, W, 3) uint8 BGR -> (n, 3, H, W) ``dtype``, mean-subtracted, channels_last on ``device``.

    The uint8 array crosses to the device as is (4x less traffic than float; asynchronously
    from pinned memory), and is normalised in float32 in its contiguous NHWC layout, which the
    final permute turns into a channels_last NCHW view without a copy.
    """
    x = torch.as_tensor(pixels).to(device, non_blocking=True)
    mean = tuple(float(v) for v in mean_bgr)
    if channel_order == "RGB":
        x, mean = x.flip(-1), mean[::-1]
    n, height, width, channels = x.shape
    x = x.float()
    # Broadcasting a 3-vector along the innermost axis defeats vectorisation; subtracting one
    # image row of tiled means runs at memory speed.
    x.view(n * height, width * channels).sub_(_mean_row(mean, width, x.device))
    return x.to(dtype).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=32)
def _mean_row(mean: tuple[float, ...], width: int, device: torch.device) -> Tensor:
    return torch.tensor(mean, dtype=torch.float32, device=device).repeat(width)
