"""Command-line face detector: ``python -m retinaface_core IMAGE... [options]``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .detector import Detector, DetectorSettings
from .flags import ANNOTATION_DEFAULTS, add_flags, flag_names, from_values
from .image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, read_image
from .postprocessing import Detections
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


@dataclass
class DetectSettings:
    """What the command line detects with: the detector settings and the decoder's pixel limit."""

    detector: DetectorSettings = field(default_factory=lambda: ANNOTATION_DEFAULTS, metadata={"flatten": ""})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "images with more pixels are refused (decompression bombs)"})


class _Deprecated(argparse.Action):
    """An old flag name: stored under the new one's name, with a warning naming it."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        print(f"warning: {option} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The images and options; ``settings`` is the :class:`DetectSettings` they give."""
    parser = argparse.ArgumentParser(
        prog="python -m retinaface_core",
        description=(
            "Detect faces with landmarks in images. The detector flags are the fields of retinaface_core.DetectorSettings, with the "
            "defaults of jobs.annotate (so both find the same faces); the Detector API's own defaults are --scale "
            "original --batching exact (the reference's results)."
        ),
    )
    parser.add_argument("images", nargs="+", help="image paths or fsspec URIs")
    add_flags(parser, DetectSettings)
    parser.add_argument(
        "--threshold",
        dest="score_threshold",
        type=float,
        default=argparse.SUPPRESS,
        action=_Deprecated,
        new="--score-threshold",
        metavar="T",
        help="deprecated name of --score-threshold",
    )
    parser.add_argument(
        "--config",
        dest="model_config",
        default=argparse.SUPPRESS,
        action=_Deprecated,
        new="--model-config",
        metavar="NAME",
        help="deprecated name of --model-config",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--draw", metavar="OUT_DIR", type=Path, help="write annotated copies here")
    args = parser.parse_args(argv)
    names = flag_names(DetectSettings)
    try:
        args.settings = from_values(DetectSettings, {k: v for k, v in vars(args).items() if k in names})
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = args.settings
    try:
        detector = Detector(settings=settings.detector, device=args.device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in args.images:
        try:
            image = read_image(path, settings.max_pixels)
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
