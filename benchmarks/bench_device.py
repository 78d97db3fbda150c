"""What one detector device does with the batching policies and precisions: fill, padding, img/s.

Three parts, on a realistic mix of photo sizes (``../shared/widerface/val_image_sizes.csv``, all
3,226 WIDER val images; a small built-in mix where it is absent):

1. **Plan**: batch fill (images per forward pass / batch size) and padding (share of computed
   pixels) of each batching candidate on the whole size mix, shuffled, at batch 8 and 32.
2. **Detect**: images/s of ``Detector.detect`` at batch 1, 8, 32, 64 in fp32 and bf16 (and fp16
   on CUDA) on ``--images`` photos of sizes sampled from the mix, bucketed, in calls of the
   job's window; after one untimed pass (kernels are made per input shape), the fastest of
   ``--repeats`` passes; and the decode cost (JPEG bytes -> BGR pixels, ms/image) of the photos.
3. **Job** (unless ``--no-job``): ``jobs.annotate`` end to end with ``--decode tasks``, one actor
   (one GPU with ``--device cuda``) and ``--decode-cpus-per-device`` CPUs of decode tasks, on a
   local moto S3.

    python -m benchmarks.bench_device --device cuda --images 512
    python -m benchmarks.bench_device --device cpu --images 24 --scale long:320   # CPU: small, so it cannot rot
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from retinaface_core.batching import PLAN_WINDOW_BATCHES, BatchStats, canvas_ladder, plan_batches  # noqa: E402
from retinaface_core.preprocessing import InputScale  # noqa: E402

# Used where val_image_sizes.csv is absent: common photo shapes, (height, width).
FALLBACK_SIZES = [(768, 1024), (683, 1024), (576, 1024), (1024, 768), (1365, 1024), (1024, 1024), (819, 1024), (1536, 1024)]


def read_size_mix(shared: Path | None) -> tuple[list[tuple[int, int]], str]:
    """(height, width) of the WIDER val images, or the fallback mix; and where they came from."""
    path = shared / "widerface/val_image_sizes.csv" if shared else None
    if path is None or not path.is_file():
        return FALLBACK_SIZES, "built-in mix (val_image_sizes.csv absent)"
    with path.open() as f:
        return [(int(row["height"]), int(row["width"])) for row in csv.DictReader(f)], str(path)


def simulate_plan(
    sizes: list[tuple[int, int]], scale: str, batch_size: int, window: int, policy: str, pad_multiple: int = 1
) -> BatchStats:
    """Fill and padding when consecutive windows of ``window`` images of ``sizes`` (original
    (height, width)) are each planned like one detect call of a job's actor (bucket canvases
    from the scale's ladder, as the Detector plans them)."""
    parsed = InputScale.parse(scale)
    ladder = canvas_ladder(parsed.max_side) if policy == "bucket" else None
    stats = BatchStats()
    for start in range(0, len(sizes), window):
        chunk = sizes[start : start + window]
        shapes = [parsed.input_shape(h, w, pad_multiple) for h, w in chunk]
        content = [parsed.resized_shape(h, w) for h, w in chunk]
        for batch in plan_batches(shapes, batch_size, policy, ladder):  # type: ignore[arg-type]
            stats.add(len(batch.indices), batch.canvas, sum(content[i][0] * content[i][1] for i in batch.indices), batch_size)
    return stats


PLAN_CANDIDATES = [
    # (name, policy, window in batches, pad_multiple)
    ("exact (one pass per shape)", "exact", 1, 1),
    ("exact, pad_multiple 32", "exact", 1, 32),
    ("bucket, window 1 batch (pad to batch max, arrival order)", "bucket", 1, 1),
    ("bucket, window 2 batches", "bucket", 2, 1),
    (f"bucket, window {PLAN_WINDOW_BATCHES} batches (the job's default)", "bucket", PLAN_WINDOW_BATCHES, 1),
    ("bucket, window 8 batches", "bucket", 8, 1),
    (f"bucket, window {PLAN_WINDOW_BATCHES} batches, pad_multiple 32", "bucket", PLAN_WINDOW_BATCHES, 32),
]


def plan_table(sizes: list[tuple[int, int]], scale: str, seed: int) -> None:
    shuffled = random.Random(seed).sample(sizes, len(sizes))
    print(f"\n## Plan: {len(sizes)} images, scale {scale}, shuffled (seed {seed})\n")
    print("| candidate | batch | fill | padding | images per pass |\n| --- | --- | --- | --- | --- |")
    for batch_size in (8, 32):
        for name, policy, batches, multiple in PLAN_CANDIDATES:
            stats = simulate_plan(shuffled, scale, batch_size, batches * batch_size, policy, multiple)
            print(f"| {name} | {batch_size} | {stats.batch_fill:.3f} | {stats.padding_fraction:.1%} | {stats.images / stats.passes:.2f} |")


def sample_photos(sizes: list[tuple[int, int]], count: int, shared: Path | None, seed: int) -> list[np.ndarray]:
    """``count`` BGR photos resized to sizes drawn from the mix (a real crowd photo where available)."""
    import cv2
    from skimage import data

    base = cv2.imread(str(shared / "images/crowd_selfie.jpg")) if shared else None
    if base is None:
        base = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    rng = random.Random(seed)
    return [cv2.resize(base, (w, h), interpolation=cv2.INTER_AREA) for h, w in (rng.choice(sizes) for _ in range(count))]


def decode_ms(photos: list[np.ndarray]) -> float:
    """Mean ms to decode one of ``photos`` from a quality-90 JPEG, as the job's readers do."""
    from jobs._samples import encode
    from retinaface_core.image_io import decode_image

    blobs = [encode(np.ascontiguousarray(p[:, :, ::-1]), "JPEG", quality=90) for p in photos]
    start = time.perf_counter()
    for i, blob in enumerate(blobs):
        decode_image(blob, f"photo{i}")
    return (time.perf_counter() - start) * 1e3 / len(blobs)


def detect_table(photos: list[np.ndarray], device: str, scale: str, repeats: int) -> None:
    import torch

    from retinaface_core import Detector

    precisions = ["fp32", "fp16", "bf16"] if device.startswith("cuda") else ["fp32", "bf16"]
    print(f"\n## Detect: {len(photos)} photos, scale {scale}, bucket batching, device {device}, torch threads {torch.get_num_threads()}\n")
    print("| precision | batch | images/s | fill | padding |\n| --- | --- | --- | --- | --- |")
    for precision in precisions:
        detector = Detector(scale=scale, device=device, precision=precision, batching="bucket")
        for batch_size in (1, 8, 32, 64):
            # One call per window of the job's size, as the actor makes them.
            window = batch_size * PLAN_WINDOW_BATCHES
            calls = [photos[first : first + window] for first in range(0, len(photos), window)]
            # Untimed first pass: kernels and oneDNN primitives are made per input shape, once.
            for call in calls:
                detector.detect(call, batch_size=batch_size)
            before = copy.copy(detector.stats)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for call in calls:
                    detector.detect(call, batch_size=batch_size)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            stats = detector.stats - before
            print(f"| {precision} | {batch_size} | {len(photos) / best:.1f} | {stats.batch_fill:.3f} | {stats.padding_fraction:.1%} |", flush=True)


def job_run(photos: list[np.ndarray], device: str, scale: str, batch_size: int, decode_cpus: int) -> None:
    import ray

    from benchmarks.bench_annotate import run_job, upload
    from jobs._local_s3 import LocalS3, s3_environment
    from jobs._samples import encode

    moto = LocalS3(process=True)
    os.environ.update(s3_environment(moto.start()))
    work = Path(tempfile.mkdtemp(prefix="bench_device_"))
    try:
        import fsspec

        fsspec.filesystem("s3").mkdir("bench")
        upload("bench/device", [encode(np.ascontiguousarray(p[:, :, ::-1]), "JPEG", quality=90) for p in photos])
        gpus = 1 if device.startswith("cuda") else 0
        # Logical CPUs: one for the actor (its torch thread and post-processing), the rest decode.
        ray.init(address="local", num_cpus=1 + decode_cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter()
        summary = run_job(
            "bench/device", work / "job", scale=scale, batch_size=batch_size, images_per_shard=batch_size * PLAN_WINDOW_BATCHES,
            decode="tasks", decode_cpus=0.5, actors=1, num_gpus_per_actor=gpus, num_cpus_per_actor=1,
        )
        seconds = time.perf_counter() - start
        ray.shutdown()
        print(f"\n## Job: {summary['images']} images, --decode tasks, {decode_cpus} decode CPUs, 1 actor on {device}, batch {batch_size}\n")
        print(f"{summary['images'] / seconds:.2f} images/s ({seconds:.1f} s with model loading), batch fill {summary['batch_fill']:.3f}, padding {summary['padding_fraction']:.1%}")
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--images", type=int, default=None, help="photos for the detect and job parts (default: 512 on cuda, 24 on cpu)")
    parser.add_argument("--scale", default=None, help="default: long:640 on cuda, long:320 on cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the photos per detect measurement; the fastest counts (a shared machine's load comes and goes)")
    parser.add_argument("--job-batch", type=int, default=32, help="--batch-size of the job part")
    parser.add_argument("--decode-cpus-per-device", type=int, default=4, help="CPUs of decode tasks in the job part")
    parser.add_argument("--no-job", action="store_true", help="skip the end-to-end job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    count = args.images or (512 if cuda else 24)
    scale = args.scale or ("long:640" if cuda else "long:320")
    shared = args.shared if args.shared.is_dir() else None
    if shared is not None:
        os.environ.setdefault("RETINAFACE_WEIGHTS_DIR", str(shared / "weights"))

    sizes, source = read_size_mix(shared)
    print(f"# bench_device: {args.device}, size mix from {source}, {os.cpu_count()} CPUs (a shared machine: figures are noisy)")
    plan_table(sizes, "long:640", args.seed)
    photos = sample_photos(sizes, count, shared, args.seed)
    print(f"\ndecode (JPEG q90 -> BGR, one thread): {decode_ms(photos):.1f} ms/image at the original sizes of the mix")
    detect_table(photos, args.device, scale, args.repeats)
    if not args.no_job:
        job_run(photos, args.device, scale, args.job_batch, args.decode_cpus_per_device)


if __name__ == "__main__":
    main()
