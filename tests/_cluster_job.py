"""Run the annotation job on a 3-node ``ray.cluster_utils.Cluster`` and remove a worker node mid-run.

Usage: ``python tests/_cluster_job.py INPUT OUTPUT`` (OUTPUT a local folder). Run by
``test_annotate.py::test_worker_node_lost_mid_run`` in its own process, because a Cluster cannot
share a process with another ``ray.init``. The head has no CPUs and each worker node one, so
with two one-CPU detector actors each worker node holds one actor: removing a node kills an
actor mid-shard. A replacement node joins afterwards (as an autoscaler would add one) so the
restarted actor has somewhere to go. Prints a JSON report as its last line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from jobs._cluster import forget_cluster
from jobs._config import from_values
from jobs.annotate import AnnotateConfig, run


def main(input_uri: str, output: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = from_values(
        AnnotateConfig,
        dict(input=input_uri, output=output, images_per_shard=2, scale="original", actors=2, batch_size=1, torch_threads=1),
    )
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["summary"] = run(config)
        except BaseException as exc:  # reported below; the main thread must still shut down
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=job)
    thread.start()
    shard_files = Path(output).glob
    deadline = time.monotonic() + 240
    while len(list(shard_files("annotations/shard=*/part-*.parquet"))) < 2 or ray.available_resources().get("CPU", 0) > 0:
        if not thread.is_alive() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    free_cpus = ray.available_resources().get("CPU", 0)
    committed = len(list(shard_files("annotations/shard=*/part-*.parquet")))
    cluster.remove_node(workers[0])
    time.sleep(2)
    cluster.add_node(num_cpus=1)
    thread.join(timeout=300)
    report = {
        "committed_when_node_removed": committed,
        "actors_on_removed_node": 1 if free_cpus == 0 else 0,
        "free_cpus_before_removal": free_cpus,
        **outcome,
    }
    gcs_port = int(cluster.address.rpartition(":")[2])
    ray.shutdown()
    cluster.shutdown()
    forget_cluster(gcs_port)
    print(json.dumps(report, default=str), flush=True)
    sys.exit(0 if "summary" in outcome else 1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
