"""The official WIDER FACE val evaluation, vectorised.

This reproduces, to the last bit of every counted quantity, the widely used
python port of the official MATLAB code (``widerface_evaluate/evaluation.py``
of github.com/biubug6/Pytorch_Retinaface), quirks included:

* Scores are normalised over the whole prediction set, ``(s - lo) / (hi -
  lo)``, where ``lo = min(1, min score)`` and ``hi = max(0, max score)``
  (the port starts its running min at 1 and its max at 0). When ``hi == lo``
  (all scores equal and in [0, 1]) the port divides by zero and scores every
  detection NaN; here every score becomes 1.0 instead.
* Boxes are ``x, y, w, h``, converted with ``x2 = x + w``, and IoU uses the
  +1 pixel convention: width ``x2 - x1 + 1``.
* Each prediction, in the order given (not sorted by score), is assigned to
  the gt face it overlaps most (the first one on ties) if that IoU is >= the
  threshold. A match to an ignore face (not in the level's ``gt_list``)
  removes the prediction from the proposals; a match to an already matched
  face leaves it a proposal without a new true positive (a false positive).
* At each of 1,000 thresholds ``1 - (t + 1) / 1000`` an image contributes
  the counts up to the *last* prediction whose score is >= the threshold;
  for predictions not sorted by descending score this includes lower-scored
  ones before it, as in the port.
* Images whose ground truth or predictions are empty contribute no
  proposals, so detections on images without faces are never false
  positives; their faces still count as misses.
* Precision is ``TP / proposals`` (NaN at thresholds where the whole set has
  no proposal, as in the port), recall ``TP / faces``; AP is VOC AP with the
  precision envelope.

Images of the ground truth that have no entry in the predictions count all
their faces as misses (the port raises KeyError instead), unless
``subset=True`` restricts the evaluation to the predicted images.
Predictions for images not in the ground truth raise ValueError.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .box_coding import box_convert
from .storage import StorageOptions, write_file
from .widerface import LEVELS, WiderValGroundTruth, as_submission_rows

_NUM_THRESHOLDS = 1000
# Same float expression as the port, 1 - (t + 1) / 1000, so the comparisons
# score >= threshold agree bit for bit; decreasing in t.
SCORE_THRESHOLDS: np.ndarray = 1 - np.arange(1, _NUM_THRESHOLDS + 1) / _NUM_THRESHOLDS
_THRESHOLDS_ASCENDING = SCORE_THRESHOLDS[::-1].copy()


@dataclass(frozen=True)
class EvaluationResult:
    """WIDER FACE val AP per level (:data:`LEVELS`).

    Attributes:
        ap: VOC AP per level; NaN for a level with no face in the evaluated images.
        pr_curves: per level ``(precision, recall)``, each float64 (1000,);
            entry t belongs to score threshold :data:`SCORE_THRESHOLDS` [t].
        num_images: images evaluated.
        num_predictions: detections on those images.
        num_faces: faces that count at each level in those images.
    """

    ap: dict[str, float]
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]]
    num_images: int
    num_predictions: int
    num_faces: dict[str, int]


def evaluate(
    predictions: Mapping[str, np.ndarray],
    gt: WiderValGroundTruth,
    *,
    iou_threshold: float = 0.5,
    subset: bool = False,
) -> EvaluationResult:
    """Evaluate detections with the official WIDER FACE protocol.

    Args:
        predictions: per image ``"EVENT/NAME"`` (no extension) an (N, 5)
            array ``x, y, w, h, score`` in pixels, in the detector's order.
        gt: the official ground truth, see
            :func:`~retinaface_core.widerface.read_ground_truth_mat`.
        iou_threshold: a prediction matches a face at IoU >= this.
        subset: evaluate only the images present in ``predictions`` (an
            image present with zero detections still counts its faces as
            misses); by default every ground-truth image is evaluated.
    """
    unknown = predictions.keys() - gt.boxes.keys()
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} images not in the ground truth, e.g. {sorted(unknown)[:3]}")
    normalized = normalize_scores({name: as_submission_rows(name, boxes) for name, boxes in predictions.items()})
    names = [name for name in gt.names if name in normalized] if subset else gt.names

    pr_counts = {level: np.zeros((_NUM_THRESHOLDS, 2), dtype=np.int64) for level in LEVELS}
    for name in names:
        gt_boxes = gt.boxes[name]
        image_predictions = normalized.get(name)
        if image_predictions is None or len(image_predictions) == 0 or len(gt_boxes) == 0:
            continue
        matched = match_predictions(image_predictions[:, :4], gt_boxes, iou_threshold)
        last_index = _last_index_per_threshold(image_predictions[:, 4])
        for level in LEVELS:
            pr_counts[level] += _image_pr_counts(last_index, matched, gt.counts[level][name])

    num_faces = {level: int(sum(int(gt.counts[level][name].sum()) for name in names)) for level in LEVELS}
    pr_curves = {}
    ap = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for level in LEVELS:
            proposals, true_positives = pr_counts[level].T.astype(np.float64)
            precision = true_positives / proposals
            recall = true_positives / num_faces[level]
            pr_curves[level] = (precision, recall)
            ap[level] = voc_ap(recall, precision)
    return EvaluationResult(
        ap=ap,
        pr_curves=pr_curves,
        num_images=len(names),
        num_predictions=sum(len(normalized.get(name, ())) for name in names),
        num_faces=num_faces,
    )


def normalize_scores(predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of (N, 5) predictions with column 4 min-max normalised over the whole set (see module doc)."""
    scores = [boxes[:, 4] for boxes in predictions.values() if len(boxes)]
    normalized = {name: np.array(boxes, dtype=np.float64) for name, boxes in predictions.items()}
    if not scores:
        return normalized
    lo = min(1.0, min(float(s.min()) for s in scores))
    hi = max(0.0, max(float(s.max()) for s in scores))
    for boxes in normalized.values():
        boxes[:, 4] = 1.0 if hi == lo else (boxes[:, 4] - lo) / (hi - lo)
    return normalized


def box_iou_plus_one(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (K, 4) ``x1, y1, x2, y2`` boxes with inclusive pixel ends.

    A box covers ``x2 - x1 + 1`` by ``y2 - y1 + 1`` pixels; pairs that do not
    overlap get 0. Returns float64 (N, K), computed in the same order of
    operations as the official Cython ``bbox_overlaps``.
    """
    boxes = boxes.astype(np.float64)[:, None, :]
    query_boxes = query_boxes.astype(np.float64)[None, :, :]
    iw = np.minimum(boxes[..., 2], query_boxes[..., 2]) - np.maximum(boxes[..., 0], query_boxes[..., 0]) + 1
    ih = np.minimum(boxes[..., 3], query_boxes[..., 3]) - np.maximum(boxes[..., 1], query_boxes[..., 1]) + 1
    box_area = (boxes[..., 2] - boxes[..., 0] + 1) * (boxes[..., 3] - boxes[..., 1] + 1)
    query_area = (query_boxes[..., 2] - query_boxes[..., 0] + 1) * (query_boxes[..., 3] - query_boxes[..., 1] + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = iw * ih / (box_area + query_area - iw * ih)
    return np.where((iw > 0) & (ih > 0), iou, 0.0)


def match_predictions(pred_xywh: np.ndarray, gt_xywh: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Index of the gt face each prediction is assigned to, -1 if none.

    ``pred_xywh`` (N, 4) and ``gt_xywh`` (K >= 1, 4) are ``x, y, w, h``. Each
    prediction takes its highest-IoU face (the first on ties) when that IoU is
    >= ``iou_threshold``, whether or not another prediction took it already.
    Returns int64 (N,).
    """
    iou = box_iou_plus_one(
        box_convert(pred_xywh.astype(np.float64), "xywh", "xyxy"), box_convert(gt_xywh.astype(np.float64), "xywh", "xyxy")
    )
    best = iou.argmax(axis=1)
    return np.where(iou[np.arange(len(iou)), best] >= iou_threshold, best, -1)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC AP: area under the precision envelope of a curve with ascending recall."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    # Running max from the right; NaN spreads leftwards exactly as in the port's loop.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def format_ap_table(result: EvaluationResult) -> str:
    """A Markdown table of AP and face count per level."""
    rows = ["| level | AP | faces |", "| --- | ---: | ---: |"]
    rows += [f"| {level} | {result.ap[level]:.4f} | {result.num_faces[level]} |" for level in LEVELS]
    rows.append(f"\n{result.num_images} images, {result.num_predictions} predictions")
    return "\n".join(rows)


def plot_pr_curves(result: EvaluationResult, path_or_uri: str, storage: StorageOptions | None = None) -> None:
    """Write a PNG with the precision-recall curve of each level (needs matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_pr_curves needs matplotlib: pip install matplotlib") from err
    # A bare Figure needs no pyplot backend, so this works headless and leaves global state alone.
    figure = Figure(figsize=(6, 5))
    axes = figure.subplots()
    for level in LEVELS:
        precision, recall = result.pr_curves[level]
        axes.plot(recall, precision, label=f"{level}: AP {result.ap[level]:.4f}")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="WIDER FACE val")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    write_file(path_or_uri, png.getvalue(), storage)


def _last_index_per_threshold(scores: np.ndarray) -> np.ndarray:
    """The port's ``r_index``: per threshold, the last prediction scored >= it, -1 if none. int64 (1000,)."""
    # Prediction i is counted from threshold first_t[i] on (thresholds decrease with t).
    first_t = _NUM_THRESHOLDS - np.searchsorted(_THRESHOLDS_ASCENDING, scores, side="right")
    order = np.argsort(first_t, kind="stable")
    last_so_far = np.maximum.accumulate(order)
    num_counted = np.searchsorted(first_t[order], np.arange(_NUM_THRESHOLDS), side="right")
    return np.where(num_counted > 0, last_so_far[np.maximum(num_counted - 1, 0)], -1)


def _image_pr_counts(last_index: np.ndarray, matched: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per threshold (proposals, true positives) of one image at one level; int64 (1000, 2).

    ``matched`` (N,) from :func:`match_predictions`, ``counts`` (K,) the
    level's mask of faces that count.
    """
    on_face = matched >= 0
    on_counted = on_face & counts[np.maximum(matched, 0)]
    proposals = np.cumsum(~(on_face & ~on_counted))
    # A face raises the recall once, at the first prediction matched to it.
    hits = np.flatnonzero(on_counted)
    _, first_hit = np.unique(matched[hits], return_index=True)
    new_face = np.zeros(len(matched), dtype=np.int64)
    new_face[hits[first_hit]] = 1
    true_positives = np.cumsum(new_face)
    index = np.maximum(last_index, 0)
    counted = last_index >= 0
    return np.stack([np.where(counted, proposals[index], 0), np.where(counted, true_positives[index], 0)], axis=1)
