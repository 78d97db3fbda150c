"""WIDER FACE AP and speed of test-time augmentation settings on the shared val images.

    RETINAFACE_WEIGHTS_DIR=../shared/weights python benchmarks/bench_tta.py \
        [--weights NAME|PATH] [--scale long:640] [--tta SETTING ...] [--repeats 3] [--no-landmarks]

For single scale (``none``) and each TTA setting (see :mod:`retinaface_core.tta`), runs the
detector at the evaluation settings of ``jobs.evaluate`` (score threshold 0.02, top-k 5000,
NMS 0.4, keep 750) over the WIDER val images in ``../shared/widerface/val/images`` one image
at a time, scores them with the official protocol in subset mode (only the images present
count) and prints a Markdown table: AP per level, and images/s (decoded images in, results
out; the best of ``--repeats`` timed passes after the untimed one that gives the AP, since
other load on a shared machine only ever slows a pass down). ``--scale`` is the base scale:
that of single scale and of settings without a pyramid.

Then, on the two crowd photos, the landmark error of voted landmarks against the top member's
(:func:`landmark_errors`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np

from retinaface_core import Detections, Detector, load_weights
from retinaface_core.augment import mirror_points
from retinaface_core.evaluation import box_iou_plus_one, evaluate
from retinaface_core.tta import TTA, box_vote, view_candidates
from retinaface_core.weights import LoadedWeights
from retinaface_core.widerface import read_ground_truth_mat, submission_rows

SHARED = Path(os.environ.get("RETINAFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETTINGS = (
    "none",
    "flip",
    "flip+merge:nms",
    "pyramid:original,long:640,long:832+merge:nms",
    "pyramid:original,long:640,long:832",
    "pyramid:long:640,long:1024,long:1600+merge:nms",
    "pyramid:long:640,long:1024,long:1600",
    "flip+pyramid:long:640,long:1024,long:1600+merge:nms",
    "flip+pyramid:long:640,long:1024,long:1600",
    "flip+pyramid:long:320,long:640,long:1024,long:1600",
)
CROWD_PHOTOS = ("crowd_selfie.jpg", "crowd_baseball.jpg")


def val_images() -> dict[str, np.ndarray]:
    """``EVENT/NAME`` -> decoded image, for every shared WIDER val image."""
    root = SHARED / "widerface/val/images"
    paths = sorted(root.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no WIDER val images under {root} (set RETINAFACE_SHARED)")
    return {f"{p.parent.name}/{p.stem}": cv2.imread(str(p)) for p in paths}


def predict(detector: Detector, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Predictions in the protocol's (N, 5) layout per image, one image at a time."""
    predictions = {}
    for name, image in images.items():
        faces = detector.detect(image)[0]
        predictions[name] = submission_rows(faces.boxes, faces.scores)
    return predictions


def speeds(detectors: list[Detector], images: dict[str, np.ndarray], rounds: int) -> list[float]:
    """Images/s of each detector: the best of ``rounds`` passes, the detectors taking turns
    within each round, so that a burst of other load on a shared machine slows one pass of
    each rather than every pass of one."""
    best = [0.0] * len(detectors)
    for _ in range(rounds):
        for i, detector in enumerate(detectors):
            start = time.perf_counter()
            predict(detector, images)
            best[i] = max(best[i], len(images) / (time.perf_counter() - start))
    return best


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
    flip_candidates = view_candidates(detector, [image], TTA(flip=True))[0]
    mirror_candidates = view_candidates(detector, [mirrored], TTA())[0]
    errors = {}
    for vote in (True, False):
        boxes, _, landmarks = box_vote(*flip_candidates, detector.nms_iou, vote_landmarks=vote)
        errors[f"flip, {'vote' if vote else 'top'}"] = normalised_errors(boxes, landmarks, reference)
    for vote in (True, False):
        boxes, _, landmarks = box_vote(*mirror_candidates, detector.nms_iou, vote_landmarks=vote)
        boxes, landmarks = mirror_points(boxes, landmarks, image.shape[1])
        errors[f"mirror view, {'vote' if vote else 'top'}"] = normalised_errors(boxes, landmarks, reference)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="mobilenet0.25-1mb", help="checkpoint name or path")
    parser.add_argument("--scale", default="long:640", help="base scale: single scale, and TTA settings without a pyramid")
    parser.add_argument("--tta", nargs="+", default=SETTINGS, help="settings to measure ('none' = single scale)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the best counts")
    parser.add_argument("--no-landmarks", action="store_true", help="skip the landmark measurement")
    args = parser.parse_args()
    weights = load_weights(args.weights)
    gt = read_ground_truth_mat(str(SHARED / "widerface/ground_truth"))
    images = val_images()
    print(f"{weights.name} (sha256 {weights.sha256[:12]}), base scale {args.scale}, {len(images)} WIDER val images, subset mode\n")
    detectors, aps = [], []
    for setting in args.tta:
        detector = Detector(weights, scale=args.scale, score_threshold=0.02, top_k=5000, nms_iou=0.4, keep_top_k=750, tta=setting)
        detectors.append(detector)
        aps.append(evaluate(predict(detector, images), gt, subset=True).ap)  # also the warm-up
    print("| TTA | views/image | Easy | Medium | Hard | img/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for setting, detector, ap, speed in zip(args.tta, detectors, aps, speeds(detectors, images, args.repeats)):
        views = detector.tta.num_views
        print(f"| `{setting}` | {views} | {100 * ap['easy']:.1f} | {100 * ap['medium']:.1f} | {100 * ap['hard']:.1f} | {speed:.2f} |")
    if args.no_landmarks:
        return
    print("\nLandmark error (mean distance / face width) against the reference's landmarks, faces at score >= 0.5:\n")
    print("| photo | measure | faces | mean | median |")
    print("| --- | --- | ---: | ---: | ---: |")
    for photo in CROWD_PHOTOS:
        for measure, errors in landmark_errors(weights, cv2.imread(str(SHARED / "images" / photo))).items():
            print(f"| {photo} | {measure} | {len(errors)} | {errors.mean():.4f} | {np.median(errors):.4f} |", flush=True)


if __name__ == "__main__":
    main()
