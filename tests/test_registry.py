"""Model registry: versioned artifacts, the promotion gate, rollback, resolution for ``--model``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import fsspec
import pytest
import torch

from jobs._exit import ExitCode
from jobs.registry import main as registry_cli
from retinaface_core.config import get_config
from retinaface_core.model import RetinaFace
from retinaface_core.registry import ModelRegistry, RegistryError, resolve_model, validation_record
from retinaface_core.storage import write_file
from retinaface_core.training import model_checkpoint_bytes
from retinaface_core.weights import CheckpointError, load_weights

VAL = {"val": "s3://data/val", "val_gt": None, "scale": "long:640"}


def model_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    return model_checkpoint_bytes(RetinaFace(get_config("mobilenet0.25-1mb")))


def register(registry: ModelRegistry, easy: float, medium: float, hard: float, seed: int = 0, val=VAL):
    metrics = {"loss_total": 1.0, "val": {"data": val, "ap": {"easy": easy, "medium": medium, "hard": hard}}}
    return registry.register(
        model_bytes(seed), config={"model": {}}, metrics=metrics, train_data={"train": "s3://data/train", "val": val["val"]}
    )


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("make_bucket")("registry")
    return f"s3://{bucket}/models/retinaface"


def test_register_writes_a_complete_version(registry_uri: str) -> None:
    registry = ModelRegistry(registry_uri)
    assert registry.versions() == [] and registry.current() is None
    entry = register(registry, 0.8, 0.7, 0.4)
    assert entry.version == "v0001" and registry.versions() == ["v0001"]
    fs, root = fsspec.core.url_to_fs(registry_uri)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/v0001"))
    assert names == ["config.json", "manifest.json", "metrics.json", "model.pth"]
    manifest = json.loads(fs.cat_file(f"{root}/v0001/manifest.json"))
    assert manifest["sha256"] == entry.sha256 and manifest["train_data"]["train"] == "s3://data/train"
    assert manifest["created"] and manifest["metrics"]["val"]["ap"]["hard"] == 0.4
    loaded = load_weights(entry.checkpoint_uri)
    assert loaded.sha256 == entry.sha256 and loaded.config.name == "mobilenet0.25-1mb"
    assert register(registry, 0.8, 0.7, 0.4, seed=1).version == "v0002"


def test_incomplete_version_is_invisible(tmp_path) -> None:
    registry = ModelRegistry(str(tmp_path / "registry"))
    register(registry, 0.8, 0.7, 0.4)
    (tmp_path / "registry" / "v0002").mkdir()
    (tmp_path / "registry" / "v0002" / "model.pth").write_bytes(b"partial")
    assert registry.versions() == ["v0001"]
    assert register(registry, 0.8, 0.7, 0.4, seed=1).version == "v0002"


def test_registering_known_bytes_returns_their_version(registry_uri: str) -> None:
    registry = ModelRegistry(registry_uri)
    first = register(registry, 0.8, 0.7, 0.4)
    again = register(registry, 0.9, 0.9, 0.9)  # same weights (seed 0), whatever the metrics say
    assert again == first and registry.versions() == ["v0001"]


def test_promotion_gate_refuses_regression_accepts_equal_or_better(registry_uri: str) -> None:
    registry = ModelRegistry(registry_uri)
    register(registry, 0.80, 0.70, 0.40)
    assert registry.promote("v0001").promoted and registry.current() == "v0001"

    register(registry, 0.85, 0.72, 0.39, seed=2)  # better on two levels, worse on hard
    decision = registry.promote("v0002")
    assert not decision.promoted and "hard 0.3900 < 0.4000" in decision.reason
    assert registry.current() == "v0001"

    register(registry, 0.80, 0.70, 0.40, seed=3)  # equal on every level
    assert registry.promote("v0003").promoted and registry.current() == "v0003"

    register(registry, 0.81, 0.70, 0.41, seed=4)  # better or equal everywhere
    decision = registry.promote("v0004")
    assert decision.promoted and decision.previous == "v0003" and registry.current() == "v0004"

    forced = registry.promote("v0002", force=True)
    assert forced.promoted and forced.reason.startswith("forced:") and registry.current() == "v0002"


def test_gate_refuses_incomparable_or_unevaluated_models(tmp_path) -> None:
    registry = ModelRegistry(str(tmp_path / "registry"))
    register(registry, 0.5, 0.5, 0.5)
    registry.promote("v0001")
    register(registry, 0.9, 0.9, 0.9, seed=1, val={**VAL, "val": "s3://other/val"})
    assert "not comparable" in registry.promote("v0002").reason
    registry.register(model_bytes(5), config={}, metrics={"loss_total": 1.0}, train_data={})
    decision = registry.promote("v0003")
    assert not decision.promoted and "no validation AP" in decision.reason
    with pytest.raises(RegistryError, match="no version"):
        registry.promote("v0042")


FINGERPRINT = {"images_sha256": "a" * 64, "ground_truth_sha256": "b" * 64}


def test_gate_compares_data_by_content_not_by_spelling(tmp_path) -> None:
    registry = ModelRegistry(str(tmp_path / "registry"))
    register(registry, 0.5, 0.5, 0.5, val={**VAL, **FINGERPRINT})
    registry.promote("v0001")
    # Other spelling, same content: comparable.
    register(registry, 0.6, 0.6, 0.6, seed=1, val={**VAL, "val": "s3a://data/val/", **FINGERPRINT})
    assert registry.promote("v0002").promoted
    # Same URIs, edited ground truth: refused, both fingerprints named.
    edited = {**VAL, **FINGERPRINT, "ground_truth_sha256": "c" * 64}
    register(registry, 0.9, 0.9, 0.9, seed=2, val=edited)
    decision = registry.promote("v0003")
    assert not decision.promoted and "not comparable" in decision.reason
    assert "ground_truth_sha256 cccccccccccc" in decision.reason and "ground_truth_sha256 bbbbbbbbbbbb" in decision.reason
    assert registry.promote("v0003", force=True).promoted


def test_gate_without_fingerprints_compares_canonical_uris(tmp_path) -> None:
    # Records written before fingerprints existed: URIs decide, in one spelling.
    registry = ModelRegistry(str(tmp_path / "registry"))
    data = tmp_path / "data"
    register(registry, 0.5, 0.5, 0.5, val={**VAL, "val": str(data) + "/"})
    registry.promote("v0001")
    register(registry, 0.6, 0.6, 0.6, seed=1, val={**VAL, "val": f"file://{data}"})
    assert registry.promote("v0002").promoted
    register(registry, 0.7, 0.7, 0.7, seed=2, val={**VAL, "val": str(data), "scale": "long:320"})
    assert "not comparable" in registry.promote("v0003").reason


def test_validation_record_spells_uris_canonically() -> None:
    record = validation_record(
        {"easy": 1.0, "medium": 1.0, "hard": 1.0}, val="s3://b/val/", val_gt=None, scale="long:640", fingerprint=FINGERPRINT
    )
    assert record["data"] == {"val": "s3://b/val", "val_gt": None, "scale": "long:640", **FINGERPRINT}


def test_noop_promotion_and_rollback_change_nothing(tmp_path, capsys) -> None:
    uri = str(tmp_path / "registry")
    registry = ModelRegistry(uri)
    register(registry, 0.5, 0.5, 0.5)
    register(registry, 0.6, 0.6, 0.6, seed=1)
    registry.promote("v0001")
    registry.promote("v0002")
    history = registry.pointer()["history"]
    capsys.readouterr()
    assert registry_cli(["promote", "--registry", uri, "v0002"]) == ExitCode.OK
    assert "unchanged: v0002 is already current" in capsys.readouterr().out
    assert registry_cli(["rollback", "--registry", uri, "--to", "v0002"]) == ExitCode.OK
    assert "unchanged: v0002 is already current" in capsys.readouterr().out
    assert registry.pointer()["history"] == history and registry.current() == "v0002"


def test_rollback_undoes_promotions_and_jumps(registry_uri: str) -> None:
    registry = ModelRegistry(registry_uri)
    for i, ap in enumerate((0.5, 0.6, 0.7)):
        register(registry, ap, ap, ap, seed=i)
        assert registry.promote(f"v000{i + 1}").promoted
    assert registry.current() == "v0003"
    assert registry.rollback() == "v0002" and registry.current() == "v0002"
    assert registry.rollback() == "v0001"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    assert registry.rollback(to="v0003") == "v0003"
    history = registry.pointer()["history"]
    assert [(e["action"], e["version"]) for e in history][-3:] == [("rollback", "v0002"), ("rollback", "v0001"), ("rollback", "v0003")]
    # The gate compares against whatever is current now.
    register(registry, 0.65, 0.65, 0.65, seed=9)
    assert not registry.promote("v0004").promoted


def test_resolve_model_for_the_annotation_job(registry_uri: str) -> None:
    registry = ModelRegistry(registry_uri)
    register(registry, 0.5, 0.5, 0.5)
    register(registry, 0.6, 0.6, 0.6, seed=1)
    with pytest.raises(RegistryError, match="no current version"):
        resolve_model(registry_uri)
    registry.promote("v0001")
    registry.promote("v0002")
    assert resolve_model(registry_uri) == (f"{registry_uri}/v0002/model.pth", "v0002")
    assert resolve_model(registry_uri + "/") == (f"{registry_uri}/v0002/model.pth", "v0002")
    assert resolve_model(f"{registry_uri}/v0001") == (f"{registry_uri}/v0001/model.pth", "v0001")
    assert resolve_model(f"{registry_uri}/v0001/model.pth") == (f"{registry_uri}/v0001/model.pth", "v0001")
    with pytest.raises(RegistryError, match="no version"):
        resolve_model(f"{registry_uri}/v0007")
    assert resolve_model("mobilenet0.25-1mb") == ("mobilenet0.25-1mb", None)
    assert resolve_model("/some/checkpoint.pth") == ("/some/checkpoint.pth", None)
    checkpoint, version = resolve_model(registry_uri)
    assert load_weights(checkpoint).sha256 == registry.get(version).sha256


def test_training_folders_resolve_to_their_checkpoint(registry_uri: str) -> None:
    # A training run folder and its checkpoint folders, as jobs.train prints them.
    run = f"{registry_uri}/runs/finetune"
    for stamp, seed in (("2026-12-01_10-00-00.000001", 1), ("2026-12-01_11-00-00.000001", 2)):
        write_file(f"{run}/checkpoint_{stamp}/model.pth", model_bytes(seed))
    newest = f"{run}/checkpoint_2026-12-01_11-00-00.000001"
    assert resolve_model(newest) == (f"{newest}/model.pth", None)
    assert resolve_model(run + "/") == (f"{newest}/model.pth", None)
    assert load_weights(resolve_model(run).checkpoint_uri).sha256 == hashlib.sha256(model_bytes(2)).hexdigest()


def test_folder_or_junk_instead_of_a_checkpoint_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="a folder without a model.pth") as folder:
        load_weights(str(tmp_path))
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a checkpoint of tensors: refused to unpickle") as text:
        load_weights(str(junk))
    assert "\n" not in str(folder.value) and "\n" not in str(text.value)


def test_cli_list_promote_rollback_show(tmp_path, capsys) -> None:
    uri = str(tmp_path / "registry")
    registry = ModelRegistry(uri)
    register(registry, 0.5, 0.5, 0.5)
    register(registry, 0.4, 0.6, 0.6, seed=1)
    assert registry_cli(["promote", "--registry", uri, "v0001"]) == 0
    assert registry_cli(["promote", "--registry", uri, "v0002"]) == ExitCode.REFUSED == 3
    assert "refused v0002" in capsys.readouterr().out
    assert registry_cli(["promote", "--registry", uri, "v0002", "--force"]) == 0
    assert registry_cli(["list", "--registry", uri]) == 0
    listing = capsys.readouterr().out
    assert "* v0002" in listing and "  v0001" in listing and "0.5000 / 0.5000 / 0.5000" in listing
    assert registry_cli(["rollback", "--registry", uri]) == 0
    assert registry.current() == "v0001"
    capsys.readouterr()
    assert registry_cli(["show", "--registry", uri]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v0001" and shown["current"] is True
    assert registry_cli(["rollback", "--registry", uri, "--to", "v0009"]) == ExitCode.FAILED == 2
    register(registry, 0.6, 0.7, 0.7, seed=2)
    assert registry_cli(["promote", "--registry", uri, "latest"]) == 0
    assert registry.current() == "v0003"


def test_cli_runs_as_a_module(tmp_path) -> None:
    uri = str(tmp_path / "registry")
    register(ModelRegistry(uri), 0.5, 0.5, 0.5)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.registry", "promote", "--registry", uri, "v0001"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "promoted v0001" in done.stdout


def test_cli_register_evaluates_a_checkpoint_as_the_baseline(tmp_path, shared_dir, weights_dir, capsys) -> None:
    from retinaface_core.widerface import read_bbx_gt, write_bbx_gt

    images = shared_dir / "widerface" / "val" / "images"
    names = sorted(str(p.relative_to(images)) for p in images.glob("*/*.jpg"))
    gt_dir = shared_dir / "widerface" / "ground_truth"
    annotations = {a.name: a for a in read_bbx_gt(str(gt_dir / "wider_face_val_bbx_gt.txt"), degenerate="drop")}
    val = tmp_path / "val"
    (val / "images").mkdir(parents=True)
    for event in {n.split("/")[0] for n in names}:
        (val / "images" / event).symlink_to(images / event)
    write_bbx_gt([annotations[n] for n in names], str(val / "wider_face_val_bbx_gt.txt"))

    uri = str(tmp_path / "registry")
    argv = [
        "register",
        "--registry",
        uri,
        "--checkpoint",
        "mobilenet0.25-1mb",
        "--val",
        str(val),
        "--val-gt",
        str(gt_dir),
        "--val-scale",
        "long:320",
    ]
    assert registry_cli(argv) == 0
    assert "registered v0001" in capsys.readouterr().out
    registry = ModelRegistry(uri)
    baseline = registry.get("v0001")
    # The published checkpoint finds most of the easy faces of these 12 images at long side 320.
    assert 0.3 < baseline.val_ap["easy"] <= 1 and baseline.val_ap["hard"] < baseline.val_ap["easy"]
    assert registry.promote("v0001").promoted
    assert baseline.val_data["images_sha256"] and baseline.val_data["ground_truth_sha256"]
    # The same checkpoint again is the same version, however the data URIs are spelled.
    respelled = [a + "/" if a in (str(val), str(gt_dir)) else a for a in argv]
    assert registry_cli(respelled) == 0
    assert "already registered as v0001" in capsys.readouterr().out and registry.versions() == ["v0001"]
    original = load_weights("mobilenet0.25-1mb")
    reloaded = load_weights(registry.get("v0001").checkpoint_uri)
    assert all(torch.equal(original.model.state_dict()[k], v) for k, v in reloaded.model.state_dict().items())
