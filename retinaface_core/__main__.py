"""Command-line face detector: ``python -m retinaface_core IMAGE... [options]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from .detector import Detector
from .image_io import ImageDecodeError, read_image
from .postprocessing import Detections
from .preprocessing import InputScale
from .tta import TTA
from .weights import CheckpointError

_LANDMARK_COLOURS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw(image: np.ndarray, detections: Detections) -> np.ndarray:
    """A copy of ``image`` with boxes, scores and the five landmarks drawn on it."""
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 600))
    for box, score, points in zip(detections.boxes, detections.scores, detections.landmarks):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(canvas, f"{score:.2f}", (x1, max(0, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, (255, 255, 255), thickness)
        for (x, y), colour in zip(points, _LANDMARK_COLOURS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), thickness + 1, colour, -1)
    return canvas


def to_json(path: str, image: np.ndarray, detections: Detections) -> dict:
    return {
        "path": path,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "detections": [
            {"box": box.tolist(), "score": float(score), "landmarks": points.tolist()}
            for box, score, points in zip(detections.boxes, detections.scores, detections.landmarks)
        ],
    }


def _tta_setting(text: str) -> TTA:
    # argparse shows an ArgumentTypeError's own message; a ValueError's would be lost.
    try:
        return TTA.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m retinaface_core", description=__doc__)
    parser.add_argument("images", nargs="+", help="image paths or fsspec URIs")
    parser.add_argument("--weights", default=None, help="checkpoint name, path or URI (default: $RETINAFACE_WEIGHTS or mobilenet0.25-1mb)")
    parser.add_argument("--config", default=None, help="architecture/anchor config for an unregistered checkpoint")
    parser.add_argument("--scale", default="original", type=InputScale.parse, help="original | long:N | square:N")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold (default 0.5)")
    parser.add_argument("--nms-iou", type=float, default=0.4, help="NMS IoU threshold (default 0.4)")
    parser.add_argument("--tta", default=None, type=_tta_setting,
                        help="test-time augmentation, e.g. flip+pyramid:long:640,long:1024,long:1600 (default: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clip", action="store_true", help="clip boxes and landmarks to the image")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--draw", metavar="OUT_DIR", type=Path, help="write annotated copies here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        detector = Detector(
            args.weights, model_config=args.config, device=args.device, scale=str(args.scale),
            score_threshold=args.threshold, nms_iou=args.nms_iou, clip=args.clip, tta=str(args.tta or "none"),
        )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageDecodeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        detections = detector.detect(image)[0]
        if args.json:
            print(json.dumps(to_json(path, image, detections)))
        else:
            print(f"{path}: {image.shape[1]}x{image.shape[0]}, {len(detections)} faces")
        if args.draw:
            args.draw.mkdir(parents=True, exist_ok=True)
            out = args.draw / (Path(path).stem + ".jpg")
            cv2.imwrite(str(out), draw(image, detections))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
