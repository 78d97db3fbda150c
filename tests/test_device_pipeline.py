"""The device pipeline on the CPU: bounded canvases, fixed-size batches, tensor inputs, batched NMS,
JPEG probing and EXIF orientation for device decoding (every device function runs on a CPU here)."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from retinaface_core import Detector, InputScale, load_weights
from retinaface_core.batching import PLAN_WINDOW_BATCHES, canvas_ladder, ladder_canvases, plan_batches
from retinaface_core.device_decode import orient
from retinaface_core.image_io import decode_image, fetch_image, probe_jpeg
from retinaface_core.postprocessing import batched_nms, nms_keep
from retinaface_core.preprocessing import group_batch


@pytest.fixture(scope="module")
def published(weights_dir):
    return load_weights("mobilenet0.25-1mb")


@pytest.fixture(scope="module")
def crowds(shared_dir: Path) -> list[np.ndarray]:
    return [cv2.imread(str(shared_dir / "images" / name)) for name in ("crowd_selfie.jpg", "crowd_baseball.jpg")]


@pytest.mark.parametrize("batch_size", [32, 64])
def test_bucket_canvases_are_few_and_pad_little_on_the_wider_size_mix(val_sizes, random_weights, batch_size):
    scale = InputScale.parse("long:640")
    sizes = random.Random(0).sample(val_sizes, len(val_sizes))
    seen, canvas_pixels, content_pixels = set(), 0, 0
    window = batch_size * PLAN_WINDOW_BATCHES
    ladder = canvas_ladder(scale.max_side)
    for start in range(0, len(sizes), window):
        chunk = sizes[start : start + window]
        shapes = [scale.input_shape(h, w, 1) for h, w in chunk]
        for batch in plan_batches(shapes, batch_size, "bucket", ladder):
            seen.add(batch.canvas)
            canvas_pixels += len(batch.indices) * batch.canvas[0] * batch.canvas[1]
            content_pixels += sum(shapes[i][0] * shapes[i][1] for i in batch.indices)
    assert len(seen) <= 16, sorted(seen)
    assert 1 - content_pixels / canvas_pixels <= 0.2
    # Every canvas met is one the detector builds before its first pass.
    detector = Detector(random_weights, scale="long:640", batching="bucket")
    assert seen <= set(detector.canvases())
    assert len(detector.canvases()) <= 16


def test_canvas_ladder_bounds_any_long_side():
    for side in (96, 320, 600, 640, 1024, 1600):
        ladder = canvas_ladder(side)
        assert ladder[-1] == side and ladder[0] >= side / 2 and len(ladder) <= 6
        assert all(b > a for a, b in zip(ladder, ladder[1:]))
        assert len(ladder_canvases(side, ladder)) <= 2 * len(ladder) - 1
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for batch in plan_batches(shapes, 16, "bucket", ()):
        assert batch.canvas[0] % 64 == 0 and batch.canvas[1] % 64 == 0
        assert all(shapes[i][0] <= batch.canvas[0] and shapes[i][1] <= batch.canvas[1] for i in batch.indices)


def test_blank_rows_of_a_fixed_size_batch_change_no_detection(random_weights, photo):
    detector = Detector(random_weights, scale="long:320", batching="bucket", score_threshold=0.9)
    images = [photo, np.ascontiguousarray(photo[:400]), np.ascontiguousarray(photo[:, :300])]
    scale = detector.scale
    for fixed in (False, True):
        groups = group_batch(images, scale, 1, detector.config.mean_bgr, "bucket", 4, fixed_batch=fixed)
        assert [g.host.shape[0] for g in groups] == [4 if fixed else 3]
    padded = group_batch(images, scale, 1, detector.config.mean_bgr, "bucket", 4, fixed_batch=True)[0]
    plain = dataclasses.replace(padded, host=padded.host[:3].clone())
    a, b = detector.candidates(plain), detector.candidates(padded)
    assert a.scores.shape[0] == b.scores.shape[0] == 3
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)


def test_tensor_images_give_the_faces_of_numpy_images(published, crowds):
    """Pixels decoded on a device are resized there: same faces as OpenCV's resize of the array."""
    detector = Detector(published, scale="long:640", batching="bucket", score_threshold=0.5)
    from_arrays = detector.detect(crowds, batch_size=2)
    from_tensors = detector.detect([torch.from_numpy(image) for image in crowds], batch_size=2)
    for a, b in zip(from_arrays, from_tensors):
        assert len(a) > 20 and abs(len(a) - len(b)) <= max(2, len(a) // 100)
        # Each face found from the array has a match from the tensor within a pixel or two.
        gap = np.abs(a.boxes[:, None, :] - b.boxes[None, :, :]).max(axis=2).min(axis=1)
        assert np.mean(gap < 2.0) >= 0.98, np.sort(gap)[-5:]


@pytest.mark.parametrize("scale, threshold", [("long:640", 0.5), ("long:640", 0.02), ("original", 0.3)])
def test_batched_nms_keeps_the_faces_opencv_nms_keeps_on_the_crowd_photos(published, crowds, scale, threshold):
    detector = Detector(published, scale=scale, batching="bucket", score_threshold=threshold)
    for group in detector._groups(crowds, detector.scale, 2):
        candidates = detector.candidates(group)
        reference = nms_keep(candidates, 0.4, threshold)  # OpenCV on the CPU
        batched = batched_nms(candidates.boxes, candidates.scores, 0.4, threshold)
        assert int(reference.sum()) > 20
        assert torch.equal(reference, batched), int((reference ^ batched).sum())


def test_batched_nms_is_greedy_nms_on_random_boxes():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n, k = int(rng.integers(1, 5)), int(rng.integers(1, 300))
        corners = rng.uniform(0, 200, (n, k, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(1, 60, (n, k, 2))], axis=2).astype(np.float32)
        scores = np.sort(rng.uniform(0, 1, (n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.4, 0.3).numpy()
        for row in range(n):
            from retinaface_core.postprocessing import nms

            valid = int(np.count_nonzero(scores[row] > 0.3))
            expected = np.zeros(k, bool)
            expected[nms(boxes[row, :valid], scores[row, :valid], 0.4, 0.3)] = True
            assert np.array_equal(keep[row], expected)


def _jpeg_with_orientation(image_rgb: np.ndarray, orientation: int, mode: str = "RGB") -> bytes:
    im = Image.fromarray(image_rgb).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_device_matches_pillows_exif_transpose(photo, orientation):
    rgb = np.ascontiguousarray(photo[:300, :200, ::-1])
    data = _jpeg_with_orientation(rgb, orientation)
    header = probe_jpeg(data)
    assert header is not None and header.orientation == orientation and (header.height, header.width) == (300, 200)
    stored = decode_image(_jpeg_with_orientation(rgb, 1), "stored")
    displayed = decode_image(data, "displayed")
    assert np.array_equal(orient(torch.from_numpy(stored), orientation).numpy(), displayed)


def test_only_complete_rgb_or_grey_jpegs_within_the_limit_go_to_the_device(photo, tmp_path):
    rgb = np.ascontiguousarray(photo[:, :, ::-1])
    good = _jpeg_with_orientation(rgb, 6)
    assert probe_jpeg(good) is not None and probe_jpeg(_jpeg_with_orientation(rgb, 1, "L")) is not None
    assert probe_jpeg(good[: len(good) // 2]) is None  # truncated: the CPU decoder names it
    assert probe_jpeg(good, max_pixels=1000) is None  # too large: the CPU decoder refuses it from its header
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert probe_jpeg(cmyk.getvalue()) is None and probe_jpeg(png.getvalue()) is None
    # fetch_image leaves such a JPEG undecoded, with its displayed size known from the header.
    path = tmp_path / "rotated.jpg"
    path.write_bytes(good)
    item = fetch_image(str(path), device_jpeg=True)
    assert item.image is None and item.encoded == good and item.size == (512, 512)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    item = fetch_image(str(truncated), device_jpeg=True)
    assert item.encoded is None and item.error_kind == "truncated"


def test_the_canvases_to_warm_up_are_the_ladder_of_the_scale(random_weights):
    detector = Detector(random_weights, scale="long:160", batching="bucket")
    canvases = detector.canvases()
    assert (160, 160) in canvases and len(canvases) == 2 * len(canvas_ladder(160)) - 1
    assert Detector(random_weights, scale="square:160", batching="bucket").canvases() == [(160, 160)]
    assert Detector(random_weights, scale="original", batching="bucket").canvases() == []


def test_the_job_and_the_core_need_no_s3fs_for_local_folders(repo_root, tmp_path, photo):
    """A GPU host with torch and Ray alone (no s3fs) runs the job on local folders."""
    import subprocess
    import sys

    cv2.imwrite(str(tmp_path / "a.jpg"), photo)
    script = f"""
import sys
class NoS3fs:
    def find_spec(self, name, path=None, target=None):
        if name == "s3fs" or name.startswith("s3fs."):
            raise ImportError("s3fs is not installed here")
sys.meta_path.insert(0, NoS3fs())
import jobs.annotate.job, jobs.annotate.worker, retinaface_core
from jobs._inputs import list_input
from retinaface_core.image_io import read_image
assert len(list_input({str(tmp_path)!r}).uris) == 1 and read_image({str(tmp_path / "a.jpg")!r}).shape == (512, 512, 3)
assert "s3fs" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], cwd=repo_root, check=True)


def test_ap_of_the_device_path_on_the_shared_wider_val_images(published, shared_dir, gt_dir):
    """The device path (pixels as tensors, resized by torch, NMS batched) on a CPU: the AP of the
    reference path (arrays resized by OpenCV, OpenCV's NMS) within 0.1 pt on every level."""
    from retinaface_core.evaluation import evaluate
    from retinaface_core.postprocessing import FaceBatch
    from retinaface_core.widerface import read_ground_truth_mat, submission_rows

    root = shared_dir / "widerface/val/images"
    paths = sorted(root.glob("*/*.jpg"))
    images = [cv2.imread(str(p)) for p in paths]
    detector = Detector(published, scale="long:640", score_threshold=0.02, batching="bucket")
    gt = read_ground_truth_mat(str(gt_dir))

    def ap(found) -> dict[str, float]:
        rows = {str(p.relative_to(root).with_suffix("")): submission_rows(d.boxes, d.scores) for p, d in zip(paths, found)}
        return {level: 100 * value for level, value in evaluate(rows, gt, subset=True).ap.items()}

    reference = ap(detector.detect(images, batch_size=8))
    # What a GPU runs: tensors resized by torch, and the batched NMS instead of OpenCV's.
    tensors = [torch.from_numpy(image) for image in images]
    parts = []
    for group in detector._groups(tensors, detector.scale, 8):
        candidates = detector.candidates(group)
        keep = batched_nms(candidates.boxes, candidates.scores, 0.4, 0.02)
        keep &= keep.cumsum(dim=1) <= 750
        rows, columns = keep.nonzero(as_tuple=True)
        faces = FaceBatch(
            rows, candidates.boxes[rows, columns], candidates.scores[rows, columns], candidates.landmarks[rows, columns], len(group.indices)
        )
        parts.append((faces, group.indices))
    device_path = ap(FaceBatch.merge(parts, len(images), torch.device("cpu")).detections())
    print(f"AP reference {reference}\nAP device path {device_path}")
    for level in reference:
        assert abs(device_path[level] - reference[level]) <= 0.1, (level, reference, device_path)


def test_device_resize_gives_opencvs_pixels(crowds, shared_dir):
    from retinaface_core.preprocessing import resize_tensor

    photos = crowds + [cv2.imread(str(p)) for p in sorted((shared_dir / "widerface/val/images").glob("*/*.jpg"))[:4]]
    for image in photos:
        h, w = image.shape[:2]
        for size in (
            (round(h * 640 / max(h, w)), round(w * 640 / max(h, w))),
            (h // 2, w // 2),
            (h * 2 // 3, w * 3 // 5),
            (h + 37, w + 51),
        ):
            expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
            resized = resize_tensor(torch.from_numpy(image), *size).numpy()
            differs = np.abs(expected.astype(np.int16) - resized)
            assert differs.max() <= 1 and (differs > 0).mean() < 1e-3, (image.shape, size, (differs > 0).mean())
            if size[0] < h:  # shrinking: bit-exact
                assert differs.max() == 0, (image.shape, size)
