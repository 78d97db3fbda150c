"""The RetinaFace multi-task training loss: anchor matching, hard negative mining, smooth-L1 heads.

Follows the reference training code (biubug6/Pytorch_Retinaface ``layers/modules/multibox_loss.py``
and ``utils/box_utils.match``) and the paper's multi-task loss::

    L = L_cls + λ1 · L_box + λ2 · L_landmark

Conventions: anchors are (A, 4) (cx, cy, w, h) and ground-truth boxes (x1, y1, x2, y2), all
normalised by the network input's width and height (see :mod:`box_coding`). A batch of ground
truth is padded to the largest face count ``G`` of the batch; ``valid`` marks the real rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_coding import box_convert, box_iou, encode_boxes, encode_landmarks
from .model import RetinaFaceOutput

# Matching builds a (B, G, A) IoU tensor; above this many elements it runs a few images at a
# time, since a crowd crop keeps many faces against every anchor of the training size.
_MATCH_CHUNK_ELEMENTS = 1 << 23


@dataclass
class FaceTargets:
    """Padded ground truth of a batch, in normalised input coordinates.

    boxes: (B, G, 4) float32 (x1, y1, x2, y2).
    landmarks: (B, G, 5, 2) float32 (x, y) of left eye, right eye, nose, left and right mouth
        corner; only meaningful where ``has_landmarks``.
    has_landmarks: (B, G) bool, faces annotated with landmarks.
    valid: (B, G) bool, real faces (False on padding rows).
    """

    boxes: Tensor
    landmarks: Tensor
    has_landmarks: Tensor
    valid: Tensor

    def to(self, device: torch.device | str) -> FaceTargets:
        return FaceTargets(*(t.to(device) for t in (self.boxes, self.landmarks, self.has_landmarks, self.valid)))


class AnchorMatch(NamedTuple):
    """Per-anchor assignment of a batch.

    gt_index: (B, A) long, index into the G ground-truth rows of the anchor's best face.
    positive: (B, A) bool, anchors trained as faces (IoU >= threshold, or forced best anchor).
    """

    gt_index: Tensor
    positive: Tensor


class LossComponents(NamedTuple):
    """The loss of one batch: ``total`` = cls + box_weight * box + landmark_weight * landmark.

    cls, box and landmark are the unweighted terms, each normalised by its number of positive
    anchors; num_pos is the number of positive anchors in the batch (a 0-dim long tensor).
    """

    total: Tensor
    cls: Tensor
    box: Tensor
    landmark: Tensor
    num_pos: Tensor


def match_anchors(
    boxes: Tensor,
    valid: Tensor,
    priors: Tensor,
    iou_threshold: float = 0.35,
    force_min_iou: float = 0.2,
) -> AnchorMatch:
    """Assign each anchor to a ground-truth face, as the reference ``match`` does.

    An anchor is positive when its IoU with some face is >= ``iou_threshold``; it takes the
    face it overlaps most. In addition every face is forced onto its best-overlapping anchor
    (so small or oddly shaped faces still get trained), unless even that IoU is below
    ``force_min_iou``: such faces cannot be regressed from any anchor and are ignored. When
    two faces force the same anchor the later face wins, like the reference loop.

    Args:
        boxes: (B, G, 4) ground truth (x1, y1, x2, y2), normalised.
        valid: (B, G) bool; padding rows and boxes without area never match.
        priors: (A, 4) anchors (cx, cy, w, h), normalised.
    """
    batch, faces = valid.shape
    num_anchors = priors.shape[0]
    if faces == 0:
        zeros = torch.zeros(batch, num_anchors, dtype=torch.long, device=priors.device)
        return AnchorMatch(zeros, zeros.bool())
    chunk = max(1, _MATCH_CHUNK_ELEMENTS // (faces * num_anchors))
    parts = [
        _match_chunk(boxes[i : i + chunk], valid[i : i + chunk], box_convert(priors, "cxcywh", "xyxy"), iou_threshold, force_min_iou)
        for i in range(0, batch, chunk)
    ]
    return AnchorMatch(torch.cat([p.gt_index for p in parts]), torch.cat([p.positive for p in parts]))


def _match_chunk(boxes: Tensor, valid: Tensor, anchors: Tensor, iou_threshold: float, force_min_iou: float) -> AnchorMatch:
    usable = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    overlaps = box_iou(boxes, anchors).masked_fill(~usable[..., None], -1.0)  # (b, G, A)
    best_anchor_iou, best_anchor = overlaps.max(dim=2)  # (b, G)
    best_gt_iou, best_gt = overlaps.max(dim=1)  # (b, A)
    forced = usable & (best_anchor_iou >= force_min_iou)
    gt_ids = torch.arange(boxes.shape[1], device=boxes.device).expand_as(best_anchor)
    # Highest forcing face index per anchor (-1 where no face forces it): "later face wins".
    forcing_gt = torch.full_like(best_gt, -1).scatter_reduce(
        1, best_anchor, torch.where(forced, gt_ids, -1), reduce="amax", include_self=True
    )
    is_forced = forcing_gt >= 0
    gt_index = torch.where(is_forced, forcing_gt, best_gt)
    positive = is_forced | (best_gt_iou >= iou_threshold)
    return AnchorMatch(gt_index, positive)


def hard_negative_mask(cls_loss: Tensor, positive: Tensor, neg_pos_ratio: float) -> Tensor:
    """Online hard example mining: per image, the ``neg_pos_ratio * num_pos`` negatives with the
    highest classification loss (at most all the negatives there are).

    Args:
        cls_loss: (B, A) per-anchor loss of classifying the anchor as background.
        positive: (B, A) bool.
    Returns:
        (B, A) bool mask of the selected negatives (never overlapping ``positive``).
    """
    ranked_loss = cls_loss.masked_fill(positive, float("-inf"))
    order = ranked_loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = torch.minimum((neg_pos_ratio * num_pos).long(), (~positive).sum(dim=1, keepdim=True))
    return rank < num_neg


def multibox_loss(
    output: RetinaFaceOutput,
    targets: FaceTargets,
    priors: Tensor,
    variances: tuple[float, float],
    *,
    iou_threshold: float = 0.35,
    neg_pos_ratio: float = 3.0,
    box_weight: float = 2.0,
    landmark_weight: float = 1.0,
) -> LossComponents:
    """The RetinaFace multi-task loss of one batch.

    Classification: 2-way softmax cross-entropy over the positive anchors and the hardest
    ``neg_pos_ratio`` x as many negatives, normalised by the number of positives. Boxes:
    smooth-L1 on the variance-encoded offsets of positive anchors. Landmarks: smooth-L1 on
    positive anchors whose face has landmarks, normalised by their number.

    Args:
        output: (B, A, ...) raw head outputs.
        targets: padded ground truth of the B images (normalised coordinates).
        priors: (A, 4) anchors for the input size.
    """
    match = match_anchors(targets.boxes, targets.valid, priors, iou_threshold)
    positive = match.positive
    batch_index = torch.arange(positive.shape[0], device=positive.device)[:, None].expand_as(positive)
    pos_batch, pos_anchor = batch_index[positive], positive.nonzero()[:, 1]
    pos_gt = match.gt_index[positive]
    pos_priors = priors[pos_anchor]
    num_pos = positive.sum()
    denominator = num_pos.clamp(min=1).float()

    box_targets = encode_boxes(targets.boxes[pos_batch, pos_gt], pos_priors, variances)
    box_loss = F.smooth_l1_loss(output.boxes[positive].float(), box_targets, reduction="sum") / denominator

    with_landmarks = targets.has_landmarks[pos_batch, pos_gt]
    landmark_targets = encode_landmarks(
        targets.landmarks[pos_batch[with_landmarks], pos_gt[with_landmarks]], pos_priors[with_landmarks], variances
    )
    landmark_predictions = output.landmarks[positive][with_landmarks].float()
    landmark_loss = F.smooth_l1_loss(landmark_predictions, landmark_targets, reduction="sum") / with_landmarks.sum().clamp(min=1).float()

    logits = output.logits.float()
    with torch.no_grad():
        background_loss = torch.logsumexp(logits, dim=-1) - logits[..., 0]
        negative = hard_negative_mask(background_loss, positive, neg_pos_ratio)
    selected = positive | negative
    cls_loss = F.cross_entropy(logits[selected], positive[selected].long(), reduction="sum") / denominator

    total = cls_loss + box_weight * box_loss + landmark_weight * landmark_loss
    return LossComponents(total, cls_loss, box_loss, landmark_loss, num_pos)
