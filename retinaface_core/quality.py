"""Per-face quality scores from an image and its detections: size, sharpness, pose, exposure.

Every score is computed for all faces of an image at once; only the crop-based ones (sharpness,
exposure) loop over faces, each on a small fixed-size crop. Conventions are those of
:class:`~retinaface_core.postprocessing.Detections`: boxes x1, y1, x2, y2 and landmarks (left
eye, right eye, nose, left mouth corner, right mouth corner, left/right as seen in the image)
in pixels of the H x W x 3 uint8 BGR image.

Signs of the pose angles, in the image as displayed:

- ``yaw`` > 0: the nose lies right of the face's midline (the face turns towards the image's
  right); mirroring the image flips the sign.
- ``pitch`` > 0: the nose lies closer to the eye line than in a frontal face (head tilted up).
- ``roll`` > 0: the eye line descends from the image-left eye to the image-right eye (head
  tilted clockwise as seen), since y grows downwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_SIZE = 64
"""Side of the square grey crop that sharpness and exposure are measured on."""

NOSE_DEPTH = 0.6
"""Depth of the nose tip in front of the eye/mouth plane, in inter-ocular distances."""

NOSE_DEPTH_VERTICAL = 0.5
"""The same depth in eye-to-mouth distances, for pitch."""

FRONTAL_NOSE_POSITION = 0.5
"""Nose position between eye line (0) and mouth line (1) in a frontal face (the 5-point
ArcFace alignment template puts it at 0.495)."""

SIZE_FULL = 96.0
"""Face short side (px) from which size no longer limits quality."""

SIZE_ZERO = 8.0
"""Face short side (px) at and below which size alone makes quality 0."""

SHARPNESS_SCALE = 200.0
"""Laplacian variance at which the sharpness factor reaches 1 - 1/e."""


@dataclass
class FaceQuality:
    """Quality scores of N faces; each field is an (N,) float32 array.

    face_size: short side of the box, px. sharpness: variance of the Laplacian of the grey
    face crop resized to CROP_SIZE x CROP_SIZE. yaw, pitch, roll: degrees. brightness: mean
    grey level of the crop in [0, 1]. contrast: RMS contrast (standard deviation of the grey
    levels) of the crop in [0, 1]. quality: composite in [0, 1].
    """

    face_size: np.ndarray
    sharpness: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    quality: np.ndarray

    def __len__(self) -> int:
        return len(self.quality)


def face_size(boxes: np.ndarray) -> np.ndarray:
    """min(x2 - x1, y2 - y1) per face: (N, 4) -> (N,)."""
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).astype(np.float32)


def pose_angles(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(yaw, pitch, roll) in degrees from (N, 5, 2) landmarks; each (N,).

    With e_l, e_r the eyes, n the nose, m_l, m_r the mouth corners:

    - roll = atan2(e_r.y - e_l.y, e_r.x - e_l.x).
    - The face's midline runs from the eye midpoint E = (e_l + e_r) / 2 to the mouth midpoint
      M = (m_l + m_r) / 2; u = (M - E) / |M - E| is its direction and v = (u.y, -u.x) is
      perpendicular to it, pointing to the image right for an upright face.
    - yaw = atan(d / (NOSE_DEPTH * iod)) with d = (n - E) . v the nose's signed distance from the
      midline and iod = |e_r - e_l|. A nose of depth D turned by yaw moves sideways by
      D sin(yaw) while the visible eye distance shrinks to iod0 cos(yaw), so d / iod is
      (D / iod0) tan(yaw): the arctangent inverts that, with D / iod0 = NOSE_DEPTH.
    - pitch = atan((t0 - t) / NOSE_DEPTH_VERTICAL) with t = (n - E) . u / |M - E| the nose's
      position from the eye line (0) to the mouth line (1) and t0 = FRONTAL_NOSE_POSITION, by
      the same projection argument along the midline.
    """
    lm = landmarks.astype(np.float64)
    left_eye, right_eye, nose = lm[:, 0], lm[:, 1], lm[:, 2]
    eyes = (left_eye + right_eye) / 2
    mouth = (lm[:, 3] + lm[:, 4]) / 2
    eye_line = right_eye - left_eye
    roll = np.degrees(np.arctan2(eye_line[:, 1], eye_line[:, 0]))
    midline = mouth - eyes
    length = np.maximum(np.linalg.norm(midline, axis=1), 1e-6)
    u = midline / length[:, None]
    v = np.stack([u[:, 1], -u[:, 0]], axis=1)
    to_nose = nose - eyes
    iod = np.maximum(np.linalg.norm(eye_line, axis=1), 1e-6)
    yaw = np.degrees(np.arctan((to_nose * v).sum(1) / (NOSE_DEPTH * iod)))
    t = (to_nose * u).sum(1) / length
    pitch = np.degrees(np.arctan((FRONTAL_NOSE_POSITION - t) / NOSE_DEPTH_VERTICAL))
    return yaw.astype(np.float32), pitch.astype(np.float32), roll.astype(np.float32)


def grey_crops(image: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(N, size, size) uint8 grey crops of the boxes (clipped to the image), resized to size x size.

    Resizing to one size is what makes the crop-based scores comparable between faces: a
    Laplacian variance on a 300 px face and on a 20 px face would otherwise measure different
    spatial frequencies. Down-sizing uses area averaging, up-sizing bilinear interpolation.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    height, width = grey.shape
    crops = np.zeros((len(boxes), size, size), np.uint8)
    corners = np.rint(boxes).astype(np.int64)
    x1 = np.clip(corners[:, 0], 0, width - 1)
    y1 = np.clip(corners[:, 1], 0, height - 1)
    x2 = np.clip(corners[:, 2], x1 + 1, width)
    y2 = np.clip(corners[:, 3], y1 + 1, height)
    for i in range(len(boxes)):
        crop = grey[y1[i] : y2[i], x1[i] : x2[i]]
        shrink = crop.shape[0] > size and crop.shape[1] > size
        crops[i] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return crops


def sharpness(crops: np.ndarray) -> np.ndarray:
    """Variance of the 3x3 Laplacian of each (N, S, S) uint8 crop, borders excluded: (N,)."""
    if len(crops) == 0:
        return np.zeros(0, np.float32)
    lap = np.stack([cv2.Laplacian(c, cv2.CV_32F, ksize=1) for c in crops])[:, 1:-1, 1:-1]
    return lap.reshape(len(crops), -1).var(axis=1).astype(np.float32)


def exposure(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brightness, contrast) of each (N, S, S) uint8 crop: mean and standard deviation / 255."""
    flat = crops.reshape(crops.shape[0], crops.shape[1] * crops.shape[2]).astype(np.float32) / 255.0
    return flat.mean(axis=1), flat.std(axis=1)


def composite_quality(
    score: np.ndarray,
    size: np.ndarray,
    sharp: np.ndarray,
    yaw: np.ndarray,
    pitch: np.ndarray,
    brightness: np.ndarray,
    contrast: np.ndarray,
) -> np.ndarray:
    """Composite quality in [0, 1]: the product of five factors, each in [0, 1].

    - detection: the detection score.
    - size: clip((log2(size) - log2(SIZE_ZERO)) / (log2(SIZE_FULL) - log2(SIZE_ZERO)), 0, 1);
      each halving of the face costs the same.
    - sharpness: 1 - exp(-sharp / SHARPNESS_SCALE).
    - pose: cos(yaw) * cos(pitch), floored at 0. Roll is not penalised: alignment undoes it.
    - exposure: (1 - (2 brightness - 1)^4) * min(1, contrast / 0.08); flat at mid-grey, 0 for
      a black or white crop, and a crop with less than 8 % RMS contrast is penalised linearly.

    A product rather than a mean, so that any one failing factor (a blurred, tiny or profile
    face) makes the face unusable by itself.
    """
    size_factor = np.clip(
        (np.log2(np.maximum(size, 1e-3)) - np.log2(SIZE_ZERO)) / (np.log2(SIZE_FULL) - np.log2(SIZE_ZERO)), 0, 1
    )
    sharp_factor = 1 - np.exp(-sharp / SHARPNESS_SCALE)
    pose_factor = np.maximum(np.cos(np.radians(yaw)) * np.cos(np.radians(pitch)), 0)
    exposure_factor = (1 - (2 * brightness - 1) ** 4) * np.minimum(1, contrast / 0.08)
    quality = score * size_factor * sharp_factor * pose_factor * exposure_factor
    return np.clip(quality, 0, 1).astype(np.float32)


def face_quality(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> FaceQuality:
    """All quality scores of the N faces (boxes (N, 4), scores (N,), landmarks (N, 5, 2)) of one image."""
    crops = grey_crops(image, boxes)
    size = face_size(boxes)
    sharp = sharpness(crops)
    yaw, pitch, roll = pose_angles(landmarks)
    brightness, contrast = exposure(crops)
    quality = composite_quality(scores.astype(np.float32), size, sharp, yaw, pitch, brightness, contrast)
    return FaceQuality(size, sharp, yaw, pitch, roll, brightness, contrast, quality)
