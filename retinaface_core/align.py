"""Faces aligned to the ArcFace 5-point template: similarity transforms and warped crops, batched in torch.

Face recognition, clustering and attribute models start from faces aligned by their five
landmarks to a fixed template, insightface's ``norm_crop`` being the common form. Here every
face of a batch of images is aligned at once:

1. :func:`similarity_transforms`: per face, the least-squares similarity (rotation, uniform
   scale, translation; Umeyama's estimate, as ``skimage``'s ``SimilarityTransform`` and
   ``cv2.estimateAffinePartial2D`` without outlier rejection) from its landmarks (F, 5, 2) to
   the template, as (F, 2, 3) matrices, with the RMS distance between the mapped landmarks and
   the template;
2. :func:`warp_faces`: each face's crop sampled from its image with ``grid_sample`` (bilinear,
   black outside the image), on the images' device;
3. :func:`encode_crops`: crops to JPEG or PNG bytes on the CPU.

:func:`align_faces` does 1 and 2 for one image or a batch.

Conventions. Images are H x W x 3 uint8 BGR (numpy arrays, or torch tensors on any device).
Landmarks are ``Detections.landmarks``: (x, y) pixels of left eye, right eye, nose tip, left
and right mouth corner, left/right as seen in the image. A matrix ``M`` maps image pixels to
crop pixels, ``[x', y'] = M @ [x, y, 1]``, in OpenCV's convention: the centre of pixel (row i,
column j) is at (x, y) = (j, i). So ``cv2.warpAffine(image, M, (size, size))`` (bilinear, black
border) gives the same crop, to rounding, and ``cv2.invertAffineTransform(M)`` maps crop pixels
back to the image. Landmarks are taken in that convention as they come from the detector, as
insightface does with its own detector's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .postprocessing import Detections
from .preprocessing import Image, InvalidImageError, validate_image

ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)
"""insightface's ``arcface_dst``: where ``norm_crop`` puts the five landmarks of a 112 x 112 crop
(left eye, right eye, nose tip, left and right mouth corner, in the crop's pixel coordinates)."""

CROP_FORMATS = ("jpeg", "png")

JPEG_QUALITY = 95
"""Quality of JPEG crops: the level face datasets are commonly stored at."""

MIN_CROP_SIZE = 16
MAX_CROP_SIZE = 1024
"""Crop sides allowed: below the minimum the landmarks are a few pixels apart; above the maximum
a crop is larger than nearly every face it would be made from, and its sampling grid large."""

SAMPLE_PIXELS = 64 * 112 * 112
"""Crop pixels sampled by one ``grid_sample`` call (64 faces at 112 px, at least one face): bounds
its grid and output, SAMPLE_PIXELS x 2 and x 3 floats."""

Landmarks = np.ndarray | Tensor | Detections


class AlignedFaces(NamedTuple):
    """Aligned crops of F faces; numpy arrays when the images were numpy arrays, else tensors on
    the device they were aligned on.

    crops: (F, size, size, 3) uint8 BGR. matrices: (F, 2, 3) float32, image pixels -> crop
    pixels (OpenCV convention, see the module). residuals: (F,) float32, RMS distance in crop
    pixels between the landmarks mapped by the matrix and the template.
    """

    crops: np.ndarray | Tensor
    matrices: np.ndarray | Tensor
    residuals: np.ndarray | Tensor


def arcface_template(size: int) -> np.ndarray:
    """The five template points (5, 2) float32 of a ``size`` x ``size`` crop: the 112 px ArcFace
    template scaled by ``size / 112`` (insightface's ``norm_crop`` for sizes that are multiples of 112)."""
    if not MIN_CROP_SIZE <= size <= MAX_CROP_SIZE:
        raise ValueError(f"crop size must be in [{MIN_CROP_SIZE}, {MAX_CROP_SIZE}] px, got {size}")
    return ARCFACE_TEMPLATE_112 * np.float32(size / 112)


def similarity_transforms(landmarks: Tensor, template: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares similarity transforms from each face's landmarks to the template.

    landmarks: (F, K, 2) points of F faces; template: (K, 2) where they should land. Returns
    matrices (F, 2, 3) float32, ``[x', y'] = M @ [x, y, 1]``, and residuals (F,) float32, the
    RMS over the K points of the distance between the mapped landmark and its template point.

    The transform ``p -> [[a, -b], [b, a]] p + t`` minimising the squared distances is, with
    both point sets centred on their means (p_k, q_k), ``a = sum(p_k . q_k) / sum(|p_k|^2)``,
    ``b = sum(p_k x q_k) / sum(|p_k|^2)``: Umeyama's estimate in two dimensions, where the
    rotation never needs an SVD (a and b are free, so no reflection can occur). Computed in
    float64 on the landmarks' device; coincident landmarks give a zero matrix.
    """
    points = landmarks.to(torch.float64)
    target = template.to(device=points.device, dtype=torch.float64)
    src_mean = points.mean(dim=1, keepdim=True)
    dst_mean = target.mean(dim=0)
    p = points - src_mean
    q = (target - dst_mean).expand_as(p)
    norm = (p**2).sum(dim=(1, 2)).clamp_min(1e-12)
    a = (p * q).sum(dim=(1, 2)) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(dim=1) / norm
    rotation = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)
    translation = dst_mean - (rotation @ src_mean.transpose(1, 2)).squeeze(2)
    matrices = torch.cat([rotation, translation[:, :, None]], dim=2)
    mapped = points @ rotation.transpose(1, 2) + translation[:, None, :]
    residuals = ((mapped - target) ** 2).sum(dim=2).mean(dim=1).sqrt()
    return matrices.to(torch.float32), residuals.to(torch.float32)


def warp_faces(images: Sequence[Tensor], image_index: Tensor, matrices: Tensor, size: int) -> Tensor:
    """Every face's ``size`` x ``size`` crop, sampled from its image on the images' device.

    images: tensors (H_i, W_i, 3) uint8 BGR, all on one device; image_index: (F,) int, the image
    of each face; matrices: (F, 2, 3) image -> crop (OpenCV convention). Returns (F, size, size,
    3) uint8 on the images' device; a face whose matrix is singular comes out black.

    Crop pixel (x, y) takes the bilinear interpolation of its image at ``M^-1 (x, y)``, a
    neighbour outside the image counting as black: what ``cv2.warpAffine`` with
    ``INTER_LINEAR`` and ``BORDER_CONSTANT`` 0 computes (OpenCV rounds coordinates to 1/32
    pixel, so values differ by a grey level here and there). Per image, up to
    :data:`SAMPLE_PIXELS` crop pixels at a time, one ``affine_grid`` + ``grid_sample`` whose
    grids are stacked into one tall grid over only the part of the image the faces reach, so
    that only that part is converted to float.
    """
    device = images[0].device if images else torch.device("cpu")
    count = len(matrices)
    crops = torch.zeros((count, size, size, 3), dtype=torch.uint8, device=device)
    if not count:
        return crops
    # The transforms are tiny: composed on the host in float64, only the grids are made on the device.
    forward = _homogeneous(matrices.detach().to("cpu", torch.float64))
    invertible = torch.linalg.det(forward).abs() > 1e-12
    inverse = torch.zeros_like(forward)
    inverse[invertible] = torch.linalg.inv(forward[invertible])
    last = size - 1
    corners = torch.tensor([[0, 0, 1], [last, 0, 1], [0, last, 1], [last, last, 1]], dtype=torch.float64)
    reach = (corners @ inverse.transpose(1, 2))[:, :, :2]  # where each crop's corner pixels fall in its image
    low, high = reach.amin(dim=1).floor(), reach.amax(dim=1).floor() + 2
    # grid_sample's coordinates (align_corners=False): pixel k of n is at (2k + 1) / n - 1.
    from_output = torch.tensor([[size / 2, 0, last / 2], [0, size / 2, last / 2], [0, 0, 1]], dtype=torch.float64)
    index = image_index.cpu()
    for i in torch.unique(index[invertible]).tolist():
        height, width = images[i].shape[:2]
        for faces in torch.nonzero((index == i) & invertible).squeeze(1).split(max(1, SAMPLE_PIXELS // size**2)):
            x0, y0 = (max(int(v), 0) for v in low[faces].amin(dim=0).tolist())
            x1, y1 = (min(int(v), limit) for v, limit in zip(high[faces].amax(dim=0).tolist(), (width, height)))
            if x0 >= x1 or y0 >= y1:
                continue  # these crops lie wholly outside the image: black
            w, h = x1 - x0, y1 - y0
            to_region = torch.tensor([[2 / w, 0, (1 - 2 * x0) / w - 1], [0, 2 / h, (1 - 2 * y0) / h - 1], [0, 0, 1]], dtype=torch.float64)
            theta = (to_region @ inverse[faces] @ from_output)[:, :2].to(device=device, dtype=torch.float32)
            grid = F.affine_grid(theta, [len(faces), 3, size, size], align_corners=False).reshape(1, len(faces) * size, size, 2)
            region = images[i][y0:y1, x0:x1].permute(2, 0, 1)[None].to(torch.float32)
            sampled = F.grid_sample(region, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            # Rounded to bytes while planar, then interleaved by a channels-last copy, whose memory is
            # the crops' (n * size, size, 3) layout: a copy through permuted strides is several times slower.
            planar = sampled.round_().clamp_(0, 255).to(torch.uint8)
            interleaved = planar.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            crops[faces.to(device)] = interleaved.reshape(len(faces), size, size, 3)
    return crops


def _homogeneous(matrices: Tensor) -> Tensor:
    """(F, 2, 3) affine matrices as (F, 3, 3), last row 0, 0, 1."""
    last = torch.tensor([0, 0, 1], dtype=matrices.dtype).expand(len(matrices), 1, 3)
    return torch.cat([matrices, last], dim=1)


def align_faces(
    images: Image | Sequence[Image],
    faces: Landmarks | Sequence[Landmarks],
    size: int = 112,
    *,
    image_index: np.ndarray | Tensor | Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> AlignedFaces:
    """Faces aligned to the ArcFace template at ``size`` x ``size``: crops, matrices, residuals.

    One image: ``images`` an H x W x 3 uint8 BGR array or tensor, ``faces`` its
    :class:`Detections` or landmarks (F, 5, 2). A batch: ``images`` a sequence of them and
    ``faces`` either one :class:`Detections` or (F_i, 5, 2) landmarks per image (the faces come
    out image by image), or landmarks (F, 5, 2) of all faces with ``image_index`` (F,) naming
    each face's image. ``device`` is where transforms and crops are computed (default: the
    images' device; numpy images: the CPU). Returns numpy arrays for numpy images, tensors on
    ``device`` for tensor images (see :class:`AlignedFaces`).

    Raises :class:`InvalidImageError` for an image that is not H x W x 3 uint8, ``ValueError``
    for landmarks that are not (F, 5, 2) finite numbers or an image index out of range.
    """
    single = isinstance(images, (np.ndarray, Tensor))
    batch: list[Image] = [images] if isinstance(images, (np.ndarray, Tensor)) else list(images)
    as_numpy = all(isinstance(image, np.ndarray) for image in batch)
    target = torch.device(device) if device is not None else _default_device(batch)
    pixels = [_image_tensor(image, k).to(target) for k, image in enumerate(batch)]
    landmarks, index = _landmarks_and_index(faces, single, len(batch), image_index)
    matrices, residuals = similarity_transforms(landmarks.to(target), torch.from_numpy(arcface_template(size)))
    crops = warp_faces(pixels, index, matrices, size)
    if as_numpy:
        return AlignedFaces(crops.cpu().numpy(), matrices.cpu().numpy(), residuals.cpu().numpy())
    return AlignedFaces(crops, matrices, residuals)


def encode_crops(crops: np.ndarray | Tensor, fmt: str = "jpeg") -> list[bytes]:
    """Each crop (F, S, S, 3) uint8 BGR encoded as ``fmt`` (``jpeg`` at :data:`JPEG_QUALITY`, or
    lossless ``png``), on the CPU; decode with ``cv2.imdecode`` (BGR) or any image library."""
    if fmt not in CROP_FORMATS:
        raise ValueError(f"crop format must be one of {CROP_FORMATS}, got {fmt!r}")
    array = crops.cpu().numpy() if isinstance(crops, Tensor) else crops
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    encoded = []
    for crop in array:
        ok, data = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), crop, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {crop.shape} crop as {fmt}")
        encoded.append(data.tobytes())
    return encoded


def _default_device(images: Sequence[Image]) -> torch.device:
    tensors = [image.device for image in images if isinstance(image, Tensor)]
    return tensors[0] if tensors else torch.device("cpu")


def _image_tensor(image: Image, index: int) -> Tensor:
    """An H x W x 3 uint8 image as a tensor (a numpy array's memory is shared, not copied)."""
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.shape[0] or not image.shape[1]:
            raise InvalidImageError(f"image {index}: expected an (H, W, 3) uint8 BGR tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    return torch.from_numpy(validate_image(image, index))


def _landmarks_and_index(
    faces: Landmarks | Sequence[Landmarks],
    single: bool,
    count: int,
    image_index: np.ndarray | Tensor | Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    """All faces' landmarks (F, 5, 2) float32 and their image indices (F,) int64, on the CPU
    unless given as tensors elsewhere."""
    if single or image_index is not None:
        landmarks = _landmark_tensor(faces, 0)  # type: ignore[arg-type]  # one image's faces, or all faces with their index
        index = torch.zeros(len(landmarks), dtype=torch.int64) if single else torch.as_tensor(np.asarray(image_index), dtype=torch.int64)
        if index.shape != (len(landmarks),):
            raise ValueError(f"image_index must have one entry per face ({len(landmarks)}), got shape {tuple(index.shape)}")
    else:
        if isinstance(faces, (np.ndarray, Tensor, Detections)) or len(faces) != count:
            raise ValueError(f"give one Detections or (F_i, 5, 2) landmarks per image ({count}), or all landmarks with image_index")
        per_image = [_landmark_tensor(f, k) for k, f in enumerate(faces)]
        landmarks = torch.cat([lm.cpu() for lm in per_image]) if per_image else torch.zeros((0, 5, 2))
        index = torch.repeat_interleave(torch.arange(count), torch.tensor([len(lm) for lm in per_image], dtype=torch.int64))
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= count):
        raise ValueError(f"image_index must be in [0, {count}), got values from {int(index.min())} to {int(index.max())}")
    return landmarks, index


def _landmark_tensor(faces: Landmarks, image: int) -> Tensor:
    landmarks = faces.landmarks if isinstance(faces, Detections) else faces
    tensor = landmarks if isinstance(landmarks, Tensor) else torch.tensor(np.asarray(landmarks, np.float32))
    if tensor.ndim != 3 or tensor.shape[1:] != (5, 2):
        raise ValueError(f"image {image}: landmarks must have shape (F, 5, 2), got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"image {image}: landmarks must be finite numbers")
    return tensor.to(torch.float32)
