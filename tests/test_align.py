"""Aligned face crops (retinaface_core/align.py) on the shared photos and their real detections."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.transform import SimilarityTransform

from retinaface_core import AlignedFaces, Detector, InvalidImageError, align_faces
from retinaface_core.align import arcface_template, encode_crops, similarity_transforms, warp_faces
from retinaface_core.image_io import read_image
from retinaface_core.quality import face_size, pose_angles

SIZE = 112


@pytest.fixture(scope="module")
def photos(shared_dir: Path, weights_dir: Path) -> tuple[list[np.ndarray], list]:
    """The shared photos (2 crowds, 12 WIDER val images) and their detections at full size."""
    paths = sorted((shared_dir / "images").glob("*.jpg")) + sorted((shared_dir / "widerface/val/images").glob("*/*.jpg"))
    images = [read_image(str(p)) for p in paths]
    torch.set_num_threads(1)
    return images, Detector(scale="original").detect(images)


@pytest.fixture(scope="module")
def aligned(photos) -> AlignedFaces:
    images, detections = photos
    return align_faces(images, detections, SIZE)


def _all(detections, name: str) -> np.ndarray:
    return np.concatenate([getattr(d, name) for d in detections])


def _image_index(detections) -> np.ndarray:
    return np.repeat(np.arange(len(detections)), [len(d) for d in detections])


def test_transforms_are_the_least_squares_similarity(photos, aligned):
    _, detections = photos
    landmarks = _all(detections, "landmarks")
    template = arcface_template(SIZE)
    assert len(landmarks) > 500, "the crowd photos hold hundreds of faces"
    for face in range(len(landmarks)):
        expected = SimilarityTransform.from_estimate(landmarks[face].astype(np.float64), template.astype(np.float64)).params[:2]
        np.testing.assert_allclose(aligned.matrices[face], expected, rtol=1e-4, atol=1e-4)
    mapped = np.einsum("fij,fkj->fki", aligned.matrices[:, :, :2].astype(np.float64), landmarks) + aligned.matrices[:, None, :, 2]
    rms = np.sqrt(((mapped - template) ** 2).sum(axis=2).mean(axis=1))
    np.testing.assert_allclose(aligned.residuals, rms, atol=1e-3)
    # No other similarity fits better: a perturbed matrix never lowers the residual.
    rng = np.random.default_rng(0)
    for face in rng.choice(len(landmarks), 20, replace=False):
        a, b = aligned.matrices[face, 0, 0], aligned.matrices[face, 1, 0]
        for da, db in rng.normal(0, 0.01 * np.hypot(a, b), (10, 2)):
            m = aligned.matrices[face].astype(np.float64).copy()
            m[:, :2] = [[a + da, -(b + db)], [b + db, a + da]]
            worse = np.sqrt((((landmarks[face] @ m[:, :2].T + m[:, 2]) - template) ** 2).sum(axis=1).mean())
            assert worse >= aligned.residuals[face] - 1e-4


def test_landmarks_of_real_faces_mapped_onto_the_template(photos, aligned):
    """Faces >= 32 px, each at its own place, size and roll in the photos: five points placed
    there as the template would be (plus 0.5 px of noise at the face's scale) land within 2 px
    RMS of the template at 112. The photos' own landmarks land within 2 px when the face is
    frontal enough to fit a frontal template; their residual grows with the head's yaw."""
    _, detections = photos
    big = face_size(torch.from_numpy(_all(detections, "boxes"))).numpy() >= 32
    assert big.sum() > 100
    forward = np.concatenate([aligned.matrices[big], np.tile([[[0, 0, 1]]], (big.sum(), 1, 1))], axis=1).astype(np.float64)
    inverse = np.linalg.inv(forward)[:, :2]
    template = arcface_template(SIZE).astype(np.float64)
    placed = np.einsum("fij,kj->fki", inverse[:, :, :2], template) + inverse[:, None, :, 2]
    scale = np.hypot(inverse[:, 0, 0], inverse[:, 1, 0])
    noisy = placed + np.random.default_rng(1).normal(0, 0.5, placed.shape) * scale[:, None, None]
    images = [np.zeros((4, 4, 3), np.uint8)]
    result = align_faces(images, noisy.astype(np.float32), SIZE, image_index=np.zeros(len(noisy), int))
    mapped = np.einsum("fij,fkj->fki", result.matrices[:, :, :2], noisy) + result.matrices[:, None, :, 2]
    rms = np.sqrt(((mapped - template) ** 2).sum(axis=2).mean(axis=1))
    assert rms.max() < 2.0, rms.max()
    np.testing.assert_allclose(result.residuals, rms, atol=1e-3)

    yaw = np.abs(pose_angles(torch.from_numpy(_all(detections, "landmarks")))[0].numpy())[big]
    residuals = aligned.residuals[big]
    assert (residuals < 2).sum() >= 20, "frontal faces fit the template within 2 px"
    assert spearmanr(residuals, yaw).statistic > 0.5, "the residual measures how far a face is from frontal"


def test_crops_match_cv2_warp_affine(photos, aligned):
    images, detections = photos
    index = _image_index(detections)
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE)), axis=-1).reshape(-1, 2).astype(np.float64)
    compared = 0
    for face, matrix in enumerate(aligned.matrices.astype(np.float64)):
        image = images[index[face]]
        expected = cv2.warpAffine(image, matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        source = grid @ cv2.invertAffineTransform(matrix)[:, :2].T + cv2.invertAffineTransform(matrix)[:, 2]
        height, width = image.shape[:2]
        inside = ((source[:, 0] >= 1) & (source[:, 0] <= width - 2) & (source[:, 1] >= 1) & (source[:, 1] <= height - 2)).reshape(
            SIZE, SIZE
        )
        difference = np.abs(aligned.crops[face].astype(int) - expected.astype(int))
        if inside.any():
            assert difference[inside].mean() < 2, f"face {face}: mean difference {difference[inside].mean():.2f}"
            compared += 1
        # Outside the image both are black, across the border both blend with black.
        assert difference.max() <= 2
    assert compared == len(aligned.matrices)


def test_crop_shows_the_face_upright(photo, weights_dir):
    """The astronaut, and the astronaut turned by 90 degrees with her landmarks turned alike:
    both crops are the same upright face (pixel centres map exactly, so only rounding
    differs), in which the detector finds the face's landmarks at the template."""
    detector = Detector(scale="original")
    landmarks = detector.detect(photo)[0].landmarks[:1]
    turned = np.ascontiguousarray(np.rot90(photo))  # pixel (x, y) moves to (y, W - 1 - x)
    turned_landmarks = np.stack([landmarks[..., 1], photo.shape[1] - 1 - landmarks[..., 0]], axis=-1)
    crops = align_faces([photo, turned], [landmarks, turned_landmarks], SIZE).crops
    assert np.abs(crops[0].astype(int) - crops[1].astype(int)).max() <= 1
    found = detector.detect(crops[0])[0]
    assert len(found) == 1
    np.testing.assert_allclose(found.landmarks[0], arcface_template(SIZE), atol=8)


def test_batched_forms_agree(photos, aligned):
    images, detections = photos
    landmarks, index = _all(detections, "landmarks"), _image_index(detections)
    by_index = align_faces(images, landmarks, SIZE, image_index=index)
    for got, expected in zip(by_index, aligned):
        np.testing.assert_array_equal(got, expected)
    one = 1
    alone = align_faces(images[one], detections[one], SIZE)
    np.testing.assert_array_equal(alone.crops, aligned.crops[index == one])
    tensors = align_faces([torch.from_numpy(im) for im in images[:3]], [d.landmarks for d in detections[:3]], SIZE, device="cpu")
    assert isinstance(tensors.crops, torch.Tensor) and tensors.crops.dtype == torch.uint8
    np.testing.assert_array_equal(tensors.crops.numpy(), aligned.crops[index < 3])
    np.testing.assert_array_equal(tensors.matrices.numpy(), aligned.matrices[index < 3])


def test_faces_outside_the_image_and_degenerate_landmarks():
    image = np.full((100, 100, 3), 200, np.uint8)
    template = arcface_template(SIZE)
    landmarks = np.stack([template / 2 + 20, template / 2 + 5000, np.full((5, 2), 50.0)]).astype(np.float32)
    crops, matrices, residuals = align_faces(image, landmarks, SIZE)
    assert crops.shape == (3, SIZE, SIZE, 3)
    assert crops[0, 40:70, 40:70].min() == 200, "a face inside the image is sampled from it"
    assert crops[1].max() == 0, "a face wholly outside the image is black"
    assert crops[2].max() == 0 and np.abs(matrices[2, :, :2]).max() == 0, "coincident landmarks give a zero matrix and a black crop"
    assert residuals[0] < 1e-3
    empty = align_faces(image, np.zeros((0, 5, 2), np.float32), SIZE)
    assert empty.crops.shape == (0, SIZE, SIZE, 3) and empty.matrices.shape == (0, 2, 3)


def test_bad_input_is_refused_with_a_reason():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(InvalidImageError, match="image 0.*uint8"):
        align_faces(image.astype(np.float32), np.zeros((1, 5, 2)))
    with pytest.raises(InvalidImageError, match="image 1"):
        align_faces([image, torch.zeros((50, 50), dtype=torch.uint8)], [np.zeros((0, 5, 2))] * 2)
    with pytest.raises(ValueError, match=r"shape \(F, 5, 2\)"):
        align_faces(image, np.zeros((1, 68, 2)))
    with pytest.raises(ValueError, match="finite"):
        align_faces(image, np.full((1, 5, 2), np.nan))
    with pytest.raises(ValueError, match=r"image_index must be in \[0, 2\)"):
        align_faces([image, image], np.zeros((2, 5, 2)), image_index=[0, 2])
    with pytest.raises(ValueError, match="one Detections"):
        align_faces([image, image], [np.zeros((1, 5, 2))])
    with pytest.raises(ValueError, match="crop size"):
        align_faces(image, np.zeros((1, 5, 2)), size=8)
    with pytest.raises(ValueError, match="crop format"):
        encode_crops(np.zeros((1, 8, 8, 3), np.uint8), "webp")


def test_encoded_crops_decode_to_the_crops(aligned):
    crops = aligned.crops[:50]
    png = encode_crops(crops, "png")
    jpeg = encode_crops(torch.from_numpy(crops), "jpeg")
    for crop, p, j in zip(crops, png, jpeg):
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR), crop)
        assert p[:4] == b"\x89PNG" and j[:2] == b"\xff\xd8"
        assert np.abs(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR).astype(int) - crop).mean() < 3


def test_building_blocks_take_tensors_as_given():
    """similarity_transforms and warp_faces keep their inputs' device and return fixed dtypes."""
    template = torch.from_numpy(arcface_template(SIZE))
    angle = np.radians(30)
    rotation = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float32)
    landmarks = (template @ rotation.T * 2 + 40)[None]
    matrices, residuals = similarity_transforms(landmarks, template)
    assert matrices.dtype == torch.float32 and residuals.shape == (1,) and residuals[0] < 1e-3
    np.testing.assert_allclose(matrices[0, :, :2].numpy(), rotation.T.numpy() / 2, atol=1e-5)
    crops = warp_faces([torch.zeros((300, 300, 3), dtype=torch.uint8)], torch.zeros(1, dtype=torch.int64), matrices, 64)
    assert crops.shape == (1, 64, 64, 3) and crops.dtype == torch.uint8
