"""Per-face quality scores from an image and its detections: size, sharpness, pose, exposure, and a
composite fitted to human labels.

Every score is computed for all faces of an image at once; only the crop-based ones (sharpness,
exposure, brightness, contrast) loop over faces, each on a small crop. Conventions are those of
:class:`~retinaface_core.postprocessing.Detections`: boxes x1, y1, x2, y2 and landmarks (left
eye, right eye, nose, left mouth corner, right mouth corner, left/right as seen in the image)
in pixels of the H x W x 3 uint8 BGR image.

Signs of the pose angles, in the image as displayed:

- ``yaw`` > 0: the nose lies right of the face's midline (the face turns towards the image's
  right); mirroring the image flips the sign.
- ``pitch`` > 0: the nose lies closer to the eye line than in a frontal face (head tilted up).
- ``roll`` > 0: the eye line descends from the image-left eye to the image-right eye (head
  tilted clockwise as seen), since y grows downwards.

The composite ``quality`` is a logistic model over the other scores whose coefficients are data,
``quality_model.json`` next to this module, written by ``benchmarks/fit_quality.py`` from the
WIDER FACE attribute labels; :data:`QUALITY_MODEL_VERSION` names it. How well each score
separates those labels is measured by ``benchmarks/quality_auc.py`` (figures in
``docs/annotate.md``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import cv2
import numpy as np

SHARPNESS_SIZE = 16
"""Side (px) of the square grey crop sharpness is measured on; smaller faces are measured at their
own size. On the 454 labelled faces of the 12 shared WIDER FACE val images, of 8, 12, 16, 24 and
32 px, 16 is where sharpness is least correlated with log face size (r = 0.03; 0.44, 0.29,
-0.24, -0.35 for the others) while separating clear from heavily blurred faces as well as any
(ROC AUC 0.66; 0.59-0.66)."""

SAMPLE_SIZE = 64
"""Grey-level statistics (brightness, contrast, exposure) are counted on at most this many samples
per side of a face's crop, taken with a fixed stride: enough for fractions and moments, and it
keeps a 1,000 px face as cheap as a 64 px one."""

CLIP_MARGIN = 8
"""A pixel is clipped when every channel is <= CLIP_MARGIN (crushed shadow) or any channel is
>= 255 - CLIP_MARGIN (blown highlight). On the shared WIDER val faces the AUC of exposure for
normal vs extreme illumination is 0.73-0.74 for margins of 2 to 8 and falls from 12 on; JPEG
ringing keeps truly clipped pixels a few levels off the ends, hence not 0."""

NOSE_DEPTH = 0.6
"""Depth of the nose tip in front of the eye/mouth plane, in inter-ocular distances."""

NOSE_DEPTH_VERTICAL = 0.5
"""The same depth in eye-to-mouth distances, for pitch."""

FRONTAL_NOSE_POSITION = 0.5
"""Nose position between eye line (0) and mouth line (1) in a frontal face (the 5-point
ArcFace alignment template puts it at 0.495)."""


@dataclass
class FaceQuality:
    """Quality scores of N faces; each field is an (N,) float32 array.

    face_size: short side of the box, px. sharpness: in [0, 1], see :func:`sharpness`.
    yaw, pitch, roll: degrees, see :func:`pose_angles`. brightness: mean grey level of the box
    in [0, 1]. contrast: RMS contrast (standard deviation of the grey levels) in [0, 1].
    exposure: 1 - fraction of clipped pixels, in [0, 1], see :func:`exposure`. quality: the
    composite in [0, 1], see :func:`composite_quality`.
    """

    face_size: np.ndarray
    sharpness: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    exposure: np.ndarray
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


def box_crops(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """The N boxes (N, 4) of the H x W x C image as views, rounded and clipped to the image, each
    at least 1 x 1 px."""
    height, width = image.shape[:2]
    corners = np.rint(boxes).astype(np.int64)
    x1 = np.clip(corners[:, 0], 0, width - 1)
    y1 = np.clip(corners[:, 1], 0, height - 1)
    x2 = np.clip(corners[:, 2], x1 + 1, width)
    y2 = np.clip(corners[:, 3], y1 + 1, height)
    return [image[y1[i] : y2[i], x1[i] : x2[i]] for i in range(len(boxes))]


def samples(crop: np.ndarray) -> np.ndarray:
    """Every k-th row and column of an h x w (x C) crop, k chosen so that at most SAMPLE_SIZE remain
    per side; taken without averaging, which would blend clipped pixels with their neighbours."""
    h, w = crop.shape[:2]
    return crop[:: max(1, h // SAMPLE_SIZE), :: max(1, w // SAMPLE_SIZE)]


def sharpness(grey_crops: Sequence[np.ndarray]) -> np.ndarray:
    """Sharpness in [0, 1] of each h x w uint8 grey face crop, whatever its size: (N,) float32.

    A crop is area-averaged to s x s, s = min(SHARPNESS_SIZE, h, w) (never upsampled, except
    to 3 px), so a face is always measured on at most SHARPNESS_SIZE samples across: the same
    face at 20 px and at 200 px, or in a photo and in its half-size copy, gets about the same
    value, and blur counts relative to the face's size. The value is
    mean(L^2) / (mean(L^2) + 4 mean(|G|^2)) with L the 4-neighbour Laplacian and G the central
    difference gradient: for a sinusoid of angular frequency w along x or y it is sin^2(w / 2),
    0 for flat or very blurred detail and 1 at the sampling limit; for a crop, a mean of that
    over its detail. Brightness and contrast cancel out (both terms scale alike). Crops of one
    s are computed together.
    """
    sides = np.array([max(min(SHARPNESS_SIZE, *crop.shape), 3) for crop in grey_crops], np.int64)
    result = np.zeros(len(sides), np.float32)
    for side in np.unique(sides):
        index = np.flatnonzero(sides == side)
        g = np.stack([_resized(grey_crops[i], int(side)) for i in index])
        centre = g[:, 1:-1, 1:-1]
        laplacian = g[:, 1:-1, 2:] + g[:, 1:-1, :-2] + g[:, 2:, 1:-1] + g[:, :-2, 1:-1] - 4 * centre
        gradient = ((g[:, 1:-1, 2:] - g[:, 1:-1, :-2]) / 2) ** 2 + ((g[:, 2:, 1:-1] - g[:, :-2, 1:-1]) / 2) ** 2
        detail = (laplacian**2).mean(axis=(1, 2))
        total = detail + 4 * gradient.mean(axis=(1, 2))
        result[index] = np.divide(detail, total, out=np.zeros_like(detail), where=total > 0)
    return result


def _resized(grey_crop: np.ndarray, side: int) -> np.ndarray:
    """side x side float32 copy of an h x w crop: area-averaged, or bilinear where it grows."""
    shrink = min(grey_crop.shape) >= side
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(grey_crop.astype(np.float32), (side, side), interpolation=interpolation)


def exposure(colour_crop: np.ndarray) -> float:
    """1 - the fraction of clipped pixels of one h x w x 3 uint8 crop, in [0, 1].

    A pixel is clipped when it is black in every channel (all <= CLIP_MARGIN: crushed shadow)
    or saturated in any (>= 255 - CLIP_MARGIN: blown highlight); either way its detail is
    lost, which a distance of the mean from mid-grey does not tell (a dark-skinned face in good
    light is dark but not clipped). Counted on :func:`samples` of the crop.
    """
    grid = np.ascontiguousarray(samples(colour_crop))
    crushed = cv2.countNonZero(cv2.inRange(grid, (0, 0, 0), (CLIP_MARGIN,) * 3))
    unsaturated = cv2.countNonZero(cv2.inRange(grid, (0, 0, 0), (254 - CLIP_MARGIN,) * 3))
    total = grid.shape[0] * grid.shape[1]
    return 1 - (crushed + total - unsaturated) / total


@dataclass(frozen=True)
class QualityModel:
    """The fitted composite: quality = sigmoid(intercept + weights . (features - mean) / scale).

    features: names of :func:`model_features` columns, F of them; mean, scale, weights: (F,).
    version: "logit-" + the first 12 hex digits of the sha256 of the other fields (see
    :func:`model_digest`), so that new coefficients always come with a new version.
    """

    version: str
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    intercept: float
    fitted_on: str

    @classmethod
    def from_json(cls, text: str) -> QualityModel:
        raw = json.loads(text)
        model = cls(
            version=raw["version"],
            features=tuple(raw["features"]),
            mean=np.asarray(raw["mean"], np.float64),
            scale=np.asarray(raw["scale"], np.float64),
            weights=np.asarray(raw["weights"], np.float64),
            intercept=float(raw["intercept"]),
            fitted_on=raw["fitted_on"],
        )
        expected = "logit-" + model_digest(raw)
        if model.version != expected:
            raise ValueError(f"quality model version {model.version!r} does not match its coefficients ({expected!r})")
        if not set(model.features) <= set(FEATURES):
            raise ValueError(f"quality model uses unknown features {sorted(set(model.features) - set(FEATURES))}")
        wrong = [f for f, w in zip(model.features, model.weights) if w * FEATURE_SIGNS[f] < 0]
        if wrong:
            raise ValueError(f"quality model weights of {wrong} have the wrong sign")
        return model


def model_digest(raw: dict) -> str:
    """First 12 hex digits of the sha256 of a model's JSON fields other than version and notes."""
    payload = {k: raw[k] for k in ("features", "mean", "scale", "weights", "intercept", "fitted_on")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


FEATURES = ("score", "log2_size", "sharpness", "abs_yaw", "abs_pitch", "abs_roll", "sqrt_clipped")
"""Every feature the composite may use, the columns of :func:`model_features`."""

FEATURE_SIGNS = {"score": 1, "log2_size": 1, "sharpness": 1, "abs_yaw": -1, "abs_pitch": -1, "abs_roll": -1, "sqrt_clipped": -1}
"""The sign each feature's weight must have: a more confidently detected, larger, sharper, less
turned or less clipped face never scores lower. The fit holds the weights to it and loading
checks it."""


def model_features(scores: np.ndarray, q: FaceQuality) -> np.ndarray:
    """(N, len(FEATURES)) float64 model inputs from the (N,) detection scores and the faces' scores.

    Transforms measured by image-level cross-validation on the shared WIDER FACE val faces
    (``benchmarks/fit_quality.py``): the square root of the clipped fraction (1 - exposure)
    spreads the few percent that tell a badly lit face from a good one (held-out AUC for
    illumination 0.54-0.60 against 0.47 for exposure as is); the detection score as is rather
    than its logit, which spreads the faces above 0.99 over a wide range (held-out AUC for pose
    0.72 against 0.68, the others within 0.01). The face size enters as log2 px
    (clipped at 1 px), the angles as absolute degrees: the model is mirror-symmetric.
    Contrast is not used: its effect has no known direction, and left free its weight fitted
    the few images with extreme lighting (held-out AUC for blur 0.62, illumination 0.46).
    """
    return np.stack(
        [
            scores,
            np.log2(np.maximum(q.face_size, 1.0)),
            q.sharpness,
            np.abs(q.yaw),
            np.abs(q.pitch),
            np.abs(q.roll),
            np.sqrt(1 - q.exposure),
        ],
        axis=1,
    ).astype(np.float64)


def composite_quality(model: QualityModel, features: np.ndarray) -> np.ndarray:
    """The model's quality in [0, 1] of (N, len(FEATURES)) features: (N,) float32.

    The model was fitted (``benchmarks/fit_quality.py``) to give the probability that a human
    labeller marks the face with no heavy blur, no heavy occlusion, a typical pose and normal
    illumination (WIDER FACE attribute conventions).
    """
    columns = [FEATURES.index(name) for name in model.features]
    z = (features[:, columns] - model.mean) / model.scale
    return (1 / (1 + np.exp(-(model.intercept + z @ model.weights)))).astype(np.float32)


def load_model() -> QualityModel:
    """The composite shipped with the package (``quality_model.json``)."""
    return QualityModel.from_json(resources.files(__package__).joinpath("quality_model.json").read_text())


QUALITY_MODEL = load_model()
QUALITY_MODEL_VERSION: str = QUALITY_MODEL.version
"""Version of the composite's coefficients; record it with every output written with them."""


def face_quality(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> FaceQuality:
    """All quality scores of the N faces (boxes (N, 4), scores (N,), landmarks (N, 5, 2)) of one image."""
    n = len(boxes)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    grey_crops = box_crops(grey, boxes)
    expo = np.array([exposure(crop) for crop in box_crops(image, boxes)], np.float32)
    moments = np.array([cv2.meanStdDev(np.ascontiguousarray(samples(crop))) for crop in grey_crops]).reshape(n, 2) / 255
    yaw, pitch, roll = pose_angles(landmarks)
    q = FaceQuality(
        face_size(boxes), sharpness(grey_crops), yaw, pitch, roll, moments[:, 0].astype(np.float32),
        moments[:, 1].astype(np.float32), expo, np.zeros(n, np.float32),
    )
    q.quality = composite_quality(QUALITY_MODEL, model_features(scores, q))
    return q


def quality_features(images, image_index, boxes, scores, landmarks):  # type: ignore[no-untyped-def]
    """(F, 9) float32 tensor of the FaceQuality fields of every face of a batch, on the boxes' device.

    images: per image an H x W x 3 uint8 BGR array or tensor; image_index: (F,) the image of each
    face; boxes (F, 4), scores (F,), landmarks (F, 5, 2) tensors.
    """
    import dataclasses

    import torch

    fields = [f.name for f in dataclasses.fields(FaceQuality)]
    out = torch.zeros((len(scores), len(fields)), dtype=torch.float32)
    index = image_index.cpu().numpy()
    b, s, lm = (t.cpu().numpy() for t in (boxes, scores, landmarks))
    for i in np.unique(index):
        rows = np.flatnonzero(index == i)
        image = images[i]
        pixels = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
        q = face_quality(np.ascontiguousarray(pixels), b[rows], s[rows], lm[rows])
        out[torch.from_numpy(rows)] = torch.from_numpy(np.stack([getattr(q, f) for f in fields], axis=1))
    return out.to(boxes.device)
