"""Face alignment (``retinaface_core.align``) on the shared photos: fit, speed and crop sizes.

Detects the faces of the 2 crowd photos and the 12 WIDER val images (``--scale``), then for the
faces of at least ``--min-size`` px:

- the residual (RMS distance at the crop size between the landmarks mapped by each face's
  similarity transform and the ArcFace template): percentiles, for all of them and for those
  with |yaw| < 15 degrees, and the mean offset of each landmark from its template point;
- align time per face on ``--device`` (transforms + warp, the images already on the device;
  the median of ``--repeats`` runs) and, for comparison, ``cv2.warpAffine`` per face on the CPU;
- bytes per face of the encoded crops, JPEG and PNG, and encoding time per face.

    python -m benchmarks.bench_align --size 112 --device cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--scale", default="original", help="detector input scale")
    parser.add_argument("--min-size", type=float, default=32.0, help="faces of at least this many px (box short side)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    os.environ.setdefault("RETINAFACE_WEIGHTS_DIR", str(args.shared / "weights"))
    torch.set_num_threads(args.threads)

    from retinaface_core import Detector, align_faces
    from retinaface_core.align import arcface_template, encode_crops
    from retinaface_core.image_io import read_image
    from retinaface_core.quality import face_size, pose_angles

    paths = sorted((args.shared / "images").glob("*.jpg")) + sorted((args.shared / "widerface/val/images").glob("*/*.jpg"))
    images = [read_image(str(p)) for p in paths]
    detections = Detector(scale=args.scale).detect(images)
    keep = [face_size(torch.from_numpy(d.boxes)).numpy() >= args.min_size for d in detections]
    landmarks = np.concatenate([d.landmarks[k] for d, k in zip(detections, keep)])
    index = np.repeat(np.arange(len(images)), [int(k.sum()) for k in keep])
    count = len(landmarks)

    device = torch.device(args.device)
    on_device = [torch.from_numpy(im).to(device) for im in images]
    points = torch.from_numpy(landmarks).to(device)
    result = align_faces(on_device, points, args.size, image_index=index)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def align() -> None:
        align_faces(on_device, points, args.size, image_index=index)
        sync()

    matrices = result.matrices.cpu().numpy().astype(np.float64)
    seconds = timed(align, args.repeats)
    reference = timed(lambda: [cv2.warpAffine(images[i], m, (args.size, args.size)) for i, m in zip(index, matrices)], args.repeats)
    crops = result.crops.cpu().numpy()
    encoded = {fmt: encode_crops(crops, fmt) for fmt in ("jpeg", "png")}
    encode_s = {fmt: timed(lambda fmt=fmt: encode_crops(crops, fmt), 1) for fmt in ("jpeg", "png")}

    residuals = result.residuals.cpu().numpy()
    yaw = np.abs(pose_angles(torch.as_tensor(landmarks))[0].numpy())
    mapped = np.einsum("fij,fkj->fki", matrices[:, :, :2], landmarks) + matrices[:, None, :, 2]
    offsets = (mapped - arcface_template(args.size)).mean(axis=0)

    print("\n=== bench_align results ===")
    print(f"{len(images)} photos, scale {args.scale}: {count} faces >= {args.min_size:g} px; crops {args.size} px; device {device}")
    for name, mask in (("all", np.ones(count, bool)), ("|yaw| < 15", yaw < 15)):
        p50, p90, p100 = np.percentile(residuals[mask], [50, 90, 100])
        within = (residuals[mask] < 2 * args.size / 112).mean()
        print(
            f"residual, {name:10s} ({mask.sum():3d} faces): median {p50:.2f}, p90 {p90:.2f}, max {p100:.2f} px; "
            f"{within:.0%} within 2 px at 112"
        )
    print("mean offset of each landmark from the template (x, y px):", " ".join(f"({x:+.2f}, {y:+.2f})" for x, y in offsets))
    print(
        f"align: {seconds / count * 1e3:.3f} ms per face ({count / seconds:.0f} faces/s); "
        f"cv2.warpAffine on the CPU {reference / count * 1e3:.3f} ms"
    )
    for fmt in ("jpeg", "png"):
        sizes = np.array([len(b) for b in encoded[fmt]])
        per_face = encode_s[fmt] / count * 1e3
        print(f"{fmt}: {sizes.mean():.0f} B per face (median {np.median(sizes):.0f}), encoded in {per_face:.3f} ms per face")


if __name__ == "__main__":
    main()
