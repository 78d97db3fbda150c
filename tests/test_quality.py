"""Quality scores on real faces: blur, exposure, mirroring, size and pose move them the right way;
they equal those of the OpenCV implementation they replaced (``tests/data/quality_reference.json``,
written by ``benchmarks/quality_reference.py``), in a batch as per image; the fitted composite is
what its data file says and meets the issue-14 targets on WIDER FACE."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from retinaface_core import Detector
from retinaface_core.image_io import read_image
from retinaface_core.quality import (
    FEATURE_SIGNS,
    FEATURES,
    QUALITY_MODEL,
    QUALITY_MODEL_VERSION,
    FaceQuality,
    QualityModel,
    composite_quality,
    face_quality,
    pose_angles,
    quality_features,
)
from schemas.annotation import QUALITY_COLUMNS

# The astronaut's face in scikit-image's photo (512 x 512), as the shared checkpoint finds it at
# score 0.9997: short side 91 px.
ASTRONAUT_FACE = np.array([179, 55, 270, 178], np.float32)
NO_LANDMARKS = np.zeros((1, 5, 2), np.float32)


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


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[..., ::-1])


def astronaut_face_at(astronaut: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo rescaled so that the face's short side is ``size`` px, and the face's (1, 4) box."""
    factor = size / 91
    shrink = factor < 1
    image = cv2.resize(astronaut, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return image, ASTRONAUT_FACE[None] * factor


def scores_of(image: np.ndarray, box: np.ndarray):
    return face_quality(image, box, np.ones(1, np.float32), NO_LANDMARKS)


def test_sharpness_does_not_depend_on_face_size_and_blur_lowers_it_alike(astronaut):
    sharp, blurred = {}, {}
    for size in (20, 200):
        image, box = astronaut_face_at(astronaut, size)
        sharp[size] = scores_of(image, box).sharpness[0]
        # The same blur relative to the face: 4 % of its size.
        blurred[size] = scores_of(cv2.GaussianBlur(image, (0, 0), 0.04 * size), box).sharpness[0]
    # Within 15 % (0.47 vs 0.53), and a sharp 20 px face above a slightly blurred 200 px one.
    assert abs(sharp[20] - sharp[200]) < 0.15 * sharp[200]
    assert sharp[20] > blurred[200]
    for size in (20, 200):
        assert blurred[size] < 0.8 * sharp[size]
    assert abs(blurred[20] / sharp[20] - blurred[200] / sharp[200]) < 0.05
    # Twice the blur, twice as visible at both sizes.
    for size in (20, 200):
        image, box = astronaut_face_at(astronaut, size)
        assert scores_of(cv2.GaussianBlur(image, (0, 0), 0.08 * size), box).sharpness[0] < 0.6 * blurred[size]


def test_sharpness_ignores_contrast_and_brightness(astronaut):
    image, box = astronaut_face_at(astronaut, 91)
    flat = (image.astype(np.float32) * 0.5 + 40).astype(np.uint8)
    assert abs(scores_of(flat, box).sharpness[0] - scores_of(image, box).sharpness[0]) < 0.05


def test_exposure_catches_dark_and_blown_out_faces_not_dark_ones(astronaut):
    image, box = astronaut_face_at(astronaut, 91)
    q = scores_of(image, box)
    assert q.exposure[0] > 0.95
    darker = scores_of((image * 0.5).astype(np.uint8), box)
    # Half as bright is still well exposed: nothing is clipped.
    assert darker.brightness[0] < 0.6 * q.brightness[0]
    assert darker.exposure[0] > 0.95
    crushed = scores_of((image * 0.05).astype(np.uint8), box)
    blown = scores_of(np.clip(image * 2.0, 0, 255).astype(np.uint8), box)
    assert crushed.exposure[0] < 0.6
    assert blown.exposure[0] < 0.2
    assert crushed.quality[0] < q.quality[0] and blown.quality[0] < q.quality[0]


def test_blur_lowers_sharpness(detector, baseball):
    det, q, best = largest_frontal(detector, baseball)
    blurred = cv2.GaussianBlur(baseball, (0, 0), 2.0)
    qb = face_quality(blurred, det.boxes, det.scores, det.landmarks)
    # A 2 px blur is visible at SHARPNESS_SIZE samples across only on faces of some size.
    large = q.face_size >= 32
    assert large.sum() >= 5
    assert (qb.sharpness[large] < q.sharpness[large]).all()
    assert qb.sharpness[best] < 0.7 * q.sharpness[best]
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
    yaw, pitch, roll = pose_angles(torch.from_numpy(det.landmarks))
    yaw_m, pitch_m, roll_m = pose_angles(torch.from_numpy(mirrored))
    np.testing.assert_allclose(yaw_m, -yaw, atol=1e-3)
    np.testing.assert_allclose(roll_m, -roll, atol=1e-3)
    np.testing.assert_allclose(pitch_m, pitch, atol=1e-3)


def test_pose_signs_on_synthetic_landmarks():
    frontal = torch.tensor([[[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]], dtype=torch.float32)
    yaw, pitch, roll = pose_angles(frontal)
    np.testing.assert_allclose([yaw[0], pitch[0], roll[0]], 0, atol=1e-4)
    turned = frontal.clone()
    turned[0, 2, 0] += 12
    assert pose_angles(turned)[0][0] > 20
    up = frontal.clone()
    up[0, 2, 1] -= 10
    assert pose_angles(up)[1][0] > 20
    tilted = frontal.clone()
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
    # Size is no term of the composite (the WIDER labels give it no weight once the detection
    # score is in, docs/annotate.md); tiny faces score lower through their detection scores.
    assert np.median(q_s.quality[tiny]) < 0.75 * q.quality[best]
    # The same face shrunk 6x: detected again, it is smaller and scores lower.
    x1, y1, x2, y2 = det.boxes[best].astype(int)
    pad = (x2 - x1) // 2
    patch = baseball[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad]
    small = cv2.resize(patch, None, fx=1 / 6, fy=1 / 6, interpolation=cv2.INTER_AREA)
    canvas = np.full((96, 96, 3), 128, np.uint8)
    canvas[: small.shape[0], : small.shape[1]] = small
    det_small = Detector(scale="long:320", score_threshold=0.3).detect(canvas)[0]
    assert len(det_small) >= 1, "the shrunk face was not detected again"
    q_small = face_quality(canvas, det_small.boxes, det_small.scores, det_small.landmarks)
    assert q_small.quality.max() < q.quality[best]


def test_shipped_model_is_its_data_file():
    raw = json.loads(resources.files("retinaface_core").joinpath("quality_model.json").read_text())
    assert QUALITY_MODEL_VERSION == raw["version"] == QUALITY_MODEL.version
    assert QUALITY_MODEL.features == tuple(raw["features"])
    edited = {**raw, "weights": [w * 1.01 for w in raw["weights"]]}
    with pytest.raises(ValueError, match="does not match its coefficients"):
        QualityModel.from_json(json.dumps(edited))


def test_composite_in_unit_interval_and_monotone():
    """Each feature moved in its known direction never lowers quality, and quality stays in [0, 1]."""
    rng = np.random.default_rng(0)
    features = np.stack(
        [rng.uniform(0.3, 1, 50), rng.uniform(2, 9, 50), rng.uniform(0.2, 0.7, 50)]
        + [rng.uniform(0, 60, 50)] * 3
        + [rng.uniform(0, 1, 50)],
        axis=1,
    )
    q0 = composite_quality(QUALITY_MODEL, torch.from_numpy(features))
    assert q0.dtype == torch.float32 and ((q0 >= 0) & (q0 <= 1)).all()
    for k, name in enumerate(FEATURES):
        better = features.copy()
        better[:, k] += FEATURE_SIGNS[name] * 0.2 * np.abs(features[:, k]).mean()
        assert (composite_quality(QUALITY_MODEL, torch.from_numpy(better)) >= q0).all(), name


@pytest.fixture(scope="module")
def wider_faces(shared_dir, weights_dir, gt_dir):
    from benchmarks.quality_auc import labelled_faces

    images = shared_dir / "widerface/val/images"
    if not images.is_dir():
        pytest.skip(f"the shared WIDER FACE val images are absent from {images}")
    return labelled_faces(images, gt_dir / "wider_face_val_bbx_gt.txt", Detector(scale="original", score_threshold=0.3))


def test_scores_separate_wider_labels(wider_faces):
    """Issue 14's targets on the shared WIDER val faces (figures in docs/annotate.md), at the
    two decimals the issue's table is written in."""
    from benchmarks.quality_auc import LABELS, label_masks, roc_auc

    def auc(values, attribute):
        label = next(label for label in LABELS if label.attribute == attribute)
        return round(roc_auc(values, *label_masks(wider_faces.attributes, label)), 2)

    q = wider_faces.quality
    assert len(wider_faces.scores) >= 400
    assert auc(q.quality, "pose") >= 0.70
    assert auc(q.quality, "illumination") >= 0.60
    for attribute in ("blur", "occlusion"):
        assert auc(q.quality, attribute) >= auc(wider_faces.scores, attribute) - 0.01, attribute
    assert auc(q.sharpness, "blur") >= 0.65
    assert auc(-np.abs(q.roll), "pose") >= 0.65
    assert auc(q.exposure, "illumination") >= 0.65


def test_no_faces():
    nothing = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    q = face_quality(np.zeros((10, 10, 3), np.uint8), *nothing)
    assert len(q) == 0
    columns = quality_features([torch.zeros((10, 10, 3), dtype=torch.uint8)], *_no_detections())
    assert columns.shape == (0, len(QUALITY_COLUMNS)) and columns.dtype == torch.float32 and columns.device.type == "cpu"
    assert quality_features([], *_no_detections()).shape == (0, len(QUALITY_COLUMNS))


def _no_detections() -> tuple[torch.Tensor, ...]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros((0, 4)), torch.zeros(0), torch.zeros((0, 5, 2))


@pytest.fixture(scope="module")
def reference(shared_dir):
    """The fixture's photos and faces (benchmarks/quality_reference.py): the 14 shared photos with
    the checkpoint's detections at long:640, then synthetic faces on crops of one photo (borders,
    empty, outside, 1-3 px and whole-image boxes, degenerate landmarks)."""
    from benchmarks.quality_reference import load_fixture

    return load_fixture(shared_dir)


def _batch(photos: list[dict], order: np.ndarray | None = None, **kwargs) -> np.ndarray:
    """quality_features of every face of ``photos`` in one call (faces in ``order`` if given), as
    (N, len(QUALITY_COLUMNS)) numpy in the photos' face order."""
    image_index = np.concatenate([np.full(len(p["scores"]), k) for k, p in enumerate(photos)])
    boxes, scores, landmarks = (np.concatenate([p[key] for p in photos]) for key in ("boxes", "scores", "landmarks"))
    order = np.arange(len(image_index)) if order is None else order
    columns = quality_features(
        [torch.from_numpy(p["image"]) for p in photos],
        torch.from_numpy(image_index[order]),
        torch.from_numpy(boxes[order]),
        torch.from_numpy(scores[order]),
        torch.from_numpy(landmarks[order]),
        **kwargs,
    )
    result = np.empty(columns.shape, np.float32)
    result[order] = columns.numpy()
    return result


def test_scores_equal_the_opencv_implementation(reference):
    """Every score of every face equals that of the per-face numpy/OpenCV code of b887762 (stored
    rounded to 1e-6): the same crops, grey levels, area and linear resizing, samples and pose."""
    assert sum(len(p["scores"]) for p in reference if not p["synthetic"]) >= 500
    assert sum(len(p["scores"]) for p in reference if p["synthetic"]) >= 20
    for photo in reference:
        q = face_quality(photo["image"], photo["boxes"], photo["scores"], photo["landmarks"])
        for column in QUALITY_COLUMNS:
            np.testing.assert_allclose(getattr(q, column), photo[column], rtol=0, atol=2e-6, err_msg=f"{photo['name']} {column}")


def test_a_batch_of_mixed_sizes_in_any_order_equals_each_image(reference):
    per_image = np.concatenate([face_quality(p["image"], p["boxes"], p["scores"], p["landmarks"]).columns().numpy() for p in reference])
    assert len({p["image"].shape for p in reference}) >= 5
    shuffled = np.random.default_rng(0).permutation(len(per_image))
    np.testing.assert_allclose(_batch(reference, shuffled), per_image, rtol=0, atol=1e-6)


def test_small_chunks_change_nothing(reference):
    """Runs split into chunks of a few hundred pixels (each crop row longer than that alone, and
    chunks cut where the image changes) give the scores of one chunk."""
    photos = [p for p in reference if p["synthetic"]] + [p for p in reference if p["name"].endswith("baseball.jpg")]
    np.testing.assert_allclose(_batch(photos, chunk_pixels=700), _batch(photos), rtol=0, atol=1e-9)


def test_reads_are_chunked_on_a_large_crowd(shared_dir):
    """A 9-MP photo with 300 faces of 2 to 1,500 px: the chunks the reads are planned in follow each
    other, each holds at most chunk_pixels pixels plus one crop row and covers its runs exactly;
    the scores of 15 of them, of every size, read in such chunks, are in range."""
    from retinaface_core.quality import _layout, crop_rectangles

    image = cv2.resize(read_image(str(shared_dir / "images/crowd_selfie.jpg")), (4000, 2245), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(2), np.log(1500), 300))
    corners = rng.uniform([-50, -50], [4000, 2245], (300, 2))
    boxes = np.concatenate([corners, corners + sizes[:, None] * rng.uniform(0.7, 1.3, (300, 2))], axis=1).astype(np.float32)
    image_sizes = np.tile(image.shape[:2], (300, 1))
    chunk_pixels = 1 << 18
    layout = _layout(crop_rectangles(boxes, image_sizes), image_sizes[:, 1], np.zeros(300, np.int64), chunk_pixels)
    assert len(layout.chunks) > 10
    assert layout.chunks[0].first_run == 0 and layout.chunks[-1].end_run == len(layout.runs)
    for chunk, following in zip(layout.chunks, layout.chunks[1:]):
        assert (following.first_run, following.first_pixel) == (chunk.end_run, chunk.end_pixel)
    longest_row = int(layout.runs[:, 2].max())
    for chunk in layout.chunks:
        assert chunk.end_pixel - chunk.first_pixel <= chunk_pixels + longest_row
        assert chunk.first_pixel == layout.runs[chunk.first_run, 1]
        assert chunk.end_pixel == layout.runs[chunk.end_run - 1, 1] + layout.runs[chunk.end_run - 1, 2]
    some = boxes[np.argsort(sizes)[::20]]
    landmarks = torch.from_numpy(np.repeat(((some[:, :2] + some[:, 2:]) / 2)[:, None], 5, axis=1))
    arguments = (torch.zeros(len(some), dtype=torch.int64), torch.from_numpy(some), torch.ones(len(some)), landmarks)
    q = FaceQuality.from_columns(quality_features([torch.from_numpy(image)], *arguments, chunk_pixels=chunk_pixels))
    for column in QUALITY_COLUMNS:
        assert np.isfinite(getattr(q, column)).all(), column
    for column in ("sharpness", "brightness", "contrast", "exposure", "quality"):
        assert ((getattr(q, column) >= 0) & (getattr(q, column) <= 1)).all(), column


def test_a_view_of_a_larger_image_reads_only_its_pixels(reference):
    """A crop passed as a strided view scores as its contiguous copy; boxes past its edges read
    its border pixels, not the larger image's."""
    photo = next(p for p in reference if p["name"].endswith("baseball.jpg") and not p["synthetic"])
    whole = torch.from_numpy(photo["image"])
    view = whole[100:500, 200:900]
    assert not view.is_contiguous()
    boxes = torch.from_numpy(photo["boxes"]) - torch.tensor([200.0, 100.0, 200.0, 100.0])
    landmarks = torch.from_numpy(photo["landmarks"]) - torch.tensor([200.0, 100.0])
    arguments = (torch.zeros(len(boxes), dtype=torch.int64), boxes, torch.from_numpy(photo["scores"]), landmarks)
    torch.testing.assert_close(quality_features([view], *arguments), quality_features([view.contiguous()], *arguments), rtol=0, atol=0)


def test_dtypes_and_device(reference):
    """float64 detections and int32 image indices give the float32 scores of float32 and int64 ones,
    as a float32 tensor on the images' device (the CPU here)."""
    photo = next(p for p in reference if p["name"].endswith("baseball.jpg") and not p["synthetic"])
    image = torch.from_numpy(photo["image"])
    boxes, scores, landmarks = (torch.from_numpy(photo[key]) for key in ("boxes", "scores", "landmarks"))
    expected = quality_features([image], torch.zeros(len(boxes), dtype=torch.int64), boxes, scores, landmarks)
    assert expected.dtype == torch.float32 and expected.device == image.device
    assert expected.shape == (len(boxes), len(QUALITY_COLUMNS))
    wide = quality_features([image], torch.zeros(len(boxes), dtype=torch.int32), boxes.double(), scores.double(), landmarks.double())
    torch.testing.assert_close(wide, expected, rtol=0, atol=1e-6)


def test_bad_inputs_are_refused_with_the_reason():
    image = torch.zeros((8, 8, 3), dtype=torch.uint8)
    index, boxes = torch.zeros(1, dtype=torch.int64), torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    scores, landmarks = torch.ones(1), torch.zeros((1, 5, 2))
    with pytest.raises(ValueError, match="uint8"):
        quality_features([image.float()], index, boxes, scores, landmarks)
    with pytest.raises(ValueError, match="uint8"):
        quality_features([image[..., :1]], index, boxes, scores, landmarks)
    with pytest.raises(ValueError, match=r"boxes \(F, 4\)"):
        quality_features([image], index, boxes[:, :3], scores, landmarks)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 1\)"):
        quality_features([image], index + 1, boxes, scores, landmarks)
    with pytest.raises(ValueError, match="integers"):
        quality_features([image], index.float(), boxes, scores, landmarks)
    with pytest.raises(ValueError, match="is on meta"):
        quality_features([image.to("meta")], index, boxes, scores, landmarks)


def test_columns_are_the_schema_columns():
    assert tuple(field.name for field in dataclasses.fields(FaceQuality)) == QUALITY_COLUMNS
    q = FaceQuality.from_columns(torch.arange(2 * len(QUALITY_COLUMNS), dtype=torch.float64).view(2, -1))
    assert q.exposure.dtype == np.float32 and q.exposure.tolist() == [7.0, 16.0]
    torch.testing.assert_close(q.columns(), torch.arange(2 * len(QUALITY_COLUMNS), dtype=torch.float32).view(2, -1))
