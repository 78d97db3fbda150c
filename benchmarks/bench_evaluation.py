"""Wall time of the WIDER FACE evaluation on the full val set with ~1000 detections per image.

Usage: python benchmarks/bench_evaluation.py [GT_DIR] [--per-image N]
GT_DIR defaults to $RETINAFACE_SHARED/widerface/ground_truth, else ../shared/widerface/ground_truth.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from retinaface_core.evaluation import evaluate, format_ap_table
from retinaface_core.widerface import WiderValGroundTruth, read_ground_truth_mat


def default_gt_dir() -> Path:
    shared = Path(os.environ.get("RETINAFACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    return shared / "widerface" / "ground_truth"


def synthetic_predictions(gt: WiderValGroundTruth, per_image: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per image: every face jittered (as a detector would find it), the rest random boxes; sorted by score."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for name, faces in gt.boxes.items():
        faces = faces[:per_image]
        jittered = faces + rng.normal(0, 0.1, faces.shape) * np.maximum(faces[:, 2:], 1).repeat(2, axis=1)
        num_random = per_image - len(faces)
        random = np.concatenate([rng.uniform(0, 1000, (num_random, 2)), rng.uniform(4, 300, (num_random, 2))], axis=1)
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(faces)), rng.uniform(0.02, 0.8, num_random)])
        boxes = np.concatenate([np.concatenate([jittered, random]), scores[:, None]], axis=1)
        predictions[name] = boxes[np.argsort(-scores, kind="stable")]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gt_dir", nargs="?", default=str(default_gt_dir()))
    parser.add_argument("--per-image", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gt = read_ground_truth_mat(args.gt_dir)
    predictions = synthetic_predictions(gt, args.per_image)
    num_predictions = sum(len(p) for p in predictions.values())
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = evaluate(predictions, gt)
        times.append(time.perf_counter() - start)
    print(format_ap_table(result))
    print(
        f"evaluate: {len(predictions)} images, {num_predictions} predictions: "
        f"best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
