"""Checkpoint resolution and strict loading; the model's published key layout (MobileNet and ResNet-50)."""

from __future__ import annotations

import collections
import hashlib
import shutil

import fsspec
import pytest
import torch

from retinaface_core import PRETRAINED, CheckpointError, RetinaFace, get_config, load_weights
from retinaface_core.model import fuse_batchnorm, optimize_for_inference
from retinaface_core.weights import ENV_CACHE_DIR, ENV_WEIGHTS, ENV_WEIGHTS_DIR, PretrainedWeights, resolve_weights


@pytest.fixture
def shared_checkpoint(weights_dir):
    return weights_dir / "mobilenet0.25_Final.pth"


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No weights dir, an empty cache: nothing resolves unless a test puts it there."""
    monkeypatch.delenv(ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path


def test_registry_records_url_hash_and_config():
    entry = PRETRAINED["mobilenet0.25-1mb"]
    assert entry.url.startswith("https://") and entry.filename == "mobilenet0.25_Final.pth"
    assert entry.sha256 == "ed6fa7d45a5179f03cb5ce82c73b0c6711372968e53782e88395acee88d319e1"
    assert get_config(entry.config).min_sizes == ((10, 20), (32, 64), (128, 256)) and get_config(entry.config).leaky == 0
    assert get_config(PRETRAINED["mobilenet0.25"].config).leaky == 0.1
    assert get_config(PRETRAINED["resnet50"].config).min_sizes == ((16, 32), (64, 128), (256, 512))


def test_shared_checkpoint_sha256_matches_registry(shared_checkpoint):
    assert hashlib.sha256(shared_checkpoint.read_bytes()).hexdigest() == PRETRAINED["mobilenet0.25-1mb"].sha256


def test_resolution_order_explicit_then_env_then_dir_then_cache(isolated_env, shared_checkpoint, monkeypatch):
    cache = isolated_env / "cache"
    cache.mkdir()
    shutil.copy(shared_checkpoint, cache / "mobilenet0.25_Final.pth")
    assert resolve_weights("mobilenet0.25-1mb")[0] == str(cache / "mobilenet0.25_Final.pth")
    monkeypatch.setenv(ENV_WEIGHTS_DIR, str(shared_checkpoint.parent))
    assert resolve_weights("mobilenet0.25-1mb")[0] == str(shared_checkpoint)
    monkeypatch.setenv(ENV_WEIGHTS, "s3://bucket/custom.pth")
    assert resolve_weights(None) == ("s3://bucket/custom.pth", None)
    assert resolve_weights(str(shared_checkpoint))[0] == str(shared_checkpoint)


def test_public_copy_of_the_pytorch_retinaface_checkpoint_is_identified_by_hash(weights_dir, isolated_env):
    path = weights_dir / "pytorch_retinaface_mobilenet0.25_Final.pth"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    entry = PRETRAINED["mobilenet0.25"]
    # A known public copy, not the upstream file: the entry's own hash stays unknown.
    assert entry.sha256 is None and entry.has_digest(hashlib.sha256(path.read_bytes()).hexdigest())
    loaded = load_weights(str(path))
    assert loaded.config.name == "mobilenet0.25" and loaded.config.leaky == 0.1
    assert loaded.sha256 == entry.public_copies[0].sha256


def test_named_checkpoint_loads_strictly_with_its_config(weights_dir):
    loaded = load_weights("mobilenet0.25-1mb")
    assert loaded.config.name == "mobilenet0.25-1mb" and loaded.name == "mobilenet0.25-1mb"
    assert loaded.sha256 == PRETRAINED["mobilenet0.25-1mb"].sha256
    assert sum(p.numel() for p in loaded.model.parameters()) == 426_608


def test_path_and_uri_are_identified_by_hash(shared_checkpoint, isolated_env):
    by_path = load_weights(str(shared_checkpoint))
    assert by_path.config.name == "mobilenet0.25-1mb"
    with fsspec.open("memory://models/any-name.pth", "wb") as f:
        f.write(shared_checkpoint.read_bytes())
    by_uri = load_weights("memory://models/any-name.pth")
    assert by_uri.config.name == "mobilenet0.25-1mb" and by_uri.uri == "memory://models/any-name.pth"
    for (name, a), b in zip(by_path.model.state_dict().items(), by_uri.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_module_prefix_is_stripped_and_unknown_checkpoint_needs_a_config(shared_checkpoint, tmp_path):
    state = torch.load(shared_checkpoint, map_location="cpu", weights_only=True)
    state = {f"module.{k}": v.clone() for k, v in state.items()}
    state["module.fpn.output1.0.weight"] += 0.01  # another checkpoint: its hash is unknown
    path = tmp_path / "finetuned.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unknown checkpoint.*config="):
        load_weights(str(path))
    loaded = load_weights(str(path), config="mobilenet0.25")
    assert loaded.config.leaky == 0.1
    assert torch.equal(loaded.model.state_dict()["fpn.output1.0.weight"], state["module.fpn.output1.0.weight"])


def test_wrong_hash_is_refused(isolated_env, shared_checkpoint, monkeypatch):
    weights = isolated_env / "weights"
    weights.mkdir()
    state = torch.load(shared_checkpoint, map_location="cpu", weights_only=True)
    state["ClassHead.0.conv1x1.bias"] += 1
    torch.save(state, weights / "mobilenet0.25_Final.pth")
    monkeypatch.setenv(ENV_WEIGHTS_DIR, str(weights))
    with pytest.raises(CheckpointError, match="sha256 .* does not match checkpoint 'mobilenet0.25-1mb'"):
        load_weights("mobilenet0.25-1mb")


def test_wrong_shapes_missing_and_unknown_keys_are_named(shared_checkpoint, tmp_path):
    state = torch.load(shared_checkpoint, map_location="cpu", weights_only=True)
    state["BboxHead.1.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)
    del state["LandmarkHead.2.conv1x1.bias"]
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(str(path), config="mobilenet0.25-1mb")
    message = str(info.value)
    assert "BboxHead.1.conv1x1.weight: checkpoint (6, 64, 1, 1) vs model (8, 64, 1, 1)" in message
    assert "LandmarkHead.2.conv1x1.bias" in message and "extra_head.weight" in message
    with pytest.raises(CheckpointError, match=r"body\.conv1\.weight"):
        load_weights(str(shared_checkpoint), config="resnet50")


class NotAStateDict:
    def __init__(self):
        self.payload = torch.zeros(2)


def test_arbitrary_pickles_and_non_checkpoints_are_refused(tmp_path):
    pickled = tmp_path / "object.pth"
    torch.save(NotAStateDict(), pickled)
    with pytest.raises(CheckpointError, match="refused to unpickle.*weights_only"):
        load_weights(str(pickled), config="mobilenet0.25")
    counter = tmp_path / "counter.pth"
    torch.save(collections.OrderedDict(a=1), counter)
    with pytest.raises(CheckpointError, match="state_dict mapping names to tensors"):
        load_weights(str(counter), config="mobilenet0.25")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable PyTorch checkpoint"):
        load_weights(str(text), config="mobilenet0.25")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_weights(str(tmp_path / "absent.pth"), config="mobilenet0.25")
    with pytest.raises(CheckpointError, match="unknown checkpoint 'no-such-model'"):
        load_weights("no-such-model")


def test_failed_download_says_where_it_looked(isolated_env, monkeypatch):
    entry = PRETRAINED["mobilenet0.25"]
    # Port 9 on loopback refuses at once: a download attempt that fails without any network.
    local = PretrainedWeights(**{**entry.__dict__, "url": "http://127.0.0.1:9/detection_mobilenet0.25_Final.pth"})
    monkeypatch.setitem(PRETRAINED, "mobilenet0.25", local)
    with pytest.raises(CheckpointError, match="download from http://127.0.0.1:9/.* failed.*Offline") as info:
        load_weights("mobilenet0.25")
    assert str(isolated_env / "cache") in str(info.value)
    assert not list((isolated_env / "cache").glob("*")), "no partial file may stay in the cache"
    with pytest.raises(CheckpointError, match="download disabled"):
        resolve_weights("mobilenet0.25", download=False)


def test_mobilenet_layout_matches_the_published_checkpoint(shared_checkpoint):
    published = torch.load(shared_checkpoint, map_location="cpu", weights_only=True)
    ours = RetinaFace(get_config("mobilenet0.25")).state_dict()
    assert {k.removeprefix("module."): tuple(v.shape) for k, v in published.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_resnet50_builds_runs_and_round_trips_the_published_layout(tmp_path):
    torch.manual_seed(0)
    model = RetinaFace(get_config("resnet50")).eval()
    state = model.state_dict()
    for key, shape in {
        "body.conv1.weight": (64, 3, 7, 7),
        "body.layer2.0.conv1.weight": (128, 256, 1, 1),
        "body.layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "body.layer4.2.bn3.running_var": (2048,),
        "fpn.output1.0.weight": (256, 512, 1, 1),
        "fpn.output3.0.weight": (256, 2048, 1, 1),
        "ssh1.conv3X3.0.weight": (128, 256, 3, 3),
        "ssh3.conv7x7_3.1.bias": (64,),
        "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
        "BboxHead.2.conv1x1.weight": (8, 256, 1, 1),
        "LandmarkHead.1.conv1x1.weight": (20, 256, 1, 1),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("body.fc", "body.avgpool")) for k in state)
    # Give BatchNorm non-trivial statistics so that folding it is actually exercised.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_weights(str(path), config="resnet50").model
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = model(x)
        again = loaded(x)
        fused = fuse_batchnorm(loaded)(x)
        inference = optimize_for_inference(loaded)(x.contiguous(memory_format=torch.channels_last))
    anchors = 2 * (12 * 16 + 6 * 8 + 3 * 4)
    assert expected.boxes.shape == (1, anchors, 4) and expected.landmarks.shape == (1, anchors, 10)
    for a, b, c, d in zip(expected, again, fused, inference):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(d, a, atol=1e-3, rtol=1e-3)


def test_weights_env_var_selects_the_default(shared_checkpoint, isolated_env, monkeypatch):
    from retinaface_core.training import model_checkpoint_bytes

    # A checkpoint other than the default, so that loading it shows the variable was followed.
    torch.manual_seed(0)
    other = isolated_env / "other.pth"
    other.write_bytes(model_checkpoint_bytes(RetinaFace(get_config("mobilenet0.25-1mb"))))
    monkeypatch.setenv(ENV_WEIGHTS, str(other))
    loaded = load_weights()
    assert loaded.uri == str(other) and loaded.sha256 != PRETRAINED["mobilenet0.25-1mb"].sha256
    # An explicit checkpoint wins over the variable.
    assert load_weights(str(shared_checkpoint)).sha256 == PRETRAINED["mobilenet0.25-1mb"].sha256
