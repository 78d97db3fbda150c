"""What one detector device does: canvases, parity with the CPU, detect() speed, and the job end to end.

Four parts, on a realistic mix of photo sizes (``../shared/widerface/val_image_sizes.csv``, all
3,226 WIDER val images; a small built-in mix where it is absent):

1. **Plan**: batch fill, padding and distinct canvases of each batching candidate on the whole
   size mix, shuffled, at batch 8, 32 and 64.
2. **Parity** (not on a CPU): the shared photos decoded on the device against Pillow, and the
   faces a device detector finds against the CPU's (fp32).
3. **Detect**: ``Detector.detect`` on ``--images`` photos of sizes drawn from the mix (a stream
   of sizes the detector has not seen: each call its own photos), bucketed, in calls of the
   job's window, after :meth:`Detector.warm_up` (its seconds are printed): images/s for each
   precision and batch size asked for, and with ``--tta`` the same for that setting.
4. **Job** (unless ``--no-job``): ``python -m jobs.annotate`` on ``--job-images`` JPEG files in a
   local folder, with the job's recommended settings for one GPU (:data:`GPU_JOB_FLAGS`; more
   flags with ``--job-arg``, the last of a flag given twice wins):
   images/s over the whole run and in the steady state after the first shard commits (from the
   committed files' times), start-up seconds (start to first commit), the GPU's busy fraction
   in the steady state (``nvidia-smi``), and host milliseconds per image by stage (the rows'
   ``read_ms``, ``decode_ms``, ``detect_ms``, ``quality_ms``).

    python -m benchmarks.bench_device --device cuda --images 2048 --job-images 30000 --precisions fp16 --tta pyramid:auto
    python -m benchmarks.bench_device --device cpu --images 24 --scale long:320 --job-images 48   # CPU: small, so it cannot rot
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from retinaface_core.batching import PLAN_WINDOW_BATCHES, BatchStats, canvas_ladder, detect_window, plan_batches  # noqa: E402
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
    sizes: list[tuple[int, int]],
    scale: str,
    batch_size: int,
    window: int,
    policy: str,
    pad_multiple: int = 1,
    canvases: set[tuple[int, int]] | None = None,
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
            if canvases is not None:
                canvases.add(batch.canvas)
    return stats


PLAN_CANDIDATES = [
    # (name, policy, window in batches, pad_multiple)
    ("exact (one pass per shape)", "exact", 1, 1),
    ("exact, pad_multiple 32", "exact", 1, 32),
    ("bucket, window 1 batch (arrival order)", "bucket", 1, 1),
    ("bucket, window 2 batches", "bucket", 2, 1),
    (f"bucket, window {PLAN_WINDOW_BATCHES} batches (the job's default)", "bucket", PLAN_WINDOW_BATCHES, 1),
    ("bucket, window 8 batches", "bucket", 8, 1),
]


def plan_table(sizes: list[tuple[int, int]], scale: str, seed: int) -> None:
    shuffled = random.Random(seed).sample(sizes, len(sizes))
    print(f"\n## Plan: {len(sizes)} images, scale {scale}, shuffled (seed {seed}); bucket canvases from the scale's ladder\n")
    print("| candidate | batch | fill | padding | images per pass | canvases |\n| --- | --- | --- | --- | --- | --- |")
    for batch_size in (8, 32, 64):
        for name, policy, batches, multiple in PLAN_CANDIDATES:
            canvases: set[tuple[int, int]] = set()
            stats = simulate_plan(shuffled, scale, batch_size, batches * batch_size, policy, multiple, canvases)
            print(
                f"| {name} | {batch_size} | {stats.batch_fill:.3f} | {stats.padding_fraction:.1%} "
                f"| {stats.images / stats.passes:.2f} | {len(canvases)} |"
            )


def sample_photos(sizes: list[tuple[int, int]], count: int, shared: Path | None, seed: int) -> list[np.ndarray]:
    """``count`` BGR photos of sizes drawn from the mix: crops of the shared real photos (the crowd
    photos and the WIDER val images; scikit-image's astronaut where absent) resized to each size."""
    import cv2
    from skimage import data

    bases = [cv2.imread(str(p)) for p in real_photo_paths(shared)] or [cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)]
    rng = random.Random(seed)
    photos = []
    for _ in range(count):
        h, w = rng.choice(sizes)
        base = rng.choice(bases)
        bh, bw = base.shape[:2]
        # The largest crop of the base with the target's aspect ratio, at a random place.
        ch, cw = (bh, min(bw, round(bh * w / h))) if bw * h >= bh * w else (min(bh, round(bw * h / w)), bw)
        y, x = rng.randint(0, bh - ch), rng.randint(0, bw - cw)
        photos.append(cv2.resize(base[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA))
    return photos


def real_photo_paths(shared: Path | None) -> list[Path]:
    if shared is None:
        return []
    return sorted((shared / "images").glob("*.jpg")) + sorted((shared / "widerface/val/images").glob("*/*.jpg"))


def decode_ms(photos: list[np.ndarray]) -> float:
    """Mean ms to decode one of ``photos`` from a quality-90 JPEG on the CPU, as the CPU readers do."""
    from retinaface_core.image_io import decode_image

    blobs = [jpeg(p) for p in photos]
    start = time.perf_counter()
    for i, blob in enumerate(blobs):
        decode_image(blob, f"photo{i}")
    return (time.perf_counter() - start) * 1e3 / len(blobs)


def jpeg(bgr: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def parity(shared: Path | None, device: str) -> None:
    """Device decoding against Pillow, and the device's faces against the CPU's, on the shared photos."""
    import torch

    from retinaface_core import Detector
    from retinaface_core.device_decode import decode_jpegs, device_decoder_available
    from retinaface_core.image_io import decode_image, probe_jpeg

    paths = real_photo_paths(shared)
    if not paths:
        print("\n## Parity: skipped (no shared photos)")
        return
    datas = [p.read_bytes() for p in paths]
    cpu_images = [decode_image(d, str(p)) for d, p in zip(datas, paths)]
    print(f"\n## Parity on {len(paths)} shared photos, {device}\n")
    if device_decoder_available():
        headers = [probe_jpeg(d) for d in datas]
        decoded = decode_jpegs(datas, headers, [str(p) for p in paths], torch.device(device))  # type: ignore[arg-type]
        diffs = [float(np.abs(d.cpu().numpy().astype(np.int16) - c).mean()) for d, c in zip(decoded, cpu_images)]
        print(f"device JPEG decode vs Pillow: mean abs difference {np.mean(diffs):.2f} grey levels (max over photos {max(diffs):.2f})")
        blobs = [jpeg(p) for p in sample_photos(read_size_mix(shared)[0], 512, shared, 1)]
        for window in (64, 256):
            start = time.perf_counter()
            for first in range(0, len(blobs), window):
                chunk = blobs[first : first + window]
                decode_jpegs(chunk, [probe_jpeg(b) for b in chunk], ["x"] * len(chunk), torch.device(device))  # type: ignore[misc]
            torch.cuda.synchronize()
            rate = len(blobs) / (time.perf_counter() - start)
            print(f"device JPEG decode, probe included, calls of {window}: {rate:.0f} images/s (one thread)")
    else:
        print("device JPEG decode: not available (torchvision's nvJPEG)")
    for precision in ("fp32", "fp16"):
        cpu = Detector(scale="long:640", batching="bucket").detect(cpu_images, batch_size=8)
        dev = Detector(scale="long:640", batching="bucket", device=device, precision=precision)
        found = dev.detect([torch.from_numpy(c).to(device) for c in cpu_images], batch_size=8)
        matched, total, worst = 0, 0, 0.0
        for a, b in zip(cpu, found):
            total += len(a)
            if len(a) and len(b):
                gap = np.abs(a.boxes[:, None, :] - b.boxes[None, :, :]).max(axis=2).min(axis=1)
                matched += int((gap < 2).sum())
                worst = max(worst, float(np.percentile(gap, 99)))
        print(
            f"{precision}: {sum(map(len, found))} faces on the device vs {total} on the CPU; {matched / max(total, 1):.1%} "
            f"of the CPU's within 2 px (99th percentile gap {worst:.2f} px)"
        )


def detect_table(photos: list[np.ndarray], device: str, scale: str, precisions: list[str], batches: list[int], tta: str | None) -> None:
    import torch

    from retinaface_core import Detector

    on_gpu = device.startswith("cuda")
    print(f"\n## Detect: {len(photos)} photos of never-seen sizes, scale {scale}, bucket batching, device {device}\n")
    print("| precision | batch | tta | warm-up s | images/s | fill | padding |\n| --- | --- | --- | --- | --- | --- | --- |")
    settings = [(p, b, "none") for p in precisions for b in batches] + ([(precisions[0], batches[-1], tta)] if tta else [])
    for precision, batch_size, setting in settings:
        detector = Detector(scale=scale, device=device, precision=precision, batching="bucket", tta=setting)
        warm = detector.warm_up(batch_size)
        # Photos go to the device first when it is a GPU, as the job's device decoder leaves them.
        inputs = [torch.from_numpy(p).to(device) for p in photos] if on_gpu else photos
        window = detect_window(batch_size, "bucket")
        before = copy.copy(detector.stats)
        start = time.perf_counter()
        for first in range(0, len(inputs), window):
            detector.detect(inputs[first : first + window], batch_size=batch_size)
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = detector.stats - before
        print(
            f"| {precision} | {batch_size} | {setting} | {warm:.1f} | {len(photos) / seconds:.1f} "
            f"| {stats.batch_fill:.3f} | {stats.padding_fraction:.1%} |",
            flush=True,
        )


def write_photos(photos: list[np.ndarray], folder: Path, count: int) -> None:
    """``count`` JPEG files in ``folder``: the photos encoded once, then hard links to them."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, data in enumerate(pool.map(jpeg, photos)):
            (folder / f"{i:07d}.jpg").write_bytes(data)
    for i in range(len(photos), count):
        os.link(folder / f"{i % len(photos):07d}.jpg", folder / f"{i:07d}.jpg")


GPU_JOB_FLAGS = ["--num-gpus-per-actor", "0.25", "--num-cpus-per-actor", "2", "--batch-size", "64", "--decode-threads", "4"]
"""The job's recommended settings for one GPU (docs/annotate.md, infra/k8s/rayjob-annotate.yaml)."""


class GpuSampler:
    """``nvidia-smi``'s utilisation of GPU 0 every 0.2 s, with the time of each sample."""

    def __init__(self) -> None:
        import subprocess

        self.samples: list[tuple[float, float]] = []
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.time(), float(line.strip())))

    def stop(self) -> None:
        self._process.terminate()

    def mean(self, start: float, end: float) -> float:
        values = [u for t, u in self.samples if start <= t <= end]
        return sum(values) / len(values) / 100 if values else float("nan")


def job_run(
    photos: list[np.ndarray], device: str, scale: str, precision: str, count: int, job_args: list[str], timeout: float, log: Path | None
) -> None:
    import subprocess

    import pyarrow.parquet as pq

    on_gpu = device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench_device_"))
    try:
        write_photos(photos, work / "photos", count)
        output = work / "faces"
        command = [
            sys.executable,
            "-m",
            "jobs.annotate",
            "--input",
            str(work / "photos"),
            "--output",
            str(output),
            "--scale",
            scale,
            "--precision",
            precision,
            *(GPU_JOB_FLAGS if on_gpu else []),
            *job_args,
        ]
        print(f"\n## Job: {count} JPEG files in a local folder, {device}, {precision}: {' '.join(command[1:])}\n", flush=True)
        sampler = GpuSampler() if on_gpu else None
        log_file = (log or work / "job.log").open("w")
        start = time.time()
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            outcome = f"rc {done.returncode}"
        except subprocess.TimeoutExpired:
            outcome = f"stopped after {timeout:.0f} s (--job-timeout): figures of the shards committed by then"
        end = time.time()
        log_file.close()
        if sampler:
            sampler.stop()
        print(f"job: {outcome}; its output is in {log or 'a temporary log'}")
        files = sorted((output / "annotations").rglob("*.parquet"), key=lambda p: p.stat().st_mtime)
        if not files:
            print("no shard committed")
            return
        commits = [p.stat().st_mtime for p in files]
        rows = [pq.read_metadata(p).num_rows for p in files]
        table = pq.read_table(output / "annotations", columns=["read_ms", "decode_ms", "detect_ms", "quality_ms", "status"])
        steady = (sum(rows) - rows[0]) / (commits[-1] - commits[0]) if len(files) > 1 else float("nan")
        print(f"images/s over the run (Ray start, model loading and warm-up included): {sum(rows) / (end - start):.1f}")
        print(f"images/s in the steady state (after the first of {len(files)} shards commits): {steady:.1f}")
        print(f"start-up: {commits[0] - start:.1f} s to the first commit")
        if sampler:
            print(f"GPU busy (nvidia-smi utilisation) in the steady state: {sampler.mean(commits[0], commits[-1]):.0%}")
        stages = ", ".join(
            f"{c.removesuffix('_ms')} {np.mean(table.column(c).to_numpy(zero_copy_only=False)):.2f}"
            for c in table.column_names
            if c.endswith("_ms")
        )
        print(f"host ms per image by stage (per actor thread): {stages}; error rows: {table.column('status').to_pylist().count('error')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--images", type=int, default=None, help="photos for the detect part (default: 2048 on cuda, 24 on cpu)")
    parser.add_argument("--scale", default=None, help="default: long:640 on cuda, long:320 on cpu")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp16 fp32 on cuda, fp32 bf16 on cpu")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64], help="batch sizes of the detect part")
    parser.add_argument(
        "--tta", default=None, help="also time this TTA setting (first precision, largest batch), e.g. the recommended pyramid:auto"
    )
    parser.add_argument("--job-images", type=int, default=None, help="files of the job part (default: 30000 on cuda, 48 on cpu)")
    parser.add_argument("--job-arg", action="append", default=[], help="extra flag for the job (repeat), e.g. --job-arg=--batch-size=64")
    parser.add_argument("--no-job", action="store_true", help="skip the end-to-end job")
    parser.add_argument(
        "--job-timeout", type=float, default=600, help="seconds before the job is stopped (figures then cover what it committed)"
    )
    parser.add_argument("--job-log", type=Path, default=None, help="write the job's output here")
    parser.add_argument("--no-detect", action="store_true", help="skip the plan, parity and detect parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    count = args.images or (2048 if cuda else 24)
    scale = args.scale or ("long:640" if cuda else "long:320")
    precisions = args.precisions or (["fp16", "fp32"] if cuda else ["fp32", "bf16"])
    shared = args.shared if args.shared.is_dir() else None
    if shared is not None:
        os.environ.setdefault("RETINAFACE_WEIGHTS_DIR", str(shared / "weights"))

    sizes, source = read_size_mix(shared)
    print(f"# bench_device: {args.device}, size mix from {source}, {os.cpu_count()} CPUs (a shared machine: figures are noisy)")
    photos = sample_photos(sizes, count, shared, args.seed)
    if not args.no_detect:
        plan_table(sizes, "long:640", args.seed)
        print(f"\ndecode on the CPU (JPEG q90 -> BGR, one thread): {decode_ms(photos[:256]):.1f} ms/image at the sizes of the mix")
        if cuda:
            parity(shared, args.device)
        detect_table(photos, args.device, scale, precisions, args.batches, args.tta)
    if not args.no_job:
        job_photos = photos[: min(len(photos), 1000)]
        count = args.job_images or (30000 if cuda else 48)
        job_run(job_photos, args.device, scale, precisions[0], count, args.job_arg, args.job_timeout, args.job_log)


if __name__ == "__main__":
    main()
