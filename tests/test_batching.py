"""Full batches at any image mix (the bucket policy), half precision, and what the job reports of them."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from benchmarks.bench_device import simulate_plan
from jobs.annotate.plan import ListedImages, Plan
from jobs.annotate.summary import shard_summary as _summary
from jobs.annotate.summary import summarise
from retinaface_core import Detector, load_weights
from retinaface_core.batching import PLAN_WINDOW_BATCHES, BatchStats, plan_batches
from retinaface_core.evaluation import evaluate
from retinaface_core.model import InferenceRetinaFace, optimize_for_inference
from retinaface_core.postprocessing import Detections
from retinaface_core.preprocessing import to_network_input
from retinaface_core.widerface import read_ground_truth_mat, submission_rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_plan_meets_the_fill_and_padding_targets_on_the_wider_val_size_mix(val_sizes, seed):
    sizes = random.Random(seed).sample(val_sizes, len(val_sizes))
    exact = simulate_plan(sizes, "long:640", 32, 32, "exact")
    bucket = simulate_plan(sizes, "long:640", 32, 32 * PLAN_WINDOW_BATCHES, "bucket")
    assert exact.batch_fill < 0.1  # the problem: about one image per forward pass
    assert bucket.batch_fill >= 0.9 and bucket.padding_fraction <= 0.2, bucket


def test_bucket_plan_gives_full_batches_on_any_mix():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, batch_size = int(rng.integers(1, 200)), int(rng.integers(1, 40))
        shapes = [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(n)]
        batches = plan_batches(shapes, batch_size, "bucket")
        assert sorted(i for b in batches for i in b.indices) == list(range(n))
        assert [len(b.indices) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        for b in batches:
            assert all(shapes[i][0] <= b.canvas[0] and shapes[i][1] <= b.canvas[1] for i in b.indices)


def test_exact_plan_keeps_each_shape_on_its_own_canvas():
    shapes = [(480, 640), (640, 480), (480, 640), (360, 640)]
    batches = plan_batches(shapes, 8, "exact")
    assert [(b.indices, b.canvas) for b in batches] == [([0, 2], (480, 640)), ([1], (640, 480)), ([3], (360, 640))]


def mixed_images(photo: np.ndarray) -> list[np.ndarray]:
    return [photo, photo[100:400, 50:450].copy(), photo[:, ::-1].copy(), cv2.resize(photo, (333, 203)), photo[:, 40:400].copy()]


def match_within(a: Detections, b: Detections, tolerance: float) -> np.ndarray:
    """Per detection of ``a``: is there one of ``b`` with every box coordinate within ``tolerance`` px?"""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    return (np.abs(a.boxes[:, None, :] - b.boxes[None]).max(-1) <= tolerance).any(1)


def test_bucket_padding_keeps_detections_on_the_random_network(random_weights, photo):
    images = mixed_images(photo)
    exact = Detector(random_weights, scale="long:640", score_threshold=0.9).detect(images)
    padded = Detector(random_weights, scale="long:640", score_threshold=0.9, batching="bucket").detect(images, batch_size=2)
    matched = np.concatenate([match_within(e, p, 1.0) for e, p in zip(exact, padded)])
    # Padding changes activations within the receptive field of the padded border, so a few
    # detections near it move (measured: 96.5 % of 1,194 within 1 px, 88 % within 0.01 px).
    assert matched.mean() >= 0.95, matched.mean()


def test_bucket_without_padding_is_exactly_the_exact_policy(random_weights, photo):
    # Equal sizes that are multiples of 32 share one canvas with no padding at all.
    images = [photo, photo[:, ::-1].copy(), photo[::-1].copy()]
    exact = Detector(random_weights, score_threshold=0.9).detect(images)
    bucket = Detector(random_weights, score_threshold=0.9, batching="bucket").detect(images, batch_size=3)
    for a, b in zip(exact, bucket):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_detector_counts_fill_and_padding(random_weights, photo):
    detector = Detector(random_weights, scale="long:320", batching="bucket")
    detector.detect(mixed_images(photo), batch_size=2)
    stats = detector.stats
    assert (stats.passes, stats.images, stats.slots) == (3, 5, 6)
    assert 0 < stats.padding_fraction < 0.5


def test_fp16_on_cpu_is_refused_clearly(random_weights):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Detector(random_weights, precision="fp16")


def test_bf16_runs_the_network_in_bf16_and_post_processing_in_fp32(random_weights, photo):
    detector = Detector(random_weights, precision="bf16", score_threshold=0.9)
    assert next(detector.network.parameters()).dtype == torch.bfloat16
    assert detector.forward(photo[None]).logits.dtype == torch.bfloat16
    result = detector.detect(photo)[0]
    assert len(result) > 0 and result.boxes.dtype == np.float32


@pytest.fixture(scope="module")
def published(weights_dir):
    return load_weights("mobilenet0.25-1mb")


@pytest.mark.parametrize("name", ["crowd_baseball", "crowd_selfie"])
def test_bf16_detections_match_fp32_on_the_crowd_photos(published, shared_dir, name):
    image = cv2.imread(str(shared_dir / f"images/{name}.jpg"))
    # A lower threshold for the other precision, so that a face just above 0.5 in one is found in the other.
    fp32 = Detector(published, scale="long:640", score_threshold=0.3).detect(image)[0]
    bf16 = Detector(published, scale="long:640", score_threshold=0.3, precision="bf16").detect(image)[0]
    for a, b in ((fp32, bf16), (bf16, fp32)):
        strong = Detections(a.boxes[a.scores >= 0.5], a.scores[a.scores >= 0.5], a.landmarks[a.scores >= 0.5])
        within = match_within(strong, b, 1.0)
        # Measured: 25 of 25 and 194 of 195 faces within 1 px (median 0.12 px); the one other,
        # on the selfie, is 6.9 px off, where NMS keeps a neighbouring anchor of nearly equal score.
        assert within.mean() >= 0.99, (within.sum(), len(within))
        assert match_within(strong, b, 8.0).all()


@pytest.mark.parametrize("name", ["astronaut", "crowd_selfie"])
def test_bias_correction_makes_bf16_outputs_closer_to_fp32(published, shared_dir, photo, name):
    image = photo if name == "astronaut" else cv2.imread(str(shared_dir / f"images/{name}.jpg"))
    x = to_network_input(image[None], published.config.mean_bgr, published.config.channel_order, torch.device("cpu"))
    with torch.no_grad():
        fp32 = torch.cat(optimize_for_inference(published.model)(x), dim=-1)
        rounded = torch.cat(InferenceRetinaFace(published.model).to(torch.bfloat16)(x.to(torch.bfloat16)), dim=-1).float()
        corrected = torch.cat(optimize_for_inference(published.model, torch.bfloat16)(x.to(torch.bfloat16)), dim=-1).float()
    assert corrected.dtype == rounded.dtype == torch.float32 and corrected.shape == fp32.shape
    # Measured: a 16-28 % smaller RMS error over all 16 outputs per anchor, and a 3-4x smaller
    # mean shift of the box offsets.
    rms = {k: (v - fp32).pow(2).mean().sqrt().item() for k, v in (("rounded", rounded), ("corrected", corrected))}
    assert rms["corrected"] <= 0.9 * rms["rounded"], rms
    shift = {k: (v - fp32)[..., :4].mean(dim=(0, 1)).norm().item() for k, v in (("rounded", rounded), ("corrected", corrected))}
    assert shift["corrected"] <= 0.5 * shift["rounded"], shift


def wider_ap(detector: Detector, shared_dir: Path, batch_size: int) -> dict[str, float]:
    """Easy/Medium/Hard AP of ``detector`` on the shared WIDER val images (subset mode), all in one detect call."""
    root = shared_dir / "widerface/val/images"
    paths = sorted(root.glob("*/*.jpg"))
    found = detector.detect([cv2.imread(str(p)) for p in paths], batch_size=batch_size)
    predictions = {str(p.relative_to(root).with_suffix("")): submission_rows(d.boxes, d.scores) for p, d in zip(paths, found)}
    gt = read_ground_truth_mat(str(shared_dir / "widerface/ground_truth"))
    return {level: 100 * ap for level, ap in evaluate(predictions, gt, subset=True).ap.items()}


def test_ap_of_bucket_on_the_shared_wider_val_images(published, shared_dir, gt_dir):
    def ap(**kwargs) -> dict[str, float]:
        return wider_ap(Detector(published, scale="long:640", score_threshold=0.02, **kwargs), shared_dir, batch_size=8)

    exact, bucket = ap(), ap(batching="bucket")
    print(f"AP exact {exact}\nAP bucket {bucket}")
    for level in exact:
        assert abs(bucket[level] - exact[level]) <= 0.1, (level, exact, bucket)


BF16_SCALES = ("long:560", "long:640", "long:720", "long:960", "original")


def test_ap_of_bf16_on_the_shared_wider_val_images(published, shared_dir, gt_dir):
    """bf16 within 0.3 pt of fp32: at the evaluation job's default scale (original size), and on
    average over five scales. On 12 images one re-ranked face moves a level's AP by up to a point,
    so a single scale is a noisy measure (long:640 Medium: -0.87 pt with the bias correction,
    -1.12 without); the average over scales is a steadier one (module docs: the table)."""
    differences = []
    for scale in BF16_SCALES:
        fp32 = wider_ap(Detector(published, scale=scale, score_threshold=0.02), shared_dir, batch_size=8)
        bf16 = wider_ap(Detector(published, scale=scale, score_threshold=0.02, precision="bf16"), shared_dir, batch_size=8)
        differences.append({level: bf16[level] - fp32[level] for level in fp32})
        print(f"{scale}: fp32 {fp32} bf16 {bf16}")
    at_original = differences[BF16_SCALES.index("original")]
    mean = {level: float(np.mean([d[level] for d in differences])) for level in at_original}
    assert all(abs(d) <= 0.3 for d in at_original.values()), at_original
    assert all(abs(d) <= 0.3 for d in mean.values()), (mean, differences)


def test_job_summary_reports_batch_fill_and_padding():
    stats = BatchStats(passes=3, images=20, slots=24, canvas_pixels=1000, content_pixels=850)
    rows = [{**_summary("a", [], stats), "images": 20}, {**_summary("b", []), "error": "boom"}]
    plan = Plan(
        store=None, listed=20, committed=0, new=ListedImages(pa.chunked_array([["x"] * 20])), retry={},  # type: ignore[arg-type]
        removed=0, removed_examples=[], settings={}, model=None, todo=2,  # type: ignore[arg-type]
    )  # fmt: skip
    summary = summarise("run", plan, rows, 1.0)
    assert summary["forward_passes"] == 3
    assert summary["batch_fill"] == pytest.approx(20 / 24, abs=1e-4)
    assert summary["padding_fraction"] == pytest.approx(0.15)
