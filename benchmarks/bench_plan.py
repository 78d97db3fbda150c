"""The annotation job's planning phase at scale, on a local S3 endpoint (moto, in its own process).

Fills a bucket with ``--objects`` tiny objects, then, each in a fresh process so that peak RSS
is the planner's own:

1. **listing** (``jobs._inputs.list_input``): seconds, LIST requests (one per 1,000 keys),
   driver peak RSS growth, bytes per object;
2. **resume** with every object committed (synthetic shard files of ``--rows-per-file`` URIs,
   named as the job names them): the one recursive listing of the output, reading the ``uri``
   column of every shard and the anti-join (``jobs.annotate.plan.split_listing``, what
   ``jobs.annotate.plan.prepare`` runs), after a first resume of 1,000 objects that pays the fixed
   costs;
3. **reading the output** locally, the same rows as files of 64 and of 1,000 rows: pyarrow and
   duckdb ``count(*)``;
4. **inventory** (``--inventory-rows``, no objects needed): a ``uri`` Parquet inventory of
   generated URIs in a local folder, half of them committed as shard files, planned by the Ray
   planner (``jobs.annotate.inventory.plan_inventory`` and the shard cutting, on a private local Ray of
   2 CPUs) and, for comparison, by the driver planner (the same URIs as one Parquet manifest:
   ``list_input`` and ``split_listing``): seconds and the driver's peak RSS growth per object.

Prints per-object costs and their extrapolation to 10^7 and 10^8 objects.

    python -m benchmarks.bench_plan --objects 30000 [--inventory-rows 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _rss_mib() -> float:
    """This process's peak RSS since the last :func:`_reset_peak` (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _reset_peak() -> None:
    """Start the peak RSS afresh from the current RSS, so that a transient peak of the imports
    before the measured step does not hide its growth (Linux: ``5`` to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(step: str, uri: str, output: str) -> dict:
    """One measured step, run in this (fresh) process."""
    from jobs._inputs import list_input
    from jobs.annotate.output import OutputStore
    from jobs.annotate.plan import split_listing

    if step.startswith("inventory"):
        return inventory_child(step.split(":", 1)[1], uri, output)

    # Imports, the S3 client and its connection pool are made by a first, one-object listing, so
    # that the growth measured below is the listing's own.
    list_input("s3://plan/warm/")
    if step == "resume":
        # Likewise split_listing's fixed costs (its lookup buffers, the reader's read-ahead), by a
        # first resume of the first 1,000 objects against the whole output.
        store = OutputStore(output)
        split_listing(list_input(uri + "00000/").uris, store.uri_batches(store.listing().committed))
    _reset_peak()
    base = _rss_mib()
    start = time.perf_counter()
    if step == "list":
        # Two listings, the first of the first 1,000 objects: the difference of the peaks is
        # what each further object costs, apart from the fixed cost of the first pages.
        first = list_input(uri + "00000/").uris
        first_rss, first_s = _rss_mib(), time.perf_counter() - start
        uris = list_input(uri).uris
        result = {
            "objects": len(uris),
            "arrow_bytes": uris.nbytes,
            "marginal_bytes_per_object": (_rss_mib() - first_rss) * 2**20 / max(1, len(uris) - len(first)),
            "first_objects": len(first),
            "first_seconds": first_s,
        }
    else:
        uris = list_input(uri).uris
        listed, listed_rss = time.perf_counter(), _rss_mib()
        store = OutputStore(output)
        listing = store.listing()
        new, _, _ = split_listing(uris, store.uri_batches(listing.committed))
        result = {
            "objects": len(uris), "files": len(listing.committed), "new": len(new), "input_listing_s": listed - start,
            "split_mib": _rss_mib() - listed_rss,
        }  # fmt: skip
    result.update(seconds=time.perf_counter() - start, rss_growth_mib=_rss_mib() - base)
    return result


def inventory_child(planner: str, inventory: str, output: str) -> dict:
    """Plan the ``uri`` inventory at ``inventory`` (a folder; ``inventory``.parquet: the same
    URIs as one file) against the shards committed under ``output``, with the Ray or the
    driver planner; peak RSS growth of this (driver) process."""
    from jobs._inputs import list_input
    from jobs.annotate.inventory import open_inventory, plan_inventory
    from jobs.annotate.output import OutputStore
    from jobs.annotate.plan import split_listing

    store = OutputStore(output)
    result: dict = {}
    if planner == "driver":
        _reset_peak()
        base, start = _rss_mib(), time.perf_counter()
        uris = list_input(inventory + ".parquet").uris
        listed = _rss_mib()
        new, _, _ = split_listing(uris, store.uri_batches(store.listing().committed))
        result["split_mib"] = _rss_mib() - listed
        rows, count = len(uris), len(new)
        del uris, new
    else:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Data's own first-use costs, paid by a plan of the warm-up inventory.
        plan_inventory(open_inventory(inventory + "-warm", "s3://plan/"), [], store.fs).new.shard_rows(1000)
        _reset_peak()
        base, start = _rss_mib(), time.perf_counter()
        committed = [store.shard_path(s, fp) for s, fp in sorted(store.listing().committed.items())]
        found = plan_inventory(open_inventory(inventory, "s3://plan/"), committed, store.fs)
        shards = found.new.shard_rows(1000)
        rows, count, result["shards"] = found.listed, len(found.new), shards.count() if shards is not None else 0
        ray.shutdown()
    return result | {"rows": rows, "new": count, "seconds": time.perf_counter() - start, "rss_growth_mib": _rss_mib() - base}


def write_inventory(folder: Path, rows: int, rows_per_file: int = 1000) -> None:
    """A ``uri`` inventory of ``rows`` generated URIs in 10 files (and as one file, for the
    driver planner), a 100-row warm-up one, and the first half of the URIs committed as shard
    files of ``rows_per_file`` under ``folder``/out, named as the job names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.annotate.output import OutputStore
    from jobs.annotate.shards import make_shards

    uris = pa.array([f"s3://plan/photos/{i // 1000:05d}/{i:09d}.jpg" for i in range(rows)])
    (folder / "inventory").mkdir(parents=True)
    (folder / "inventory-warm").mkdir()
    step = -(-rows // 10)
    for i, start in enumerate(range(0, rows, step)):
        pq.write_table(pa.table({"uri": uris[start : start + step]}), folder / "inventory" / f"{i:02d}.parquet")
    pq.write_table(pa.table({"uri": uris}), folder / "inventory.parquet")
    pq.write_table(pa.table({"uri": uris[:100]}), folder / "inventory-warm" / "0.parquet")
    store = OutputStore(str(folder / "out"))
    for shard in make_shards(uris[: rows // 2], rows_per_file):
        path = Path(store.shard_path(shard.id, "0123456789ab"))
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"uri": shard.uris}), path)


def run_child(step: str, uri: str, output: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_plan", "--child", step, uri, output],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def fill(bucket: str, count: int) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/warm/0.jpg", b"x")
    names = [f"{bucket}/photos/{i // 1000:05d}/{i:09d}.jpg" for i in range(count)]
    for start in range(0, count, 5000):
        fs.pipe({name: b"x" for name in names[start : start + 5000]})
    return [f"s3://{name}" for name in names]


def commit_all(uris: list[str], output: str, rows_per_file: int) -> None:
    """Shard files holding every URI, as the job names them (only the uri column: what resume reads)."""
    import fsspec
    import pyarrow as pa

    from jobs.annotate.output import parquet_bytes
    from jobs.annotate.shards import make_shards

    fs = fsspec.filesystem("s3")
    files = {}
    for shard in make_shards(uris, rows_per_file):
        path = f"{output[5:]}/annotations/shard={shard.id}/part-0123456789ab.parquet"
        files[path] = parquet_bytes(pa.table({"uri": list(shard.uris)}), compression="zstd")
    items = list(files.items())
    for start in range(0, len(items), 500):
        fs.pipe(dict(items[start : start + 500]))


def read_cost(rows: int, work: Path) -> dict:
    """Seconds to read the same rows as files of 64 and of 1,000 rows (best of 3)."""
    import duckdb
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "uri": [f"s3://bucket/photos/{i:09d}.jpg" for i in range(rows)],
            "num_faces": rng.integers(0, 20, rows).astype(np.int32),
            "score": rng.random(rows).astype(np.float32),
        }
    )
    figures = {}
    for per_file in (64, 1000):
        folder = work / f"rows{per_file}"
        folder.mkdir()
        for i, start in enumerate(range(0, rows, per_file)):
            pq.write_table(table.slice(start, per_file), folder / f"{i:06d}.parquet", compression="zstd")
        timings = {"pyarrow": [], "duckdb": []}
        for _ in range(3):
            start = time.perf_counter()
            pads.dataset(folder, format="parquet").to_table()
            timings["pyarrow"].append(time.perf_counter() - start)
            start = time.perf_counter()
            duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall()
            timings["duckdb"].append(time.perf_counter() - start)
        figures[per_file] = {k: min(v) for k, v in timings.items()} | {"files": -(-rows // per_file)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=30_000)
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--read-rows", type=int, default=128_000, help="rows of the output-read comparison")
    parser.add_argument("--inventory-rows", type=int, nargs="*", default=[100_000, 1_000_000], help="inventory sizes planned (none: skip)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    inventories = bench_inventories(args.inventory_rows)

    from jobs._local_s3 import LocalS3, s3_environment

    with LocalS3(process=True) as s3, tempfile.TemporaryDirectory() as work:
        os.environ.update(s3_environment(s3.endpoint))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        started = time.perf_counter()
        uris = fill("plan", args.objects)
        print(f"bench_plan: {args.objects} objects made in {time.perf_counter() - started:.0f} s", flush=True)
        listing = run_child("list", "s3://plan/photos/", "", env)
        commit_all(uris, "s3://plan/out", args.rows_per_file)
        resume = run_child("resume", "s3://plan/photos/", "s3://plan/out", env)
        reads = read_cost(args.read_rows, Path(work))

    n = args.objects
    per_object_s = (listing["seconds"] - listing["first_seconds"]) / n
    per_object_b = listing["marginal_bytes_per_object"]
    resume_s = resume["seconds"] - resume["input_listing_s"]
    resume_b = resume["rss_growth_mib"] * 2**20 / n
    print("\n=== bench_plan results ===")
    print(f"objects: {n}, output files: {resume['files']} of {args.rows_per_file} rows")
    print(
        f"listing : {listing['seconds'] - listing['first_seconds']:.2f} s, {math.ceil(n / 1000)} LIST requests, driver peak RSS "
        f"+{listing['rss_growth_mib']:.1f} MiB in all (after a first listing of {listing['first_objects']}: "
        f"{per_object_b:.0f} B per further object; the Arrow array itself {listing['arrow_bytes'] / n:.0f} B/object), "
        f"{per_object_s * 1e6:.0f} us/object"
    )
    print(
        f"resume  : {resume_s:.2f} s for the output listing ({math.ceil(resume['files'] / 1000)} LIST requests), "
        f"reading {resume['files']} uri columns and the anti-join; {resume['new']} new; driver peak RSS +{resume['rss_growth_mib']:.1f} MiB "
        f"(input listing included) = {resume_b:.0f} B/object, of which split_listing {resume['split_mib'] * 2**20 / n:.0f} B/object"
    )
    for scale in (10**7, 10**8):
        print(
            f"at {scale:.0e} objects (local endpoint, linear): listing {per_object_s * scale / 60:.0f} min and "
            f"{per_object_b * scale / 2**30:.2f} GiB, resume {resume_s / n * scale / 60:.0f} min and {resume_b * scale / 2**30:.2f} GiB"
        )
    for per_file, figure in reads.items():
        print(
            f"read {args.read_rows} rows as {figure['files']} files of {per_file}: pyarrow {figure['pyarrow'] * 1e3:.0f} ms, duckdb count(*) {figure['duckdb'] * 1e3:.0f} ms"
        )
    print_inventories(inventories)


def bench_inventories(sizes: list[int]) -> dict[int, dict[str, dict]]:
    """Plan a ``uri`` inventory of each size with each planner, each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    figures = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory() as work:
            write_inventory(Path(work), rows)
            inventory, output = str(Path(work) / "inventory"), str(Path(work) / "out")
            figures[rows] = {planner: run_child(f"inventory:{planner}", inventory, output, env) for planner in ("ray", "driver")}
        print(f"bench_plan: inventory of {rows} planned: {figures[rows]}", flush=True)
    return figures


def print_inventories(figures: dict[int, dict[str, dict]]) -> None:
    for rows, by_planner in figures.items():
        ray_, driver = by_planner["ray"], by_planner["driver"]
        print(
            f"inventory {rows} URIs ({ray_['new']} new, half committed; {ray_['shards']} shards): Ray planner {ray_['seconds']:.1f} s, driver peak RSS "
            f"+{ray_['rss_growth_mib']:.1f} MiB = {ray_['rss_growth_mib'] * 2**20 / rows:.1f} B/object; driver planner "
            f"{driver['seconds']:.1f} s, +{driver['rss_growth_mib']:.1f} MiB = {driver['rss_growth_mib'] * 2**20 / rows:.0f} B/object, "
            f"of which split_listing +{driver['split_mib']:.1f} MiB = {driver['split_mib'] * 2**20 / rows:.0f} B/object"
        )
    if len(figures) > 1:
        (small, a), (large, b) = min(figures.items()), max(figures.items())
        # Growth below the noise of fixed costs reads as none, not as a negative cost.
        per_object = {k: max(0.0, b[k]["rss_growth_mib"] - a[k]["rss_growth_mib"]) * 2**20 / (large - small) for k in ("ray", "driver")}
        split = max(0.0, b["driver"]["split_mib"] - a["driver"]["split_mib"]) * 2**20 / (large - small)
        seconds = (b["ray"]["seconds"] - a["ray"]["seconds"]) / (large - small)
        print(
            f"inventory marginal per object ({small} -> {large}): Ray planner driver RSS {per_object['ray']:.1f} B, "
            f"{seconds * 1e6:.0f} us of planning (this machine's CPUs); driver planner {per_object['driver']:.0f} B "
            f"(split_listing {split:.0f} B)"
        )
        for scale in (10**7, 10**8):
            print(
                f"at {scale:.0e} objects from an inventory (linear): Ray planner driver RSS "
                f"+{(b['ray']['rss_growth_mib'] * 2**20 + per_object['ray'] * (scale - large)) / 2**30:.2f} GiB, "
                f"{(b['ray']['seconds'] + seconds * (scale - large)) / 60:.0f} min on 2 CPUs; driver planner "
                f"{(b['driver']['rss_growth_mib'] * 2**20 + per_object['driver'] * (scale - large)) / 2**30:.2f} GiB"
            )


if __name__ == "__main__":
    main()
