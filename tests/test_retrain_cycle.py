"""The weekly retraining cycle end to end on moto S3, as the CronJob runs it, through the jobs' CLIs:
baseline registered -> a run the gate refuses (exit 3) -> a better run promoted (exit 0) -> its
rerun changes nothing -> the annotation job's ``--model`` picks up the new current version ->
rollback restores the old one.

Kept tiny (3 real WIDER val images, 160 px crops, one epoch, one worker). The outcomes do not
depend on luck: the baseline is the published checkpoint with noise on its classification heads
(AP about 0.42 against 0.80 on these images at long:320), the refused run trains from scratch
for one epoch (AP about 0), the promoted one fine-tunes the published checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch

from jobs._config import from_values
from jobs._exit import ExitCode
from jobs.annotate import AnnotateConfig
from jobs.annotate import run as annotate
from jobs.registry import main as registry_cli
from jobs.train import main as train_cli
from retinaface_core.registry import ModelRegistry, resolve_model
from retinaface_core.storage import write_file
from retinaface_core.training import model_checkpoint_bytes
from retinaface_core.weights import load_weights
from retinaface_core.widerface import read_bbx_gt, write_bbx_gt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

IMAGES = (
    "11--Meeting/11_Meeting_Meeting_11_Meeting_Meeting_11_176.jpg",
    "12--Group/12_Group_Group_12_Group_Group_12_249.jpg",
    "12--Group/12_Group_Group_12_Group_Group_12_728.jpg",
)
SCALE = "long:320"


@pytest.fixture(scope="module")
def bucket(shared_dir: Path, weights_dir: Path, make_bucket) -> str:
    """A bucket with ``wider/`` (3 images and their official boxes) and ``baseline.pth``."""
    name = make_bucket("cycle")
    images = shared_dir / "widerface" / "val" / "images"
    annotations = {
        a.name: a for a in read_bbx_gt(str(shared_dir / "widerface" / "ground_truth" / "wider_face_val_bbx_gt.txt"), degenerate="drop")
    }
    fs = fsspec.filesystem("s3")
    for image in IMAGES:
        fs.pipe(f"{name}/wider/images/{image}", (images / image).read_bytes())
    write_bbx_gt([annotations[image] for image in IMAGES], f"s3://{name}/wider/wider_face_val_bbx_gt.txt")
    degraded = load_weights("mobilenet0.25-1mb")
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in degraded.model.ClassHead:
            weight = head.conv1x1.weight
            weight.add_(torch.randn(weight.shape, generator=noise) * weight.std())
    write_file(f"s3://{name}/baseline.pth", model_checkpoint_bytes(degraded.model))
    return name


def train_argv(bucket: str, name: str, init: str) -> list[str]:
    # --val spelled with a slash, the baseline's without: the same data for the gate.
    return [
        "--train", f"s3://{bucket}/wider", "--val", f"s3://{bucket}/wider/", "--val-scale", SCALE,
        "--init", init, "--train-size", "160", "--epochs", "1", "--num-workers", "1", "--batch-size", "2",
        "--loader-workers", "0", "--max-failures", "0", "--progress-every", "1",
        "--storage", f"s3://{bucket}/runs", "--name", name, "--registry", f"s3://{bucket}/models/retinaface", "--promote",
    ]  # fmt: skip


def line_starting(text: str, prefix: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return line


def test_weekly_cycle(ray_session, bucket: str, capsys, tmp_path: Path) -> None:
    registry_uri = f"s3://{bucket}/models/retinaface"
    registry = ModelRegistry(registry_uri)
    common = ["--registry", registry_uri]

    # A baseline: without one the gate promotes whatever comes first.
    register = ["register", *common, "--checkpoint", f"s3://{bucket}/baseline.pth", "--val", f"s3://{bucket}/wider", "--val-scale", SCALE]
    assert registry_cli(register) == ExitCode.OK
    assert registry_cli(["promote", *common, "v0001"]) == ExitCode.OK
    baseline_ap = registry.get("v0001").val_ap["easy"]
    assert 0.2 < baseline_ap < 0.6

    # A worse model: trained and registered, refused by the gate, exit 3; current unchanged.
    capsys.readouterr()
    assert train_cli(train_argv(bucket, "worse", "scratch")) == ExitCode.REFUSED
    out = capsys.readouterr().out
    assert "refused by the gate: val AP regressed against current v0001" in out
    assert registry.versions() == ["v0001", "v0002"] and registry.current() == "v0001"

    # A better one: promoted, exit 0. The checkpoint the summary prints loads as printed.
    better = train_argv(bucket, "better", "mobilenet0.25-1mb")
    assert train_cli(better) == ExitCode.OK
    out = capsys.readouterr().out
    assert "promoted: val AP not lower than current v0001" in out and registry.current() == "v0003"
    assert registry.get("v0003").val_ap["easy"] > baseline_ap
    printed = line_starting(out, "checkpoint: ").split()[1]
    assert printed.startswith(f"s3://{bucket}/runs/better/checkpoint_")
    assert load_weights(resolve_model(printed).checkpoint_uri).sha256 == registry.get("v0003").sha256
    # The worker ran this checkout's loop: progress lines and the fingerprint exist nowhere else.
    assert registry.get("v0003").val_data["images_sha256"] == registry.get("v0001").val_data["images_sha256"]

    # The same command again (a second trigger of the same week): nothing new, exit 0; a folder
    # an interrupted run left behind is removed.
    stale = f"s3://{bucket}/runs/better/checkpoint_2000-01-01_00-00-00.000000/model.pth"
    write_file(stale, b"left behind")
    assert train_cli(better) == ExitCode.OK
    out = capsys.readouterr().out
    assert "already registered as v0003" in out and registry.versions() == ["v0001", "v0002", "v0003"]
    assert not fsspec.filesystem("s3").exists(stale[5:])

    # The annotation job follows the registry's current version, and names it in every row.
    rows = annotated_rows(bucket, registry_uri, tmp_path / "v0003")
    assert set(rows["model_version"]) == {"v0003"} and set(rows["model_name"]) == {"retinaface@v0003"}
    assert set(rows["model_sha256"]) == {registry.get("v0003").sha256}

    # Rollback restores the baseline; rolling back to it again says so and changes nothing.
    assert registry_cli(["rollback", *common]) == ExitCode.OK and registry.current() == "v0001"
    capsys.readouterr()
    assert registry_cli(["rollback", *common, "--to", "v0001"]) == ExitCode.OK
    assert "unchanged" in capsys.readouterr().out
    assert resolve_model(registry_uri) == (f"{registry_uri}/v0001/model.pth", "v0001")


def annotated_rows(bucket: str, model: str, output: Path):
    import pandas as pd

    config = from_values(
        AnnotateConfig,
        {
            "input": f"s3://{bucket}/wider/images/12--Group/",
            "output": str(output),
            "model": model,
            "actors": 1,
            "torch_threads": 1,
            "scale": SCALE,
        },
    )
    annotate(config)
    return pd.read_parquet(output / "annotations")


def test_bad_init_fails_at_once_in_one_line(ray_session, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint\n")
    for init in (str(junk), str(tmp_path)):
        argv = ["--train", str(tmp_path), "--init", init, "--storage", str(tmp_path / "runs"), "--name", "bad"]
        assert train_cli(argv) == ExitCode.FAILED
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"train: error: --init {init}: ")
    assert not (tmp_path / "runs").exists(), "nothing may start before --init is known good"
