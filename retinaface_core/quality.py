"""Per-face quality scores from images and their detections: size, sharpness, pose, exposure, and a
composite fitted to human labels.

One torch implementation, on any device, for all faces of a batch of images at once:
:func:`quality_features`. :func:`face_quality` is the same for the faces of one numpy image.
Conventions are those of :class:`~retinaface_core.postprocessing.Detections`: boxes x1, y1, x2, y2
and landmarks (left eye, right eye, nose, left mouth corner, right mouth corner, left/right as
seen in the image) in pixels of the H x W x 3 uint8 BGR image.

The crop-based scores (sharpness, brightness, contrast, exposure) read each face's box rounded
and clipped to its image (:func:`crop_rectangles`). The crops' pixels are gathered as *runs*, one
per crop row (sharpness) or per sampled row (the grey-level statistics), for every face of the
batch together; no pixel outside the crops is read, and the runs are gathered in chunks of about
``chunk_pixels`` pixels (a crop larger than that is split between rows), so memory stays
bounded whatever the number and size of faces. Each score equals, to float rounding, the
OpenCV computation it was first written with (``benchmarks/quality_reference.py`` measures it;
``tests/data/quality_reference.json`` holds that implementation's values).

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

Grey-level sums are exact (int64); the summed-area table, the pose and the composite are float64,
which CPUs and CUDA devices have (Apple's MPS has not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor

from schemas.annotation import QUALITY_COLUMNS

SHARPNESS_SIZE = 16
"""Side (px) of the square grey crop sharpness is measured on; smaller faces are measured at their
own size. On the 454 labelled faces of the 12 shared WIDER FACE val images, of 8, 12, 16, 24 and
32 px, 16 is where sharpness is least correlated with log face size (r = 0.03; 0.44, 0.29,
-0.24, -0.35 for the others) while separating clear from heavily blurred faces as well as any
(ROC AUC 0.66; 0.59-0.66)."""

MIN_SHARPNESS_SIZE = 3
"""The smallest side sharpness is measured on: the Laplacian needs one pixel inside a border."""

SAMPLE_SIZE = 64
"""Grey-level statistics (brightness, contrast, exposure) are counted on every k-th row and column
of a face's crop, k = max(1, side // SAMPLE_SIZE) per axis (so between SAMPLE_SIZE and
2 * SAMPLE_SIZE - 1 samples per side of a large crop): enough for fractions and moments, and it
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

GREY_WEIGHTS = (3735, 19235, 9798)
GREY_SHIFT = 15
"""ITU-R BT.601 luma (0.114 B + 0.587 G + 0.299 R) in OpenCV 5's fixed point: weights times
2^GREY_SHIFT, rounded to sum to 2^GREY_SHIFT, then rounded to nearest; bit-exact with
``cv2.cvtColor(..., COLOR_BGR2GRAY)`` on all 2^24 colours."""

CHUNK_PIXELS = 1 << 20
"""Crop pixels read at once: bounds the working memory (about 60 bytes per pixel, besides about
250 bytes per crop row of the batch) whatever the number and size of the faces, while keeping
the chunks of a batch few."""


@dataclass
class FaceQuality:
    """Quality scores of N faces; each field is an (N,) float32 array, fields in
    ``schemas.annotation.QUALITY_COLUMNS`` order.

    face_size: short side of the box, px. sharpness: in [0, 1], see :func:`sharpness`.
    yaw, pitch, roll: degrees, see :func:`pose_angles`. brightness: mean grey level of the box
    in [0, 1]. contrast: RMS contrast (standard deviation of the grey levels) in [0, 1]; both
    see :func:`sample_statistics`.
    exposure: 1 - fraction of clipped pixels, in [0, 1], see :func:`sample_statistics`. quality: the
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

    @classmethod
    def from_columns(cls, columns: Tensor) -> FaceQuality:
        """From an (N, len(QUALITY_COLUMNS)) tensor such as :func:`quality_features` returns."""
        values = columns.detach().to("cpu", torch.float32).numpy()
        return cls(**{name: values[:, k].copy() for k, name in enumerate(QUALITY_COLUMNS)})

    def columns(self) -> Tensor:
        """(N, len(QUALITY_COLUMNS)) float32 CPU tensor of the fields."""
        return torch.from_numpy(np.stack([getattr(self, name) for name in QUALITY_COLUMNS], axis=1).astype(np.float32))


def face_size(boxes: Tensor) -> Tensor:
    """min(x2 - x1, y2 - y1) per face: (F, 4) -> (F,) float32."""
    return torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).to(torch.float32)


def pose_angles(landmarks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(yaw, pitch, roll) in degrees from (F, 5, 2) landmarks; each (F,) float32, computed in float64.

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
    # Points as complex numbers x + iy: n * conj(m) / |m| has real part n . u and imaginary part -(n . v).
    points = torch.view_as_complex(landmarks.to(torch.float64).contiguous())
    eyes, mouth = points[:, :2].mean(1), points[:, 3:].mean(1)
    eye_line, midline, to_nose = points[:, 1] - points[:, 0], mouth - eyes, points[:, 2] - eyes
    length, iod = torch.stack([midline, eye_line]).abs().clamp(min=1e-6)
    nose = to_nose * midline.conj() / length
    across = torch.stack([-nose.imag, FRONTAL_NOSE_POSITION - nose.real / length, eye_line.imag])
    scale = torch.stack([NOSE_DEPTH * iod, torch.full_like(iod, NOSE_DEPTH_VERTICAL), eye_line.real])
    yaw, pitch, roll = torch.rad2deg(torch.atan2(across, scale)).to(torch.float32)
    return yaw, pitch, roll


def crop_rectangles(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The pixel rectangles the crop-based scores read, on the host: (F, 4) boxes and (F, 2)
    (height, width) of each face's image -> (F, 4) int64 x1, y1, x2, y2 (x2, y2 exclusive): the box
    rounded half to even, clipped to the image and at least 1 x 1 px (a box outside the image
    reads its nearest border pixel)."""
    limit = float(1 << 40)
    corners = np.rint(np.nan_to_num(boxes.astype(np.float64, copy=False), nan=0.0).clip(-limit, limit)).astype(np.int64)
    height, width = sizes[:, 0], sizes[:, 1]
    x1 = np.minimum(np.maximum(corners[:, 0], 0), width - 1)
    y1 = np.minimum(np.maximum(corners[:, 1], 0), height - 1)
    x2 = np.minimum(np.maximum(corners[:, 2], x1 + 1), width)
    y2 = np.minimum(np.maximum(corners[:, 3], y1 + 1), height)
    return np.stack([x1, y1, x2, y2], axis=1)


def grey_levels(bgr: Tensor) -> Tensor:
    """(..., 3) uint8 BGR -> (...) int32 grey levels in 0..255, equal to ``cv2.cvtColor(...,
    COLOR_BGR2GRAY)`` (see GREY_WEIGHTS); integer arithmetic, exact on every device."""
    blue, green, red = (channel.to(torch.int32) for channel in bgr.unbind(-1))
    grey = blue.mul_(GREY_WEIGHTS[0]).add_(green, alpha=GREY_WEIGHTS[1]).add_(red, alpha=GREY_WEIGHTS[2])
    return grey.add_(1 << (GREY_SHIFT - 1)).bitwise_right_shift_(GREY_SHIFT)


def _area_positions(extent: np.ndarray, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell boundaries j * extent / side, j = 0..SHARPNESS_SIZE (those past ``side`` repeat it), of
    (F,) crop extents cut into (F,) sides: the pixel (F, SHARPNESS_SIZE + 1) int64 in
    0..extent - 1 each boundary lies in and the fraction of that pixel before it, in [0, 1]."""
    numerator = np.minimum(np.arange(SHARPNESS_SIZE + 1), sides[:, None]) * extent[:, None]
    pixel = np.minimum(numerator // sides[:, None], extent[:, None] - 1)
    return pixel, (numerator - pixel * sides[:, None]) / sides[:, None]


def _linear_positions(extent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where ``cv2.resize(..., INTER_LINEAR)`` samples a crop of (F,) extents for MIN_SHARPNESS_SIZE
    outputs: the two pixels (F, 3) int64 and the weight of the second (F, 3). Sample centres at
    (j + 0.5) * extent / 3 - 0.5, rounded to float32 as OpenCV has them, clamped to the crop."""
    scale = 1.0 / (MIN_SHARPNESS_SIZE / extent.astype(np.float64))
    centre = ((np.arange(MIN_SHARPNESS_SIZE) + 0.5) * scale[:, None] - 0.5).astype(np.float32)
    low = np.floor(centre)
    last = extent[:, None] - 1
    weight = np.where((low < 0) | (low >= last), 0.0, (centre - low).astype(np.float64))
    low = np.minimum(np.maximum(low.astype(np.int64), 0), last)
    return low, np.minimum(low + 1, last), weight


@dataclass(frozen=True)
class _Chunk:
    """Runs [first_run, end_run) and pixels [first_pixel, end_pixel) of a batch, gathered together;
    ``stretches``: (image, first pixel, end pixel) of its parts, each within one image."""

    first_run: int
    end_run: int
    first_pixel: int
    end_pixel: int
    stretches: list[tuple[int, int, int]]


@dataclass(frozen=True)
class _Layout:
    """What the crop-based scores read of F faces sorted by image, planned on the host (numpy
    arrays; :meth:`to` gives the same with tensors on a device).

    The pixels are read as *runs* grouped in *sets*, in face order: every face has a crop-row set
    (h runs of w pixels, its whole crop: sharpness, and the grey-level statistics when all of the
    crop is sampled), and a face of 2 * SAMPLE_SIZE px or more on a side also a sample set (ny runs
    of nx pixels, every ky-th row and kx-th column: its grey-level statistics). Runs and pixels
    are numbered through the whole batch, set after set, so each image's runs are contiguous.

    Per run, ``runs`` (R, 5) int64: its set, its first pixel in the batch's numbering, its length,
    and the second differences of the flat image positions of the chunk's pixels at its first
    pixel and at the one after (see :func:`_pixel_positions`).
    Per set, ``set_runs`` (S, 2) int64: its first run and the run after its last; (S,
    SHARPNESS_SIZE + 7) int64 ``columns`` and (S, SHARPNESS_SIZE + 4) ``column_weights`` (zero for
    sample sets): the pixel of a crop row that each of the SHARPNESS_SIZE + 1 area boundaries lies in,
    then the two pixels of each of the 3 linear samples; the fraction of the pixel before each
    boundary, then the linear weights. Per face (F,): the same across rows, as run numbers,
    ``rows`` (F, SHARPNESS_SIZE + 7) and ``row_weights`` (F, SHARPNESS_SIZE + 4); ``first_row``,
    its first run; ``valid`` (F, SHARPNESS_SIZE - 2) 1.0 for its inner resized samples;
    ``cell_factor`` side^2 / (h w), the inverse of an area cell; ``linear`` (bool) resized
    linearly; ``sample_set``, the set its grey-level statistics are counted on, and ``samples``
    (float64) their number.
    """

    # numpy arrays as planned on the host, tensors after :meth:`to`.
    runs: Any
    set_runs: Any
    columns: Any
    column_weights: Any
    rows: Any
    row_weights: Any
    first_row: Any
    valid: Any
    cell_factor: Any
    linear: Any
    sample_set: Any
    samples: Any
    chunks: list[_Chunk]

    def to(self, device: torch.device) -> _Layout:
        """The same plan with its arrays on ``device``, moved in one transfer per dtype (a few small
        copies rather than one per array)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        moved = {}
        for dtype in {a.dtype for a in arrays.values()}:
            names = [name for name, a in arrays.items() if a.dtype == dtype]
            flat = torch.from_numpy(np.concatenate([arrays[name].ravel() for name in names])).to(device)
            for name, part in zip(names, flat.split([arrays[name].size for name in names])):
                moved[name] = part.view(arrays[name].shape)
        return replace(self, **moved)


def _layout(rectangles: np.ndarray, widths: np.ndarray, face_image: np.ndarray, chunk_pixels: int) -> _Layout:
    """The :class:`_Layout` of (F, 4) crop rectangles in images of (F,) widths; (F,) sorted image indices."""
    x1, y1, x2, y2 = rectangles.T
    height, width = y2 - y1, x2 - x1
    row_step, col_step = np.maximum(height // SAMPLE_SIZE, 1), np.maximum(width // SAMPLE_SIZE, 1)
    sample_rows, sample_cols = -(-height // row_step), -(-width // col_step)
    strided = (row_step > 1) | (col_step > 1)
    face = np.repeat(np.arange(len(x1)), 1 + strided)
    row_set = np.cumsum(1 + strided) - 1 - strided
    sample = np.ones(len(face), bool)
    sample[row_set] = False

    count = np.where(sample, sample_rows[face], height[face])
    length = np.where(sample, sample_cols[face], width[face])
    step = np.where(sample, col_step[face], 1)
    run_end, pixel_end = np.cumsum(count), np.cumsum(count * length)
    first_run, first_pixel = run_end - count, pixel_end - count * length
    run_set = np.repeat(np.arange(len(face)), count)
    index = np.arange(len(run_set)) - first_run[run_set]
    row_advance = np.where(sample, row_step[face], 1) * widths[face]
    chunks = _chunks(count, length, run_end, pixel_end, face_image[face], chunk_pixels)
    # Each run's first and last pixel in its image, and the change of position entering it
    # (from the previous run's last pixel, or from 0 where a chunk starts).
    run_step = step[run_set]
    run_first = (y1 * widths + x1)[face][run_set] + index * row_advance[run_set]
    run_last = run_first + (length[run_set] - 1) * run_step
    jump, previous_step = run_first - np.roll(run_last, 1), np.roll(run_step, 1)
    chunk_starts = [chunk.first_run for chunk in chunks]
    jump[chunk_starts], previous_step[chunk_starts] = run_first[chunk_starts], 0
    run_start = first_pixel[run_set] + index * length[run_set]
    runs = np.stack([run_set, run_start, length[run_set], jump - previous_step, run_step - jump], axis=1)

    sides = np.clip(np.minimum(height, width), MIN_SHARPNESS_SIZE, SHARPNESS_SIZE)
    col_pixel, col_fraction = _area_positions(width, sides)
    col_low, col_high, col_weight = _linear_positions(width)
    row_pixel, row_fraction = _area_positions(height, sides)
    row_low, row_high, row_weight = _linear_positions(height)
    columns = np.zeros((len(face), SHARPNESS_SIZE + 7), np.int64)
    columns[row_set] = np.concatenate([col_pixel, col_low, col_high], axis=1)
    column_weights = np.zeros((len(face), SHARPNESS_SIZE + 4))
    column_weights[row_set] = np.concatenate([col_fraction, col_weight], axis=1)
    first_row = first_run[row_set]
    return _Layout(
        runs=runs,
        set_runs=np.stack([first_run, run_end], axis=1),
        columns=columns,
        column_weights=column_weights,
        rows=first_row[:, None] + np.concatenate([row_pixel, row_low, row_high], axis=1),
        row_weights=np.concatenate([row_fraction, row_weight], axis=1),
        first_row=first_row,
        valid=(np.arange(SHARPNESS_SIZE - 2) < sides[:, None] - 2).astype(np.float64),
        cell_factor=sides**2 / (height * width),
        linear=np.minimum(height, width) < MIN_SHARPNESS_SIZE,
        sample_set=row_set + strided,
        samples=(sample_rows * sample_cols).astype(np.float64),
        chunks=chunks,
    )


def _chunks(
    count: np.ndarray, length: np.ndarray, run_end: np.ndarray, pixel_end: np.ndarray, set_image: np.ndarray, chunk_pixels: int
) -> list[_Chunk]:
    """Whole runs in chunks, each ending at the first run end at or after a multiple of
    ``chunk_pixels`` (so at most ``chunk_pixels`` pixels plus one run, a crop row), cut into
    stretches where the image changes. Per set (S,): count, length, cumulative runs and pixels,
    image."""
    run_start, pixel_start = run_end - count, pixel_end - count * length
    total_runs, total_pixels = int(run_end[-1]), int(pixel_end[-1])
    targets = np.arange(1, -(-total_pixels // chunk_pixels)) * chunk_pixels
    target_set = np.searchsorted(pixel_end, targets, side="right")
    within = -(-(targets - pixel_start[target_set]) // length[target_set])
    chunk_runs = run_start[target_set] + within
    chunk_cuts = set(zip(chunk_runs.tolist(), (pixel_start[target_set] + within * length[target_set]).tolist()))
    image_starts = np.flatnonzero(np.diff(set_image, prepend=-1))
    image_cuts = set(zip(run_start[image_starts].tolist(), pixel_start[image_starts].tolist()))
    cuts = sorted((chunk_cuts | image_cuts) - {(total_runs, total_pixels)}) + [(total_runs, total_pixels)]
    chunk_starts = set(chunk_runs.tolist())
    cut_sets = np.searchsorted(run_end, [run for run, _ in cuts], side="right")
    chunks, stretches, first = [], [], 0
    for k in range(len(cuts) - 1):
        stretches.append((int(set_image[cut_sets[k]]), cuts[k][1], cuts[k + 1][1]))
        if cuts[k + 1][0] in chunk_starts or k == len(cuts) - 2:
            chunks.append(_Chunk(cuts[first][0], cuts[k + 1][0], cuts[first][1], cuts[k + 1][1], stretches))
            stretches, first = [], k + 1
    return chunks


def _take(source: Tensor, index: Tensor, dim: int = 0) -> Tensor:
    """``source`` gathered along ``dim`` at an index of any shape, which replaces that dimension
    (index_select, much faster on the CPU than advanced indexing)."""
    taken = torch.index_select(source, dim, index.reshape(-1))
    return taken.view(*source.shape[:dim], *index.shape, *source.shape[dim + 1 :])


def _pixel_positions(start: Tensor, entering: Tensor, leaving: Tensor, total: int) -> Tensor:
    """Flat image positions (total,) int32 of a chunk's pixels, runs laid end to end from (R,)
    ``start``: the running sum of the running sum of their second difference, which is non-zero
    only at a run's first pixel (``entering``) and the one after (``leaving``; :func:`_layout`
    has both). repeat_interleave would do, but its CPU kernel starts threads for any size."""
    change = torch.zeros(total + 1, dtype=torch.int32, device=start.device)
    change.index_put_((start,), entering.to(torch.int32), accumulate=True)
    change.index_put_((start + 1,), leaving.to(torch.int32), accumulate=True)
    return torch.cumsum(torch.cumsum(change[:total], 0, dtype=torch.int32), 0, dtype=torch.int32)


def _read_runs(images: Sequence[Tensor], layout: _Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Read every run of ``layout`` (on the images' device) from the images, chunk by chunk, and
    reduce each run to a few numbers.

    Returns ``sums`` (S, 3) float64 per set: of its grey levels, their squares and its clipped
    pixels (see CLIP_MARGIN); per run, for crop-row runs: ``integrals`` (R, SHARPNESS_SIZE + 1)
    float64, the running sum of the row's grey levels at each area boundary (whole pixels plus
    the fraction of the next), and ``samples`` (R, 3), its grey levels interpolated at the
    linear sample columns.
    """
    device = layout.runs.device
    area, low, high = SHARPNESS_SIZE + 1, SHARPNESS_SIZE + 4, SHARPNESS_SIZE + 7
    sums, integrals, samples = [], [], []
    for chunk in layout.chunks:
        run_set, start, length, entering, leaving = layout.runs[chunk.first_run : chunk.end_run].unbind(1)
        start = start - chunk.first_pixel
        total = chunk.end_pixel - chunk.first_pixel
        where = _pixel_positions(start, entering, leaving, total)
        pixels = torch.empty((total, 3), dtype=torch.uint8, device=device)
        for image, begin, end in chunk.stretches:
            part = slice(begin - chunk.first_pixel, end - chunk.first_pixel)
            torch.index_select(images[image].view(-1, 3), 0, where[part], out=pixels[part])
        grey = grey_levels(pixels)
        blue, green, red = pixels.unbind(1)
        brightest = torch.maximum(torch.maximum(blue, green), red)
        clipped = (brightest <= CLIP_MARGIN).logical_or_(brightest >= 255 - CLIP_MARGIN)
        # before[:, t]: sums of the grey levels, their squares and the clipped pixels before pixel t
        # (whole numbers, exact in float64).
        before = torch.empty((3, total + 1), dtype=torch.float64, device=device)
        before[:, 0] = 0
        for k, values in enumerate((grey, grey * grey, clipped)):
            torch.cumsum(values, 0, dtype=torch.float64, out=before[k, 1:])
        at_start = torch.index_select(before, 1, start)
        sums.append(torch.index_select(before, 1, start + length) - at_start)
        at = start[:, None] + _take(layout.columns, run_set)
        grey_at, weights = _take(grey, at).to(torch.float64), _take(layout.column_weights, run_set)
        before_at = _take(before[0], at[:, :area]) - at_start[0, :, None]
        integrals.append(before_at + weights[:, :area] * grey_at[:, :area])
        samples.append(grey_at[:, area:low] + weights[:, area:] * (grey_at[:, low:high] - grey_at[:, area:low]))
    # Per set from the running sums over runs (index_add_ would start threads for any size).
    running = torch.nn.functional.pad(torch.cumsum(torch.cat(sums, 1), 1), (1, 0))
    set_sums = _take(running, layout.set_runs[:, 1], 1) - _take(running, layout.set_runs[:, 0], 1)
    return set_sums.T, torch.cat(integrals), torch.cat(samples)


def resized_crops(integrals: Tensor, samples: Tensor, layout: _Layout) -> Tensor:
    """Every face's grey crop resized to side x side as ``cv2.resize`` does it: area-averaged where
    both extents reach the side, else (crops under MIN_SHARPNESS_SIZE px on a side) bilinear:
    (F, SHARPNESS_SIZE, SHARPNESS_SIZE) float64, face f in its top-left side x side.

    An area average is an integral of the piecewise-constant image over a cell, and the integral
    from a crop's corner is bilinear within each pixel, so each cell is four samples of the crop's
    summed-area table at fractional corners. The table is built in two exact passes: per crop
    row, its running sum at the column boundaries (``integrals`` (R, SHARPNESS_SIZE + 1) from
    :func:`_read_runs`); per face, the running sum of those over its rows, at the row
    boundaries. The linear case interpolates the rows' linear ``samples`` (R, 3) between rows.
    """
    area, low, high = SHARPNESS_SIZE + 1, SHARPNESS_SIZE + 4, SHARPNESS_SIZE + 7
    above = torch.cumsum(integrals, 0) - integrals
    rows = layout.rows[:, :area]
    table = _take(above, rows) - _take(above, layout.first_row)[:, None] + layout.row_weights[:, :area, None] * _take(integrals, rows)
    cells = torch.diff(torch.diff(table, dim=1), dim=2) * layout.cell_factor[:, None, None]
    near, far = _take(samples, layout.rows[:, area:low]), _take(samples, layout.rows[:, low:high])
    linear = near + layout.row_weights[:, area:, None] * (far - near)
    pad = SHARPNESS_SIZE - MIN_SHARPNESS_SIZE
    return torch.where(layout.linear[:, None, None], torch.nn.functional.pad(linear, (0, pad, 0, pad)), cells)


def sharpness(resized: Tensor, valid: Tensor) -> Tensor:
    """Sharpness in [0, 1] of each face's resized grey crop: (F, S, S) (face f in its top-left
    s x s, S = SHARPNESS_SIZE) and (F, S - 2) float, 1 for the inner samples 1..s - 2 -> (F,) float32.

    A crop is area-averaged to s x s, s = min(SHARPNESS_SIZE, h, w) (never upsampled, except
    to MIN_SHARPNESS_SIZE px; :func:`resized_crops`), so a face is always measured on at most
    SHARPNESS_SIZE samples across: the same face at 20 px and at 200 px, or in a photo and in its
    half-size copy, gets about the same value, and blur counts relative to the face's size. The
    value is mean(L^2) / (mean(L^2) + 4 mean(|G|^2)) over the inner samples, with L the
    4-neighbour Laplacian and G the central difference gradient: for a sinusoid of angular
    frequency w along x or y it is sin^2(w / 2), 0 for flat or very blurred detail and 1 at the
    sampling limit; for a crop, a mean of that over its detail. Brightness and contrast cancel out
    (both terms scale alike).
    """
    g = resized
    centre = g[:, 1:-1, 1:-1]
    laplacian = g[:, 1:-1, 2:] + g[:, 1:-1, :-2] + g[:, 2:, 1:-1] + g[:, :-2, 1:-1] - 4 * centre
    # 4 |G|^2, G the central difference gradient.
    gradient = (g[:, 1:-1, 2:] - g[:, 1:-1, :-2]) ** 2 + (g[:, 2:, 1:-1] - g[:, :-2, 1:-1]) ** 2
    energy = (torch.stack([laplacian**2, gradient]) * (valid[:, :, None] * valid[:, None, :])).sum((2, 3))
    detail, total = energy[0], energy[0] + energy[1]
    return torch.where(total > 0, detail / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0).to(torch.float32)


def sample_statistics(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(brightness, contrast, exposure), each (F,) float32, from the (F, 3) sums of each face's
    grey-level samples, their squares and its clipped samples, and (F,) sample counts.

    The samples are every k-th row and column of the crop (see SAMPLE_SIZE), taken without
    averaging, which would blend clipped pixels with their neighbours. brightness: mean grey level
    / 255; contrast: their standard deviation / 255 (population, as ``cv2.meanStdDev``);
    exposure: 1 - the fraction of clipped samples. A pixel is clipped when it is black in every
    channel (all <= CLIP_MARGIN: crushed shadow) or saturated in any (>= 255 - CLIP_MARGIN: blown
    highlight); either way its detail is lost, which a distance of the mean from mid-grey does not
    tell (a dark-skinned face in good light is dark but not clipped).
    """
    mean = sums[:, 0] / counts
    std = torch.sqrt((sums[:, 1] / counts - mean**2).clamp(min=0))
    return (mean / 255).to(torch.float32), (std / 255).to(torch.float32), (1 - sums[:, 2] / counts).to(torch.float32)


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


def model_features(scores: Tensor, columns: Tensor) -> Tensor:
    """(F, len(FEATURES)) float64 model inputs from the (F,) detection scores and the faces'
    (F, len(QUALITY_COLUMNS)) scores (the ``quality`` column is not read).

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
    c = columns.to(torch.float64)

    def column(name: str) -> Tensor:
        return c[:, QUALITY_COLUMNS.index(name)]

    return torch.stack(
        [
            scores.to(torch.float64),
            torch.log2(column("face_size").clamp(min=1.0)),
            column("sharpness"),
            column("yaw").abs(),
            column("pitch").abs(),
            column("roll").abs(),
            torch.sqrt((1 - column("exposure")).clamp(min=0)),
        ],
        dim=1,
    )


def composite_quality(model: QualityModel, features: Tensor) -> Tensor:
    """The model's quality in [0, 1] of (F, len(FEATURES)) features: (F,) float32.

    The model was fitted (``benchmarks/fit_quality.py``) to give the probability that a human
    labeller marks the face with no heavy blur, no heavy occlusion, a typical pose and normal
    illumination (WIDER FACE attribute conventions).
    """
    columns = [FEATURES.index(name) for name in model.features]
    coefficients = torch.from_numpy(np.stack([model.mean, model.scale, model.weights])).to(features.device)
    z = (features[:, columns].to(torch.float64) - coefficients[0]) / coefficients[1]
    return torch.sigmoid(model.intercept + z @ coefficients[2]).to(torch.float32)


def load_model() -> QualityModel:
    """The composite shipped with the package (``quality_model.json``)."""
    return QualityModel.from_json(resources.files(__package__).joinpath("quality_model.json").read_text())


QUALITY_MODEL = load_model()
QUALITY_MODEL_VERSION: str = QUALITY_MODEL.version
"""Version of the composite's coefficients; record it with every output written with them."""


def _check_inputs(images: Sequence[Tensor], image_index: Tensor, boxes: Tensor, scores: Tensor, landmarks: Tensor) -> None:
    faces = len(boxes)
    if boxes.shape != (faces, 4) or scores.shape != (faces,) or landmarks.shape != (faces, 5, 2) or image_index.shape != (faces,):
        raise ValueError(
            "quality_features needs boxes (F, 4), scores (F,), landmarks (F, 5, 2) and image_index (F,); got "
            f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(landmarks.shape)}, {tuple(image_index.shape)}"
        )
    if image_index.dtype.is_floating_point or image_index.dtype == torch.bool:
        raise ValueError(f"quality_features: image_index must be integers, got {image_index.dtype}")
    for k, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(
                f"quality_features: image {k} must be a non-empty H x W x 3 uint8 BGR tensor, got {image.dtype} {tuple(image.shape)}"
            )
        if image.device != boxes.device:
            raise ValueError(f"quality_features: image {k} is on {image.device}, the detections on {boxes.device}")


def quality_features(
    images: Sequence[Tensor],
    image_index: Tensor,
    boxes: Tensor,
    scores: Tensor,
    landmarks: Tensor,
    chunk_pixels: int = CHUNK_PIXELS,
) -> Tensor:
    """Every quality score of the F faces of a batch of images, on the images' device.

    images: N tensors (H_i, W_i, 3) uint8 BGR, of any sizes, on one device; image_index (F,)
    integer: the image of each face (in any order); boxes (F, 4) x1, y1, x2, y2, scores (F,),
    landmarks (F, 5, 2), in pixels of the face's image, on that device. Returns
    (F, len(QUALITY_COLUMNS)) float32, columns in ``schemas.annotation.QUALITY_COLUMNS`` order
    (face_size, sharpness, yaw, pitch, roll, brightness, contrast, exposure, quality; see
    :class:`FaceQuality`). ``chunk_pixels`` bounds the crop pixels read at once, give or take one
    crop row (CHUNK_PIXELS).

    Host work and transfers are per batch, not per face or pixel: the boxes and image indices
    come to the host once to plan the reads (:class:`_Layout`), the plan's per-face arrays go to
    the device once, and the pixels are read with one index_select per image and chunk.
    """
    _check_inputs(images, image_index, boxes, scores, landmarks)
    device = boxes.device
    if len(boxes) == 0:
        return torch.zeros((0, len(QUALITY_COLUMNS)), dtype=torch.float32, device=device)
    with torch.no_grad():
        # One transfer to the host: the boxes and image indices (whole numbers, exact in float64).
        host = torch.cat([boxes.to(torch.float64), image_index.to(torch.float64)[:, None]], dim=1).cpu().numpy()
        host_boxes, face_image = host[:, :4], host[:, 4].astype(np.int64)
        if face_image.min() < 0 or face_image.max() >= len(images):
            raise ValueError(f"quality_features: image_index must lie in [0, {len(images)}) for {len(images)} images")
        in_order = bool((np.diff(face_image) >= 0).all())
        if not in_order:
            host_order = np.argsort(face_image, kind="stable")
            order = torch.from_numpy(host_order).to(device)
            boxes, scores, landmarks = boxes[order], scores[order], landmarks[order]
            host_boxes, face_image = host_boxes[host_order], face_image[host_order]
        sizes = np.array([image.shape[:2] for image in images], np.int64)[face_image]
        rectangles = crop_rectangles(host_boxes, sizes)
        layout = _layout(rectangles, sizes[:, 1], face_image, chunk_pixels).to(device)
        set_sums, integrals, samples = _read_runs([image.contiguous() for image in images], layout)
        sharp = sharpness(resized_crops(integrals, samples, layout), layout.valid)
        brightness, contrast, exposure = sample_statistics(set_sums[layout.sample_set], layout.samples)
        yaw, pitch, roll = pose_angles(landmarks)
        columns = torch.stack([face_size(boxes), sharp, yaw, pitch, roll, brightness, contrast, exposure, torch.zeros_like(sharp)], dim=1)
        columns[:, -1] = composite_quality(QUALITY_MODEL, model_features(scores, columns))
        if in_order:
            return columns
        result = torch.empty_like(columns)
        result[order] = columns
        return result


def face_quality(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> FaceQuality:
    """All quality scores of the N faces (boxes (N, 4), scores (N,), landmarks (N, 5, 2)) of one
    H x W x 3 uint8 BGR image: :func:`quality_features` on the CPU."""
    columns = quality_features(
        [torch.from_numpy(np.ascontiguousarray(image))],
        torch.zeros(len(boxes), dtype=torch.int64),
        torch.from_numpy(np.asarray(boxes)),
        torch.from_numpy(np.asarray(scores)),
        torch.from_numpy(np.asarray(landmarks)),
    )
    return FaceQuality.from_columns(columns)
