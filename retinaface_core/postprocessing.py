"""From raw head outputs to detections: top-k, decoding, NMS, mapping back to image pixels.

Everything runs on the whole batch at once on the model's device, in float32 whatever the
network's dtype, and the faces stay there (:class:`FaceBatch`) for the per-face work that
follows (quality scores, crops) until one transfer brings a batch's results back. On a CPU the
NMS is OpenCV's C++ implementation per image (the reference's algorithm, cheapest there); on a
GPU a batched form that gives the same faces (:func:`batched_nms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from .box_coding import decode_boxes, decode_landmarks
from .model import RetinaFaceOutput


@dataclass
class Detections:
    """Faces found in one image, in that image's pixel coordinates, by descending score.

    boxes: (N, 4) float32 x1, y1, x2, y2 (not clipped unless asked: a face cut by the
        border legitimately extends past it).
    scores: (N,) float32 face probability.
    landmarks: (N, 5, 2) float32 (x, y) of left eye, right eye, nose tip, left mouth corner,
        right mouth corner, left/right as seen in the image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass
class Candidates:
    """The top-k anchors of every image of a group, decoded to original-image pixels, on the
    network's device.

    scores: (n, k) float32; boxes: (n, k, 4); landmarks: (n, k, 5, 2); each row sorted by
    descending score. A row's tail may lie below the score threshold (see
    :func:`decode_candidates`).
    """

    scores: Tensor
    boxes: Tensor
    landmarks: Tensor


@dataclass
class FaceBatch:
    """The faces of n images, flat, on the device they were found on.

    image_index: (F,) int64, the image (0..n-1) each face belongs to, ascending; within an
        image faces are by descending score. boxes: (F, 4) float32 x1, y1, x2, y2; scores: (F,);
        landmarks: (F, 5, 2); all in the pixels of each face's original image.
    count: n, the number of images (an image may have no face).
    """

    image_index: Tensor
    boxes: Tensor
    scores: Tensor
    landmarks: Tensor
    count: int

    def __len__(self) -> int:
        return len(self.scores)

    def counts(self) -> Tensor:
        """(n,) faces per image."""
        return torch.bincount(self.image_index, minlength=self.count)

    def detections(self) -> list[Detections]:
        """One :class:`Detections` per image, in host memory (one transfer for the batch)."""
        host = torch.cat([self.boxes, self.scores.unsqueeze(1), self.landmarks.reshape(-1, 10)], dim=1).cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(self.counts().cpu().numpy())])
        return [
            Detections(
                boxes=np.ascontiguousarray(host[a:b, :4]),
                scores=np.ascontiguousarray(host[a:b, 4]),
                landmarks=np.ascontiguousarray(host[a:b, 5:].reshape(-1, 5, 2)),
            )
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    @classmethod
    def from_detections(cls, detections: Sequence[Detections], device: torch.device) -> FaceBatch:
        """The faces of per-image :class:`Detections` (e.g. from test-time augmentation) as one batch on ``device``."""
        counts = [len(d) for d in detections]
        flat = [
            np.concatenate(arrays) if detections else np.zeros((0, *shape), np.float32)
            for arrays, shape in (
                ([d.boxes for d in detections], (4,)),
                ([d.scores for d in detections], ()),
                ([d.landmarks for d in detections], (5, 2)),
            )
        ]
        boxes, scores, landmarks = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device) for a in flat)
        index = torch.repeat_interleave(torch.arange(len(detections)), torch.tensor(counts, dtype=torch.long)).to(device)
        return cls(index, boxes, scores, landmarks, len(detections))

    @classmethod
    def merge(cls, parts: Sequence[tuple[FaceBatch, Sequence[int]]], count: int, device: torch.device) -> FaceBatch:
        """One batch of ``count`` images from parts covering some of them: each part's image i
        is image ``positions[i]`` of the result. Faces keep their order within an image."""
        if not parts:
            empty = torch.zeros(0, device=device)
            return cls(empty.long(), empty.view(0, 4), empty, empty.view(0, 5, 2), count)
        index = torch.cat([torch.as_tensor(list(pos), device=b.image_index.device)[b.image_index] for b, pos in parts])
        order = torch.argsort(index, stable=True)
        return cls(
            index[order],
            torch.cat([b.boxes for b, _ in parts])[order],
            torch.cat([b.scores for b, _ in parts])[order],
            torch.cat([b.landmarks for b, _ in parts])[order],
            count,
        )


def decode_candidates(
    output: RetinaFaceOutput,
    priors: Tensor,
    variances: tuple[float, float],
    input_size: tuple[int, int],
    scales: np.ndarray,
    top_k: int,
    score_threshold: float,
) -> Candidates:
    """Keep the ``top_k`` highest-scoring anchors above ``score_threshold`` per image; decode only those.

    Args:
        output: raw outputs for m >= n images of one padded input size; rows past n are blank
            padding of a fixed-size batch and are dropped.
        priors: (A, 4) anchors for that input size.
        input_size: (height, width) of the padded network input in pixels.
        scales: (n, 2) (sx, sy) resize factors from original image to network input.

    Rows hold k = min(top_k, most anchors above the threshold in any image) candidates; an
    image with fewer has its tail below the threshold, which selection drops. Everything stays
    on the network's device, in float32.
    """
    n = len(scales)
    logits = output.logits[:n].float()
    # The face column of a 2-way softmax, as a sigmoid of the logit difference: softmax over
    # an innermost axis of length 2 is a slow path.
    probs = torch.sigmoid(logits[..., 1] - logits[..., 0])
    # Sorting only as many anchors as pass the threshold keeps top-k cheap: at a display
    # threshold a few dozen anchors of an image pass.
    k = min(top_k, int((probs > score_threshold).sum(dim=1).max())) if n else 0
    scores, index = probs.topk(k, dim=1)
    box_offsets = output.boxes[:n].float().gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    landmark_offsets = output.landmarks[:n].float().gather(1, index.unsqueeze(-1).expand(-1, -1, 10))
    anchors = priors[index]
    height, width = input_size
    # Input pixels -> original pixels, per axis, since rounding makes sx and sy differ slightly.
    to_pixels = (
        torch.as_tensor(np.stack([width / scales[:, 0], height / scales[:, 1]], axis=1), dtype=torch.float32)
        .to(probs.device, non_blocking=True)
        .view(-1, 1, 1, 2)
    )
    boxes = decode_boxes(box_offsets, anchors, variances).view(*index.shape, 2, 2) * to_pixels
    landmarks = decode_landmarks(landmark_offsets, anchors, variances) * to_pixels
    return Candidates(scores=scores, boxes=boxes.reshape(*index.shape, 4), landmarks=landmarks)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float) -> np.ndarray:
    """Greedy NMS with the reference's +1 pixel area convention; returns kept indices by descending score.

    Boxes with score <= ``score_threshold`` are dropped first. A box is suppressed when its IoU
    with a kept, higher-scoring box exceeds ``iou_threshold``. Passing width/height as
    ``x2 - x1 + 1`` to OpenCV gives exactly the reference's (x2 - x1 + 1) * (y2 - y1 + 1) areas
    and intersections.
    """
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    rects = np.empty((len(boxes), 4), dtype=np.float64)
    rects[:, :2] = boxes[:, :2]
    rects[:, 2:] = boxes[:, 2:] - boxes[:, :2] + 1
    # OpenCV's stubs ask for sequences; its binding takes arrays, without a copy.
    keep = cv2.dnn.NMSBoxes(rects, scores.astype(np.float32), float(score_threshold), float(iou_threshold))  # type: ignore[arg-type]
    return np.asarray(keep, dtype=np.int64).reshape(-1)


# Elements of one (images, k, k) overlap matrix of batched_nms; more images are done in turns.
_NMS_ELEMENTS = 1 << 26


def batched_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """Greedy NMS of every row at once, on the boxes' device: (n, k, 4), (n, k) -> (n, k) bool keep.

    Each row must be sorted by descending score. The result is exactly greedy NMS with the
    +1 pixel convention of :func:`nms` (up to float rounding of IoUs at the threshold), found
    as the fixed point of "a box is kept unless a kept, better box overlaps it" (Cluster-NMS,
    Zheng et al. 2020): that rule decides box j from the boxes before it alone, so it has one
    fixed point, greedy NMS's, and iterating from "all kept" reaches it after at most as many
    rounds as the longest chain of suppressions, each round one batched matrix product.
    """
    valid = scores > score_threshold
    n, k = valid.shape
    if n == 0 or k == 0:
        return valid
    per_turn = max(1, _NMS_ELEMENTS // (k * k))
    return torch.cat([_cluster_nms(boxes[i : i + per_turn], valid[i : i + per_turn], iou_threshold) for i in range(0, n, per_turn)])


def _cluster_nms(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]) + 1).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]) + 1).clamp_(min=0)
    inter = w * h
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    # over[i, j]: better box i would suppress box j.
    over = ((iou > iou_threshold).triu_(1) & valid[:, None, :]).float()
    keep = valid
    for _ in range(valid.shape[1]):
        suppressed = torch.bmm(keep.float().unsqueeze(1), over).squeeze(1) > 0
        updated = valid & ~suppressed
        if torch.equal(updated, keep):
            break
        keep = updated
    return keep


def nms_keep(candidates: Candidates, iou_threshold: float, score_threshold: float) -> Tensor:
    """(n, k) bool: the candidates that NMS keeps, by :func:`nms` (OpenCV) on a CPU and by
    :func:`batched_nms` elsewhere (one kernel sequence for the whole batch, no transfer)."""
    if candidates.scores.device.type != "cpu":
        return batched_nms(candidates.boxes, candidates.scores, iou_threshold, score_threshold)
    keep = torch.zeros(candidates.scores.shape, dtype=torch.bool)
    scores, boxes = candidates.scores.numpy(), candidates.boxes.numpy()
    for row in range(len(scores)):
        valid = int(np.count_nonzero(scores[row] > score_threshold))
        keep[row, nms(boxes[row, :valid], scores[row, :valid], iou_threshold, score_threshold)] = True
    return keep


def select_faces(
    candidates: Candidates,
    score_threshold: float,
    nms_iou: float,
    keep_top_k: int,
    clip_to: np.ndarray | None = None,
) -> FaceBatch:
    """The final faces of a group's images: NMS, then the best ``keep_top_k`` of each image.

    ``clip_to``: (n, 2) (height, width) of each original image, to clip boxes and landmarks to.
    """
    keep = nms_keep(candidates, nms_iou, score_threshold)
    keep &= keep.cumsum(dim=1) <= keep_top_k
    image_index, column = keep.nonzero(as_tuple=True)
    boxes = candidates.boxes[image_index, column]
    landmarks = candidates.landmarks[image_index, column]
    if clip_to is not None:
        limit = torch.as_tensor(clip_to[:, ::-1].copy(), dtype=torch.float32).to(boxes.device)[image_index]
        boxes = torch.minimum(boxes.view(-1, 2, 2).clamp(min=0), limit[:, None]).view(-1, 4)
        landmarks = torch.minimum(landmarks.clamp(min=0), limit[:, None])
    return FaceBatch(image_index, boxes, candidates.scores[image_index, column], landmarks, len(candidates.scores))


def clip_points(boxes: np.ndarray, landmarks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) boxes and (N, 5, 2) landmarks clipped to an image of ``size`` = (height, width) pixels."""
    height, width = size
    limit = np.array([width, height], dtype=np.float32)
    return np.clip(boxes.reshape(-1, 2, 2), 0, limit).reshape(-1, 4), np.clip(landmarks, 0, limit)
