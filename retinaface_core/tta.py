"""Test-time augmentation: horizontal flip and an image pyramid, merged by box voting or NMS.

RetinaFace's published WIDER FACE figures come from running every image mirrored and at
several sizes and merging all the detections with box voting (insightface's ``bbox_vote``).
Here a *view* of an image is one (scale, mirrored or not) pair. The views of all images at one
scale go to the detector in one call (``ViewCandidates``), the mirrored copies next to their
originals, so they share the detector's batches. Every view contributes its decoded candidates
above the score threshold, before NMS, mapped back to the original image's pixels (mirrored
views: x -> width - x, and the left/right landmarks swap names). The candidates of all views
of an image are then merged into one detection per face, with the same IoU threshold (+1 pixel
areas) as the detector's NMS.

**Face sizes per view** (``sizes:anchors``, the default). A network finds faces well only at the
sizes its anchors were trained for: a face far larger than the largest anchor comes out cut or
misplaced, one far smaller than the smallest as noise. So, as in the multi-scale test of S3FD,
PyramidBox and DSFD ("enlarge only detect small face", "shrink only detect big face"), each view
contributes only the faces whose size in that view (the square root of the box area) lies in
the range its anchors cover well, :func:`anchor_face_range`: an enlarged view contributes only
faces that are small in the original, a reduced view only large ones. The view of the smallest
factor also keeps every larger face and the view of the largest factor every smaller one, so
no face size is left to no view (:func:`face_size_ranges`). ``sizes:all`` keeps every face of
every view.

**Relative and automatic pyramids.** Scales relative to each photo (``x0.5``, ``x1``, ``x2``)
treat a thumbnail and a 12 MP photo alike. ``pyramid:auto`` picks the views of each photo from
its size and the anchors (:func:`auto_scales`): the photo at about its own size plus the long
sides at which the anchors cover the face sizes photos hold (:func:`auto_long_sides`), no view
above a pixel budget. Every view's long side comes from one geometric ladder, so that a GPU
meets a fixed set of canvases (each new shape costs it a round of kernel selection) whatever
the photos' sizes.

Settings have a string form, for command lines and run records::

    setting := "none" | part ("+" part)*          each part at most once, in any order
    part    := "flip" | "pyramid:" pyramid | "merge:" ("vote" | "nms") | "sizes:" ("anchors" | "all")
    pyramid := scale ("," scale)* | "auto" [":" M]  (M: megapixels per view at most, default AUTO_MEGAPIXELS)
    scale   := "original" | "long:N" | "square:N" | "xF"  (see InputScale)

e.g. ``flip``, ``pyramid:x1,x2``, ``flip+pyramid:auto``, ``flip+pyramid:long:640,long:1600+sizes:all``.
Without ``pyramid`` the detector's own ``scale`` is the only scale; ``merge`` defaults to
``vote`` and ``sizes`` to ``anchors``; ``str()`` gives the canonical form (flip, pyramid, merge,
sizes) and parses back equal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from .augment import mirror_points
from .box_coding import box_iou
from .postprocessing import Detections, clip_points, nms
from .preprocessing import Image, InputScale, validate_image


class MergeSettings(Protocol):
    """What merging the views needs of a detector's settings (``DetectorSettings`` has it)."""

    @property
    def scale(self) -> str: ...
    @property
    def score_threshold(self) -> float: ...
    @property
    def nms_iou(self) -> float: ...
    @property
    def keep_top_k(self) -> int: ...
    @property
    def clip(self) -> bool: ...


ViewResult = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Candidates of one view: (M, 4) x1, y1, x2, y2 boxes, (M,) scores, (M, 5, 2) landmarks."""

ViewCandidates = Callable[[Sequence[Image], InputScale], list[ViewResult]]
"""Runs views at a scale (in the detector's batches); per view, its candidates (``ViewResult``)
above the score threshold before NMS, in that view's original pixels."""

AnchorSizes = Sequence[Sequence[int]]
"""Anchor side lengths in network input pixels, one sequence per FPN level (``RetinaFaceConfig.min_sizes``)."""

Merge = Literal["vote", "nms"]
MERGES: tuple[Merge, ...] = ("vote", "nms")
Sizes = Literal["anchors", "all"]
SIZES: tuple[Sizes, ...] = ("anchors", "all")
GRAMMAR = (
    "'none' or parts joined by '+': 'flip', 'pyramid:SCALE[,SCALE...]' (SCALE: original | long:N | square:N | xF) "
    "or 'pyramid:auto[:MEGAPIXELS]', 'merge:vote|nms', 'sizes:anchors|all'"
)
# Megapixels of the largest view of an automatic pyramid, unless the setting names another
# (at least MIN_MEGAPIXELS: a 100 x 100 view).
AUTO_MEGAPIXELS, MIN_MEGAPIXELS = 4.0, 0.01
# Faces a view trusts, against its anchors: from the smallest anchor (the smallest face the
# network was trained to match; below, a face is a few pixels of evidence) to half the largest
# (above, the regression stretches towards sizes no anchor starts from, and the face fills much
# of a training crop).
SMALL_FACE_ANCHORS, LARGE_FACE_ANCHORS = 1.0, 0.5
# The faces an automatic pyramid looks for, as fractions of the photo's long side: from a
# face in a crowd (1/160: WIDER's hard faces in 1,024 px photos) to a portrait (2/5).
SMALLEST_FACE, LARGEST_FACE = 1 / 160, 2 / 5
# Long sides of an automatic pyramid between its smallest and largest (steps of 1.2x): dense
# enough that a face lies within the trusted sizes of several views, which vote on its box.
# Votes from one more scale cost a view each; a flip's cost a second copy of every view.
AUTO_SIDES = 6
# An automatic pyramid enlarges a photo at most this much: upsampling adds no detail.
MAX_ENLARGEMENT = 4.0
# The smallest long side of an automatic view (InputScale's minimum).
MIN_AUTO_SIDE = 32
# The photos whose automatic views' canvases a detector builds before its first pass: long
# sides from WARM_SMALLEST_SIDE, aspect ratios up to WARM_ASPECT (2:1 holds 4:3, 3:2 and 16:9).
WARM_SMALLEST_SIDE, WARM_ASPECT = 256, 2.0
# Candidates per chunk of box_vote's IoU against the cluster heads: bounds its memory however
# many candidates a crowd photo's pyramid yields, and narrow chunks meet few heads, so fewer
# candidate-head pairs are computed.
_IOU_ROWS = 512


@dataclass(frozen=True)
class TTA:
    """A test-time augmentation setting.

    Attributes:
        flip: also run every image mirrored horizontally.
        scales: the pyramid; empty means the detector's own ``scale`` alone (or ``auto``).
        merge: ``"vote"`` (box voting, :func:`box_vote`) or ``"nms"`` (plain NMS over all views).
        sizes: ``"anchors"`` (each view contributes the face sizes its anchors cover,
            :func:`face_size_ranges`) or ``"all"``.
        auto: megapixels of the largest view of an automatic pyramid (:func:`auto_scales`),
            or None for none; exclusive with ``scales``.
    """

    flip: bool = False
    scales: tuple[InputScale, ...] = ()
    merge: Merge = "vote"
    sizes: Sizes = "anchors"
    auto: float | None = None

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"TTA merge must be one of {MERGES}, got {self.merge!r}")
        if self.sizes not in SIZES:
            raise ValueError(f"TTA sizes must be one of {SIZES}, got {self.sizes!r}")
        if len({_same_view(scale) for scale in self.scales}) != len(self.scales):
            raise ValueError(f"TTA pyramid lists a scale twice: {','.join(map(str, self.scales))}")
        if self.auto is not None and (self.scales or not self.auto >= MIN_MEGAPIXELS):
            raise ValueError(
                f"TTA pyramid:auto takes a budget of at least {MIN_MEGAPIXELS} megapixels and no other scale, got {self.auto!r}"
            )
        if (self.merge, self.sizes) != ("vote", "anchors") and not self.enabled:
            raise ValueError("TTA merge and sizes apply only with flip or a pyramid")

    @property
    def enabled(self) -> bool:
        """Whether this setting changes anything: off (``none``) is one plain pass."""
        return self.flip or bool(self.scales) or self.auto is not None

    def view_scales(self, base: InputScale, height: int, width: int, anchor_sizes: AnchorSizes) -> tuple[InputScale, ...]:
        """The scales of the views of one ``height`` x ``width`` image (each also mirrored with
        ``flip``); ``base``: the detector's scale, the only one without a pyramid."""
        if self.auto is not None:
            return auto_scales(height, width, anchor_sizes, self.auto)
        return self.scales or (base,)

    @classmethod
    def parse(cls, text: str | TTA) -> TTA:
        """A setting from its string form (module doc); raises ValueError naming what is wrong."""
        if isinstance(text, TTA):
            return text
        if not isinstance(text, str):
            raise ValueError(f"TTA setting must be a string ({GRAMMAR}), got {type(text).__name__}")
        if text == "none":
            return cls()
        seen: dict[str, str] = {}
        for part in text.split("+"):
            kind = part.split(":", 1)[0]
            if kind not in ("flip", "pyramid", "merge", "sizes") or (kind == "flip") != (part == "flip"):
                raise ValueError(f"TTA setting {text!r}: unknown part {part!r}; expected {GRAMMAR}")
            if kind in seen:
                raise ValueError(f"TTA setting {text!r}: {kind!r} given twice")
            seen[kind] = part[len(kind) + 1 :]
        try:
            scales, auto = _parse_pyramid(seen["pyramid"]) if "pyramid" in seen else ((), None)
            return cls(
                flip="flip" in seen,
                scales=scales,
                merge=seen.get("merge", "vote"),  # type: ignore[arg-type]
                sizes=seen.get("sizes", "anchors"),  # type: ignore[arg-type]
                auto=auto,
            )
        except ValueError as exc:
            raise ValueError(f"TTA setting {text!r}: {exc}") from None

    def __str__(self) -> str:
        parts = ["flip"] if self.flip else []
        if self.auto is not None:
            parts.append("pyramid:auto" + ("" if self.auto == AUTO_MEGAPIXELS else ":" + repr(self.auto).removesuffix(".0")))
        elif self.scales:
            parts.append("pyramid:" + ",".join(map(str, self.scales)))
        if self.merge != "vote":
            parts.append(f"merge:{self.merge}")
        if self.sizes != "anchors":
            parts.append(f"sizes:{self.sizes}")
        return "+".join(parts) or "none"


def _parse_pyramid(text: str) -> tuple[tuple[InputScale, ...], float | None]:
    auto = re.fullmatch(r"auto(?::(\d+(?:\.\d+)?))?", text)
    if auto:
        return (), float(auto.group(1)) if auto.group(1) else AUTO_MEGAPIXELS
    return tuple(InputScale.parse(scale) for scale in text.split(",")), None


def _same_view(scale: InputScale) -> InputScale:
    """``x1`` and ``original`` size every image alike: one key for both."""
    return InputScale("original") if scale == InputScale("relative", factor=1.0) else scale


def anchor_face_range(anchor_sizes: AnchorSizes) -> tuple[float, float]:
    """(smallest, largest) face size, in network input pixels, that a network with these anchor
    side lengths finds well: see ``SMALL_FACE_ANCHORS``."""
    sizes = [size for level in anchor_sizes for size in level]
    return SMALL_FACE_ANCHORS * min(sizes), LARGE_FACE_ANCHORS * max(sizes)


def face_size_ranges(factors: Sequence[float], anchor_sizes: AnchorSizes) -> list[tuple[float, float]]:
    """Per view, the (min, max) face size in original-image pixels it contributes.

    A view that resizes the image by ``factor`` (view size / original size) contributes the
    faces whose size times ``factor`` lies in :func:`anchor_face_range`; the views of the
    smallest factor have no upper bound and those of the largest no lower bound. A face's size
    is the square root of its box area.
    """
    smallest, largest = anchor_face_range(anchor_sizes)
    low, high = min(factors), max(factors)
    return [(0.0 if f == high else smallest / f, math.inf if f == low else largest / f) for f in factors]


def _auto_ladder(anchor_sizes: AnchorSizes) -> tuple[float, float]:
    """(first, ratio) of the automatic pyramid's long sides: ``first * ratio**k`` for integer k.

    Side 0 puts a face of ``LARGEST_FACE`` of the long side at the largest anchor, side
    ``AUTO_SIDES - 1`` one of ``SMALLEST_FACE`` at the smallest anchor, the smallest size a view
    trusts (:func:`anchor_face_range`); the same steps continue below and above.
    """
    sizes = [size for level in anchor_sizes for size in level]
    low, high = max(sizes) / LARGEST_FACE, min(sizes) / SMALLEST_FACE
    return low, (high / low) ** (1 / (AUTO_SIDES - 1))


def _auto_side(k: int, ladder: tuple[float, float]) -> int:
    return max(MIN_AUTO_SIDE, round(ladder[0] * ladder[1] ** k))


def _rung_at_most(length: float, ladder: tuple[float, float]) -> int:
    """The largest k whose side is at most ``length``."""
    k = math.floor(math.log(length / ladder[0]) / math.log(ladder[1]))
    while _auto_side(k, ladder) > length and _auto_side(k - 1, ladder) < _auto_side(k, ladder):
        k -= 1
    return k


def auto_long_sides(anchor_sizes: AnchorSizes) -> tuple[int, ...]:
    """The long sides every photo's automatic pyramid looks at (an enlargement up to
    ``MAX_ENLARGEMENT`` and the pixel budget allowing): ``AUTO_SIDES`` steps of its ladder."""
    ladder = _auto_ladder(anchor_sizes)
    return tuple(_auto_side(k, ladder) for k in range(AUTO_SIDES))


def auto_scales(height: int, width: int, anchor_sizes: AnchorSizes, megapixels: float = AUTO_MEGAPIXELS) -> tuple[InputScale, ...]:
    """The views of a ``height`` x ``width`` photo in an automatic pyramid, each ``long:N`` with N
    a side of one geometric ladder (:func:`_auto_ladder`), so that a detector meets a fixed set
    of canvases (:func:`auto_canvas_sides`) whatever the photos' sizes.

    The photo at the side nearest its own long side (within half a step: its own detail, barely
    resampled), then each of :func:`auto_long_sides` (the same side counts once). An enlargement
    stops at ``MAX_ENLARGEMENT``: the sides beyond give way to the largest side within it. A view
    above ``megapixels`` gives way to the largest side that fits.
    """
    long_side, short_side = max(height, width), min(height, width)
    ladder = _auto_ladder(anchor_sizes)
    own = round(math.log(long_side / ladder[0]) / math.log(ladder[1]))
    rungs = [own] + [k for k in range(AUTO_SIDES) if _auto_side(k, ladder) <= MAX_ENLARGEMENT * long_side]
    if _auto_side(AUTO_SIDES - 1, ladder) > MAX_ENLARGEMENT * long_side:
        rungs.append(_rung_at_most(MAX_ENLARGEMENT * long_side, ladder))
    fitting = _rung_at_most(math.sqrt(megapixels * 1e6 * long_side / short_side), ladder)
    sides: list[int] = []
    for k in rungs:
        side = _auto_side(min(k, fitting), ladder)
        if side not in sides:
            sides.append(side)
    return tuple(InputScale("long", side) for side in sides)


def auto_canvas_sides(anchor_sizes: AnchorSizes, megapixels: float = AUTO_MEGAPIXELS) -> tuple[int, ...]:
    """The long sides of the automatic pyramids of photos from ``WARM_SMALLEST_SIDE`` pixels up
    to those whose views the budget caps, up to an aspect of ``WARM_ASPECT``: the sides whose
    canvases a detector builds before its first pass. Smaller photos and longer panoramas add
    a few more sides of the same ladder, met on first use."""
    ladder = _auto_ladder(anchor_sizes)
    first = round(math.log(WARM_SMALLEST_SIDE / ladder[0]) / math.log(ladder[1]))
    last = _rung_at_most(math.sqrt(megapixels * 1e6 * WARM_ASPECT), ladder)
    return tuple(sorted({_auto_side(k, ladder) for k in range(first, max(last, AUTO_SIDES - 1) + 1)}))


def view_factor(scale: InputScale, height: int, width: int) -> float:
    """How much ``scale`` resizes a ``height`` x ``width`` image: the geometric mean of the two axes."""
    resized_height, resized_width = scale.resized_shape(height, width)
    return math.sqrt(resized_height * resized_width / (height * width))


def detect_with_tta(
    images: Sequence[Image], tta: TTA, view_candidates: ViewCandidates, settings: MergeSettings, anchor_sizes: AnchorSizes
) -> list[Detections]:
    """Detection with test-time augmentation; one :class:`Detections` per image, in
    original-image pixels, one detection per face.

    ``view_candidates`` runs the views (the detector's network, batches and score threshold);
    ``settings`` gives the NMS IoU (also the voting threshold), keep-top-k (after merging), the
    base scale and clipping; ``anchor_sizes`` (the detector config's ``min_sizes``) set the face
    sizes of each view (``sizes:anchors``) and the automatic pyramid. Voting votes the landmarks
    too: against an independent view's landmarks they err less than the top member's
    (``benchmarks/bench_tta.py``).
    """
    for i, image in enumerate(images):
        validate_image(image, i)
    pooled = pooled_candidates(images, tta, view_candidates, InputScale.parse(settings.scale), anchor_sizes)
    return [merge_views(candidates, tta.merge, settings, _size(image)) for image, candidates in zip(images, pooled)]


def mirrored(image: Image) -> Image:
    """The image mirrored left-right, as a contiguous array or tensor on its device."""
    if isinstance(image, torch.Tensor):
        return image.flip(1)
    return np.ascontiguousarray(image[:, ::-1])


def _size(image: Image) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])


def pooled_candidates(
    images: Sequence[Image], tta: TTA, view_candidates: ViewCandidates, base: InputScale, anchor_sizes: AnchorSizes
) -> list[ViewResult]:
    """Per image, the candidates of all its views (each within its face sizes), before any NMS,
    in original-image pixels: (M, 4) x1, y1, x2, y2 boxes, (M,) scores, (M, 5, 2) landmarks
    (left/right as seen in the original image); views by scale in the order the image's scales
    come, each original before its mirror. ``base``: the scale without a pyramid.

    Images are grouped by scale, so that each scale's views of all images (mirrored copies after
    the originals) go to ``view_candidates`` in one call and fill its batches.
    """
    sizes = [_size(image) for image in images]
    plans = [tta.view_scales(base, height, width, anchor_sizes) for height, width in sizes]
    members: dict[InputScale, list[int]] = {}
    for index, scales in enumerate(plans):
        for scale in scales:
            members.setdefault(scale, []).append(index)
    found: dict[tuple[int, InputScale], list[ViewResult]] = {}
    for scale, indices in members.items():
        views = [images[i] for i in indices] + ([mirrored(images[i]) for i in indices] if tta.flip else [])
        for slot, (boxes, scores, landmarks) in enumerate(view_candidates(views, scale)):
            index = indices[slot % len(indices)]
            if slot >= len(indices):
                boxes, landmarks = mirror_points(boxes, landmarks, sizes[index][1])
            found.setdefault((index, scale), []).append((boxes, scores, landmarks))
    pooled = []
    for index, scales in enumerate(plans):
        factors = [view_factor(scale, *sizes[index]) for scale in scales]
        ranges = face_size_ranges(factors, anchor_sizes) if tta.sizes == "anchors" else [(0.0, math.inf)] * len(scales)
        parts = [within_sizes(view, *size_range) for scale, size_range in zip(scales, ranges) for view in found[index, scale]]
        pooled.append(tuple(np.concatenate(arrays) for arrays in zip(*parts)))
    return pooled  # type: ignore[return-value]


def within_sizes(candidates: ViewResult, smallest: float, largest: float) -> ViewResult:
    """The candidates whose size (square root of the box area) lies in [smallest, largest]."""
    boxes, scores, landmarks = candidates
    extent = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    size = np.sqrt(extent[:, 0] * extent[:, 1])
    keep = (size >= smallest) & (size <= largest)
    return boxes[keep], scores[keep], landmarks[keep]


def merge_views(candidates: ViewResult, merge: Merge, settings: MergeSettings, size: tuple[int, int]) -> Detections:
    """One image's pooled candidates merged into one detection per face (``merge``), the best
    ``settings.keep_top_k``, clipped to the image's (height, width) ``size`` with ``settings.clip``."""
    boxes, scores, landmarks = candidates
    if merge == "vote":
        boxes, scores, landmarks = box_vote(boxes, scores, landmarks, settings.nms_iou)
    else:
        keep = nms(boxes, scores, settings.nms_iou, settings.score_threshold)
        boxes, scores, landmarks = boxes[keep], scores[keep], landmarks[keep]
    keep_top_k = settings.keep_top_k
    boxes, scores, landmarks = boxes[:keep_top_k], scores[:keep_top_k], landmarks[:keep_top_k]
    if settings.clip:
        boxes, landmarks = clip_points(boxes, landmarks, size)
    return Detections(
        boxes=np.ascontiguousarray(boxes, dtype=np.float32),
        scores=np.ascontiguousarray(scores, dtype=np.float32),
        landmarks=np.ascontiguousarray(landmarks, dtype=np.float32),
    )


def box_vote(
    boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, iou_threshold: float, *, vote_landmarks: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box voting (insightface's ``bbox_vote``): greedy clusters, each merged into its score-weighted mean.

    In descending score order, the best detection not yet taken takes every remaining one that
    overlaps it at IoU >= ``iou_threshold`` (+1 pixel areas, as :func:`postprocessing.nms`) as its
    cluster. A cluster becomes one detection: box = the members' boxes averaged with their scores
    as weights, score = the best member's, landmarks = the same weighted mean
    (``vote_landmarks``) or the best member's. Merged boxes can overlap more than their cluster
    heads did, so a final NMS at the same threshold keeps the result at one detection per face.

    Args:
        boxes: (N, 4) x1, y1, x2, y2 in any one pixel frame.
        scores: (N,) positive.
        landmarks: (N, 5, 2) (x, y) in the same frame.

    Returns:
        (K, 4) boxes, (K,) scores, (K, 5, 2) landmarks, float64, by descending score.
    """
    # The greedy loop, vectorised: its cluster heads are exactly the boxes greedy NMS keeps, and
    # a box joins the first head (in score order) that it overlaps enough.
    heads = nms(boxes, scores, iou_threshold, 0.0)
    # box_iou's continuous areas of boxes whose far corner moved by one pixel are the +1 pixel areas.
    inclusive = torch.from_numpy(np.asarray(boxes, dtype=np.float32)) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    head_boxes = inclusive[torch.from_numpy(heads)]
    cluster = np.empty(len(boxes), dtype=np.int64)
    # Rows in order of their centre's x: a chunk of them spans a narrow band of the image, and
    # only the heads that reach into that band can take them (their own heads always do).
    by_x = torch.from_numpy(np.argsort(boxes[:, 0] + boxes[:, 2], kind="stable"))
    for start in range(0, len(boxes), _IOU_ROWS):
        rows = by_x[start : start + _IOU_ROWS]
        chunk = inclusive[rows]
        near = torch.nonzero((head_boxes[:, 2] > chunk[:, 0].min()) & (head_boxes[:, 0] < chunk[:, 2].max())).squeeze(1)
        iou = box_iou(chunk, head_boxes[near])
        member = iou >= iou_threshold
        # The first True of a row: the best-scoring head that takes the box. A row without one is
        # a box that OpenCV's IoU put just above the threshold and this one just below: it joins
        # its best match.
        first = torch.where(member.any(dim=1), member.byte().argmax(dim=1), iou.argmax(dim=1))
        cluster[rows.numpy()] = near[first].numpy()
    cluster[heads] = np.arange(len(heads))
    weights = scores.astype(np.float64)
    merged_boxes = _cluster_mean(boxes, cluster, weights, len(heads))
    merged_landmarks = (
        _cluster_mean(landmarks.reshape(-1, 10), cluster, weights, len(heads)).reshape(-1, 5, 2)
        if vote_landmarks
        else landmarks[heads].astype(np.float64)
    )
    merged_scores = weights[heads]
    keep = nms(merged_boxes, merged_scores, iou_threshold, 0.0)
    return merged_boxes[keep], merged_scores[keep], merged_landmarks[keep]


def _cluster_mean(values: np.ndarray, cluster: np.ndarray, weights: np.ndarray, count: int) -> np.ndarray:
    """(count, D) weighted mean of the (N, D) ``values`` per cluster id in ``cluster`` (N,)."""
    sums = np.zeros((count, values.shape[1]), dtype=np.float64)
    np.add.at(sums, cluster, values * weights[:, None])
    return sums / np.bincount(cluster, weights, minlength=count)[:, None]
