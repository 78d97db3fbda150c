"""From raw head outputs to detections: top-k, decoding, NMS, mapping back to image pixels.

Everything before NMS runs on the whole batch at once on the model's device, in float32
whatever the network's dtype, and comes back in one transfer; only the per-image NMS
(OpenCV's C++ implementation) runs per image, never per box in Python.
"""

from __future__ import annotations

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
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass
class Candidates:
    """The top-k anchors of every image of a group, decoded to original-image pixels.

    scores: (n, k); boxes: (n, k, 4); landmarks: (n, k, 5, 2); all sorted by descending score.
    """

    scores: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray


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
        output: raw outputs for n images of one padded input size.
        priors: (A, 4) anchors for that input size.
        input_size: (height, width) of the padded network input in pixels.
        scales: (n, 2) (sx, sy) resize factors from original image to network input.

    Rows hold k = min(top_k, most anchors above the threshold in any image) candidates; an
    image with fewer has its tail below the threshold, which :func:`select` drops.
    """
    logits = output.logits.float()
    # The face column of a 2-way softmax, as a sigmoid of the logit difference: softmax over
    # an innermost axis of length 2 is a slow path (0.65 ms for 16,800 anchors, against 0.02).
    probs = torch.sigmoid(logits[..., 1] - logits[..., 0])
    # Sorting only as many anchors as pass the threshold keeps top-k cheap: at a display
    # threshold a few dozen of the 16,800 anchors of a 640x640 input pass.
    k = min(top_k, int((probs > score_threshold).sum(dim=1).max()))
    scores, index = probs.topk(k, dim=1)
    gather4 = index.unsqueeze(-1).expand(-1, -1, 4)
    box_offsets = output.boxes.float().gather(1, gather4)
    landmark_offsets = output.landmarks.float().gather(1, index.unsqueeze(-1).expand(-1, -1, 10))
    anchors = priors[index]
    height, width = input_size
    # Input pixels -> original pixels, per axis, since rounding makes sx and sy differ slightly.
    to_pixels = torch.tensor(
        [[width / sx, height / sy] for sx, sy in scales], dtype=torch.float32, device=probs.device
    ).view(-1, 1, 1, 2)
    boxes = decode_boxes(box_offsets, anchors, variances).view(*index.shape, 2, 2) * to_pixels
    landmarks = decode_landmarks(landmark_offsets, anchors, variances) * to_pixels
    # One transfer back for the whole batch: on a GPU each .cpu() is a synchronisation.
    host = torch.cat([scores.unsqueeze(-1), boxes.reshape(*index.shape, 4), landmarks.reshape(*index.shape, 10)], dim=-1).cpu().numpy()
    return Candidates(
        scores=host[..., 0],
        boxes=host[..., 1:5],
        landmarks=host[..., 5:].reshape(*index.shape, 5, 2),
    )


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
    keep = cv2.dnn.NMSBoxes(rects, scores.astype(np.float32), float(score_threshold), float(iou_threshold))
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def select(
    candidates: Candidates,
    row: int,
    score_threshold: float,
    nms_iou: float,
    keep_top_k: int,
    clip_to: tuple[int, int] | None = None,
) -> Detections:
    """Final detections of image ``row`` of a group; ``clip_to`` = (height, width) clips to the image."""
    scores = candidates.scores[row]
    valid = int(np.count_nonzero(scores > score_threshold))
    if valid == 0:
        return Detections.empty()
    boxes = candidates.boxes[row, :valid]
    keep = nms(boxes, scores[:valid], nms_iou, score_threshold)[:keep_top_k]
    boxes = boxes[keep]
    landmarks = candidates.landmarks[row, keep]
    if clip_to is not None:
        boxes, landmarks = clip_points(boxes, landmarks, clip_to)
    return Detections(
        boxes=np.ascontiguousarray(boxes, dtype=np.float32),
        scores=np.ascontiguousarray(scores[keep], dtype=np.float32),
        landmarks=np.ascontiguousarray(landmarks, dtype=np.float32),
    )


def clip_points(boxes: np.ndarray, landmarks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) boxes and (N, 5, 2) landmarks clipped to an image of ``size`` = (height, width) pixels."""
    height, width = size
    limit = np.array([width, height], dtype=np.float32)
    return np.clip(boxes.reshape(-1, 2, 2), 0, limit).reshape(-1, 4), np.clip(landmarks, 0, limit)
