"""Detector throughput on this machine, all figures from one run.

    RETINAFACE_WEIGHTS_DIR=../shared/weights python benchmarks/bench_detector.py [--compile] [--seconds 5]

Prints images/s for: JPEG decode alone; the plain eager forward pass (network as loaded,
NCHW float input, no optimisation), before and after the allocator setting that ``Detector``
makes on CPU; the optimised forward (BatchNorm folded, heads merged, channels_last,
inference_mode; optionally torch.compile); full ``detect`` at square:640 with batch 1 and 8,
from decoded uint8 arrays (what ``Detector.detect`` takes) and from JPEG bytes; and at
original size on crowd_selfie.jpg (from JPEG bytes).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from retinaface_core import Detector, load_weights
from retinaface_core.image_io import decode_image

SHARED = Path(os.environ.get("RETINAFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def rate(fn: Callable[[], int], seconds: float, windows: int = 5) -> float:
    """Images per second of ``fn`` (which returns how many images it handled): the best of
    ``windows`` equal windows after one warm-up call, since other load on a shared machine only
    ever slows a window down (the timeit convention)."""
    fn()
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            done += fn()
        best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = parser.parse_args()

    photos = sorted((SHARED / "images").glob("*.jpg")) + sorted((SHARED / "widerface/val/images").glob("*/*.jpg"))
    if not photos:
        raise SystemExit(f"no photos under {SHARED}; set RETINAFACE_SHARED")
    encoded = [p.read_bytes() for p in photos]
    size = args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {len(photos)} photos, {size}x{size}")

    cursor = iter(range(10**9))

    def next_bytes() -> bytes:
        return encoded[next(cursor) % len(encoded)]

    print(f"JPEG decode (decode_image)             {rate(lambda: (decode_image(next_bytes(), 'x'), 1)[1], args.seconds):7.1f} img/s")

    loaded = load_weights()
    plain = loaded.model.eval()
    x = torch.randn(1, 3, size, size)

    def eager() -> int:
        with torch.no_grad():
            plain(x)
        return 1

    eager_rate = rate(eager, args.seconds)
    print(f"forward, eager as loaded (NCHW)        {eager_rate:7.1f} img/s")

    variants = [("optimised", False)] + ([("optimised + compile", True)] if args.compile else [])
    pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    detectors = {label: Detector(loaded, scale=f"square:{size}", compile=compiled) for label, compiled in variants}
    # Detector construction pinned the allocator (runtime.keep_freed_memory); show what that
    # alone does for the unoptimised network, so the gain is not credited to the rest.
    print(f"forward, eager, allocator pinned       {rate(eager, args.seconds):7.1f} img/s")
    for label, detector in detectors.items():
        print(f"forward, {label:<29} {rate(lambda: (detector.forward(pixels), 1)[1], args.seconds):7.1f} img/s")

    decoded = [decode_image(data, "x") for data in encoded]
    for label, detector in detectors.items():
        for source in ("arrays", "JPEG"):
            for batch in (1, 8):

                def full() -> int:
                    start = next(cursor)
                    if source == "JPEG":
                        images = [decode_image(encoded[(start + i) % len(encoded)], "x") for i in range(batch)]
                    else:
                        images = [decoded[(start + i) % len(decoded)] for i in range(batch)]
                    detector.detect(images)
                    return batch

                figure = rate(full, args.seconds)
                print(
                    f"detect {source:<6} square:{size} batch {batch} {label:<19} {figure:7.1f} img/s   "
                    f"({figure / eager_rate:.2f}x eager forward)"
                )

    selfie = (SHARED / "images/crowd_selfie.jpg").read_bytes()
    original = Detector(loaded, scale="original", score_threshold=0.02)
    image = cv2.imdecode(np.frombuffer(selfie, np.uint8), cv2.IMREAD_COLOR)
    faces = len(original.detect(image)[0])
    figure = rate(lambda: (original.detect(decode_image(selfie, "selfie")), 1)[1], args.seconds)
    print(f"detect original {image.shape[1]}x{image.shape[0]} crowd_selfie    {figure:7.1f} img/s   ({faces} detections at score > 0.02)")


if __name__ == "__main__":
    main()
