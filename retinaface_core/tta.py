"""Test-time augmentation: horizontal flip and an image pyramid, merged by box voting or NMS.

RetinaFace's published WIDER FACE figures come from running every image mirrored and at
several sizes and merging all the detections with box voting (insightface's ``bbox_vote``).
Here a *view* of an image is one (scale, mirrored or not) pair. The mirrored copy of an image
has the image's input shape, so at each scale it rides in the same forward pass (one stacked
tensor). Every view contributes its decoded candidates above the score threshold, before NMS,
mapped back to the original image's pixels (mirrored views: x -> width - x, and the left/right
landmarks swap names). The candidates of all views of an image are then merged into one
detection per face, with the same IoU threshold (+1 pixel areas) as the detector's NMS.

Settings have a string form, for command lines and run records::

    setting := "none" | part ("+" part)*          each part at most once, in any order
    part    := "flip" | "pyramid:" scale ("," scale)* | "merge:" ("vote" | "nms")
    scale   := "original" | "long:N" | "square:N"  (see InputScale)

e.g. ``flip``, ``pyramid:original,long:640,long:1024``, ``flip+pyramid:long:640,long:1600``.
Without ``pyramid`` the detector's own ``scale`` is the only scale; ``merge`` defaults to
``vote``; ``str()`` gives the canonical form (flip, pyramid, merge) and parses back equal.
"""

from __future__ import annotations

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


ViewCandidates = Callable[[Sequence[Image], InputScale], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
"""Runs views at a scale; per view, its candidates above the score threshold before NMS, in the
view's pixels: (M, 4) boxes, (M,) scores, (M, 5, 2) landmarks."""

Merge = Literal["vote", "nms"]
MERGES: tuple[Merge, ...] = ("vote", "nms")
GRAMMAR = "'none' or parts joined by '+': 'flip', 'pyramid:SCALE[,SCALE...]' (SCALE: original | long:N | square:N), 'merge:vote|nms'"
# Candidates per chunk of box_vote's IoU against the cluster heads: bounds its memory however
# many candidates a crowd photo's pyramid yields, and narrow chunks meet few heads (512 rows
# compute 22 % of all candidate-head pairs on the shared WIDER images, 2048 rows 36 %).
_IOU_ROWS = 512


@dataclass(frozen=True)
class TTA:
    """A test-time augmentation setting.

    Attributes:
        flip: also run every image mirrored horizontally.
        scales: the pyramid; empty means the detector's own ``scale`` alone.
        merge: ``"vote"`` (box voting, :func:`box_vote`) or ``"nms"`` (plain NMS over all views).
    """

    flip: bool = False
    scales: tuple[InputScale, ...] = ()
    merge: Merge = "vote"

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"TTA merge must be one of {MERGES}, got {self.merge!r}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"TTA pyramid lists a scale twice: {','.join(map(str, self.scales))}")
        if self.merge != "vote" and not self.enabled:
            raise ValueError("TTA merge applies only with flip or a pyramid")

    @property
    def enabled(self) -> bool:
        """Whether this setting changes anything: off (``none``) is one plain pass."""
        return self.flip or bool(self.scales)

    @property
    def num_views(self) -> int:
        """Forward passes per image."""
        return max(1, len(self.scales)) * (2 if self.flip else 1)

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
            if kind not in ("flip", "pyramid", "merge") or (kind == "flip") != (part == "flip"):
                raise ValueError(f"TTA setting {text!r}: unknown part {part!r}; expected {GRAMMAR}")
            if kind in seen:
                raise ValueError(f"TTA setting {text!r}: {kind!r} given twice")
            seen[kind] = part[len(kind) + 1 :]
        try:
            scales = tuple(InputScale.parse(s) for s in seen["pyramid"].split(",")) if "pyramid" in seen else ()
            return cls(flip="flip" in seen, scales=scales, merge=seen.get("merge", "vote"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"TTA setting {text!r}: {exc}") from None

    def __str__(self) -> str:
        parts = ["flip"] if self.flip else []
        if self.scales:
            parts.append("pyramid:" + ",".join(map(str, self.scales)))
        if self.merge != "vote":
            parts.append(f"merge:{self.merge}")
        return "+".join(parts) or "none"


def detect_with_tta(images: Sequence[Image], tta: TTA, view_candidates: ViewCandidates, settings: MergeSettings) -> list[Detections]:
    """Detection with test-time augmentation; one :class:`Detections` per image, in
    original-image pixels, one detection per face.

    ``view_candidates`` runs the views (the detector's network, batches and score threshold);
    ``settings`` gives the NMS IoU (also the voting threshold), keep-top-k (after merging), the
    base scale and clipping. Voting votes the landmarks too: against an independent view's
    landmarks they err less than the top member's (``benchmarks/bench_tta.py``).
    """
    results = []
    for image, (boxes, scores, landmarks) in zip(images, _all_views(images, tta, view_candidates, settings)):
        if tta.merge == "vote":
            boxes, scores, landmarks = box_vote(boxes, scores, landmarks, settings.nms_iou)
        else:
            keep = nms(boxes, scores, settings.nms_iou, settings.score_threshold)
            boxes, scores, landmarks = boxes[keep], scores[keep], landmarks[keep]
        keep_top_k = settings.keep_top_k
        boxes, scores, landmarks = boxes[:keep_top_k], scores[:keep_top_k], landmarks[:keep_top_k]
        if settings.clip:
            boxes, landmarks = clip_points(boxes, landmarks, (int(image.shape[0]), int(image.shape[1])))
        results.append(
            Detections(
                boxes=np.ascontiguousarray(boxes, dtype=np.float32),
                scores=np.ascontiguousarray(scores, dtype=np.float32),
                landmarks=np.ascontiguousarray(landmarks, dtype=np.float32),
            )
        )
    return results


def mirrored(image: Image) -> Image:
    """The image mirrored left-right, as a contiguous array or tensor on its device."""
    if isinstance(image, torch.Tensor):
        return image.flip(1)
    return np.ascontiguousarray(image[:, ::-1])


def _all_views(
    images: Sequence[Image], tta: TTA, view_candidates: ViewCandidates, settings: MergeSettings
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image, the candidates of all its views, before any NMS, in original-image pixels:
    (M, 4) x1, y1, x2, y2 boxes, (M,) scores, (M, 5, 2) landmarks (left/right as seen in the
    original image), views one after the other."""
    for i, image in enumerate(images):
        validate_image(image, i)
    count = len(images)
    # Mirrored copies go after the originals, index i + count for image i: same input shape, so
    # they share batches with their originals.
    views = list(images) + ([mirrored(image) for image in images] if tta.flip else [])
    found: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in images]
    for scale in tta.scales or (InputScale.parse(settings.scale),):
        for index, (boxes, scores, landmarks) in enumerate(view_candidates(views, scale)):
            source = index % count
            if index >= count:
                boxes, landmarks = mirror_points(boxes, landmarks, int(images[source].shape[1]))
            found[source].append((boxes, scores, landmarks))
    return [tuple(np.concatenate(arrays) for arrays in zip(*parts)) for parts in found]  # type: ignore[misc]


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
