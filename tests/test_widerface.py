"""Tests of the WIDER FACE annotation readers and writers, on the real val ground truth."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec
import numpy as np
import pytest

from retinaface_core.widerface import (
    LEVELS,
    WiderFormatError,
    WiderImage,
    read_bbx_gt,
    read_ground_truth_mat,
    read_label_txt,
    write_bbx_gt,
    write_label_txt,
)

# Line of the one negative-size box in wider_face_val_bbx_gt.txt (w = -2).
NEGATIVE_BOX_LINE = 34471


@pytest.fixture(scope="module")
def bbx_gt_path(gt_dir: Path) -> str:
    return str(gt_dir / "wider_face_val_bbx_gt.txt")


@pytest.fixture(scope="module")
def val_images(bbx_gt_path: str) -> list[WiderImage]:
    return read_bbx_gt(bbx_gt_path, degenerate="keep")


def write(tmp_path: Path, text: str, name: str = "annotations.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def image(name: str, boxes: list[list[float]], landmarks: np.ndarray | None = None, attributes=None) -> WiderImage:
    n = len(boxes)
    if landmarks is None:
        landmarks = np.full((n, 5, 2), np.nan)
    has_landmarks = ~np.all(np.isnan(landmarks), axis=(1, 2))
    return WiderImage(
        name=name,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(n, 4),
        landmarks=np.asarray(landmarks, dtype=np.float32),
        has_landmarks=has_landmarks,
        attributes=None if attributes is None else np.asarray(attributes, dtype=np.int32).reshape(n, 6),
    )


# --- the real val split file and .mat ---------------------------------------------------------------


def test_real_bbx_gt_counts(val_images: list[WiderImage]) -> None:
    assert len(val_images) == 3226
    assert sum(len(im.boxes) for im in val_images) == 39708
    first = val_images[0]
    assert first.name == "0--Parade/0_Parade_marchingband_1_465.jpg"
    assert len(first.boxes) == 126
    # "345 211 4 4 2 0 0 0 2 0": x, y, w, h -> x1, y1, x2, y2.
    assert first.boxes[0].tolist() == [345, 211, 349, 215]
    assert first.attributes[0].tolist() == [2, 0, 0, 0, 2, 0]
    assert not first.has_landmarks.any() and np.isnan(first.landmarks).all()


def test_real_bbx_gt_matches_mat_image_by_image(val_images: list[WiderImage], gt_dir: Path) -> None:
    gt = read_ground_truth_mat(str(gt_dir))
    assert gt.names == [im.name.removesuffix(".jpg") for im in val_images]
    for im in val_images:
        xywh = im.boxes.astype(np.float64)
        xywh[:, 2:] -= xywh[:, :2]
        assert np.array_equal(xywh, gt.boxes[im.name.removesuffix(".jpg")]), im.name


def test_real_mat_levels(gt_dir: Path) -> None:
    gt = read_ground_truth_mat(f"file://{gt_dir}")
    assert {level: gt.num_faces(level) for level in LEVELS} == {"easy": 7211, "medium": 13319, "hard": 31958}
    first = "0--Parade/0_Parade_marchingband_1_465"
    assert gt.names[0] == first
    assert gt.boxes[first].dtype == np.float64 and gt.boxes[first][0].tolist() == [345, 211, 4, 4]
    # Every easy face is a medium face, every medium face a hard face.
    for name in gt.names:
        easy, medium, hard = (gt.counts[level][name] for level in LEVELS)
        assert np.all(medium[easy]) and np.all(hard[medium])
    subset = gt.subset([gt.names[-1], first])
    assert subset.names == [first, gt.names[-1]]
    assert subset.num_faces("hard") == gt.counts["hard"][first].sum() + gt.counts["hard"][gt.names[-1]].sum()
    with pytest.raises(KeyError):
        gt.subset(["no/such_image"])


def test_real_bbx_gt_negative_size_is_an_error_by_default(bbx_gt_path: str) -> None:
    with pytest.raises(WiderFormatError, match="negative box size w=-2 h=23") as info:
        read_bbx_gt(bbx_gt_path)
    assert info.value.line == NEGATIVE_BOX_LINE
    assert f"wider_face_val_bbx_gt.txt, line {NEGATIVE_BOX_LINE}" in str(info.value)


def test_real_bbx_gt_drop_counts_degenerate_boxes(bbx_gt_path: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retinaface_core.widerface"):
        images = read_bbx_gt(bbx_gt_path, degenerate="drop")
    # 10 boxes with a zero side (4 of them the all-zero box of an image
    # without faces) and the one with w = -2.
    assert sum(len(im.boxes) for im in images) == 39708 - 11
    assert sum(len(im.boxes) == 0 for im in images) == 4
    assert any("dropped 11 boxes" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_real_bbx_gt_round_trip(val_images: list[WiderImage], bbx_gt_path: str, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "bbx_gt.txt"
    write_bbx_gt(val_images, str(out))
    assert read_bbx_gt(str(out), degenerate="keep") == val_images
    # The writer reproduces the official file, except its trailing spaces.
    original = Path(bbx_gt_path).read_text().splitlines()
    assert out.read_text().splitlines() == [line.rstrip() for line in original]


def test_real_val_as_label_txt_round_trip(val_images: list[WiderImage], tmp_path: Path) -> None:
    out = str(tmp_path / "label.txt")
    write_label_txt(val_images, out)
    read = read_label_txt(out, degenerate="keep")
    assert read == [WiderImage(im.name, im.boxes, im.landmarks, im.has_landmarks, attributes=None) for im in val_images]


# --- bbx_gt format details ----------------------------------------------------------------------


def test_bbx_gt_zero_count_with_and_without_zero_line(tmp_path: Path) -> None:
    text = (
        "a/1.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"  # train form
        "b/2.jpg\n0\n"  # without the all-zero line
        "c/3.jpg\n1\n1.5 2 3 4 1 0 2 1 0 1\n"
    )
    images = read_bbx_gt(write(tmp_path, text))
    assert [im.name for im in images] == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]
    assert [len(im.boxes) for im in images] == [0, 0, 1]
    assert images[2].boxes.tolist() == [[1.5, 2, 4.5, 6]]
    assert images[2].attributes.tolist() == [[1, 0, 2, 1, 0, 1]]


def test_bbx_gt_zero_size_box_dropped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "a/1.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n5 5 0 4 0 0 0 0 0 0\n7 7 2 2 0 0 0 1 0 0\n"
    with caplog.at_level(logging.WARNING, logger="retinaface_core.widerface"):
        (im,) = read_bbx_gt(write(tmp_path, text))
    assert im.boxes.tolist() == [[1, 2, 4, 6], [7, 7, 9, 9]]
    # The invalid flag is kept as an attribute, not used to drop the face.
    assert im.attributes[:, 3].tolist() == [0, 1]
    assert "dropped 1 boxes" in caplog.text
    (kept,) = read_bbx_gt(write(tmp_path, text), degenerate="keep")
    assert len(kept.boxes) == 3


def test_bbx_gt_round_trip_fractional_and_empty(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 500, (6, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(1, 50, (6, 2))], axis=1).tolist()
    images = [
        image("ev/a.jpg", boxes, attributes=rng.integers(0, 3, (6, 6))),
        image("ev/empty.jpg", [], attributes=np.zeros((0, 6))),
        image("other/b.jpg", [[0, 0, 1, 1]], attributes=[[0, 1, 0, 1, 0, 1]]),
    ]
    uri = "memory://widerface-tests/bbx_gt.txt"
    write_bbx_gt(images, uri)
    assert read_bbx_gt(uri) == images
    with pytest.raises(ValueError, match="needs attributes"):
        write_bbx_gt([image("ev/a.jpg", [[0, 0, 1, 1]])], uri)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a/1.jpg\nb/2.jpg\n0\n", 2, "missing face count line"),
        ("a/1.jpg\n", 1, "missing face count line"),
        ("a/1.jpg\n1 2 3 4 0 0 0 0 0 0\n", 2, "face count must be one non-negative integer"),
        ("a/1.jpg\n1.5\n1 2 3 4 0 0 0 0 0 0\n", 2, "face count must be one non-negative integer"),
        ("a/1.jpg\n-1\n", 2, "must be non-negative"),
        ("a/1.jpg\n1\n1 2 x 4 0 0 0 0 0 0\n", 3, "non-numeric field 'x'"),
        ("a/1.jpg\n\n\n1\n1 2 3 4 0 0 0 nan 0 0\n", 5, "non-finite"),
        ("a/1.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n1 2 3 4 0 0 0 0 0 0\nb/2.jpg\n0\n", 5, "declares 3 faces, only 2"),
        ("a/1.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n\n", 3, "declares 3 faces, the file ends after 1"),
        ("a/1.jpg\n1\n1 2 3 4 0 0 0 0 0 0\n1 2 3 4 0 0 0 0 0 0\n", 4, "expected an image path"),
        ("a/1.jpg\n1\n1 2 -3 4 0 0 0 0 0 0\n", 3, "negative box size"),
        ("a/1.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n1 2 3 -4 0 0 0 0 0 0\n", 4, "negative box size"),
        ("a/1.jpg\n1\n1 2 3 4 0 0\n", 3, "expected 10 numbers, got 6 fields"),
        ("a/1.jpg\n1\n1 2 3 4 0 0.5 0 0 0 0\n", 3, "attributes must be integers"),
    ],
)
def test_bbx_gt_malformed(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, text, "bad_bbx_gt.txt")
    with pytest.raises(WiderFormatError, match=reason) as info:
        read_bbx_gt(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}, line {line}: ")


# --- label.txt ----------------------------------------------------------------------------------

LABEL_TXT = """\
# 0--Parade/0_Parade_marchingband_1_849.jpg
449 330 122 149 488.906 373.643 0.0 542.089 376.442 0.0 515.031 412.83 0.0 485.174 425.893 0.0 538.357 431.491 0.0 0.82
# 0--Parade/0_Parade_Parade_0_904.jpg
361 98 263 339 424.143 251.656 0.0 547.134 232.571 0.0 494.121 325.875 0.0 453.83 368.286 0.0 561.978 342.839 0.0 0.89
78 221 7 8 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0
# 1--Handshaking/1_Handshaking_Handshaking_1_35.jpg
# 2--Demonstration/2_Demonstration_Demonstration_Or_Protest_2_58.jpg
10 20 30 40
"""


def test_label_txt_parses_landmarks_and_box_only_lines(tmp_path: Path) -> None:
    images = read_label_txt(write(tmp_path, LABEL_TXT, "label.txt"))
    assert [im.name for im in images] == [
        "0--Parade/0_Parade_marchingband_1_849.jpg",
        "0--Parade/0_Parade_Parade_0_904.jpg",
        "1--Handshaking/1_Handshaking_Handshaking_1_35.jpg",
        "2--Demonstration/2_Demonstration_Demonstration_Or_Protest_2_58.jpg",
    ]
    first = images[0]
    assert first.boxes.tolist() == [[449, 330, 571, 479]]
    expected = [[488.906, 373.643], [542.089, 376.442], [515.031, 412.83], [485.174, 425.893], [538.357, 431.491]]
    assert np.array_equal(first.landmarks[0], np.asarray(expected, dtype=np.float32))
    assert first.has_landmarks.tolist() == [True] and first.attributes is None
    assert images[1].has_landmarks.tolist() == [True, False]
    assert np.isnan(images[1].landmarks[1]).all() and not np.isnan(images[1].landmarks[0]).any()
    assert len(images[2].boxes) == 0
    assert images[3].boxes.tolist() == [[10, 20, 40, 60]] and images[3].has_landmarks.tolist() == [False]


def test_label_txt_round_trip(tmp_path: Path) -> None:
    images = read_label_txt(write(tmp_path, LABEL_TXT, "label.txt"))
    out = f"file://{tmp_path}/out/label.txt"
    write_label_txt(images, out)
    assert read_label_txt(out) == images

    rng = np.random.default_rng(1)
    landmarks = rng.uniform(0, 640, (5, 5, 2))
    landmarks[[1, 3]] = np.nan
    boxes = rng.uniform(0, 600, (5, 2))
    synthetic = [image("x/y.jpg", np.concatenate([boxes, boxes + rng.uniform(1, 99, (5, 2))], axis=1), landmarks)]
    write_label_txt(synthetic, "memory://widerface-tests/label.txt")
    assert read_label_txt("memory://widerface-tests/label.txt") == synthetic
    with fsspec.open("memory://widerface-tests/label.txt", "rt") as f:
        assert len(f.read().splitlines()[1].split()) == 20


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("1 2 3 4\n", 1, "expected an image header"),
        ("# a/1.jpg\n1 2 3 4 5 6 7\n", 2, "expected 4 or 20 numbers, got 7 fields"),
        ("# a/1.jpg\n1 2 3 4\n\n" + " ".join(["1"] * 19) + "\n", 4, "expected 4 or 20 numbers, got 19 fields"),
        ("# a/1.jpg\n1 2 3 4\n# b/2.jpg\n1 2 3 4 " + " ".join(["1"] * 15) + " high\n", 4, "non-numeric"),
        ("# a/1.jpg\n1 2 -3 4\n", 2, "negative box size"),
        ("#\n1 2 3 4\n", 1, "expected an image header"),
    ],
)
def test_label_txt_malformed(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, text, "label.txt")
    with pytest.raises(WiderFormatError, match=reason) as info:
        read_label_txt(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}, line {line}: ")


def test_wider_image_checks_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        WiderImage("a.jpg", np.zeros((1, 4)), np.zeros((1, 5, 2), np.float32), np.zeros(1, bool))
    with pytest.raises(ValueError, match="has_landmarks"):
        WiderImage("a.jpg", np.zeros((1, 4), np.float32), np.zeros((1, 5, 2), np.float32), np.zeros(2, bool))
    with pytest.raises(ValueError, match="degenerate"):
        read_label_txt(write(tmp_path, "# a/1.jpg\n1 2 3 4\n"), degenerate="ignore")  # type: ignore[arg-type]
