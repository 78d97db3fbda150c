"""Joining or starting Ray, and sizing the jobs' actor pools from what the cluster holds."""

from __future__ import annotations

import os


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
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


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
