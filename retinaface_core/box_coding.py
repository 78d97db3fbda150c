"""Box formats and SSD-style box and landmark coding against anchors, with variances.

Conventions of the coding: anchors are (cx, cy, w, h) and boxes (x1, y1, x2, y2), all in
coordinates normalised by the network input's width and height. Landmarks are five (x, y)
points. Leading dimensions broadcast, so (B, A, 4) offsets decode against (A, 4) anchors.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
Boxes = TypeVar("Boxes", np.ndarray, Tensor)


def box_convert(boxes: Boxes, in_fmt: BoxFormat, out_fmt: BoxFormat) -> Boxes:
    """(..., 4) boxes from one format to another, like torchvision's ``box_convert``.

    ``xyxy``: corners (x1, y1, x2, y2); ``xywh``: top-left corner and size (WIDER FACE's
    files); ``cxcywh``: centre and size (anchors). Works on numpy arrays and tensors alike and
    keeps their dtype, so convert float32 boxes to float64 first where the sum must be exact.
    """
    cat = np.concatenate if isinstance(boxes, np.ndarray) else torch.cat
    a, b = boxes[..., :2], boxes[..., 2:]
    if in_fmt == out_fmt:
        return boxes
    if in_fmt == "xywh":
        xyxy = cat([a, a + b], -1)
    elif in_fmt == "cxcywh":
        xyxy = cat([a - b / 2, a + b / 2], -1)
    elif in_fmt == "xyxy":
        xyxy = boxes
    else:
        raise ValueError(f"unknown box format {in_fmt!r}")
    a, b = xyxy[..., :2], xyxy[..., 2:]
    if out_fmt == "xyxy":
        return xyxy
    if out_fmt == "xywh":
        return cat([a, b - a], -1)
    if out_fmt == "cxcywh":
        return cat([(a + b) / 2, b - a], -1)
    raise ValueError(f"unknown box format {out_fmt!r}")


def decode_boxes(offsets: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """(..., A, 4) offsets (dx, dy, dw, dh) -> (..., A, 4) boxes (x1, y1, x2, y2)."""
    centre = priors[..., :2] + offsets[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(offsets[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def encode_boxes(boxes: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Inverse of :func:`decode_boxes`: (..., A, 4) boxes (x1, y1, x2, y2) -> offsets."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    size = boxes[..., 2:] - boxes[..., :2]
    d_centre = (centre - priors[..., :2]) / (variances[0] * priors[..., 2:])
    d_size = torch.log(size / priors[..., 2:]) / variances[1]
    return torch.cat([d_centre, d_size], dim=-1)


def decode_landmarks(offsets: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """(..., A, 10) offsets -> (..., A, 5, 2) landmark points."""
    points = offsets.reshape(*offsets.shape[:-1], 5, 2)
    return priors[..., None, :2] + points * variances[0] * priors[..., None, 2:]


def encode_landmarks(landmarks: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Inverse of :func:`decode_landmarks`: (..., A, 5, 2) points -> (..., A, 10) offsets."""
    offsets = (landmarks - priors[..., None, :2]) / (variances[0] * priors[..., None, 2:])
    return offsets.reshape(*offsets.shape[:-2], 10)


def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """IoU of (..., N, 4) boxes against (M, 4) boxes, both (x1, y1, x2, y2): (..., N, M).

    Continuous areas (no +1 pixel term), as the reference matcher computes them on normalised
    coordinates.
    """
    top_left = torch.maximum(boxes[..., :, None, :2], others[:, :2])
    bottom_right = torch.minimum(boxes[..., :, None, 2:], others[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1)
    other_area = (others[:, 2:] - others[:, :2]).prod(-1)
    return inter / (area[..., :, None] + other_area - inter)
