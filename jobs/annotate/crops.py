"""Aligned face crops of the annotation job (``--crops SIZE``): the worker's hook and the crops table.

The worker calls :func:`crop_rows` once per detect window, after detection and quality, with
the window's decoded images: it picks the faces that pass ``--crop-min-size`` and
``--crop-min-quality``, aligns them all at once on the images' device
(:func:`retinaface_core.align.align_faces`), encodes them on the CPU and returns their rows of
``schemas.crops.CROPS_SCHEMA``. The shard writes the rows of all its windows as one crops
object before its annotation object (see ``docs/annotate.md``, "Aligned face crops").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from retinaface_core.align import align_faces, encode_crops
from schemas.crops import CROPS_SCHEMA

from .config import AnnotateConfig


def crop_rows(
    config: AnnotateConfig,
    run_id: str,
    uris: Sequence[str],
    images: Sequence[np.ndarray | Tensor],
    image_index: np.ndarray,
    landmarks: np.ndarray | Tensor,
    face_size: np.ndarray,
    quality: np.ndarray,
) -> pa.Table:
    """The crops table rows (``CROPS_SCHEMA``) of a window's faces that pass the crop filters.

    uris and images (H x W x 3 uint8 BGR arrays, or tensors on the device the crops are made
    on): one entry per image. The F faces of the window, image by image in detection order:
    image_index (F,) ascending, landmarks (F, 5, 2) (an array, or a tensor on the images'
    device), face_size and quality (F,) host arrays. ``face_index`` is the face's position in
    its image's detections, as in the annotation rows.
    """
    counts = np.bincount(image_index, minlength=len(images))
    starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    selected = np.flatnonzero((face_size >= config.crop_min_size) & (quality >= config.crop_min_quality))
    if not len(selected):
        return CROPS_SCHEMA.empty_table()
    face_index = (selected - starts[selected]).astype(np.int32)
    image_index = image_index[selected]
    landmarks = landmarks[torch.from_numpy(selected).to(landmarks.device)] if isinstance(landmarks, Tensor) else landmarks[selected]
    crops, matrices, residuals = align_faces(list(images), landmarks, config.crops, image_index=image_index)
    count = len(selected)
    matrices = matrices.cpu().numpy() if isinstance(matrices, Tensor) else matrices
    residuals = residuals.cpu().numpy() if isinstance(residuals, Tensor) else residuals
    columns = {
        "uri": pa.array([uris[i] for i in image_index], pa.string()),
        "face_index": pa.array(face_index, pa.int32()),
        "run_id": pa.array([run_id] * count, pa.string()),
        "size": pa.array(np.full(count, config.crops, np.int32)),
        "format": pa.array([config.crop_format] * count, pa.string()),
        "matrix": pa.FixedSizeListArray.from_arrays(pa.array(matrices.reshape(-1), pa.float32()), type=CROPS_SCHEMA.field("matrix").type),
        "residual": pa.array(residuals, pa.float32()),
        "crop": pa.array(encode_crops(crops, config.crop_format), pa.binary()),
    }
    return pa.Table.from_arrays([columns[f.name] for f in CROPS_SCHEMA], schema=CROPS_SCHEMA)
