"""Readers and writers for the WIDER FACE annotation formats.

Every WIDER FACE file format lives here, each read from any fsspec URI (local
path, ``file://``, ``s3://``, ...; S3 settings in ``storage``):

* the official split files ``wider_face_{train,val}_bbx_gt.txt``
  (:func:`read_bbx_gt`, :func:`write_bbx_gt`);
* the RetinaFace landmark file ``label.txt`` (:func:`read_label_txt`,
  :func:`write_label_txt`);
* the official evaluation ground truth ``wider_face_val.mat`` with
  ``wider_{easy,medium,hard}_val.mat`` (:func:`read_ground_truth_mat`);
* the submission layout of detections, ``EVENT/NAME.txt`` per image
  (:func:`write_predictions`, :func:`read_predictions`,
  :func:`submission_rows`).

Coordinate conventions: the text files store boxes as ``x, y, w, h`` in
pixels; :class:`WiderImage` holds them as ``x1, y1, x2, y2`` with
``x2 = x + w`` and ``y2 = y + h``. :class:`WiderValGroundTruth` keeps the
official ``x, y, w, h`` because the evaluation protocol is defined on it.

Boxes with a non-positive width or height are "degenerate". The official
files contain some: the train file writes an empty image as one all-zero
box, and ``wider_face_val_bbx_gt.txt`` holds ten boxes with a zero side and
one with ``w = -2`` (``39--Ice_Skating/39_Ice_Skating_iceskiing_39_583.jpg``,
line 34471, which the official ``.mat`` also contains). The readers'
``degenerate`` argument decides what happens to them:

* ``"strict"`` (default): zero-size boxes are dropped and their number is
  logged at WARNING; a negative size raises :class:`WiderFormatError`, since
  it usually means a corrupt or misformatted file;
* ``"drop"``: zero and negative sizes are dropped and counted;
* ``"keep"``: every box is kept exactly as written (what the official
  ``.mat`` and evaluation do).

The ``invalid`` attribute of the split files is kept in
:attr:`WiderImage.attributes` and never used to filter: the official
evaluation ground truth contains those faces too, and the difficulty levels
already leave them out.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.io import loadmat

from .box_coding import box_convert
from .storage import StorageOptions, filesystem, read_file

logger = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("easy", "medium", "hard")
ATTRIBUTE_NAMES: tuple[str, ...] = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")

Degenerate = Literal["strict", "drop", "keep"]

_NUM_LANDMARKS = 5
_BBX_FIELDS = 4 + len(ATTRIBUTE_NAMES)
# label.txt: box, then (x, y, flag) per landmark, then one confidence value.
_LABEL_FIELDS_WITH_LANDMARKS = 4 + 3 * _NUM_LANDMARKS + 1
_LABEL_FIELDS_BOX_ONLY = 4
_MISSING_LANDMARK = -1.0


class WiderFormatError(ValueError):
    """A malformed annotation or prediction file; names the file and the 1-based line."""

    def __init__(self, uri: str, line: int | None, reason: str) -> None:
        self.uri = uri
        self.line = line
        self.reason = reason
        where = uri if line is None else f"{uri}, line {line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, eq=False)
class WiderImage:
    """The faces annotated in one image.

    Attributes:
        name: path relative to the images root, ``"EVENT/NAME.jpg"``.
        boxes: float32 (N, 4), ``x1, y1, x2, y2`` in pixels.
        landmarks: float32 (N, 5, 2), ``x, y`` in pixels of the left eye,
            right eye, nose, left and right mouth corner; NaN where a face
            has no landmark annotation.
        has_landmarks: bool (N,), whether a face's landmarks are annotated.
        attributes: int32 (N, 6) in :data:`ATTRIBUTE_NAMES` order when the
            source format has them (split files), else None.
    """

    name: str
    boxes: np.ndarray
    landmarks: np.ndarray
    has_landmarks: np.ndarray
    attributes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.boxes.dtype != np.float32:
            raise ValueError(f"{self.name}: boxes must be float32 (N, 4), got {self.boxes.dtype} {self.boxes.shape}")
        if self.landmarks.shape != (n, _NUM_LANDMARKS, 2) or self.landmarks.dtype != np.float32:
            raise ValueError(f"{self.name}: landmarks must be float32 ({n}, 5, 2), got {self.landmarks.shape}")
        if self.has_landmarks.shape != (n,) or self.has_landmarks.dtype != np.bool_:
            raise ValueError(f"{self.name}: has_landmarks must be bool ({n},), got {self.has_landmarks.shape}")
        if self.attributes is not None and self.attributes.shape != (n, len(ATTRIBUTE_NAMES)):
            raise ValueError(f"{self.name}: attributes must be ({n}, 6), got {self.attributes.shape}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WiderImage):
            return NotImplemented
        if (self.attributes is None) != (other.attributes is None):
            return False
        return (
            self.name == other.name
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.landmarks, other.landmarks, equal_nan=True)
            and np.array_equal(self.has_landmarks, other.has_landmarks)
            and (self.attributes is None or (other.attributes is not None and np.array_equal(self.attributes, other.attributes)))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class WiderValGroundTruth:
    """The official evaluation ground truth, keyed by ``"EVENT/NAME"`` (no extension).

    Attributes:
        boxes: per image float64 (N, 4) ``x, y, w, h`` in pixels, in the
            official event and file order.
        counts: per level (:data:`LEVELS`) and image, bool (N,): whether a
            face counts at that level; the others are "ignore" faces, whose
            detections are neither true nor false positives.
    """

    boxes: dict[str, np.ndarray]
    counts: dict[str, dict[str, np.ndarray]]

    @property
    def names(self) -> list[str]:
        return list(self.boxes)

    def num_faces(self, level: str) -> int:
        """Number of faces that count at ``level``."""
        return int(sum(int(mask.sum()) for mask in self.counts[level].values()))

    def subset(self, names: Iterable[str]) -> WiderValGroundTruth:
        """The ground truth of ``names`` only, in the official order."""
        wanted = set(names)
        unknown = wanted - self.boxes.keys()
        if unknown:
            raise KeyError(f"{len(unknown)} images not in the ground truth, e.g. {sorted(unknown)[:3]}")
        boxes = {name: b for name, b in self.boxes.items() if name in wanted}
        counts = {level: {name: masks[name] for name in boxes} for level, masks in self.counts.items()}
        return WiderValGroundTruth(boxes=boxes, counts=counts)


def read_bbx_gt(uri: str, *, degenerate: Degenerate = "strict", storage: StorageOptions | None = None) -> list[WiderImage]:
    """Read an official split file ``wider_face_{train,val}_bbx_gt.txt``.

    Per image: a line ``EVENT/NAME.jpg``, a line with the face count, then per
    face ``x y w h blur expression illumination invalid occlusion pose``. An
    image with count 0 may be followed by one all-zero face line (the train
    file does this); it is consumed. Landmarks are not part of this format:
    every ``has_landmarks`` is False.
    """
    lines = _read_lines(uri, storage)
    images: list[WiderImage] = []
    dropped = 0
    i = 0
    while i < len(lines):
        name_line, name = lines[i]
        if not _is_image_name(name):
            raise WiderFormatError(uri, name_line, f"expected an image path EVENT/NAME.jpg, got {name!r}")
        if i + 1 == len(lines):
            raise WiderFormatError(uri, name_line, f"missing face count line after {name!r}: the file ends")
        count = _parse_count(uri, *lines[i + 1])
        i += 2
        rows: list[list[float]] = []
        row_lines: list[int] = []
        for k in range(count):
            _check_face_line_follows(uri, lines, i, name, count, k)
            rows.append(_parse_numbers(uri, *lines[i], expected=(_BBX_FIELDS,)))
            row_lines.append(lines[i][0])
            i += 1
        if count == 0 and i < len(lines) and _is_zero_face_line(lines[i][1]):
            i += 1
        values = np.asarray(rows, dtype=np.float64).reshape(count, _BBX_FIELDS)
        attributes = values[:, 4:]
        for row, line in zip(attributes, row_lines):
            if not np.all(row == np.round(row)):
                raise WiderFormatError(uri, line, "attributes must be integers")
        keep = _degenerate_mask(uri, row_lines, values[:, :4], degenerate)
        dropped += int(np.count_nonzero(~keep))
        n = int(keep.sum())
        images.append(
            WiderImage(
                name=name,
                boxes=_xywh_to_xyxy(values[keep, :4]),
                landmarks=np.full((n, _NUM_LANDMARKS, 2), np.nan, dtype=np.float32),
                has_landmarks=np.zeros(n, dtype=bool),
                attributes=attributes[keep].astype(np.int32),
            )
        )
    _log_dropped(uri, dropped)
    return images


def write_bbx_gt(images: Sequence[WiderImage], uri: str, storage: StorageOptions | None = None) -> None:
    """Write ``images`` in the split-file format read by :func:`read_bbx_gt`.

    An image without faces is written as count 0 plus one all-zero line, like
    the official train file. Every image needs ``attributes``.
    """
    out: list[str] = []
    for image in images:
        if image.attributes is None:
            raise ValueError(f"{image.name}: the bbx_gt format needs attributes, this image has none")
        out += [image.name, str(len(image.boxes))]
        for box, attrs in zip(_xyxy_to_xywh(image.boxes), image.attributes.tolist()):
            out.append(" ".join([*map(_format_number, box), *map(str, attrs)]))
        if len(image.boxes) == 0:
            out.append(" ".join(["0"] * _BBX_FIELDS))
    _write_text(uri, out, storage)


def read_label_txt(uri: str, *, degenerate: Degenerate = "strict", storage: StorageOptions | None = None) -> list[WiderImage]:
    """Read a RetinaFace ``label.txt``.

    Per image a line ``# EVENT/NAME.jpg``, then one line per face: either
    ``x y w h`` (the val/test form, no landmarks) or 20 numbers
    ``x y w h  l0x l0y f0 ... l4x l4y f4  conf``. Landmarks written as -1 are
    "not annotated" (NaN here). The per-point flags and the trailing
    confidence are checked to be numbers but not kept.
    """
    lines = _read_lines(uri, storage)
    images: list[WiderImage] = []
    dropped = 0
    i = 0
    while i < len(lines):
        header_line, header = lines[i]
        name = header[1:].strip()
        if not header.startswith("#") or not name:
            raise WiderFormatError(uri, header_line, f"expected an image header '# EVENT/NAME.jpg', got {header!r}")
        i += 1
        rows: list[list[float]] = []
        row_lines: list[int] = []
        while i < len(lines) and not lines[i][1].startswith("#"):
            numbers = _parse_numbers(uri, *lines[i], expected=(_LABEL_FIELDS_BOX_ONLY, _LABEL_FIELDS_WITH_LANDMARKS))
            rows.append(numbers + [_MISSING_LANDMARK] * (_LABEL_FIELDS_WITH_LANDMARKS - len(numbers)))
            row_lines.append(lines[i][0])
            i += 1
        values = np.asarray(rows, dtype=np.float64).reshape(len(rows), _LABEL_FIELDS_WITH_LANDMARKS)
        keep = _degenerate_mask(uri, row_lines, values[:, :4], degenerate)
        dropped += int(np.count_nonzero(~keep))
        values = values[keep]
        landmarks = values[:, 4:-1].reshape(-1, _NUM_LANDMARKS, 3)[:, :, :2]
        has_landmarks = ~np.all(landmarks == _MISSING_LANDMARK, axis=(1, 2))
        landmarks[~has_landmarks] = np.nan
        images.append(
            WiderImage(
                name=name,
                boxes=_xywh_to_xyxy(values[:, :4]),
                landmarks=landmarks.astype(np.float32),
                has_landmarks=has_landmarks,
            )
        )
    _log_dropped(uri, dropped)
    return images


def write_label_txt(images: Sequence[WiderImage], uri: str, storage: StorageOptions | None = None) -> None:
    """Write ``images`` as a RetinaFace ``label.txt`` (the 20-number train form).

    Faces without landmarks get -1 for every landmark value and the
    confidence; annotated ones get flag 0.0 per point and confidence 1.0.
    """
    out: list[str] = []
    for image in images:
        out.append(f"# {image.name}")
        xywh = _xyxy_to_xywh(image.boxes)
        for box, points, annotated in zip(xywh, image.landmarks.astype(np.float64), image.has_landmarks):
            if annotated:
                points = np.where(np.isnan(points), _MISSING_LANDMARK, points)
                tail = [v for x, y in points.tolist() for v in (x, y, 0.0)] + [1.0]
            else:
                tail = [_MISSING_LANDMARK] * (_LABEL_FIELDS_WITH_LANDMARKS - 4)
            out.append(" ".join(map(_format_number, [*box, *tail])))
    _write_text(uri, out, storage)


def read_ground_truth_mat(gt_dir_or_uri: str, storage: StorageOptions | None = None) -> WiderValGroundTruth:
    """Read ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat`` from one directory.

    The level files hold per image ``gt_list``, the 1-based indices of the
    faces that count at that level.
    """
    root = gt_dir_or_uri.rstrip("/")
    main_uri = posixpath.join(root, "wider_face_val.mat")
    main = _load_mat(main_uri, storage)
    boxes: dict[str, np.ndarray] = {}
    for event_id, event_cell in enumerate(main["event_list"][:, 0]):
        event = str(event_cell[0])
        for file_cell, box_cell in zip(main["file_list"][event_id, 0][:, 0], main["face_bbx_list"][event_id, 0][:, 0]):
            boxes[f"{event}/{file_cell[0]}"] = box_cell.astype(np.float64).reshape(-1, 4)

    counts: dict[str, dict[str, np.ndarray]] = {}
    for level in LEVELS:
        level_uri = posixpath.join(root, f"wider_{level}_val.mat")
        gt_lists = [cell[0] for event_cells in _load_mat(level_uri, storage)["gt_list"][:, 0] for cell in event_cells]
        if len(gt_lists) != len(boxes):
            raise WiderFormatError(level_uri, None, f"{len(gt_lists)} images, {main_uri} has {len(boxes)}")
        counts[level] = {}
        for (name, image_boxes), indices in zip(boxes.items(), gt_lists):
            indices = indices.astype(np.int64).ravel()
            if np.any((indices < 1) | (indices > len(image_boxes))):
                raise WiderFormatError(level_uri, None, f"{name}: gt_list index out of 1..{len(image_boxes)}")
            mask = np.zeros(len(image_boxes), dtype=bool)
            mask[indices - 1] = True
            counts[level][name] = mask
    return WiderValGroundTruth(boxes=boxes, counts=counts)


def write_predictions(predictions: Mapping[str, np.ndarray], root_uri: str, storage: StorageOptions | None = None) -> None:
    """Write the official submission layout: ``ROOT/EVENT/NAME.txt`` per image.

    Each file holds the image name (``NAME``, as Pytorch_Retinaface writes
    it), the number of boxes, then one ``x y w h score`` line per box, with
    values written exactly (shortest repr of the float64).
    """
    fs, root = filesystem(root_uri, storage)
    files = {}
    for name, boxes in predictions.items():
        boxes = as_submission_rows(name, boxes)
        lines = [posixpath.basename(name), str(len(boxes))] + [" ".join(map(repr, row)) for row in boxes.tolist()]
        files[posixpath.join(root, f"{name}.txt")] = "".join(line + "\n" for line in lines).encode()
    for parent in {posixpath.dirname(path) for path in files}:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe(files)


def read_predictions(root_uri: str, storage: StorageOptions | None = None) -> dict[str, np.ndarray]:
    """Read every ``*.txt`` under ``root_uri`` in the submission layout.

    Returns per ``"EVENT/NAME"`` (the path relative to the root, without
    ``.txt``) a float64 (N, 5) array ``x, y, w, h, score``. The first line
    must name the file's image (``NAME``, ``NAME.jpg`` or a path ending in
    one of them); the second is the number of box lines that follow.
    """
    fs, root = filesystem(root_uri, storage)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"no prediction directory at {root_uri}")
    paths = [path for path in fs.find(root) if path.endswith(".txt")]
    contents = fs.cat(paths) if paths else {}
    return {
        path[len(root) + 1 : -len(".txt")]: _parse_prediction_file(fs.unstrip_protocol(path), data)
        for path, data in sorted(contents.items())
    }


def submission_rows(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Detector output -> the protocol's rows: (N, 4) x1, y1, x2, y2 and (N,) scores to float64
    (N, 5) ``x, y, w, h, score``, order kept."""
    xywh = box_convert(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "xyxy", "xywh")
    return np.concatenate([xywh, np.asarray(scores, dtype=np.float64).reshape(-1, 1)], axis=1)


def as_submission_rows(name: str, boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as float64 (N, 5) ``x, y, w, h, score`` rows; a clear error names the image otherwise."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 5)
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"{name}: predictions must be (N, 5) x, y, w, h, score, got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{name}: predictions must be finite")
    return boxes


def _parse_prediction_file(uri: str, data: bytes) -> np.ndarray:
    lines = [(number, line.strip()) for number, line in enumerate(data.decode("utf-8").splitlines(), start=1)]
    lines = [(number, text) for number, text in lines if text]
    stem = posixpath.basename(uri)[: -len(".txt")]
    if not lines:
        raise WiderFormatError(uri, 1, f"empty file, the first line must name the image {stem!r}")
    if posixpath.basename(lines[0][1]).removesuffix(".jpg") != stem:
        raise WiderFormatError(uri, lines[0][0], f"first line must name the image {stem!r}, got {lines[0][1]!r}")
    if len(lines) < 2:
        raise WiderFormatError(uri, lines[0][0], "missing box count line")
    count_line, count_text = lines[1]
    try:
        count = int(count_text)
    except ValueError:
        raise WiderFormatError(uri, count_line, f"box count must be an integer, got {count_text!r}") from None
    box_lines = lines[2:]
    if count != len(box_lines):
        raise WiderFormatError(uri, count_line, f"box count says {count}, {len(box_lines)} box lines follow")
    boxes = np.empty((count, 5), dtype=np.float64)
    for row, (number, text) in enumerate(box_lines):
        fields = text.split()
        if len(fields) != 5:
            raise WiderFormatError(uri, number, f"expected 5 numbers x y w h score, got {len(fields)} fields")
        try:
            boxes[row] = [float(field) for field in fields]
        except ValueError:
            raise WiderFormatError(uri, number, f"non-numeric field in {text!r}") from None
        if not np.all(np.isfinite(boxes[row])):
            raise WiderFormatError(uri, number, f"non-finite value in {text!r}")
    return boxes


def _load_mat(uri: str, storage: StorageOptions | None) -> dict:
    return loadmat(io.BytesIO(read_file(uri, storage)))


def _read_lines(uri: str, storage: StorageOptions | None) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (1-based line number, stripped text)."""
    text = read_file(uri, storage).decode("utf-8")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _write_text(uri: str, lines: list[str], storage: StorageOptions | None) -> None:
    fs, path = filesystem(uri, storage)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def _is_image_name(text: str) -> bool:
    return len(text.split()) == 1 and not _is_number(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_zero_face_line(text: str) -> bool:
    fields = text.split()
    return len(fields) == _BBX_FIELDS and all(_is_number(f) and float(f) == 0 for f in fields)


def _parse_count(uri: str, line: int, text: str) -> int:
    if _is_image_name(text):
        raise WiderFormatError(uri, line, f"missing face count line: got image path {text!r}")
    try:
        count = int(text)
    except ValueError:
        raise WiderFormatError(uri, line, f"face count must be one non-negative integer, got {text!r}") from None
    if count < 0:
        raise WiderFormatError(uri, line, f"face count must be non-negative, got {count}")
    return count


def _check_face_line_follows(uri: str, lines: list[tuple[int, str]], i: int, name: str, count: int, k: int) -> None:
    if i == len(lines):
        raise WiderFormatError(uri, lines[-1][0], f"{name!r} declares {count} faces, the file ends after {k}")
    if _is_image_name(lines[i][1]):
        raise WiderFormatError(uri, lines[i][0], f"{name!r} declares {count} faces, only {k} face lines follow")


def _parse_numbers(uri: str, line: int, text: str, *, expected: tuple[int, ...]) -> list[float]:
    fields = text.split()
    if len(fields) not in expected:
        wanted = " or ".join(map(str, expected))
        raise WiderFormatError(uri, line, f"expected {wanted} numbers, got {len(fields)} fields")
    values = []
    for field in fields:
        try:
            value = float(field)
        except ValueError:
            raise WiderFormatError(uri, line, f"non-numeric field {field!r}") from None
        if not math.isfinite(value):
            raise WiderFormatError(uri, line, f"non-finite field {field!r}")
        values.append(value)
    return values


def _degenerate_mask(uri: str, lines: list[int], xywh: np.ndarray, policy: Degenerate) -> np.ndarray:
    """Which boxes to keep under ``policy``; raises on a negative size in "strict"."""
    sizes = xywh[:, 2:]
    if policy == "keep":
        return np.ones(len(xywh), dtype=bool)
    if policy == "strict":
        negative = np.flatnonzero(np.any(sizes < 0, axis=1))
        if negative.size:
            w, h = xywh[negative[0], 2:]
            raise WiderFormatError(uri, lines[negative[0]], f"negative box size w={w:g} h={h:g} (degenerate='drop' or 'keep' accepts it)")
    elif policy != "drop":
        raise ValueError(f"degenerate must be 'strict', 'drop' or 'keep', got {policy!r}")
    return np.all(sizes > 0, axis=1)


def _log_dropped(uri: str, dropped: int) -> None:
    if dropped:
        logger.warning("%s: dropped %d boxes with a non-positive width or height", uri, dropped)


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    # Summed in float64 so that writing w = x2 - x1 back is exact.
    return box_convert(xywh.astype(np.float64), "xywh", "xyxy").astype(np.float32)


def _xyxy_to_xywh(xyxy: np.ndarray) -> list[list[float]]:
    return box_convert(xyxy.astype(np.float64), "xyxy", "xywh").tolist()


def _format_number(value: float) -> str:
    """Integers without a decimal point (as the official files), others exactly (shortest repr)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
