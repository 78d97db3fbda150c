"""Training-time augmentation of the RetinaFace reference (Pytorch_Retinaface ``data/data_augment.py``).

One sample goes: random square crop (faces whose centre is inside survive) -> photometric
distortion -> pad to a square if no crop was found -> random horizontal mirror (left/right
landmarks swapped) -> resize to the training size -> drop faces too small to learn from.

Coordinates are continuous pixel coordinates of the current image: pixel (row i, column j)
covers [j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5). In that convention a
mirror maps x to ``width - x`` and a resize by factor s maps x to ``s * x``, exactly as the
pixels move under ``image[:, ::-1]`` and ``cv2.resize``.

Every random decision is drawn from the ``numpy.random.Generator`` passed in, so a sample is a
pure function of (image, faces, generator state). The output stays uint8 BGR: mean subtraction
happens in :func:`preprocessing.to_network_input`, the very function the detector uses, so that
training and inference cannot normalise differently (and uint8 batches cost a quarter of the
inter-process traffic of float ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Crop sides as fractions of the image's short side, as in the reference.
CROP_SCALES: tuple[float, ...] = (0.3, 0.45, 0.6, 0.8, 1.0)
# Order of the five landmarks after a horizontal mirror: the eyes (0, 1) and the mouth
# corners (3, 4) trade places, the nose (2) stays.
MIRROR_LANDMARK_ORDER: tuple[int, ...] = (1, 0, 2, 4, 3)
_INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)


@dataclass(frozen=True)
class Faces:
    """Annotated faces of one image, in its pixel coordinates.

    boxes: (N, 4) float32 (x1, y1, x2, y2).
    landmarks: (N, 5, 2) float32 (x, y) of left eye, right eye, nose, left and right mouth
        corner (left/right as seen in the image); NaN where a face has none.
    has_landmarks: (N,) bool.
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    has_landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls) -> Faces:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, bool))

    def select(self, mask: np.ndarray) -> Faces:
        return Faces(self.boxes[mask], self.landmarks[mask], self.has_landmarks[mask])

    def transformed(self, scale: float | np.ndarray = 1.0, offset: float | np.ndarray = 0.0) -> Faces:
        """Faces with every point p mapped to ``p * scale + offset`` (per-axis arrays of shape (2,) allowed)."""
        scale = np.asarray(scale, np.float32)
        offset = np.asarray(offset, np.float32)
        boxes = (self.boxes.reshape(-1, 2, 2) * scale + offset).reshape(-1, 4)
        return Faces(boxes.astype(np.float32), (self.landmarks * scale + offset).astype(np.float32), self.has_landmarks)


def random_square_crop(
    image: np.ndarray,
    faces: Faces,
    rng: np.random.Generator,
    *,
    scales: Sequence[float] = CROP_SCALES,
    max_tries: int = 250,
    min_relative_size: float = 0.0,
) -> tuple[np.ndarray, Faces] | None:
    """A random square crop of ``scale * short side`` pixels, or None if none of ``max_tries`` works.

    A try is accepted when at least one face lies entirely inside the crop and at least one
    kept face has both sides >= ``min_relative_size`` times the crop side. The crop keeps
    exactly the faces whose centre lies strictly inside it; their boxes are clipped to the
    crop and their landmarks clamped into it (as the reference does), in crop coordinates.
    """
    height, width = image.shape[:2]
    short_side = min(height, width)
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    for _ in range(max_tries):
        side = int(scales[int(rng.integers(len(scales)))] * short_side)
        if side < 1:
            continue
        left = int(rng.integers(width - side)) if width > side else 0
        top = int(rng.integers(height - side)) if height > side else 0
        origin = np.array([left, top], np.float32)
        far = origin + side
        fully_inside = np.all((faces.boxes[:, :2] >= origin) & (faces.boxes[:, 2:] <= far), axis=1)
        if not fully_inside.any():
            continue
        kept = faces.select(np.all((centres > origin) & (centres < far), axis=1))
        boxes = np.clip(kept.boxes.reshape(-1, 2, 2), origin, far).reshape(-1, 4) - np.tile(origin, 2)
        if not np.any(np.all(boxes[:, 2:] - boxes[:, :2] >= min_relative_size * side, axis=1)):
            continue
        landmarks = np.clip(kept.landmarks - origin, 0, side)
        return image[top : top + side, left : left + side], Faces(boxes, landmarks, kept.has_landmarks)
    return None


def distort_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue changes of a uint8 BGR image (a new array).

    As in the reference (SSD's photometric distortion): each change is applied with
    probability 1/2, with contrast either before or after the HSV changes.
    """
    image = image.copy()
    contrast_first = rng.integers(2) == 1
    if rng.integers(2):
        _affine(image, beta=rng.uniform(-32, 32))
    if contrast_first and rng.integers(2):
        _affine(image, alpha=rng.uniform(0.5, 1.5))
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    if rng.integers(2):
        _affine(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        # OpenCV's 8-bit hue runs over 0..179 and wraps around.
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + int(rng.integers(-18, 19))) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and rng.integers(2):
        _affine(image, alpha=rng.uniform(0.5, 1.5))
    return image


def _affine(channels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> None:
    """In place: channels = clip(channels * alpha + beta, 0, 255)."""
    channels[:] = np.clip(channels.astype(np.float32) * alpha + beta, 0, 255)


def pad_to_square(image: np.ndarray, fill: Sequence[float]) -> np.ndarray:
    """Pad bottom and right with ``fill`` (BGR) to a square of the long side; faces keep their coordinates."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.clip(np.rint(fill), 0, 255).astype(np.uint8)
    out[:height, :width] = image
    return out


def mirror(image: np.ndarray, faces: Faces) -> tuple[np.ndarray, Faces]:
    """Flip horizontally: x -> width - x, boxes keep x1 < x2, left and right landmarks swap names."""
    boxes, landmarks = mirror_points(faces.boxes, faces.landmarks, image.shape[1])
    return np.ascontiguousarray(image[:, ::-1]), Faces(boxes, landmarks, faces.has_landmarks)


def mirror_points(boxes: np.ndarray, landmarks: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, ..., 4) x1, y1, x2, y2 boxes and (N, ..., 5, 2) landmarks of an image ``width`` pixels wide,
    as they lie in its horizontal mirror: new arrays, x -> width - x, boxes keep x1 < x2, left and
    right landmarks swap names."""
    mirrored = boxes.copy()
    mirrored[..., [0, 2]] = width - boxes[..., [2, 0]]
    points = landmarks[..., MIRROR_LANDMARK_ORDER, :].copy()
    points[..., 0] = width - points[..., 0]
    return mirrored, points


def resize(image: np.ndarray, faces: Faces, size: int, interpolation: int = cv2.INTER_LINEAR) -> tuple[np.ndarray, Faces]:
    """Resize to ``size`` x ``size`` pixels (any aspect), scaling the faces with the pixels."""
    height, width = image.shape[:2]
    scale = np.array([size / width, size / height], np.float32)
    return cv2.resize(image, (size, size), interpolation=interpolation), faces.transformed(scale)


@dataclass(frozen=True)
class TrainAugment:
    """The reference training augmentation, as a callable.

    Args:
        size: side of the square training input in pixels.
        mean_bgr: fill colour of the padding (the checkpoint config's mean, so padding is zero
            after mean subtraction).
        min_face_size: faces whose width or height is below this many pixels after the resize
            are dropped: they cannot be localised at stride 8 and give noisy forced matches.
        crop: try a random square crop (else the whole image, padded to a square, is used).
        crop_scales, crop_tries: see :func:`random_square_crop`.
        mirror_probability: chance of a horizontal mirror.
        photometric: apply :func:`distort_photometric`.
        random_interpolation: pick the resize interpolation at random (reference behaviour).
    """

    size: int
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)
    min_face_size: float = 2.0
    crop: bool = True
    crop_scales: tuple[float, ...] = CROP_SCALES
    crop_tries: int = 250
    mirror_probability: float = 0.5
    photometric: bool = True
    random_interpolation: bool = True

    def __call__(self, image: np.ndarray, faces: Faces, rng: np.random.Generator) -> tuple[np.ndarray, Faces]:
        """(H, W, 3) uint8 BGR + faces in its pixels -> (size, size, 3) uint8 BGR + faces in its pixels."""
        cropped = None
        if self.crop:
            cropped = random_square_crop(
                image,
                faces,
                rng,
                scales=self.crop_scales,
                max_tries=self.crop_tries,
                min_relative_size=self.min_face_size / self.size,
            )
        if cropped is not None:
            image, faces = cropped
        if self.photometric:
            image = distort_photometric(image, rng)
        if cropped is None:
            image = pad_to_square(image, self.mean_bgr)
        if rng.random() < self.mirror_probability:
            image, faces = mirror(image, faces)
        interpolation = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))] if self.random_interpolation else cv2.INTER_LINEAR
        image, faces = resize(image, faces, self.size, interpolation)
        sizes = faces.boxes[:, 2:] - faces.boxes[:, :2]
        return image, faces.select(np.all(sizes >= self.min_face_size, axis=1))
