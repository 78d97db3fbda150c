"""Throughput and memory of the annotation job against a bare single-process loop.

Builds ``--images`` (default 1,000) JPEGs in a bucket of a local moto S3 server (in its own
process): random crops and rescales (long side 256..1024 px) of the ``../shared`` photos and
scikit-image's photos. Then, in one run, on the same images and settings:

(a) a bare loop in this process: list -> read -> decode -> detect -> quality -> one Parquet file,
    run before and after (b), its figure the mean of the two;
(b) the job (``jobs.annotate.run``) on a local Ray with its default settings: on a CPU-only
    machine one single-threaded detector actor per core, each decoding on its own threads.

Both include model loading and write the same rows; the job's time excludes starting Ray.
Prints images/s of both and their ratio. With ``--crops SIZE``, (b) runs again with ``--crops
SIZE`` (aligned face crops written with the rows) right after the plain run, and the crops'
cost is printed: images/s with and without, bytes per face (encoded crop, and crops object),
and the share of the actors' time spent on crops (measured inside the job, so it holds on a
loaded machine where the two runs' images/s do not compare). Then runs the job on ``--mem-small`` and
``--mem-small`` x 10 images, each on a fresh local Ray, sampling the summed RSS of all Ray
processes (every process this one started: GCS, raylet, workers, actors) every 0.2 s, and
prints both peaks and the growth.

    python -m benchmarks.bench_annotate --images 1000 --mem-small 200
    python -m benchmarks.bench_annotate --images 300 --mem-small 0 --crops 112
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SCALE = "long:640"
BATCH_SIZE = 8


def make_images(count: int, shared: Path | None, seed: int = 0) -> list[bytes]:
    from skimage import data

    from jobs._samples import encode, random_variant
    from retinaface_core.image_io import read_image

    bases = [data.astronaut(), data.chelsea(), data.coffee(), np.stack([data.camera()] * 3, axis=-1)]
    if shared is not None:
        for path in sorted((shared / "images").glob("*.jpg")) + sorted((shared / "widerface/val/images").glob("*/*.jpg")):
            bases.append(np.ascontiguousarray(read_image(str(path))[:, :, ::-1]))
    rng = np.random.default_rng(seed)
    return [encode(random_variant(bases[i % len(bases)], rng), "JPEG", quality=90) for i in range(count)]


def upload(prefix: str, images: list[bytes]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for i, data in enumerate(images):
        fs.pipe_file(f"{prefix}/{i:06d}.jpg", data)
    fs.invalidate_cache()


def bare_loop(prefix: str, output: Path, torch_threads: int) -> tuple[float, int, int]:
    """(seconds, images, faces) of the single-process baseline."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from retinaface_core import Detector
    from retinaface_core.image_io import decode_image
    from retinaface_core.quality import face_quality

    torch.set_num_threads(torch_threads)
    start = time.perf_counter()
    detector = Detector(scale=SCALE)
    fs = fsspec.filesystem("s3")
    uris = sorted(fs.find(prefix))
    rows = []
    for uri in uris:
        image = decode_image(fs.cat_file(uri), uri)
        det = detector.detect(image)[0]
        q = face_quality(image, det.boxes, det.scores, det.landmarks)
        rows.append({"uri": uri, "num_faces": len(det), "boxes": det.boxes.ravel().tolist(), "quality": q.quality.tolist()})
    pq.write_table(pa.Table.from_pylist(rows), output)
    return time.perf_counter() - start, len(uris), sum(r["num_faces"] for r in rows)


def crop_bytes(output: Path) -> tuple[int, int, int]:
    """(encoded crop bytes, crops object bytes, crops) of an output's crops table."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(output.glob("crops/*/*.parquet"))
    column = [pq.read_table(f, columns=["crop"]).column("crop") for f in files]
    encoded = sum(int(pc.sum(pc.binary_length(c)).as_py() or 0) for c in column)
    return encoded, sum(f.stat().st_size for f in files), sum(len(c) for c in column)


class RaySampler:
    """Peak of the summed RSS of this process's descendants but ``exclude`` (the Ray processes)."""

    def __init__(self, exclude: set[int], interval: float = 0.2) -> None:
        import psutil

        self.process = psutil.Process()
        self.exclude = exclude
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for child in self.process.children(recursive=True):
                if child.pid in self.exclude:
                    continue
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> RaySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_job(prefix: str, output: Path, **overrides) -> dict:
    from jobs._config import from_values
    from jobs.annotate import AnnotateConfig, run

    settings = {
        "scale": SCALE,
        "batch_size": BATCH_SIZE,
        "images_per_shard": 50,
        "overwrite": True,
        **overrides,
    }
    config = from_values(AnnotateConfig, {"input": f"s3://{prefix}/", "output": str(output), **settings})
    return run(config)


def start_ray() -> None:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument(
        "--mem-small", type=int, default=200, help="images of the small memory run; the large one has 10x; 0 skips the memory runs"
    )
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the bare loop")
    parser.add_argument("--crops", type=int, default=0, help="also run the job with --crops SIZE and print the crops' cost")
    parser.add_argument("--batching", default=None, help="the job's --batching (default: the job's own default)")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    shared = args.shared if args.shared.is_dir() else None
    if shared is not None:
        os.environ.setdefault("RETINAFACE_WEIGHTS_DIR", str(shared / "weights"))

    import fsspec
    import ray

    from jobs._local_s3 import LocalS3, s3_environment

    # In a process of its own, so that it takes no CPU time from the bare loop's.
    moto = LocalS3(process=True)
    endpoint = moto.start()
    os.environ.update(s3_environment(endpoint))
    work = Path(tempfile.mkdtemp(prefix="bench_annotate_"))
    try:
        large = 10 * args.mem_small
        started = time.perf_counter()
        images = make_images(max(args.images, large), shared)
        fsspec.filesystem("s3").mkdir("bench")
        upload("bench/throughput", images[: args.images])
        if args.mem_small:
            upload("bench/mem_small", images[: args.mem_small])
            upload("bench/mem_large", images[:large])
        print(f"bench: {len(images)} images made and uploaded to {endpoint} in {time.perf_counter() - started:.0f} s", flush=True)

        # The loop runs before and after the job: on a shared machine the two loop figures show
        # how much the load changed while the job ran.
        loop_before, loop_n, loop_faces = bare_loop("bench/throughput", work / "loop.parquet", args.torch_threads)
        start_ray()
        batching = {"batching": args.batching} if args.batching else {}
        job_start = time.perf_counter()
        summary = run_job("bench/throughput", work / "job", **batching)
        job_s = time.perf_counter() - job_start
        if args.crops:
            crops_start = time.perf_counter()
            crops_summary = run_job("bench/throughput", work / "crops", crops=args.crops, **batching)
            crops_s = time.perf_counter() - crops_start
        ray.shutdown()
        loop_after, _, _ = bare_loop("bench/throughput", work / "loop.parquet", args.torch_threads)
        loop_s = (loop_before + loop_after) / 2
        # The job's bucket batching pads a few images, which moves a few faces near the threshold.
        assert summary["images"] == loop_n and abs(summary["faces"] - loop_faces) <= 0.01 * loop_faces, (summary, loop_n, loop_faces)

        peaks = {}
        for name, count in (("mem_small", args.mem_small), ("mem_large", large)) if args.mem_small else ():
            start_ray()
            with RaySampler(exclude={moto.pid}) as sampler:
                run_job(f"bench/{name}", work / name)
                peaks[count] = sampler.peak
            ray.shutdown()

        print("\n=== bench_annotate results ===")
        print(
            f"cpus: {os.cpu_count()}, loop torch threads {args.torch_threads}, scale {SCALE}, batch {BATCH_SIZE}, images {loop_n}, faces {loop_faces}"
        )
        print(f"bare loop : {loop_n / loop_s:7.2f} images/s (before the job {loop_before:.1f} s, after it {loop_after:.1f} s)")
        print(f"job       : {loop_n / job_s:7.2f} images/s ({job_s:.1f} s; the job's own summary: {summary['images_per_second']:.2f})")
        print(f"ratio     : {loop_s / job_s:.2f}x")
        print(
            f"job batches: fill {summary['batch_fill']:.3f}, padding {summary['padding_fraction']:.1%}; faces: job {summary['faces']}, loop {loop_faces}"
        )
        if args.crops:
            encoded, stored, count = crop_bytes(work / "crops")
            crop_s, worker_s = crops_summary["crop_seconds"], crops_summary["worker_seconds"]
            print(
                f"job --crops {args.crops}: {loop_n / crops_s:7.2f} images/s ({crops_s:.1f} s; without crops {loop_n / job_s:.2f}, "
                f"{crops_s / job_s - 1:+.1%} time); {count} crops of {crops_summary['faces']} faces, "
                f"{encoded / max(count, 1):.0f} B per crop encoded, {stored / max(count, 1):.0f} B per crop in the crops objects; "
                f"the actors spent {crop_s:.1f} s of {worker_s:.1f} s on crops ({crop_s / worker_s:.1%}, "
                f"{crop_s / max(count, 1) * 1e3:.2f} ms per crop)"
            )
        if peaks:
            small, big = peaks[args.mem_small], peaks[large]
            print(
                f"peak RSS of Ray processes: {args.mem_small} images {small / 2**20:.0f} MiB, {large} images {big / 2**20:.0f} MiB, growth {100 * (big / small - 1):+.1f} %"
            )
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
