"""Every entrypoint with its S3 settings given only as flags.

A second moto S3 server holds all the data, the model, the registry and the outputs; the
environment (``AWS_ENDPOINT_URL``) keeps pointing at the session's server, where none of it
exists. So a single read or write that does not get ``--s3-endpoint-url`` (on the driver or on a
Ray worker) fails the entrypoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pytest

from jobs import annotate, evaluate, registry, train
from jobs._local_s3 import LocalS3
from retinaface_core.registry import ModelRegistry, validation_record
from retinaface_core.storage import StorageOptions, filesystem
from retinaface_core.training import model_checkpoint_bytes
from retinaface_core.weights import load_weights
from retinaface_core.widerface import read_bbx_gt, write_bbx_gt
from schemas.annotation import partitioning

GT_FILES = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")
BUCKET = "elsewhere"


@pytest.fixture(scope="module")
def other_s3(s3_server: str, shared_dir: Path, gt_dir: Path, weights_dir: Path):
    """(endpoint, storage options) of a second server that the environment does not name."""
    images_dir = shared_dir / "widerface" / "val" / "images"
    images = sorted(images_dir.glob("*/*.jpg"))
    if len(images) < 12:
        pytest.skip(f"the 12 WIDER val images are absent under {images_dir}")
    with LocalS3() as server:
        assert server.endpoint != s3_server
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
        options = StorageOptions(endpoint_url=server.endpoint)
        fs, _ = filesystem(f"s3://{BUCKET}", options)
        for path in images:
            fs.pipe_file(f"{BUCKET}/val/images/{path.parent.name}/{path.name}", path.read_bytes())
        for name in GT_FILES:
            fs.pipe_file(f"{BUCKET}/gt/{name}", (gt_dir / name).read_bytes())
        annotations = {a.name: a for a in read_bbx_gt(str(gt_dir / "wider_face_val_bbx_gt.txt"), degenerate="drop")}
        names = [f"{p.parent.name}/{p.name}" for p in images]
        write_bbx_gt([annotations[n] for n in names], f"s3://{BUCKET}/val/wider_face_val_bbx_gt.txt", options)
        loaded = load_weights("mobilenet0.25-1mb")
        fs.pipe_file(f"{BUCKET}/models/published.pth", (weights_dir / "mobilenet0.25_Final.pth").read_bytes())
        models = ModelRegistry(f"s3://{BUCKET}/registry", options)
        version = models.register(
            model_checkpoint_bytes(loaded.model),
            config={"model": loaded.config.to_dict()},
            metrics={"val": validation_record({"easy": 0.5, "medium": 0.5, "hard": 0.5}, val="v", val_gt=None, scale="long:320")},
            train_data={},
        )
        assert models.promote(version.version).promoted
        yield server.endpoint, options


def _rows(output: str, options: StorageOptions) -> int:
    fs, path = filesystem(output, options)
    return pads.dataset(f"{path}/annotations", filesystem=fs, format="parquet", partitioning=partitioning()).count_rows()


@pytest.mark.parametrize(
    "model_flag",
    [["--weights", f"s3://{BUCKET}/models/published.pth"], ["--model", f"s3://{BUCKET}/registry"]],
    ids=["weights", "registry"],
)
def test_annotate_with_flags_only(ray_session, other_s3, model_flag) -> None:
    endpoint, options = other_s3
    output = f"s3://{BUCKET}/out-{model_flag[0][2:]}"
    code = annotate.main(
        [
            "--input",
            f"s3://{BUCKET}/val/images/",
            "--output",
            output,
            "--s3-endpoint-url",
            endpoint,
            "--scale",
            "long:320",
            "--images-per-shard",
            "6",
            "--actors",
            "1",
            *model_flag,
        ]
    )
    assert code == 0
    assert _rows(output, options) == 12
    fs, path = filesystem(output, options)
    dataset = json.loads(fs.cat_file(f"{path}/_dataset.json"))
    assert dataset["model_version"] == ("v0001" if model_flag[0] == "--model" else None)


def test_evaluate_with_flags_only(ray_session, other_s3) -> None:
    endpoint, options = other_s3
    output = f"s3://{BUCKET}/eval"
    code = evaluate.main(
        [
            "--images",
            f"s3://{BUCKET}/val/images",
            "--ground-truth",
            f"s3://{BUCKET}/gt",
            "--output",
            output,
            "--s3-endpoint-url",
            endpoint,
            "--scale",
            "long:320",
            "--subset",
            "--actors",
            "1",
            "--model",
            f"s3://{BUCKET}/registry",
        ]
    )
    assert code == 0
    fs, path = filesystem(output, options)
    report = json.loads(fs.cat_file(f"{path}/ap.json"))
    assert report["num_images"] == 12 and report["model_version"] == "v0001"
    assert fs.exists(f"{path}/pr_curves.png")


def test_train_and_registry_with_flags_only(ray_session, other_s3, capsys) -> None:
    endpoint, options = other_s3
    data = f"s3://{BUCKET}/val"
    code = train.main(
        [
            "--train",
            data,
            "--val",
            data,
            "--val-gt",
            f"s3://{BUCKET}/gt",
            "--val-scale",
            "long:320",
            "--init",
            f"s3://{BUCKET}/registry",
            "--s3-endpoint-url",
            endpoint,
            "--storage",
            f"s3://{BUCKET}/runs",
            "--name",
            "flags",
            "--num-workers",
            "1",
            "--loader-workers",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--train-size",
            "160",
            "--no-augment",
            "--registry",
            f"s3://{BUCKET}/registry",
            "--max-failures",
            "0",
        ]
    )
    assert code == 0
    assert ModelRegistry(f"s3://{BUCKET}/registry", options).versions() == ["v0001", "v0002"]
    capsys.readouterr()
    assert registry.main(["list", "--registry", f"s3://{BUCKET}/registry", "--s3-endpoint-url", endpoint]) == 0
    listed = capsys.readouterr().out
    assert "* v0001" in listed and "v0002" in listed
