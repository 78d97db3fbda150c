"""Joining or starting Ray, sizing the jobs' actor pools from what the cluster holds, and keeping
Ray's start-up quiet where it says nothing a user can act on."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator


def pool_size(resources: dict[str, float], cpus_per_actor: float, gpus_per_actor: float) -> int:
    """Actors that the cluster's resources hold at once: one per GPU share, else per CPU share.

    On CPUs, several single-threaded actors beat one multi-threaded actor: each overlaps its own
    decoding with its own forward pass, and a single-threaded forward wastes no time in thread
    synchronisation (``docs/annotate.md``, "Benchmark", has the measurements).
    """
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cpus_per_actor))


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://…``, ``host:port``) or ``$RAY_ADDRESS``;
    with neither, start a private local Ray.

    A bare ``ray.init()`` would join whatever ``/tmp/ray/ray_current_cluster`` names, and wait
    minutes on a cluster that no longer exists.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            logging.getLogger(_TOKEN_AUTH_LOGGER).addFilter(_token_auth_default)
        ray.init(address=address)


# Ray turns token authentication on for every local Ray it starts and says so with a warning
# whose only advice is to turn it off (docs/annotate.md keeps it on). Other messages of that
# logger (a token missing, authentication off) still show.
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _token_auth_default(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


HARMLESS_RAY_LINES = (b"has constructor arguments in the object store and max_restarts > 0",)
"""Lines Ray's core writes to the driver's stderr that a job's user cannot act on. Ray Data
creates every pool actor with its own objects (the data context and the map function, put by
the driver) as constructor arguments and restarts allowed, and Ray's core logs an error line
for each such actor (ray-project/ray#57733): a restart would fail if those objects were lost,
but the driver holds them for the whole run, and losing the driver ends the run anyway."""


@contextlib.contextmanager
def dropping_stderr_lines(markers: tuple[bytes, ...] = HARMLESS_RAY_LINES) -> Iterator[None]:
    """Run the body with this process's stderr (file descriptor 2, where Ray's C++ core writes)
    passed through a thread that drops the lines holding any of ``markers``; everything else
    goes through unchanged, a partial line as soon as it is written."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pass_lines, args=(read_end, saved, markers), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to its end and stops
        pump.join(timeout=10)
        os.close(saved)


def _pass_lines(source: int, target: int, markers: tuple[bytes, ...]) -> None:
    with os.fdopen(source, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 16):
            lines = chunk.split(b"\n")
            kept = [line for line in lines[:-1] if not any(m in line for m in markers)]
            out = memoryview(b"".join(line + b"\n" for line in kept) + lines[-1])
            try:
                while out:
                    out = out[os.write(target, out) :]
            except OSError:
                pass  # stderr closed: go on draining the pipe, so that no writer ever blocks on it


def forget_cluster(gcs_port: int) -> None:
    """Remove Ray's note of the "current" cluster (``/tmp/ray/ray_current_cluster``) if it names
    the GCS at ``gcs_port``: a cluster started with ``ray start`` or ``ray.cluster_utils.Cluster``
    leaves it behind when it stops, and every bare ``ray.init()`` afterwards would wait on the
    dead address. The port decides, since Ray writes the node's own IP even for a head started
    on 127.0.0.1."""
    from ray._private.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            named = f.read().strip()
    except FileNotFoundError:
        return
    if named.rpartition(":")[2] == str(gcs_port):
        os.remove(path)
