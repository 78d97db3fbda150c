"""Session fixtures shared by the whole suite.

- ``repo_root``: the checkout.
- ``shared_dir``: the read-only data folder (``$RETINAFACE_SHARED``, else ``../shared`` next to
  the checkout); tests that need it skip, saying so, where it is absent.
- ``weights_dir``: the folder holding the published checkpoint; exported as
  ``RETINAFACE_WEIGHTS_DIR`` for the rest of the session so that the core, subprocesses and Ray
  workers started afterwards all resolve ``mobilenet0.25-1mb`` to it.
- ``gt_dir``: the official WIDER FACE val ground truth in ``shared_dir``.
- ``s3_server``: one moto S3 server on 127.0.0.1 for the session, with ``AWS_ENDPOINT_URL`` and
  test credentials exported so that pyarrow, s3fs and Ray workers all talk to it; yields its URL.
- ``make_bucket``: creates a fresh, uniquely named bucket on that server and returns its name.
- ``ray_session``: one local Ray instance for the session, started after the variables above are
  exported (workers inherit the driver's environment). Tests that need their own cluster
  (``ray.cluster_utils.Cluster``) run in a subprocess instead; see ``test_annotate_multinode.py``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILE = "mobilenet0.25_Final.pth"

# Workers and subprocesses must find the same S3 endpoint; these are what every client reads.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


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
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # One log line per request would drown every failure report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
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
