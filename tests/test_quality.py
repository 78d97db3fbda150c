"""Quality scores on real faces: blur, mirroring, size and pose move them the right way."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from retinaface_core import Detector
from retinaface_core.image_io import read_image
from retinaface_core.quality import composite_quality, face_quality, pose_angles


@pytest.fixture(scope="module")
def detector(weights_dir):
    return Detector(scale="original", score_threshold=0.5)


@pytest.fixture(scope="module")
def baseball(shared_dir):
    return read_image(str(shared_dir / "images/crowd_baseball.jpg"))


def largest_frontal(detector, image):
    det = detector.detect(image)[0]
    q = face_quality(image, det.boxes, det.scores, det.landmarks)
    frontal = np.flatnonzero((np.abs(q.yaw) < 15) & (det.scores > 0.9))
    assert len(frontal), "no confident frontal face found"
    best = frontal[np.argmax(q.face_size[frontal])]
    return det, q, best


def test_blur_lowers_sharpness(detector, baseball):
    det, q, best = largest_frontal(detector, baseball)
    blurred = cv2.GaussianBlur(baseball, (0, 0), 2.0)
    qb = face_quality(blurred, det.boxes, det.scores, det.landmarks)
    assert (qb.sharpness < q.sharpness).all()
    assert qb.sharpness[best] < 0.5 * q.sharpness[best]
    assert qb.quality[best] < q.quality[best]


def test_mirror_flips_yaw_and_roll(detector, baseball):
    det = detector.detect(baseball)[0]
    q = face_quality(baseball, det.boxes, det.scores, det.landmarks)
    mirrored = np.ascontiguousarray(baseball[:, ::-1])
    det_m = detector.detect(mirrored)[0]
    q_m = face_quality(mirrored, det_m.boxes, det_m.scores, det_m.landmarks)
    width = baseball.shape[1]
    # Match each face with its mirror image by box centre (x mirrored as width - x).
    centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
    centres_m = (det_m.boxes[:, :2] + det_m.boxes[:, 2:]) / 2
    centres_m[:, 0] = width - centres_m[:, 0]
    distance = np.linalg.norm(centres[:, None] - centres_m[None], axis=2)
    match = distance.argmin(1)
    close = distance[np.arange(len(det)), match] < 3
    assert close.sum() >= 10
    # Landmarks of a re-detected mirror image differ by a few pixels (the network is not
    # mirror-symmetric), so compare signs where the turn is clear.
    turned = close & (np.abs(q.yaw) > 10)
    assert turned.sum() >= 3
    assert (np.sign(q.yaw[turned]) == -np.sign(q_m.yaw[match[turned]])).all()
    assert np.corrcoef(q.yaw[close], q_m.yaw[match[close]])[0, 1] < -0.5


def test_mirrored_landmarks_flip_yaw_and_roll_exactly(detector, baseball):
    det = detector.detect(baseball)[0]
    width = baseball.shape[1]
    mirrored = det.landmarks.copy()
    mirrored[..., 0] = width - mirrored[..., 0]
    # The image-left eye becomes the image-right one, and the same for the mouth corners.
    mirrored = mirrored[:, [1, 0, 2, 4, 3]]
    yaw, pitch, roll = pose_angles(det.landmarks)
    yaw_m, pitch_m, roll_m = pose_angles(mirrored)
    np.testing.assert_allclose(yaw_m, -yaw, atol=1e-3)
    np.testing.assert_allclose(roll_m, -roll, atol=1e-3)
    np.testing.assert_allclose(pitch_m, pitch, atol=1e-3)


def test_pose_signs_on_synthetic_landmarks():
    frontal = np.array([[[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]], np.float32)
    yaw, pitch, roll = pose_angles(frontal)
    np.testing.assert_allclose([yaw[0], pitch[0], roll[0]], 0, atol=1e-4)
    turned = frontal.copy()
    turned[0, 2, 0] += 12
    assert pose_angles(turned)[0][0] > 20
    up = frontal.copy()
    up[0, 2, 1] -= 10
    assert pose_angles(up)[1][0] > 20
    tilted = frontal.copy()
    tilted[0, 1, 1] += 10
    assert pose_angles(tilted)[2][0] > 10


def test_tiny_face_scores_lower_than_large_frontal(detector, shared_dir, baseball):
    det, q, best = largest_frontal(detector, baseball)
    selfie = read_image(str(shared_dir / "images/crowd_selfie.jpg"))
    det_s = detector.detect(selfie)[0]
    q_s = face_quality(selfie, det_s.boxes, det_s.scores, det_s.landmarks)
    tiny = q_s.face_size < 10
    assert tiny.sum() >= 5
    assert q.face_size[best] > 40
    assert (q_s.quality[tiny] < q.quality[best]).all()
    # The same face shrunk 6x: detected again, it is smaller and scores lower.
    x1, y1, x2, y2 = det.boxes[best].astype(int)
    pad = (x2 - x1) // 2
    patch = baseball[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad]
    small = cv2.resize(patch, None, fx=1 / 6, fy=1 / 6, interpolation=cv2.INTER_AREA)
    canvas = np.full((96, 96, 3), 128, np.uint8)
    canvas[: small.shape[0], : small.shape[1]] = small
    det_small = Detector(scale="long:320", score_threshold=0.3).detect(canvas)[0]
    if len(det_small):
        q_small = face_quality(canvas, det_small.boxes, det_small.scores, det_small.landmarks)
        assert q_small.quality.max() < q.quality[best]


def test_composite_in_unit_interval_and_monotone():
    n = 5
    ones = np.ones(n, np.float32)
    base = dict(score=ones * 0.99, size=ones * 120, sharp=ones * 400, yaw=ones * 0, pitch=ones * 0, brightness=ones * 0.5, contrast=ones * 0.2)
    q0 = composite_quality(**base)
    assert ((q0 > 0.5) & (q0 <= 1)).all()
    for key, worse in [("size", 12), ("sharp", 10), ("yaw", 70), ("pitch", 60), ("brightness", 0.97), ("contrast", 0.01)]:
        q = composite_quality(**{**base, key: ones * worse})
        assert (q < q0).all() and (q >= 0).all(), key


def test_no_faces():
    q = face_quality(np.zeros((10, 10, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    assert len(q) == 0
