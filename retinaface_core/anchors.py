"""Anchor ("prior") boxes for RetinaFace, in the order the heads emit their predictions."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def feature_map_sizes(height: int, width: int, steps: Sequence[int]) -> list[tuple[int, int]]:
    """(rows, cols) of each FPN level for an input of ``height`` x ``width`` pixels: ceil(size / step)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in steps]


def generate_priors(height: int, width: int, min_sizes: Sequence[Sequence[int]], steps: Sequence[int]) -> Tensor:
    """Square anchors for an input of ``height`` x ``width`` pixels.

    Returns:
        (A, 4) float32 tensor of (cx, cy, w, h) normalised by the input width/height, ordered
        level by level, then row, column, anchor size: the order of :class:`model.RetinaFaceOutput`.
        The centre of cell (i, j) at stride s is ((j + 0.5) * s, (i + 0.5) * s) pixels.
    """
    levels = []
    for (rows, cols), step, sizes in zip(feature_map_sizes(height, width, steps), steps, min_sizes):
        # float64 first so the values round to float32 exactly as the reference's Python floats do.
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width, indexing="ij")
        n_sizes = len(sizes)
        sizes_arr = np.asarray(sizes, dtype=np.float64)
        level = np.empty((rows, cols, n_sizes, 4), dtype=np.float64)
        level[..., 0] = cx[..., None]
        level[..., 1] = cy[..., None]
        level[..., 2] = sizes_arr / width
        level[..., 3] = sizes_arr / height
        levels.append(level.reshape(-1, 4))
    return torch.from_numpy(np.concatenate(levels).astype(np.float32))


@functools.lru_cache(maxsize=64)
def cached_priors(
    height: int,
    width: int,
    min_sizes: tuple[tuple[int, ...], ...],
    steps: tuple[int, ...],
    device: str = "cpu",
) -> Tensor:
    """:func:`generate_priors`, memoised per input size and device (treat the result as read-only)."""
    return generate_priors(height, width, min_sizes, steps).to(device)
