"""Parity with the reference RetinaFace detector on the published checkpoint and real photos.

The reference here is a literal, loop-based transcription of the pre/post-processing that
``../shared/README.md`` specifies (itself that of biubug6's detect.py, the same loop in
Face-Detector-1MB-with-landmark and in Pytorch_Retinaface, which differ only in the anchor
sizes of their configs): priors built by nested loops, decoding per anchor, ``py_cpu_nms``
with the +1 pixel area convention. It runs on the raw
outputs of the network exactly as loaded (eager, BatchNorm not folded), so the comparison also
covers the Detector's inference optimisations, vectorised decoding and OpenCV NMS.
"""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest
import torch

from retinaface_core import Detector, load_weights
from retinaface_core.anchors import generate_priors

MEAN = (104, 117, 123)
STEPS = (8, 16, 32)
MIN_SIZES = ((10, 20), (32, 64), (128, 256))
# Pytorch_Retinaface's cfg_mnet, for its MobileNet-0.25 checkpoint.
CFG_MNET_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
PYTORCH_RETINAFACE_FILE = "pytorch_retinaface_mobilenet0.25_Final.pth"
VARIANCE = (0.1, 0.2)


def reference_priors(height: int, width: int, min_sizes=MIN_SIZES) -> np.ndarray:
    anchors = []
    for k, step in enumerate(STEPS):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        for i, j in itertools.product(range(rows), range(cols)):
            for min_size in min_sizes[k]:
                anchors += [(j + 0.5) * step / width, (i + 0.5) * step / height, min_size / width, min_size / height]
    return np.array(anchors, dtype=np.float32).reshape(-1, 4)


def reference_decode(loc: np.ndarray, landm: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.empty_like(loc)
    points = np.empty((len(loc), 10), dtype=np.float32)
    for a in range(len(loc)):
        cx, cy, w, h = priors[a]
        ccx = cx + loc[a, 0] * VARIANCE[0] * w
        ccy = cy + loc[a, 1] * VARIANCE[0] * h
        bw = w * math.exp(loc[a, 2] * VARIANCE[1])
        bh = h * math.exp(loc[a, 3] * VARIANCE[1])
        boxes[a] = (ccx - bw / 2, ccy - bh / 2, ccx + bw / 2, ccy + bh / 2)
        for p in range(5):
            points[a, 2 * p] = cx + landm[a, 2 * p] * VARIANCE[0] * w
            points[a, 2 * p + 1] = cy + landm[a, 2 * p + 1] * VARIANCE[0] * h
    return boxes, points


def py_cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def reference_detect(model: torch.nn.Module, image: np.ndarray, min_sizes=MIN_SIZES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference detector: threshold 0.02, top 5000, NMS 0.4, keep 750."""
    height, width = image.shape[:2]
    x = np.float32(image)
    x -= MEAN
    x = x.transpose(2, 0, 1)[None]
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    loc = out.boxes[0].numpy()
    conf = torch.softmax(out.logits[0], dim=-1).numpy()
    landm = out.landmarks[0].numpy()
    scores = conf[:, 1]
    inds = np.where(scores > 0.02)[0]
    priors = reference_priors(height, width, min_sizes)[inds]
    boxes, points = reference_decode(loc[inds], landm[inds], priors)
    boxes *= np.array([width, height, width, height], dtype=np.float32)
    points *= np.array([width, height] * 5, dtype=np.float32)
    scores = scores[inds]
    order = scores.argsort()[::-1][:5000]
    boxes, points, scores = boxes[order], points[order], scores[order]
    dets = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)
    keep = py_cpu_nms(dets, 0.4)[:750]
    return boxes[keep], scores[keep], points[keep].reshape(-1, 5, 2)


@pytest.fixture(scope="module")
def reference_model(weights_dir):
    return load_weights("mobilenet0.25-1mb").model.eval()


@pytest.fixture(scope="module")
def detector(weights_dir):
    return Detector("mobilenet0.25-1mb", scale="original", score_threshold=0.02, top_k=5000, nms_iou=0.4, keep_top_k=750)


def real_photos(shared_dir):
    paths = sorted((shared_dir / "images").glob("*.jpg")) + sorted((shared_dir / "widerface/val/images").glob("*/*.jpg"))
    if len(paths) < 14:
        pytest.skip(f"expected 14 real photos under {shared_dir}, found {len(paths)}")
    return paths


def test_priors_equal_the_reference_loop():
    for (height, width), min_sizes in itertools.product([(624, 1024), (898, 1600), (301, 299), (33, 7)], [MIN_SIZES, CFG_MNET_MIN_SIZES]):
        expected = reference_priors(height, width, min_sizes)
        actual = generate_priors(height, width, min_sizes, STEPS).numpy()
        assert actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)


def test_detections_match_reference_on_real_photos(shared_dir, reference_model, detector):
    assert_parity(real_photos(shared_dir), reference_model, detector, MIN_SIZES)


def test_pytorch_retinaface_checkpoint_matches_its_reference_on_real_photos(shared_dir, weights_dir):
    path = weights_dir / PYTORCH_RETINAFACE_FILE
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    # Resolved by path: its hash, a known public copy, picks the mobilenet0.25 config.
    loaded = load_weights(str(path))
    assert loaded.config.name == "mobilenet0.25" and loaded.config.min_sizes == CFG_MNET_MIN_SIZES
    reference_model = load_weights(str(path)).model.eval()
    detector = Detector(loaded, scale="original", score_threshold=0.02, top_k=5000, nms_iou=0.4, keep_top_k=750)
    assert_parity(real_photos(shared_dir), reference_model, detector, CFG_MNET_MIN_SIZES)


def assert_parity(paths, reference_model, detector, min_sizes) -> None:
    compared = 0
    for path in paths:
        image = cv2.imread(str(path))
        ref_boxes, ref_scores, ref_points = reference_detect(reference_model, image, min_sizes)
        ours = detector.detect(image)[0]
        ref_sel = ref_scores >= 0.5
        our_sel = ours.scores >= 0.5
        assert our_sel.sum() == ref_sel.sum(), f"{path.name}: {our_sel.sum()} faces vs reference {ref_sel.sum()}"
        ref_boxes, ref_scores, ref_points = ref_boxes[ref_sel], ref_scores[ref_sel], ref_points[ref_sel]
        boxes, scores, points = ours.boxes[our_sel], ours.scores[our_sel], ours.landmarks[our_sel]
        # Same set: pair each reference face with its nearest detection, one to one.
        distance = np.abs(ref_boxes[:, None, :] - boxes[None, :, :]).max(axis=2)
        match = distance.argmin(axis=1)
        assert len(set(match.tolist())) == len(match), f"{path.name}: detections do not pair one to one"
        assert distance[np.arange(len(match)), match].max(initial=0) < 0.5, path.name
        np.testing.assert_allclose(points[match], ref_points, atol=0.5, err_msg=path.name)
        np.testing.assert_allclose(scores[match], ref_scores, atol=1e-3, err_msg=path.name)
        compared += len(match)
    assert compared > 600  # the two crowd photos alone hold several hundred faces


def test_landmarks_are_ordered_as_seen_in_the_image(shared_dir, weights_dir):
    image = cv2.imread(str(shared_dir / "images/crowd_baseball.jpg"))
    faces = Detector(score_threshold=0.9).detect(image)[0]
    big = faces.landmarks[(faces.boxes[:, 2] - faces.boxes[:, 0]) > 30]
    assert len(big) >= 10
    eyes_left_to_right = big[:, 0, 0] < big[:, 1, 0]
    mouth_left_to_right = big[:, 3, 0] < big[:, 4, 0]
    eyes_above_mouth = big[:, :2, 1].max(axis=1) < big[:, 3:, 1].min(axis=1)
    assert eyes_left_to_right.all() and mouth_left_to_right.all() and eyes_above_mouth.all()
