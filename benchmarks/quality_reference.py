"""The quality scores of the batched torch implementation against those of the per-face OpenCV one
it replaced, on the shared photos: values and CPU cost.

The reference is ``retinaface_core/quality.py`` at commit ``REFERENCE_COMMIT`` (numpy/OpenCV, one
face at a time), loaded from git history. ``--write`` detects faces on the 14 shared photos (the
two crowd photos and the 12 WIDER val images; ``Detector(scale="long:640")``, the shared
checkpoint), adds EDGE_CASES (synthetic faces on crops of one photo), scores them all with the
reference and stores detections and scores in ``tests/data/quality_reference.json``, the fixture
``tests/test_quality.py`` checks against. Without ``--write`` it prints, for the stored faces,
the largest difference of each score between the reference and today's ``face_quality`` (per
image) and ``quality_features`` (all in one batch), then the milliseconds per image (wall, and
CPU of all threads) of the reference, ``face_quality``, ``quality_features`` and, for scale, the
detector at the job's default scale, on the 14 photos (medians of ``--repeats`` passes,
``--threads`` torch and OpenCV threads).

    RETINAFACE_WEIGHTS_DIR=../shared/weights python -m benchmarks.quality_reference [--write] [--threads 2] [--repeats 7]

Run from a git checkout (the reference is read with ``git show``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import torch

from benchmarks.quality_auc import default_shared
from retinaface_core.image_io import read_image
from retinaface_core.quality import QUALITY_MODEL_VERSION, face_quality, quality_features
from schemas.annotation import QUALITY_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "b887762"
"""The last commit of the per-face numpy/OpenCV implementation."""
FIXTURE = REPO_ROOT / "tests" / "data" / "quality_reference.json"
PHOTOS = ("images/crowd_selfie.jpg", "images/crowd_baseball.jpg", "widerface/val/images/*/*.jpg")
"""The photos, relative to the shared folder."""
EDGE_PHOTO = "images/crowd_baseball.jpg"
EDGE_CASES = (
    # (crop of EDGE_PHOTO as y0, y1, x0, x1 or None, boxes x1, y1, x2, y2)
    (
        None,
        [
            (-20.3, -15.7, 30.2, 40.9),  # across the top-left corner
            (1000.4, 600.6, 1060.0, 650.0),  # across the bottom-right corner
            (10.2, 10.2, 10.2, 10.2),  # empty box
            (500.0, 500.0, 480.0, 480.0),  # inverted box
            (50.0, 60.0, 51.0, 61.0),  # 1 x 1 px
            (300.5, 200.5, 302.5, 202.5),  # halves round to even: 2 x 2 px
            (400.0, 100.0, 402.0, 300.0),  # 2 px wide
            (400.0, 100.0, 600.0, 101.2),  # 1 px tall
            (700.0, 300.0, 703.0, 400.0),  # 3 px wide
            (2000.0, 2000.0, 2100.0, 2100.0),  # outside, below right
            (-300.0, -300.0, -100.0, -100.0),  # outside, above left
            (-50.0, -50.0, 1100.0, 700.0),  # the whole image and more
            (100.0, 100.0, 400.0, 300.0),  # sampled every 3rd row and 4th column
            (500.0, 200.0, 620.0, 330.0),  # every 2nd row
            (600.0, 50.0, 700.0, 179.6),
            (20.0, 400.0, 83.0, 463.0),  # 63 x 63
            (800.0, 100.0, 864.0, 228.0),
        ],
    ),
    ((300, 302, 500, 503), [(0.0, 0.0, 3.0, 2.0), (-1.0, -1.0, 5.0, 5.0), (1.0, 0.0, 2.0, 1.0), (2.6, 1.6, 10.0, 10.0)]),
    ((100, 101, 0, 60), [(0.0, 0.0, 60.0, 1.0), (10.0, -5.0, 50.0, 5.0), (5.0, 0.0, 6.0, 1.0)]),
)
"""Synthetic faces on crops of a shared photo that reach every branch of the crop-based scores:
borders, empty, outside and 1-2 px boxes, linear and area resizing, sampled and whole crops."""


def photo_paths(shared: Path) -> list[str]:
    """The shared photos of PHOTOS, relative to ``shared``, in a fixed order."""
    return [str(path.relative_to(shared)) for pattern in PHOTOS for path in sorted(shared.glob(pattern))]


def reference_module() -> ModuleType:
    """``retinaface_core/quality.py`` as it was at REFERENCE_COMMIT, imported as a module of the package
    (so that it reads the package's ``quality_model.json``)."""
    source = subprocess.run(
        ["git", "show", f"{REFERENCE_COMMIT}:retinaface_core/quality.py"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout
    name = "retinaface_core._quality_reference"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "quality_reference.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _shortest(values: np.ndarray) -> list[float]:
    """float32 values, flattened, as the shortest decimals that read back to the same float32."""
    return [float(str(v)) for v in values.astype(np.float32).ravel()]


def edge_landmarks(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 5, 2) landmarks of a frontal face in each box, moved at random by up to a tenth of it;
    the first face's all zero and the second's eyes on one point (degenerate geometry)."""
    template = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
    size = boxes[:, None, 2:] - boxes[:, None, :2]
    landmarks = boxes[:, None, :2] + size * (template + rng.uniform(-0.1, 0.1, (len(boxes), 5, 2)))
    landmarks[0] = 0
    landmarks[1, 1] = landmarks[1, 0]
    return landmarks.astype(np.float32)


def write_fixture(shared: Path) -> None:
    from retinaface_core import Detector

    reference = reference_module()
    if reference.QUALITY_MODEL_VERSION != QUALITY_MODEL_VERSION:
        raise SystemExit(f"the composite changed since {REFERENCE_COMMIT}: its reference values are no longer today's")
    detector = Detector(scale="long:640")
    rng = np.random.default_rng(0)
    cases = [(name, None, None) for name in photo_paths(shared)] + [(EDGE_PHOTO, crop, boxes) for crop, boxes in EDGE_CASES]
    photos = []
    for name, crop, case_boxes in cases:
        image = read_image(str(shared / name))
        if crop is not None:
            image = np.ascontiguousarray(image[crop[0] : crop[1], crop[2] : crop[3]])
        if case_boxes is None:
            det = detector.detect(image)[0]
            boxes, scores, landmarks = det.boxes, det.scores, det.landmarks
        else:
            boxes = np.asarray(case_boxes, np.float32)
            scores = rng.uniform(0.3, 1, len(boxes)).astype(np.float32)
            landmarks = edge_landmarks(boxes, rng)
        q = reference.face_quality(image, boxes, scores, landmarks)
        photos.append(
            {
                "name": name,
                "synthetic": case_boxes is not None,
                **({} if crop is None else {"crop": list(crop)}),
                "boxes": _shortest(boxes),
                "scores": _shortest(scores),
                "landmarks": _shortest(landmarks),
                **{column: np.round(getattr(q, column).astype(np.float64), 6).tolist() for column in QUALITY_COLUMNS},
            }
        )
    fixture = {
        "made_by": f"python -m benchmarks.quality_reference --write: retinaface_core/quality.py at {REFERENCE_COMMIT}, "
        'detections of Detector(scale="long:640") with the shared checkpoint',
        "quality_model_version": QUALITY_MODEL_VERSION,
        "photos": photos,
    }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"{sum(len(p['scores']) for p in photos)} faces of {len(photos)} photos written to {FIXTURE}")


def load_fixture(shared: Path) -> list[dict]:
    """The fixture's photos (the shared photos, then the edge cases), each with its decoded
    ``image`` (cropped where it has a ``crop``) and numpy arrays."""
    photos = json.loads(FIXTURE.read_text())["photos"]
    for photo in photos:
        image = read_image(str(shared / photo["name"]))
        if "crop" in photo:
            y0, y1, x0, x1 = photo["crop"]
            image = np.ascontiguousarray(image[y0:y1, x0:x1])
        photo["image"] = image
        photo["boxes"] = np.asarray(photo["boxes"], np.float32).reshape(-1, 4)
        photo["scores"] = np.asarray(photo["scores"], np.float32)
        photo["landmarks"] = np.asarray(photo["landmarks"], np.float32).reshape(-1, 5, 2)
    return photos


def batched(photos: list[dict]) -> np.ndarray:
    """(N, len(QUALITY_COLUMNS)) scores of every face of ``photos`` from one call of ``quality_features``."""
    counts = [len(p["scores"]) for p in photos]
    columns = quality_features(
        [torch.from_numpy(p["image"]) for p in photos],
        torch.repeat_interleave(torch.arange(len(photos)), torch.tensor(counts)),
        torch.from_numpy(np.concatenate([p["boxes"] for p in photos])),
        torch.from_numpy(np.concatenate([p["scores"] for p in photos])),
        torch.from_numpy(np.concatenate([p["landmarks"] for p in photos])),
    )
    return columns.numpy()


def ms_per_image(run, photos: list[dict], repeats: int) -> tuple[float, float]:
    """(wall, CPU of all threads) milliseconds per image of ``run(photos)``, medians of ``repeats`` passes."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(photos)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)) * 1e3 / len(photos), float(np.median(cpu)) * 1e3 / len(photos)


def compare(shared: Path, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    photos = load_fixture(shared)
    expected = np.concatenate([np.stack([p[c] for c in QUALITY_COLUMNS], axis=1) for p in photos])
    per_image = np.concatenate([face_quality(p["image"], p["boxes"], p["scores"], p["landmarks"]).columns().numpy() for p in photos])
    batch = batched(photos)
    print(f"{len(expected)} faces of {len(photos)} photos; largest |difference| from the reference ({REFERENCE_COMMIT}):")
    print("| score | face_quality | quality_features |")
    print("| --- | --- | --- |")
    for k, column in enumerate(QUALITY_COLUMNS):
        print(f"| {column} | {np.abs(per_image[:, k] - expected[:, k]).max():.2e} | {np.abs(batch[:, k] - expected[:, k]).max():.2e} |")

    reference = reference_module()

    def old(items: list[dict]) -> None:
        for p in items:
            reference.face_quality(p["image"], p["boxes"], p["scores"], p["landmarks"])

    def new(items: list[dict]) -> None:
        for p in items:
            face_quality(p["image"], p["boxes"], p["scores"], p["landmarks"])

    from retinaface_core import Detector

    detector = Detector(scale="long:640")

    def detect(items: list[dict]) -> None:
        for p in items:
            detector.detect(p["image"])

    shared_photos = [p for p in photos if not p["synthetic"]]
    for run in (old, new, batched, detect):
        run(shared_photos)
    print(f"\nms per image, {threads} threads, medians of {repeats} passes over the {len(shared_photos)} shared photos:")
    print("| implementation | wall | CPU (all threads) |")
    print("| --- | --- | --- |")
    for label, run in (
        ("reference (numpy/OpenCV, per image)", old),
        ("face_quality (torch, per image)", new),
        (f"quality_features (torch, one batch of {len(shared_photos)})", batched),
        ('for scale: Detector(scale="long:640").detect, per image', detect),
    ):
        wall, cpu = ms_per_image(run, shared_photos, repeats)
        print(f"| {label} | {wall:.2f} | {cpu:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"detect and score with the reference, write {FIXTURE}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shared = default_shared()
    if args.write:
        write_fixture(shared)
    else:
        compare(shared, args.threads, args.repeats)


if __name__ == "__main__":
    main()
