"""Training augmentation: geometry stays aligned with the pixels, crops keep the right faces."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from retinaface_core.augment import (
    MIRROR_LANDMARK_ORDER,
    Faces,
    TrainAugment,
    distort_photometric,
    mirror,
    pad_to_square,
    random_square_crop,
    resize,
)

# Landmark dot colours (BGR) by landmark name: eyes share one, mouth corners another, so that
# a correct mirror (which renames left and right) keeps every colour under its name.
DOT_COLOURS = {0: (255, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (0, 0, 255)}
FACE_COLOUR = (255, 255, 255)


def frontal_face(x1: float, y1: float, side: float) -> tuple[list[float], list[list[float]]]:
    """A box and its five landmarks laid out like an upright face seen from the front."""
    rel = [(0.3, 0.35), (0.7, 0.35), (0.5, 0.55), (0.35, 0.75), (0.65, 0.75)]
    return [x1, y1, x1 + side, y1 + side], [[x1 + u * side, y1 + v * side] for u, v in rel]


def make_faces(specs: list[tuple[float, float, float]], has_landmarks: list[bool] | None = None) -> Faces:
    boxes, points = zip(*(frontal_face(*s) for s in specs))
    landmarks = np.asarray(points, np.float32)
    has = np.ones(len(specs), bool) if has_landmarks is None else np.asarray(has_landmarks)
    landmarks[~has] = np.nan
    return Faces(np.asarray(boxes, np.float32), landmarks, has)


def draw(height: int, width: int, faces: Faces, dot_radius: int) -> np.ndarray:
    """Grey image; each face a white square with coloured landmark dots."""
    image = np.full((height, width, 3), 60, np.uint8)
    for box, points, has in zip(faces.boxes, faces.landmarks, faces.has_landmarks):
        x1, y1, x2, y2 = np.rint(box).astype(int)
        image[y1:y2, x1:x2] = FACE_COLOUR
        if has:
            for k, (x, y) in enumerate(points):
                cv2.circle(image, (int(x), int(y)), dot_radius, DOT_COLOURS[k], -1)
    return image


def colour_at(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """Colour of the pixel containing continuous point (x, y)."""
    return image[int(np.floor(y)), int(np.floor(x))].astype(int)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel encodes its own (row, column), so a crop's origin can be read off its first pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, rows % 256, (cols // 256) * 16 + rows // 256], axis=-1).astype(np.uint8)


def decode_origin(pixel: np.ndarray) -> tuple[int, int]:
    b, g, r = (int(v) for v in pixel)
    return b + 256 * (r // 16), g + 256 * (r % 16)


def test_mirror_swaps_left_and_right_landmarks() -> None:
    faces = make_faces([(10, 20, 40), (60, 5, 30)], has_landmarks=[True, False])
    image = np.zeros((80, 100, 3), np.uint8)
    flipped_image, flipped = mirror(image, faces)
    assert flipped_image.shape == image.shape
    assert np.all(flipped.boxes[:, 0] < flipped.boxes[:, 2])
    np.testing.assert_allclose(flipped.boxes[0], [100 - 50, 20, 100 - 10, 60])
    lm, original = flipped.landmarks[0], faces.landmarks[0]
    # The eye on the image's left is still called the left eye after the flip, and so on.
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    for new, old in enumerate(MIRROR_LANDMARK_ORDER):
        np.testing.assert_allclose(lm[new], [100 - original[old, 0], original[old, 1]])
    assert MIRROR_LANDMARK_ORDER == (1, 0, 2, 4, 3)
    assert np.isnan(flipped.landmarks[1]).all() and flipped.has_landmarks.tolist() == [True, False]
    twice_image, twice = mirror(flipped_image, flipped)
    np.testing.assert_allclose(twice.boxes, faces.boxes)
    np.testing.assert_allclose(twice.landmarks, faces.landmarks)


def test_mirror_moves_pixels_with_coordinates() -> None:
    faces = make_faces([(10, 20, 40)])
    image = draw(80, 100, faces, dot_radius=2)
    flipped_image, flipped = mirror(image, faces)
    for k, (x, y) in enumerate(flipped.landmarks[0]):
        assert tuple(colour_at(flipped_image, x, y)) == DOT_COLOURS[k]
    x1, y1, x2, y2 = flipped.boxes[0]
    assert tuple(colour_at(flipped_image, x1 + 0.5, y1 + 0.5)) == FACE_COLOUR
    assert tuple(colour_at(flipped_image, x1 - 0.5, y1 + 0.5)) != FACE_COLOUR
    assert tuple(colour_at(flipped_image, x2 - 0.5, y2 - 0.5)) == FACE_COLOUR
    assert tuple(colour_at(flipped_image, x2 + 0.5, y2 - 0.5)) != FACE_COLOUR


@pytest.mark.parametrize("seed", range(20))
def test_crop_keeps_exactly_the_faces_whose_centre_is_inside(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = 300, 420
    centres = rng.uniform(0, [width, height], (25, 2))
    sides = rng.uniform(8, 60, (25, 1))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).astype(np.float32)
    landmarks = (centres[:, None, :] + rng.uniform(-3, 3, (25, 5, 2))).astype(np.float32)
    faces = Faces(boxes, landmarks, np.arange(25) % 3 != 0)
    faces.landmarks[~faces.has_landmarks] = np.nan
    result = random_square_crop(coordinate_image(height, width), faces, rng)
    assert result is not None
    crop, kept = result
    side = crop.shape[0]
    assert crop.shape[:2] == (side, side) and side in {int(s * height) for s in (0.3, 0.45, 0.6, 0.8, 1.0)}
    left, top = decode_origin(crop[0, 0])
    inside = (centres[:, 0] > left) & (centres[:, 0] < left + side) & (centres[:, 1] > top) & (centres[:, 1] < top + side)
    assert len(kept) == inside.sum() >= 1
    expected = np.clip(boxes[inside].reshape(-1, 2, 2), [left, top], [left + side, top + side]).reshape(-1, 4)
    np.testing.assert_allclose(kept.boxes, expected - [left, top, left, top], atol=1e-4)
    assert kept.has_landmarks.tolist() == faces.has_landmarks[inside].tolist()
    shifted = np.clip(landmarks[inside] - [left, top], 0, side)
    assert np.array_equal(np.isnan(kept.landmarks), np.isnan(faces.landmarks[inside]))
    np.testing.assert_allclose(kept.landmarks[kept.has_landmarks], shifted[kept.has_landmarks], atol=1e-4)
    # At least one face lies entirely inside the crop (the acceptance rule).
    assert np.any(np.all((boxes[inside, :2] >= [left, top]) & (boxes[inside, 2:] <= [left + side, top + side]), axis=1))


def test_crop_gives_up_when_no_face_fits() -> None:
    faces = make_faces([(0, 0, 100)])  # as large as the image: never entirely inside a 0.3 crop
    rng = np.random.default_rng(0)
    assert random_square_crop(np.zeros((100, 120, 3), np.uint8), faces, rng, scales=(0.3,), max_tries=20) is None


def test_fallback_pads_to_square_with_the_mean() -> None:
    faces = make_faces([(0, 0, 100)])
    augment = TrainAugment(size=64, crop_scales=(0.3,), crop_tries=5, photometric=False, mirror_probability=0.0)
    image, out = augment(np.zeros((100, 200, 3), np.uint8), faces, np.random.default_rng(0))
    assert image.shape == (64, 64, 3)
    # 200 x 200 padded square, scaled by 0.32: the bottom half is the mean colour.
    assert np.all(image[40:, :, :] == np.array([104, 117, 123], np.uint8))
    np.testing.assert_allclose(out.boxes, [[0, 0, 32, 32]], atol=1e-4)
    assert pad_to_square(np.zeros((5, 5, 3), np.uint8), (1, 2, 3)).shape == (5, 5, 3)


def test_resize_scales_coordinates_per_axis() -> None:
    faces = make_faces([(10, 20, 40)])
    image, out = resize(np.zeros((80, 160, 3), np.uint8), faces, 40)
    assert image.shape == (40, 40, 3)
    np.testing.assert_allclose(out.boxes, [[2.5, 10, 12.5, 30]])
    np.testing.assert_allclose(out.landmarks, faces.landmarks * [0.25, 0.5])


@pytest.mark.parametrize("seed", range(12))
def test_augmented_geometry_matches_pixels(seed: int) -> None:
    """Squares and dots drawn at the annotations are found at the augmented annotations."""
    specs = [(40, 60, 90), (200, 40, 110), (330, 200, 80), (90, 220, 100)]
    faces = make_faces(specs, has_landmarks=[True, True, False, True])
    image = draw(360, 480, faces, dot_radius=5)
    augment = TrainAugment(size=320, photometric=False, random_interpolation=False)
    out_image, out = augment(image, faces, np.random.default_rng(seed))
    assert out_image.shape == (320, 320, 3) and out_image.dtype == np.uint8
    assert len(out) >= 1
    for box, points, has in zip(out.boxes, out.landmarks, out.has_landmarks):
        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        # The centre of a kept face is inside its square (no dot sits exactly there).
        assert tuple(colour_at(out_image, cx, cy)) == FACE_COLOUR or has
        for x, y in [(x1 + 1.5, y1 + 1.5), (x2 - 1.5, y2 - 1.5)]:
            if 0 <= x < 320 and 0 <= y < 320:
                assert np.abs(colour_at(out_image, x, y) - FACE_COLOUR).max() < 40
        if has:
            for k, (x, y) in enumerate(points):
                if 1 < x < 319 and 1 < y < 319:
                    assert np.abs(colour_at(out_image, x, y) - DOT_COLOURS[k]).max() < 60, (k, x, y)
        else:
            assert np.isnan(points).all()


def test_augment_is_deterministic_given_the_generator_and_drops_tiny_faces() -> None:
    faces = make_faces([(40, 60, 90), (300, 40, 3)])
    image = draw(360, 480, faces, dot_radius=5)
    augment = TrainAugment(size=160, min_face_size=4.0)
    a_image, a = augment(image, faces, np.random.default_rng(7))
    b_image, b = augment(image, faces, np.random.default_rng(7))
    assert np.array_equal(a_image, b_image) and np.array_equal(a.boxes, b.boxes)
    for seed in range(10):
        _, out = augment(image, faces, np.random.default_rng(seed))
        sizes = out.boxes[:, 2:] - out.boxes[:, :2]
        assert np.all(sizes >= 4.0)


def test_photometric_distortion_changes_colours_only() -> None:
    rng_image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    outputs = [distort_photometric(rng_image, np.random.default_rng(seed)) for seed in range(8)]
    assert all(o.shape == rng_image.shape and o.dtype == np.uint8 for o in outputs)
    assert np.array_equal(distort_photometric(rng_image, np.random.default_rng(3)), outputs[3])
    assert sum(not np.array_equal(o, rng_image) for o in outputs) >= 6
    assert len({o.tobytes() for o in outputs}) >= 6
