"""How well each per-face quality score separates WIDER FACE's human attribute labels (ROC AUC).

Detects faces (score >= 0.3, the checkpoint at original size) on images that have WIDER FACE
``bbx_gt`` labels, matches them one-to-one to the labelled faces (IoU >= 0.4, highest score
first; faces labelled ``invalid`` are left out), then prints, per label, the ROC AUC of every
score for telling the label's good class from its bad one (1 = perfect, 0.5 = chance, < 0.5 =
inverted), with the number of faces in each class. With ``--folds K`` it also prints the AUCs
of a composite refitted K times, each time scored on the images it was not fitted on
(``benchmarks/fit_quality.py``).

Usage (from the repository root)::

    RETINAFACE_WEIGHTS_DIR=../shared/weights python -m benchmarks.quality_auc \
        [--images DIR] [--gt FILE] [--downscale F] [--folds K]

DIR defaults to ``$RETINAFACE_SHARED/widerface/val/images`` (else ``../shared/...``), FILE to
the val ``wider_face_val_bbx_gt.txt`` next to it; every image of the labels found under DIR as
``EVENT/NAME.jpg`` is used. ``--downscale F`` shrinks every image by F (area averaging) before
detection, the way a smaller copy of the same photo would arrive.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import rankdata

from retinaface_core import Detector
from retinaface_core.evaluation import box_iou_plus_one
from retinaface_core.image_io import read_image
from retinaface_core.quality import FaceQuality, face_quality
from retinaface_core.widerface import ATTRIBUTE_NAMES, read_bbx_gt

SCORE_THRESHOLD = 0.3
MATCH_IOU = 0.4


@dataclass(frozen=True)
class Label:
    """A WIDER FACE attribute read as good class vs bad class (the middle class of 3-level ones is left out)."""

    attribute: str
    good: int
    bad: int
    description: str


LABELS = (
    Label("blur", 0, 2, "blur: clear (0) vs heavy (2)"),
    Label("pose", 0, 1, "pose: typical vs atypical"),
    Label("illumination", 0, 1, "illumination: normal vs extreme"),
    Label("occlusion", 0, 2, "occlusion: none vs heavy (2)"),
)


@dataclass
class LabelledFaces:
    """Detected faces matched to labelled ones, over all images; N faces.

    image: (N,) int index into ``names``. attributes: (N, 6) int, ``ATTRIBUTE_NAMES`` order.
    scores: (N,) detector scores. quality: the faces' scores, each field (N,).
    """

    names: list[str]
    image: np.ndarray
    attributes: np.ndarray
    scores: np.ndarray
    quality: FaceQuality


def default_shared() -> Path:
    return Path(os.environ.get("RETINAFACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def match_faces(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches of score-sorted detections (N, 4) to labelled boxes (K, 4), x1 y1 x2 y2.

    Greedy, highest score first, each labelled face taken at most once. Returns the matched
    detection and labelled indices, each (M,) int.
    """
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    iou = box_iou_plus_one(det_boxes, gt_boxes)
    det_index, gt_index = [], []
    for i in range(len(det_boxes)):
        row = np.where(np.isin(np.arange(len(gt_boxes)), gt_index), -1.0, iou[i])
        best = int(row.argmax())
        if row[best] >= iou_threshold:
            det_index.append(i)
            gt_index.append(best)
    return np.asarray(det_index, np.int64), np.asarray(gt_index, np.int64)


def labelled_faces(images_dir: Path, gt_file: Path, detector: Detector, downscale: float = 1.0) -> LabelledFaces:
    """Detect, score and match the faces of every labelled image found under ``images_dir``."""
    invalid = ATTRIBUTE_NAMES.index("invalid")
    labelled = [g for g in read_bbx_gt(str(gt_file), degenerate="drop") if (images_dir / g.name).is_file()]
    if not labelled:
        raise SystemExit(f"none of the images labelled in {gt_file} is under {images_dir}")
    per_image = []
    for k, entry in enumerate(labelled):
        image = read_image(str(images_dir / entry.name))
        gt_boxes = entry.boxes
        if downscale != 1.0:
            size = (round(image.shape[1] / downscale), round(image.shape[0] / downscale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            gt_boxes = gt_boxes / downscale
        det = detector.detect(image)[0]
        d, g = match_faces(det.boxes, gt_boxes)
        valid = entry.attributes[g, invalid] == 0
        d, g = d[valid], g[valid]
        q = face_quality(image, det.boxes[d], det.scores[d], det.landmarks[d])
        per_image.append((np.full(len(d), k), entry.attributes[g], det.scores[d], q))
    fields = FaceQuality.__dataclass_fields__
    quality = FaceQuality(**{f: np.concatenate([getattr(p[3], f) for p in per_image]) for f in fields})
    return LabelledFaces(
        names=[g.name for g in labelled],
        image=np.concatenate([p[0] for p in per_image]),
        attributes=np.concatenate([p[1] for p in per_image]),
        scores=np.concatenate([p[2] for p in per_image]),
        quality=quality,
    )


def label_masks(attributes: np.ndarray, label: Label) -> tuple[np.ndarray, np.ndarray]:
    """(good, bad) boolean (N,) masks of ``label`` over (N, 6) attributes."""
    column = attributes[:, ATTRIBUTE_NAMES.index(label.attribute)]
    return column == label.good, column == label.bad


def roc_auc(values: np.ndarray, good: np.ndarray, bad: np.ndarray) -> float:
    """P(value of a random good face > value of a random bad face), ties counted half (Mann-Whitney U)."""
    n_good, n_bad = int(good.sum()), int(bad.sum())
    if n_good == 0 or n_bad == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([values[good], values[bad]]))
    return float((ranks[:n_good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def score_columns(faces: LabelledFaces) -> dict[str, np.ndarray]:
    """The scores compared in the table, each oriented so that higher should mean better: (N,) each."""
    q = faces.quality
    return {
        "detector score": faces.scores,
        "sharpness": q.sharpness,
        "-abs(yaw)": -np.abs(q.yaw),
        "-abs(roll)": -np.abs(q.roll),
        "-abs(pitch)": -np.abs(q.pitch),
        "exposure": q.exposure,
        "contrast": q.contrast,
        "face_size": q.face_size,
        "quality": q.quality,
    }


def auc_table(columns: Mapping[str, np.ndarray], attributes: np.ndarray) -> str:
    """A Markdown table: one row per label (with its class sizes), one column per score."""
    lines = [
        "| label (good vs bad) | faces good / bad | " + " | ".join(columns) + " |",
        "| --- | --- |" + " --- |" * len(columns),
    ]
    for label in LABELS:
        good, bad = label_masks(attributes, label)
        aucs = " | ".join(f"{roc_auc(v, good, bad):.2f}" for v in columns.values())
        lines.append(f"| {label.description} | {int(good.sum())} / {int(bad.sum())} | {aucs} |")
    return "\n".join(lines)


def main() -> None:
    shared = default_shared()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=shared / "widerface/val/images")
    parser.add_argument("--gt", type=Path, default=shared / "widerface/ground_truth/wider_face_val_bbx_gt.txt")
    parser.add_argument("--downscale", type=float, default=1.0)
    parser.add_argument("--folds", type=int, default=0, help="also print held-out AUCs of a composite refitted per fold of images")
    args = parser.parse_args()

    detector = Detector(scale="original", score_threshold=SCORE_THRESHOLD)
    faces = labelled_faces(args.images, args.gt, detector, args.downscale)
    print(f"{len(faces.names)} images, {len(faces.scores)} labelled faces matched (IoU >= {MATCH_IOU}, score >= {SCORE_THRESHOLD})")
    print(auc_table(score_columns(faces), faces.attributes))
    if args.folds:
        from benchmarks.fit_quality import held_out_quality

        print(f"\nquality refitted on {args.folds} folds of images, each fold scored by the model fitted without it:")
        print(auc_table({"quality (held out)": held_out_quality(faces, args.folds)}, faces.attributes))


if __name__ == "__main__":
    main()
