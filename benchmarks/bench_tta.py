"""WIDER FACE AP and pixel cost of test-time augmentation settings, on photos of three size bands.

    RETINAFACE_WEIGHTS_DIR=../shared/weights python benchmarks/bench_tta.py \\
        [--weights NAME|PATH] [--scale original] [--tta SETTING ...] [--bands 400 as-is 2000] \\
        [--repeats 0] [--no-landmarks]

Bands, made from the 12 WIDER val images in ``../shared/widerface/val/images`` (1,024 px wide):
the images as they are (``as-is``), and the same resized so that their long side is N pixels
(``N``: cv2.INTER_AREA to reduce, INTER_LINEAR to enlarge), with the ground truth boxes scaled
alike. In each band, one plain pass at the base scale ``--scale`` and each TTA setting (see
:mod:`retinaface_core.tta`) run at the evaluation settings of ``jobs.evaluate`` (score threshold
0.02, top-k 5000, NMS 0.4, keep 750), one photo at a time, and are scored with the official
protocol in subset mode (only the images present count). Each band prints a Markdown table:
views per photo, the pixels the network computed relative to the plain pass and in megapixels
per photo (image content, without padding), AP per level and its gain over the plain pass, and with ``--repeats N``
images/s (the best of N timed passes after the one that gives the AP, since other load on a
shared machine only ever slows a pass down).

Then, on the two crowd photos, the landmark error of voted landmarks against the top member's
(:func:`landmark_errors`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from retinaface_core import Detections, Detector, load_weights
from retinaface_core.augment import mirror_points
from retinaface_core.evaluation import box_iou_plus_one, evaluate
from retinaface_core.tta import TTA, box_vote, pooled_candidates
from retinaface_core.weights import LoadedWeights
from retinaface_core.widerface import WiderValGroundTruth, read_ground_truth_mat, submission_rows

SHARED = Path(os.environ.get("RETINAFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETTINGS = (
    "flip",
    "flip+pyramid:long:640,long:1024,long:1600+sizes:all",
    "flip+pyramid:long:640,long:1024,long:1600",
    "pyramid:long:640,long:1024,long:1600",
    "pyramid:auto",
    "flip+pyramid:auto",
)
BANDS = ("400", "as-is", "2000")
CROWD_PHOTOS = ("crowd_selfie.jpg", "crowd_baseball.jpg")


@dataclass
class Band:
    """Photos of one size band, by ``EVENT/NAME``, and the ground truth scaled to them."""

    name: str
    images: dict[str, np.ndarray]
    gt: WiderValGroundTruth


def val_images() -> dict[str, np.ndarray]:
    """``EVENT/NAME`` -> decoded image, for every shared WIDER val image."""
    root = SHARED / "widerface/val/images"
    paths = sorted(root.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no WIDER val images under {root} (set RETINAFACE_SHARED)")
    return {f"{p.parent.name}/{p.stem}": cv2.imread(str(p)) for p in paths}


def make_band(name: str, images: dict[str, np.ndarray], gt: WiderValGroundTruth) -> Band:
    """The band ``name`` (``as-is`` or a long side in pixels) of ``images``, with its ground truth."""
    gt = gt.subset(images)
    if name == "as-is":
        return Band(name, images, gt)
    long_side = int(name)
    resized, boxes = {}, {}
    for key, image in images.items():
        height, width = image.shape[:2]
        factor = long_side / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        resized[key] = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        sx, sy = size[0] / width, size[1] / height
        boxes[key] = gt.boxes[key] * np.array([sx, sy, sx, sy])
    return Band(f"{long_side} px", resized, WiderValGroundTruth(boxes=boxes, counts=gt.counts))


def predict(detector: Detector, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Predictions in the protocol's (N, 5) layout per image, one image at a time."""
    predictions = {}
    for name, image in images.items():
        faces = detector.detect(image)[0]
        predictions[name] = submission_rows(faces.boxes, faces.scores)
    return predictions


@dataclass
class Row:
    setting: str
    ap: dict[str, float]
    views: float
    pixels: int
    speed: float = float("nan")


def measure(detector: Detector, setting: str, band: Band) -> Row:
    """AP of ``detector`` on ``band``, with the views per photo and the pixels it computed."""
    before = replace(detector.stats)
    ap = evaluate(predict(detector, band.images), band.gt, subset=True).ap
    work = detector.stats - before
    return Row(setting, ap, work.images / len(band.images), work.content_pixels)


def best_speed(detector: Detector, images: dict[str, np.ndarray], rounds: int) -> float:
    """Images/s: the best of ``rounds`` passes."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        predict(detector, images)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def print_band(band: Band, rows: list[Row], timed: bool) -> None:
    plain = rows[0]
    faces = {level: band.gt.num_faces(level) for level in ("easy", "medium", "hard")}
    print(f"\n{band.name} ({len(band.images)} photos; {faces['easy']} Easy, {faces['medium']} Medium, {faces['hard']} Hard faces)\n")
    print("| TTA | views/photo | pixels | MP/photo | Easy | Medium | Hard | gain Easy / Medium / Hard |" + (" img/s |" if timed else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |" + (" ---: |" if timed else ""))
    for row in rows:
        ap = [100 * row.ap[level] for level in ("easy", "medium", "hard")]
        gain = " / ".join(f"{100 * (row.ap[level] - plain.ap[level]):+.1f}" for level in ("easy", "medium", "hard"))
        speed = f" {row.speed:.2f} |" if timed else ""
        megapixels = row.pixels / len(band.images) / 1e6
        cells = f"{row.views:g} | {row.pixels / plain.pixels:.1f}x | {megapixels:.2f} | {ap[0]:.1f} | {ap[1]:.1f} | {ap[2]:.1f}"
        print(f"| `{row.setting}` | {cells} | {gain} |{speed}", flush=True)


def normalised_errors(boxes: np.ndarray, landmarks: np.ndarray, reference: Detections) -> np.ndarray:
    """Mean distance of the five landmarks to those of the reference face each box matches
    (IoU >= 0.5), over that face's box width; one value per matched box."""
    iou = box_iou_plus_one(boxes, reference.boxes)
    match = iou.argmax(axis=1)
    matched = iou[np.arange(len(boxes)), match] >= 0.5
    ref_boxes, ref_points = reference.boxes[match[matched]], reference.landmarks[match[matched]]
    distance = np.linalg.norm(landmarks[matched] - ref_points, axis=2).mean(axis=1)
    return distance / (ref_boxes[:, 2] - ref_boxes[:, 0])


def landmark_errors(weights: LoadedWeights, image: np.ndarray) -> dict[str, np.ndarray]:
    """Landmark error (:func:`normalised_errors`) of box voting's two landmark choices, at the
    image's own size, against the reference's own landmarks there (the plain detector, equal to
    the reference's detect loop: ``tests/test_reference_parity.py``), at score >= 0.5.

    ``flip``: the flip setting, whose views include the reference's own, so the top member's
    landmarks are often exactly the reference's. ``mirror view``: only the mirrored image's
    view, mapped back: an estimate independent of the reference's view, so it measures which
    choice is less noisy rather than which repeats the reference.
    """
    detector = Detector(weights, score_threshold=0.5)
    reference = detector.detect(image)[0]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    anchors = detector.config.min_sizes
    flip_candidates = pooled_candidates([image], TTA(flip=True), detector.view_candidates, detector.scale, anchors)[0]
    mirror_candidates = pooled_candidates([mirrored], TTA(), detector.view_candidates, detector.scale, anchors)[0]
    errors = {}
    for vote in (True, False):
        boxes, _, landmarks = box_vote(*flip_candidates, detector.settings.nms_iou, vote_landmarks=vote)
        errors[f"flip, {'vote' if vote else 'top'}"] = normalised_errors(boxes, landmarks, reference)
    for vote in (True, False):
        boxes, _, landmarks = box_vote(*mirror_candidates, detector.settings.nms_iou, vote_landmarks=vote)
        boxes, landmarks = mirror_points(boxes, landmarks, image.shape[1])
        errors[f"mirror view, {'vote' if vote else 'top'}"] = normalised_errors(boxes, landmarks, reference)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="mobilenet0.25-1mb", help="checkpoint name or path")
    parser.add_argument("--scale", default="original", help="base scale: the plain pass, and TTA settings without a pyramid")
    parser.add_argument("--tta", nargs="*", default=SETTINGS, help="settings to measure besides the plain pass (none: the plain pass only)")
    parser.add_argument("--bands", nargs="*", default=BANDS, help="'as-is' and/or long sides in pixels (none: landmarks only)")
    parser.add_argument("--repeats", type=int, default=0, help="timed passes per setting for img/s (0: no timing)")
    parser.add_argument("--no-landmarks", action="store_true", help="skip the landmark measurement")
    args = parser.parse_args()
    weights = load_weights(args.weights)
    gt = read_ground_truth_mat(str(SHARED / "widerface/ground_truth"))
    images = val_images()
    print(f"{weights.name} (sha256 {weights.sha256[:12]}), base scale {args.scale}, WIDER val images, subset mode")
    settings = ["none", *args.tta]
    detectors = [
        Detector(weights, scale=args.scale, score_threshold=0.02, top_k=5000, nms_iou=0.4, keep_top_k=750, tta=setting)
        for setting in settings
    ]
    for name in args.bands:
        band = make_band(name, images, gt)
        rows = [measure(detector, setting, band) for setting, detector in zip(settings, detectors)]
        for row, detector in zip(rows, detectors):
            row.speed = best_speed(detector, band.images, args.repeats) if args.repeats else float("nan")
        print_band(band, rows, bool(args.repeats))
    if args.no_landmarks:
        return
    print("\nLandmark error (mean distance / face width) against the reference's landmarks, faces at score >= 0.5:\n")
    print("| photo | measure | faces | mean | median |")
    print("| --- | --- | ---: | ---: | ---: |")
    for photo in CROWD_PHOTOS:
        for measure_name, errors in landmark_errors(weights, cv2.imread(str(SHARED / "images" / photo))).items():
            print(f"| {photo} | {measure_name} | {len(errors)} | {errors.mean():.4f} | {np.median(errors):.4f} |", flush=True)


if __name__ == "__main__":
    main()
