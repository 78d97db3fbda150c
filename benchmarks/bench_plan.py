"""The annotation job's planning phase at scale, on a local S3 endpoint (moto, in its own process).

Fills a bucket with ``--objects`` tiny objects, then, each in a fresh process so that peak RSS
is the planner's own:

1. **listing** (``jobs._storage.list_input``): seconds, LIST requests (one per 1,000 keys),
   driver peak RSS growth, bytes per object;
2. **resume** with every object committed (synthetic shard files of ``--rows-per-file`` URIs,
   named as the job names them): the one recursive listing of the output, reading the ``uri``
   column of every shard and the anti-join (``jobs.annotate.prepare``'s steps);
3. **reading the output** locally, the same rows as files of 64 and of 1,000 rows: pyarrow and
   duckdb ``count(*)``.

Prints per-object costs and their extrapolation to 10^7 and 10^8 objects.

    python -m benchmarks.bench_plan --objects 30000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, uri: str, output: str) -> dict:
    """One measured step, run in this (fresh) process."""
    import pyarrow.compute as pc

    from jobs._storage import OutputStore, list_input

    # Imports, the S3 client and its connection pool are made by a first, one-object listing, so
    # that the growth measured below is the listing's own.
    list_input("s3://plan/warm/")
    base = _rss_mib()
    start = time.perf_counter()
    if step == "list":
        # Two listings, the first of the first 1,000 objects: the difference of the peaks is
        # what each further object costs, apart from the fixed cost of the first pages.
        first = list_input(uri + "00000/")
        first_rss, first_s = _rss_mib(), time.perf_counter() - start
        uris = list_input(uri)
        result = {
            "objects": len(uris),
            "arrow_bytes": uris.nbytes,
            "marginal_bytes_per_object": (_rss_mib() - first_rss) * 2**20 / max(1, len(uris) - len(first)),
            "first_objects": len(first),
            "first_seconds": first_s,
        }
    else:
        uris = list_input(uri)
        listed = time.perf_counter()
        store = OutputStore(output)
        listing = store.listing()
        done = store.read_uris(listing.committed).combine_chunks()
        new = uris.filter(pc.invert(pc.is_in(uris, value_set=done)))
        result = {"objects": len(uris), "files": len(listing.committed), "new": len(new), "input_listing_s": listed - start}
    result.update(seconds=time.perf_counter() - start, rss_growth_mib=_rss_mib() - base)
    return result


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

    from jobs._storage import make_shards, parquet_bytes

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
    table = pa.table({
        "uri": [f"s3://bucket/photos/{i:09d}.jpg" for i in range(rows)],
        "num_faces": rng.integers(0, 20, rows).astype(np.int32),
        "score": rng.random(rows).astype(np.float32),
    })
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
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

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
        f"reading {resume['files']} uri columns and the anti-join; {resume['new']} new; driver RSS +{resume['rss_growth_mib']:.1f} MiB "
        "(input listing included)"
    )
    for scale in (10**7, 10**8):
        print(
            f"at {scale:.0e} objects (local endpoint, linear): listing {per_object_s * scale / 60:.0f} min and "
            f"{per_object_b * scale / 2**30:.2f} GiB, resume {resume_s / n * scale / 60:.0f} min"
        )
    for per_file, figure in reads.items():
        print(f"read {args.read_rows} rows as {figure['files']} files of {per_file}: pyarrow {figure['pyarrow'] * 1e3:.0f} ms, duckdb count(*) {figure['duckdb'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
