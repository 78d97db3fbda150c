"""The local dev stack: up starts a real S3 endpoint and Ray head, a job runs against them, down leaves nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs
import s3fs

ROOT = Path(__file__).resolve().parents[1]
DEVSTACK = ROOT / "infra/dev/devstack.py"
_spec = importlib.util.spec_from_file_location("devstack", DEVSTACK)
devstack_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(devstack_module)
process_group = devstack_module.group_members


def devstack(command: str, state_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEVSTACK), command, "--num-cpus", "2"] if command == "up" else [sys.executable, str(DEVSTACK), command],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DEVSTACK_DIR": str(state_dir), **env},
    )


def test_devstack_up_job_down(tmp_path, shared_dir, weights_dir):
    state_dir = tmp_path / "devstack"
    started = devstack("up", state_dir, RETINAFACE_WEIGHTS_DIR=str(weights_dir))
    assert started.returncode == 0, started.stderr
    try:
        env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines() if line.startswith("export "))
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:") and env["RAY_ADDRESS"].startswith("127.0.0.1:")
        state = json.loads((state_dir / "state.json").read_text())
        assert process_group(state["ray_pid"]) and process_group(state["s3_pid"])
        assert devstack("status", state_dir).returncode == 0

        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.put(str(shared_dir / "images/crowd_baseball.jpg"), "dev/in/crowd.jpg")
        fs.pipe("dev/in/broken.jpg", b"not an image")
        job_env = {**os.environ, **env, "RETINAFACE_WEIGHTS_DIR": str(weights_dir)}
        job = subprocess.run(
            [sys.executable, "-m", "jobs.annotate", "--input", "s3://dev/in/", "--output", "s3://dev/out/", "--scale", "square:320"],
            capture_output=True,
            text=True,
            timeout=300,
            env=job_env,
            cwd=ROOT,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        s3 = pyarrow.fs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing", region="us-east-1"
        )
        table = pads.dataset("dev/out/annotations", filesystem=s3, format="parquet", partitioning="hive").to_table()
        assert sorted(table.column("status").to_pylist()) == ["error", "ok"]
    finally:
        stopped = devstack("down", state_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert process_group(state["ray_pid"]) == [] and process_group(state["s3_pid"]) == []
    assert devstack("status", state_dir).returncode == 1
