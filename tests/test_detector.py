"""Detector behaviour: batching, mirroring, input scales, clipping, bad input, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from retinaface_core import Detector, InputScale, InvalidImageError, load_weights
from retinaface_core.model import optimize_for_inference
from retinaface_core.postprocessing import Detections
from retinaface_core.preprocessing import group_batch, to_network_input


@pytest.fixture(scope="module")
def baseball(shared_dir):
    path = shared_dir / "images/crowd_baseball.jpg"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return cv2.imread(str(path))


@pytest.fixture(scope="module")
def loaded(weights_dir):
    return load_weights("mobilenet0.25-1mb")


def assert_same(a: Detections, b: Detections, atol: float = 1e-3) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=atol)


@pytest.mark.parametrize(("scale", "pad_multiple"), [("original", 1), ("long:320", 32), ("square:320", 1)])
def test_batch_of_mixed_sizes_equals_one_at_a_time(random_weights, photo, scale, pad_multiple):
    detector = Detector(random_weights, scale=scale, pad_multiple=pad_multiple, score_threshold=0.9)
    images = [
        photo,
        photo[100:400, 50:450].copy(),
        photo[:, ::-1].copy(),
        photo[60:360, 80:480].copy(),  # same size as the second: shares its input tensor
        cv2.resize(photo, (333, 203)),
    ]
    batched = detector.detect(images)
    assert len(batched) == len(images)
    assert all(len(d) > 20 for d in batched)
    for image, result in zip(images, batched):
        assert_same(result, detector.detect(image)[0])


def test_mirrored_image_gives_mirrored_boxes_and_swapped_landmarks(loaded, baseball):
    width = baseball.shape[1]
    plain = Detector(loaded, score_threshold=0.9).detect(baseball)[0]
    # A lower threshold on the mirror side, so that a face scoring just above 0.9 on one
    # side and just below on the other still finds its counterpart.
    mirrored = Detector(loaded, score_threshold=0.5).detect(np.ascontiguousarray(baseball[:, ::-1]))[0]
    # Continuous pixel coordinates: the image spans [0, width], so x maps to width - x.
    expected_boxes = np.stack([width - mirrored.boxes[:, 2], mirrored.boxes[:, 1], width - mirrored.boxes[:, 0], mirrored.boxes[:, 3]], 1)
    reflected = mirrored.landmarks.copy()
    reflected[..., 0] = width - reflected[..., 0]
    swapped = reflected[:, [1, 0, 2, 4, 3]]
    errors_swapped, errors_unswapped = [], []
    for box, points in zip(plain.boxes, plain.landmarks):
        size = box[2] - box[0]
        if size < 25:
            continue
        nearest = np.abs(expected_boxes - box).max(axis=1).argmin()
        # The network is not exactly flip-equivariant (stride-2 convolutions pad asymmetrically,
        # profile faces look different mirrored): a few pixels of disagreement remain.
        assert np.abs(expected_boxes[nearest] - box).max() < 0.15 * size
        errors_swapped.append(np.linalg.norm(swapped[nearest] - points, axis=1).mean() / size)
        errors_unswapped.append(np.linalg.norm(reflected[nearest] - points, axis=1).mean() / size)
    errors_swapped, errors_unswapped = np.array(errors_swapped), np.array(errors_unswapped)
    assert len(errors_swapped) >= 10
    assert np.median(errors_swapped) < 0.05
    assert (errors_swapped < errors_unswapped).mean() >= 0.9


def test_scales_map_back_to_original_pixels(loaded, baseball):
    reference = Detector(loaded, score_threshold=0.9).detect(baseball)[0]
    big = (reference.boxes[:, 2] - reference.boxes[:, 0]) > 40
    assert big.sum() >= 5
    for scale in ("long:800", "square:800"):
        scaled = Detector(loaded, scale=scale, score_threshold=0.5).detect(baseball)[0]
        for box in reference.boxes[big]:
            distance = np.abs(scaled.boxes - box).max(axis=1).min()
            # A wrong mapping would be off by the 0.78 resize factor: ~60 px at x = 300.
            assert distance < 0.25 * (box[2] - box[0]), scale


def test_input_scale_shapes():
    assert InputScale.parse("long:640").resized_shape(624, 1024) == (390, 640)
    assert InputScale.parse("long:640").input_shape(624, 1024, 32) == (416, 640)
    assert InputScale.parse("square:640").input_shape(624, 1024, 32) == (640, 640)
    assert InputScale.parse("original").input_shape(33, 65, 1) == (33, 65)
    for bad in ("long", "long:abc", "square:8", "huge:640"):
        with pytest.raises(ValueError, match="input scale"):
            InputScale.parse(bad)


def test_clip_keeps_boxes_and_landmarks_inside_the_image(random_weights, photo):
    crop = np.ascontiguousarray(photo[40:300, 100:400])
    height, width = crop.shape[:2]
    unclipped = Detector(random_weights, score_threshold=0.9).detect(crop)[0]
    assert (unclipped.boxes[:, 1] < 0).any() and (unclipped.boxes[:, 3] > height).any() and (unclipped.boxes[:, 2] > width).any()
    clipped = Detector(random_weights, score_threshold=0.9, clip=True).detect(crop)[0]
    assert len(clipped) == len(unclipped)
    assert (clipped.boxes >= 0).all() and (clipped.landmarks >= 0).all()
    assert (clipped.boxes[:, [0, 2]] <= width).all() and (clipped.boxes[:, [1, 3]] <= height).all()
    assert (clipped.landmarks[..., 0] <= width).all() and (clipped.landmarks[..., 1] <= height).all()
    inside = (unclipped.boxes[:, 0] >= 0) & (unclipped.boxes[:, 2] <= width)
    np.testing.assert_array_equal(clipped.boxes[inside, 0], unclipped.boxes[inside, 0])


def test_optimised_network_computes_the_same_function(loaded, baseball):
    plain = Detector(loaded, optimize=False, score_threshold=0.02).detect(baseball)[0]
    fast = Detector(loaded, optimize=True, score_threshold=0.02).detect(baseball)[0]
    keep = plain.scores > 0.3
    assert_same(
        Detections(plain.boxes[keep], plain.scores[keep], plain.landmarks[keep]),
        Detections(fast.boxes[fast.scores > 0.3], fast.scores[fast.scores > 0.3], fast.landmarks[fast.scores > 0.3]),
        atol=0.05,
    )


def test_inference_network_gives_the_raw_outputs_of_the_published_one(loaded, baseball):
    pixels = group_batch([baseball], InputScale.parse("long:480"), 1, loaded.config.mean_bgr)[0].pixels
    x = to_network_input(pixels, loaded.config.mean_bgr, loaded.config.channel_order, torch.device("cpu"))
    with torch.no_grad():
        expected = loaded.model.eval()(x.contiguous())
        merged = optimize_for_inference(loaded.model)(x)
    for name, a, b in zip(expected._fields, expected, merged):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize("channel_order", ["BGR", "RGB"])
def test_network_input_is_the_mean_subtracted_image_in_channel_order(channel_order):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean = (104.0, 117.0, 123.0)
    x = to_network_input(pixels, mean, channel_order, torch.device("cpu"))
    expected = pixels.astype(np.float32) - np.array(mean, np.float32)
    if channel_order == "RGB":
        expected = expected[..., ::-1]
    assert x.shape == (2, 3, 5, 7) and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), expected)


def test_letterbox_keeps_the_resized_image_top_left_and_pads_with_the_mean():
    portrait = np.random.default_rng(1).integers(0, 256, (100, 50, 3), dtype=np.uint8)
    landscape = np.ascontiguousarray(portrait.transpose(1, 0, 2))
    groups = group_batch([portrait, landscape], InputScale.parse("square:64"), 1, (104.4, 117.0, 123.0))
    assert len(groups) == 1 and groups[0].pixels.shape == (2, 64, 64, 3)
    tall, wide = groups[0].pixels
    np.testing.assert_array_equal(tall[:, :32], cv2.resize(portrait, (32, 64), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(wide[:32], cv2.resize(landscape, (64, 32), interpolation=cv2.INTER_LINEAR))
    assert (tall[:, 32:] == (104, 117, 123)).all() and (wide[32:] == (104, 117, 123)).all()
    np.testing.assert_allclose(groups[0].scales, [[32 / 50, 64 / 100], [64 / 100, 32 / 50]])


def test_image_without_faces_gives_empty_detections(loaded):
    result = Detector(loaded).detect(np.full((200, 300, 3), 127, np.uint8))[0]
    assert len(result) == 0 and result.boxes.shape == (0, 4) and result.landmarks.shape == (0, 5, 2)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("not an image", "numpy array"),
        (np.zeros((0, 0, 3), np.uint8), "empty image"),
        (np.zeros((10, 0, 3), np.uint8), "empty image"),
        (np.zeros((32, 32, 3), np.float32), "dtype uint8"),
        (np.zeros((32, 32), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((32, 32, 4), np.uint8), r"shape \(H, W, 3\)"),
    ],
)
def test_bad_input_is_refused_with_the_reason(loaded, image, message):
    detector = Detector(loaded)
    with pytest.raises(InvalidImageError, match=message):
        detector.detect([np.zeros((32, 32, 3), np.uint8), image])


def test_cli_json_and_draw(shared_dir, weights_dir, baseball, tmp_path):
    path = shared_dir / "images/crowd_baseball.jpg"
    out = subprocess.run(
        [sys.executable, "-m", "retinaface_core", str(path), "--json", "--score-threshold", "0.6", "--draw", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RETINAFACE_WEIGHTS_DIR": str(weights_dir)},
    )
    record = json.loads(out.stdout.strip().splitlines()[0])
    assert (record["width"], record["height"]) == (1024, 624)
    # The command line starts from the annotation job's settings, not the API's.
    expected = Detector(score_threshold=0.6, scale="long:640", batching="bucket").detect(baseball)[0]
    assert len(record["detections"]) == len(expected)
    np.testing.assert_allclose([d["box"] for d in record["detections"]], expected.boxes, atol=1e-3)
    np.testing.assert_allclose([d["landmarks"] for d in record["detections"]], expected.landmarks, atol=1e-3)
    drawn = cv2.imread(str(tmp_path / "crowd_baseball.jpg"))
    assert drawn.shape == baseball.shape and not np.array_equal(drawn, baseball)


def test_cli_reports_unreadable_images(weights_dir, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    out = subprocess.run(
        [sys.executable, "-m", "retinaface_core", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "RETINAFACE_WEIGHTS_DIR": str(weights_dir)},
    )
    assert out.returncode == 1
    assert "notes.jpg" in out.stderr and "not an image" in out.stderr


def test_device_argument_runs_on_cpu_tensors(loaded):
    detector = Detector(loaded, device="cpu")
    raw = detector.forward(np.zeros((2, 64, 96, 3), np.uint8))
    anchors = 2 * (8 * 12 + 4 * 6 + 2 * 3)
    assert raw.boxes.shape == (2, anchors, 4) and raw.logits.shape == (2, anchors, 2) and raw.landmarks.shape == (2, anchors, 10)
    assert raw.boxes.device == torch.device("cpu")
