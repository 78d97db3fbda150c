"""Session fixtures shared by the whole suite.

- ``repo_root``: the checkout.
- ``shared_dir``: the read-only data folder (``$RETINAFACE_SHARED``, else ``../shared`` next to
  the checkout); tests that need it skip, saying so, where it is absent.
- ``weights_dir``: the folder holding the published checkpoint; exported as
  ``RETINAFACE_WEIGHTS_DIR`` for the rest of the session so that the core, subprocesses and Ray
  workers started afterwards all resolve ``mobilenet0.25-1mb`` to it.
- ``gt_dir``: the official WIDER FACE val ground truth in ``shared_dir``.
- ``random_weights``, ``photo``: a seeded random network and a scikit-image photo, for the
  invariants that need neither the published weights nor ``shared_dir``.
- ``s3_server``: one moto S3 server on 127.0.0.1 for the session, with ``AWS_ENDPOINT_URL`` and
  test credentials exported so that pyarrow, s3fs and Ray workers all talk to it; yields its URL.
- ``make_bucket``: creates a fresh, uniquely named bucket on that server and returns its name.
- ``ray_session``: one local Ray instance for the session, started after the variables above are
  exported (workers inherit the driver's environment). Tests that need their own cluster
  (``ray.cluster_utils.Cluster``) run in a subprocess instead; see ``test_annotate_multinode.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILE = "mobilenet0.25_Final.pth"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set RETINAFACE_SHARED to point at it)")
    return path


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    path = shared_dir / "weights"
    if not (path / CHECKPOINT_FILE).is_file():
        pytest.skip(f"checkpoint {path / CHECKPOINT_FILE} is absent")
    os.environ["RETINAFACE_WEIGHTS_DIR"] = str(path)
    return path


WIDER_GT_FILES = (
    "wider_face_val_bbx_gt.txt",
    "wider_face_val.mat",
    "wider_easy_val.mat",
    "wider_medium_val.mat",
    "wider_hard_val.mat",
)


@pytest.fixture(scope="session")
def gt_dir(shared_dir: Path) -> Path:
    """The official WIDER FACE val ground truth folder (.txt and the four .mat files)."""
    path = shared_dir / "widerface" / "ground_truth"
    missing = [name for name in WIDER_GT_FILES if not (path / name).is_file()]
    if missing:
        pytest.skip(f"WIDER FACE val ground truth not found in {path} (missing {missing}); set RETINAFACE_SHARED")
    return path


@pytest.fixture(scope="session")
def val_sizes(shared_dir: Path) -> list[tuple[int, int]]:
    """(height, width) of all WIDER FACE val images: the real mix of photo sizes."""
    import csv

    path = shared_dir / "widerface/val_image_sizes.csv"
    if not path.is_file():
        pytest.skip(f"{path} (the sizes of the WIDER val images) is absent")
    with path.open() as f:
        return [(int(row["height"]), int(row["width"])) for row in csv.DictReader(f)]


@pytest.fixture(scope="session", autouse=True)
def no_stale_ray_address() -> Iterator[None]:
    """Fail the session if it leaves /tmp/ray/ray_current_cluster naming a Ray that no longer
    runs: every bare ``ray.init()`` on this machine would then wait minutes on it."""
    import socket

    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    yield
    if not path.exists() or path.read_text() == before:
        return
    host, _, port = path.read_text().strip().rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        pytest.fail(f"the test session left {path} naming {host}:{port}, where no Ray runs")


@pytest.fixture(scope="session")
def random_weights():
    """A seeded, randomly initialised MobileNet-0.25 RetinaFace whose outputs spread like a trained
    one's (class logits of std 2, offsets of std 0.5 on photo-like input), for the invariants
    that do not need the published weights: they then run where ``../shared`` is absent."""
    import torch

    from retinaface_core import RetinaFace, get_config
    from retinaface_core.weights import LoadedWeights

    torch.manual_seed(0)
    config = get_config("mobilenet0.25-1mb")
    model = RetinaFace(config).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        # The input is pixels minus the mean, not divided by a std of about 60.
        convs[0].weight /= 60
        sample = model(torch.randn(1, 3, 320, 320) * 60)
        for heads, output, std in (
            (model.ClassHead, sample.logits, 2.0),
            (model.BboxHead, sample.boxes, 0.5),
            (model.LandmarkHead, sample.landmarks, 0.5),
        ):
            for head in heads:
                head.conv1x1.weight *= std / output.std()
    return LoadedWeights(model=model, config=config, name="random", uri="random", sha256="")


@pytest.fixture(scope="session")
def photo():
    """scikit-image's astronaut (512 x 512, a face), BGR: a real photo that needs no ../shared."""
    import cv2
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from jobs._local_s3 import LocalS3, s3_environment

    with LocalS3() as server:
        # Workers and subprocesses must find the same S3 endpoint: these are what every client reads.
        variables = s3_environment(server.endpoint)
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        yield server.endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def make_bucket(s3_server: str) -> Callable[[str], str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)

    def make(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture(scope="session")
def ray_session(s3_server: str, weights_dir: Path) -> Iterator[None]:
    import ray

    # Ray Train declares a worker dead when its health check has hung this long (default 10
    # min). Once in a few runs Ray misses the death of the worker that test_train kills, and
    # only this timeout ends the wait; the raylet and workers inherit it from this process.
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "30")
    # More logical CPUs than the 2 physical cores: decode tasks and the detector actors hold
    # fractional or whole CPUs, and the pipeline must never wait for a free slot.
    # address="local": never join another Ray that happens to run on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
