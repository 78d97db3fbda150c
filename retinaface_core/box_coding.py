"""SSD-style box and landmark coding against anchors, with variances.

Conventions: anchors are (cx, cy, w, h) and boxes (x1, y1, x2, y2), all in coordinates
normalised by the network input's width and height. Landmarks are five (x, y) points.
Leading dimensions broadcast, so (B, A, 4) offsets decode against (A, 4) anchors.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
