"""jobs.evaluate end to end: real WIDER val images and official ground truth on a moto S3 endpoint, real Ray."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import s3fs

from jobs import evaluate as evaluate_job
from retinaface_core import Detector
from retinaface_core.evaluation import evaluate
from retinaface_core.registry import ModelRegistry
from retinaface_core.training import model_checkpoint_bytes
from retinaface_core.weights import load_weights
from retinaface_core.widerface import read_ground_truth_mat, read_predictions

GT_FILES = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")


@pytest.fixture(scope="module")
def wider_bucket(shared_dir, gt_dir, make_bucket, s3_server):
    images = sorted((shared_dir / "widerface/val/images").glob("*/*.jpg"))
    if len(images) < 12:
        pytest.skip(f"the 12 WIDER val images are absent under {shared_dir / 'widerface/val/images'}")
    bucket = make_bucket("wider")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for path in images:
        fs.pipe(f"{bucket}/val/images/{path.parent.name}/{path.name}", path.read_bytes())
    for name in GT_FILES:
        fs.pipe(f"{bucket}/gt/{name}", (gt_dir / name).read_bytes())
    return bucket, images


def run_evaluate(bucket: str, output: str, *flags: str, images: str = "val/images") -> int:
    """``jobs.evaluate`` on the bucket's ``images`` prefix against its ground truth, writing ``output``."""
    return evaluate_job.main(["--images", f"s3://{bucket}/{images}", "--ground-truth", f"s3://{bucket}/gt", "--output", output, *flags])


def direct_evaluation(images, scale, gt_dir):
    detector = Detector(scale=scale, score_threshold=0.02, nms_iou=0.4, top_k=5000, keep_top_k=750)
    predictions = {}
    for path in images:
        faces = detector.detect(cv2.imread(str(path)))[0]
        xywh = np.concatenate([faces.boxes[:, :2], faces.boxes[:, 2:] - faces.boxes[:, :2], faces.scores[:, None]], 1)
        predictions[f"{path.parent.name}/{path.stem}"] = xywh.astype(np.float64)
    return evaluate(predictions, read_ground_truth_mat(str(gt_dir)), subset=True)


@pytest.mark.parametrize("scale", ["original", "long:640"])
def test_evaluate_job_matches_the_in_package_evaluation(ray_session, wider_bucket, gt_dir, scale, capsys):
    bucket, images = wider_bucket
    out = f"s3://{bucket}/eval/{scale.replace(':', '')}"
    code = run_evaluate(bucket, out, "--scale", scale, "--subset", "--actors", "1", "--batch-size", "4")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| easy |" in printed and "12 images" in printed

    fs = s3fs.S3FileSystem()
    report = json.loads(fs.cat(f"{out}/ap.json"))
    assert report["num_images"] == 12 and report["model_name"] == "mobilenet0.25-1mb"
    expected = direct_evaluation(images, scale, gt_dir)
    for level in ("easy", "medium", "hard"):
        assert 0.3 < report["ap"][level] <= 1.0
        assert report["ap"][level] == pytest.approx(expected.ap[level], abs=1e-4)
    predictions = read_predictions(f"{out}/predictions")
    assert sorted(predictions) == sorted(f"{p.parent.name}/{p.stem}" for p in images)
    assert sum(len(p) for p in predictions.values()) == report["num_predictions"]
    png = fs.cat(f"{out}/pr_curves.png")
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3
    assert "| hard |" in fs.cat(f"{out}/ap.md").decode()


def test_images_outside_the_val_set_are_refused(ray_session, wider_bucket, shared_dir, capsys):
    bucket, _ = wider_bucket
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{bucket}/other/images/0--Parade/not_a_val_image.jpg", (shared_dir / "images/crowd_baseball.jpg").read_bytes())
    code = run_evaluate(bucket, f"s3://{bucket}/eval/bad", images="other/images")
    assert code == 2
    assert "not WIDER val images" in capsys.readouterr().err


def test_evaluate_a_registry_version_records_it(ray_session, wider_bucket, tmp_path, capsys):
    bucket, _ = wider_bucket
    registry = ModelRegistry(str(tmp_path / "registry"))
    loaded = load_weights("mobilenet0.25-1mb")
    registry.register(
        model_checkpoint_bytes(loaded.model),
        config={"model": loaded.config.to_dict()},
        metrics={"val": {"data": "none", "ap": {"easy": 0.0, "medium": 0.0, "hard": 0.0}}},
        train_data={},
    )
    assert registry.promote("v0001").promoted
    out = f"s3://{bucket}/eval/registry"
    code = run_evaluate(bucket, out, "--weights", registry.uri, "--scale", "long:320", "--subset")
    assert code == 0, capsys.readouterr().err
    report = json.loads(s3fs.S3FileSystem().cat(f"{out}/ap.json"))
    assert report["model_version"] == "v0001"
    assert report["model_sha256"] == registry.get("v0001").sha256
