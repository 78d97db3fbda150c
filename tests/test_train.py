"""Ray Train fine-tuning on real WIDER images served from S3: losses, checkpoints, resume, fault tolerance.

The dataset is built in the test from the 12 WIDER FACE val images in ``../shared`` and their
official boxes (no landmarks), uploaded to the session's moto S3 server. Runs are small (train
size 256, two CPU workers, a few steps per epoch) to keep the suite quick on two cores.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from retinaface_core.augment import TrainAugment
from retinaface_core.detector import Detector
from retinaface_core.registry import ModelRegistry, resolve_model
from retinaface_core.storage import StorageOptions
from retinaface_core.training import Schedule, WiderTrainDataset, collate_faces, open_wider_dataset
from retinaface_core.weights import load_weights
from retinaface_core.widerface import read_bbx_gt, write_bbx_gt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRAIN_SIZE = 256


@pytest.fixture(scope="module")
def wider_s3(shared_dir: Path, make_bucket) -> str:
    """s3://BUCKET/wider/ with images/EVENT/NAME.jpg and wider_face_val_bbx_gt.txt for the 12 images."""
    images_dir = shared_dir / "widerface" / "val" / "images"
    names = sorted(str(p.relative_to(images_dir)) for p in images_dir.glob("*/*.jpg"))
    assert len(names) == 12
    annotations = {
        a.name: a for a in read_bbx_gt(str(shared_dir / "widerface" / "ground_truth" / "wider_face_val_bbx_gt.txt"), degenerate="drop")
    }
    root = f"s3://{make_bucket('wider')}/wider"
    fs = fsspec.filesystem("s3")
    for name in names:
        fs.pipe(f"{root}/images/{name}", (images_dir / name).read_bytes())
    write_bbx_gt([annotations[n] for n in names], f"{root}/wider_face_val_bbx_gt.txt")
    return root


def small_config(wider_s3: str, **overrides):
    from jobs.train import TrainConfig

    settings = dict(
        train=wider_s3,
        train_size=TRAIN_SIZE,
        num_workers=2,
        loader_workers=1,
        batch_size=2,
        epochs=3,
        # A learning rate that visibly moves the model within a few steps, with BatchNorm training
        # as it did before the fine-tuning defaults (frozen BatchNorm at this rate loses faces).
        lr=2e-3,
        freeze_bn=False,
        warmup_epochs=0.0,
        schedule="cosine",
        max_failures=0,
        keep_checkpoints=8,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_dataset_and_collate_from_s3(wider_s3: str) -> None:
    dataset = open_wider_dataset(wider_s3 + "/")
    assert dataset.annotation_uri.endswith("wider_face_val_bbx_gt.txt") and len(dataset.images) == 12
    train = WiderTrainDataset(dataset, TrainAugment(size=TRAIN_SIZE), seed=1)
    samples = [train[i] for i in range(3)]
    pixels, targets = collate_faces(samples)
    assert pixels.shape == (3, TRAIN_SIZE, TRAIN_SIZE, 3) and pixels.dtype == torch.uint8
    assert targets.valid.sum() == sum(len(s[1]) for s in samples) > 0
    boxes = targets.boxes[targets.valid]
    assert boxes.min() >= 0 and boxes.max() <= 1 and torch.all(boxes[:, 2:] > boxes[:, :2])
    assert not targets.has_landmarks.any() and torch.isfinite(targets.landmarks).all()
    train.set_epoch(1)
    again = train[0]
    train.set_epoch(0)
    assert torch.equal(train[0][0], samples[0][0]) and not torch.equal(again[0], samples[0][0])


def test_schedule_warmup_step_and_cosine() -> None:
    step = Schedule(total_steps=100, warmup_steps=10, kind="step", milestones=(0.5, 0.8), gamma=0.1)
    assert step(0) == pytest.approx(1e-3) and step(5) == pytest.approx(0.5 + 0.5e-3) and step(10) == 1.0
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1) and step(80) == pytest.approx(0.01)
    cosine = Schedule(total_steps=110, warmup_steps=10, kind="cosine")
    assert cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0)
    values = [cosine(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_training_run_on_s3_reloads_and_registers(ray_session, wider_s3: str, shared_dir: Path, make_bucket) -> None:
    from jobs.train import run

    bucket = make_bucket("runs")
    cfg = small_config(
        wider_s3,
        epochs=4,
        keep_checkpoints=4,
        augment=False,
        val=wider_s3,
        val_gt=str(shared_dir / "widerface" / "ground_truth"),
        val_scale="long:320",
        storage=f"s3://{bucket}/runs",
        name="finetune",
        registry=f"s3://{bucket}/models/retinaface",
        promote=True,
    )
    summary = run(cfg)
    metrics = summary["metrics"]
    assert metrics["epoch"] == 3 and metrics["resumed_from_epoch"] == 0
    assert summary["checkpoint"].startswith(f"s3://{bucket}/runs/finetune/checkpoint_")

    history = _reported_metrics(f"s3://{bucket}/runs/finetune")
    assert [m["epoch"] for m in history] == [0, 1, 2, 3]
    for m in history:
        for key in ("loss_total", "loss_cls", "loss_box", "loss_landmark", "lr", "images_per_second"):
            assert math.isfinite(m[key]), key
        assert m["loss_landmark"] == 0.0, "the WIDER boxes carry no landmarks"
        assert m["images"] == 12 and m["positives_per_image"] > 1
        assert set(m["val_ap"]) == {"easy", "medium", "hard"} and all(0 < ap <= 1 for ap in m["val_ap"].values())
    assert history[-1]["loss_total"] < history[0]["loss_total"]

    # The registered model is the final checkpoint; it loads into a Detector with its config.
    registered = summary["registry"]
    assert registered["version"] == "v0001" and registered["promoted"]
    checkpoint_uri, version = resolve_model(f"s3://{bucket}/models/retinaface")
    assert version == "v0001" and checkpoint_uri.endswith("v0001/model.pth")
    loaded = load_weights(checkpoint_uri)
    assert loaded.config.name == "mobilenet0.25-1mb" and loaded.sha256 == registered["sha256"]
    image = _read(shared_dir / "widerface" / "val" / "images" / "12--Group" / "12_Group_Group_12_Group_Group_12_249.jpg")
    tuned = Detector(loaded, scale="long:640", score_threshold=0.5).detect([image])[0]
    original = Detector("mobilenet0.25-1mb", scale="long:640", score_threshold=0.5).detect([image])[0]
    assert len(tuned) >= 0.5 * len(original) > 0
    manifest = ModelRegistry(f"s3://{bucket}/models/retinaface").get("v0001")
    assert manifest.val_ap == history[-1]["val_ap"] and manifest.train_data["train"] == wider_s3


def _read(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))


def _reported_metrics(run_uri: str) -> list[dict]:
    """Metrics of every checkpoint kept under a run folder, by epoch."""
    import json

    fs, root = fsspec.core.url_to_fs(run_uri)
    fs.invalidate_cache()
    found = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{root}/checkpoint_*/metrics.json")]
    return sorted(found, key=lambda m: m["epoch"])


def crash_once(marker: Path, run_dir: Path):
    """A train loop that, on rank 1 and only while ``marker`` does not exist, kills its own worker
    process (``os._exit``) once the run's first checkpoint is committed: mid-run, after epoch 0,
    like a node lost while training. Ray Train records committed checkpoints in
    ``checkpoint_manager_snapshot.json`` (a checkpoint folder alone is not yet a checkpoint of the run)."""
    from jobs.train import train_loop_per_worker

    def loop(config: dict) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == 1 and not marker.exists():

            def kill_after_first_checkpoint() -> None:
                while not (run_dir / "checkpoint_manager_snapshot.json").exists():
                    time.sleep(0.05)
                marker.write_text(str(os.getpid()))
                os._exit(1)

            threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
        train_loop_per_worker(config)

    return loop


def test_stopped_run_resumes_from_its_checkpoint(ray_session, wider_s3: str, tmp_path: Path) -> None:
    from jobs.train import build_trainer

    epochs = 4
    run_dir = tmp_path / "runs" / "resume"
    cfg = small_config(wider_s3, epochs=epochs, storage=str(tmp_path / "runs"), name="resume", max_failures=0)
    marker = tmp_path / "crashed"
    with pytest.raises(Exception):
        build_trainer(cfg, crash_once(marker, run_dir)).fit()
    assert marker.exists(), "the worker was never killed"
    reached = max(m["epoch"] for m in _reported_metrics(str(run_dir)))
    assert reached < epochs - 1, "the first run was not stopped before its end"

    result = build_trainer(cfg).fit()
    assert result.metrics["epoch"] == epochs - 1
    resumed_from = result.metrics["resumed_from_epoch"]
    assert 1 <= resumed_from <= reached + 1, "the rerun started from zero instead of the checkpoint"
    history = _reported_metrics(str(run_dir))
    assert sorted({m["epoch"] for m in history}) == list(range(epochs))
    # Every epoch from the resume point on was trained by the rerun. (The killed run may also
    # have left the folder of a checkpoint it uploaded but never committed, for the same epoch.)
    assert {m["epoch"] for m in history if m["resumed_from_epoch"] == resumed_from} == set(range(resumed_from, epochs))
    state = torch.load(run_dir / _latest(run_dir) / "train_state.pt", weights_only=True)
    steps_per_epoch = 12 // (2 * 2)
    assert state["epoch"] == epochs - 1 and state["scheduler"]["last_epoch"] == epochs * steps_per_epoch


def _latest(run_dir: Path) -> str:
    return max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime).name


def test_worker_killed_mid_run_recovers_with_failure_config(ray_session, wider_s3: str, tmp_path: Path) -> None:
    from jobs.train import build_trainer

    epochs = 4
    run_dir = tmp_path / "runs" / "chaos"
    cfg = small_config(wider_s3, epochs=epochs, storage=str(tmp_path / "runs"), name="chaos", max_failures=1)
    marker = tmp_path / "crashed"
    result = build_trainer(cfg, crash_once(marker, run_dir)).fit()
    assert marker.exists(), "the worker was never killed"
    assert result.error is None and result.metrics["epoch"] == epochs - 1
    # The restarted worker group continued from the last committed checkpoint, not from zero.
    assert result.metrics["resumed_from_epoch"] >= 1
    history = _reported_metrics(str(run_dir))
    assert sorted({m["epoch"] for m in history}) == list(range(epochs))


def test_cli_flags_and_yaml_fill_the_config(tmp_path: Path) -> None:
    from jobs._config import parse_config
    from jobs.train import TrainConfig, storage_filesystem

    settings = tmp_path / "run.yaml"
    settings.write_text("epochs: 7\nschedule: cosine\nlr: 0.01\n")
    cfg = parse_config(
        TrainConfig,
        ["--train", "s3://b/train", "--config", str(settings), "--lr", "0.002", "--no-augment", "--init", "scratch", "--name", "x"],
    )
    assert (cfg.epochs, cfg.schedule, cfg.lr, cfg.augment, cfg.init, cfg.name) == (7, "cosine", 0.002, False, "scratch", "x")
    assert TrainConfig(train="t").name.startswith("retinaface-")
    assert storage_filesystem(TrainConfig(train="t", storage="s3://b/runs")) == ("s3://b/runs", None)
    path, fs = storage_filesystem(TrainConfig(train="t", storage="s3://b/runs", s3=StorageOptions(endpoint_url="http://127.0.0.1:1")))
    assert path == "b/runs" and fs.type_name == "s3"
    path, fs = storage_filesystem(TrainConfig(train="t", storage="memory://runs"))
    assert fs.type_name.startswith("py::fsspec")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--train", "t", "--schedule", "linear"])


def test_fine_tuning_defaults_and_explicit_flags_win() -> None:
    from jobs._config import parse_config
    from jobs.train import FINETUNE_LR, FINETUNE_MIN_FACE, SCRATCH_LR, SCRATCH_MIN_FACE, TrainConfig

    tuned = parse_config(TrainConfig, ["--train", "t"])
    assert (tuned.lr, tuned.freeze_bn, tuned.min_face_size) == (FINETUNE_LR, True, FINETUNE_MIN_FACE)
    scratch = parse_config(TrainConfig, ["--train", "t", "--init", "scratch"])
    assert (scratch.lr, scratch.freeze_bn, scratch.min_face_size) == (SCRATCH_LR, False, SCRATCH_MIN_FACE)
    explicit = parse_config(TrainConfig, ["--train", "t", "--lr", "1e-3", "--no-freeze-bn", "--min-face-size", "2"])
    assert (explicit.lr, explicit.freeze_bn, explicit.min_face_size) == (1e-3, False, 2.0)


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters(wider_s3: str) -> None:
    from retinaface_core.config import get_config
    from retinaface_core.model import RetinaFace
    from retinaface_core.training import freeze_batchnorm, make_optimizer, train_one_epoch

    torch.manual_seed(0)
    config = get_config("mobilenet0.25-1mb")
    model = RetinaFace(config)
    assert freeze_batchnorm(model) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = WiderTrainDataset(open_wider_dataset(wider_s3), TrainAugment(size=160, mean_bgr=config.mean_bgr), seed=0)
    batch = collate_faces([train[0], train[1]])
    optimizer = make_optimizer(model, 1e-2, 0.9, 5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(model, [batch], optimizer, scheduler, config, torch.device("cpu"), freeze_batchnorm=True)
    after = model.state_dict()
    batchnorm = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    frozen = [k for k in after if k.rsplit(".", 1)[0] in batchnorm]
    assert frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen), "BatchNorm changed"
    assert any(not torch.equal(before[k], after[k]) for k in after if k not in frozen), "nothing trained"


def test_progress_and_summary_lines(caplog) -> None:
    from jobs._exit import ExitCode
    from jobs.train import Progress, exit_code, summary_lines
    from retinaface_core.training import EpochStats

    progress = Progress(epochs=3, steps_per_epoch=4, every=2, world=2)
    report = progress.step_callback(1)
    stats = EpochStats({"total": 8.0, "cls": 4.0, "box": 2.0, "landmark": 0.0}, images=4, steps=1, seconds=2.0)
    caplog.set_level("INFO", logger="jobs.train")
    report(stats)  # not a multiple of every: silent
    stats.steps = 2
    report(stats)
    (line,) = caplog.messages
    # 6 steps left (2 of epoch 2, 4 of epoch 3) at 1 s each; 4 images in 2 s on each of 2 workers.
    assert line == "epoch 2/3 step 2/4 loss 2.000 (cls 1.000 box 0.500 landmark 0.000) 4.0 img/s ETA 0:00:06"
    metrics = {
        "epoch": 2,
        "loss_total": 1.0,
        "loss_cls": 0.5,
        "loss_box": 0.25,
        "loss_landmark": 0.0,
        "val_ap": {"easy": 0.5, "medium": 0.4, "hard": 0.3},
    }
    summary = {"run": "r", "run_uri": "s3://b/runs/r", "checkpoint": "s3://b/runs/r/checkpoint_x", "metrics": metrics}
    refused = {
        **summary,
        "registry": {"version": "v0002", "uri": "s3://b/m/v0002", "new": True, "promoted": False, "promotion_reason": "val AP regressed"},
    }
    lines = summary_lines(refused)
    assert lines[0] == "run r: 3 epochs, last loss 1.000 (cls 0.500 box 0.250 landmark 0.000)"
    assert lines[1].startswith("checkpoint: s3://b/runs/r/checkpoint_x ")
    assert lines[-1] == "refused by the gate: val AP regressed"
    assert exit_code(refused) == ExitCode.REFUSED and exit_code(summary) == ExitCode.OK
    promoted = {
        **refused,
        "registry": {**refused["registry"], "new": False, "promoted": True, "promotion_reason": "v0002 is already current: nothing to do"},
    }
    assert "already registered as v0002" in summary_lines(promoted)[-2] and exit_code(promoted) == ExitCode.OK


def test_ctrl_c_exits_130_says_how_to_resume_and_leaves_no_extra_checkpoints(ray_session, wider_s3: str, tmp_path: Path) -> None:
    """``python -m jobs.train`` joined to the session's Ray, interrupted with SIGINT once its run
    folder holds more checkpoint folders than it keeps (uploaded ones not yet committed)."""
    import signal
    import subprocess
    import sys

    import ray

    run_dir = tmp_path / "runs" / "stopped"
    argv = [
        "--train", wider_s3, "--num-workers", "1", "--batch-size", "4", "--epochs", "50", "--train-size", "160",
        "--loader-workers", "0", "--storage", str(tmp_path / "runs"), "--name", "stopped", "--keep-checkpoints", "1",
        "--ray-address", ray.get_runtime_context().gcs_address,
    ]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "jobs.train", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_checkpoint_folders(run_dir)) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-2000:]
    assert "Resume with the same command:\n  python -m jobs.train " + " ".join(argv) in err
    # One, or none where the interrupt came before Ray Train committed the first checkpoint.
    assert len(_checkpoint_folders(run_dir)) <= 1, err[-3000:]


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
