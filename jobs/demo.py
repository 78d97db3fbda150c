"""``make demo``: the annotation job end to end on this machine, with no cluster, cloud or download.

1. starts an S3 server in this process (moto, on 127.0.0.1) and fills a bucket with photos that
   ship inside scikit-image, variants of them (crops, rescales, an EXIF-rotated copy, grey,
   16-bit and alpha versions), broken files (zero bytes, a truncated JPEG, text named .jpg,
   random bytes, a 110-megapixel PNG bomb) and, where ``../shared`` exists, its real photos;
2. runs ``jobs.annotate`` on a local Ray over that bucket, writing Parquet to ``demo_output/``,
   with the faces' aligned 112 x 112 crops (``--crops 112``);
3. prints a duckdb summary of the result;
4. draws a contact sheet of the faces by quality (``jobs.annotate.report``) and prints its path.

The checkpoint is found as usual (``$RETINAFACE_WEIGHTS_DIR``, the cache, or its upstream URL);
``../shared/weights`` is used when present. Needs the ``demo`` extra (moto, scikit-image,
duckdb), which ``make demo`` installs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._exit import ExitCode
from ._local_s3 import LocalS3, s3_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = "demo-images"


def fill_bucket(shared: Path | None) -> int:
    import fsspec

    from ._samples import broken_files, generated_images, oversized_png, shared_photos

    files = generated_images()
    files.update(broken_files(files["photos/astronaut.jpg"]))
    files["broken/pixel_bomb.png"] = oversized_png(11_000, 10_000)
    if shared is not None:
        files.update(shared_photos(shared))
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    for name, data in files.items():
        fs.pipe_file(f"{BUCKET}/{name}", data)
    return len(files)


def print_summary(output: Path) -> None:
    import duckdb

    con = duckdb.connect()
    files = f"{output}/annotations/*/*.parquet"
    con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet('{files}', hive_partitioning = true)")
    con.execute("CREATE VIEW faces AS SELECT uri, unnest(faces, recursive := true) FROM images")
    queries = {
        "images by status": "SELECT status, count(*) AS images, sum(num_faces) AS faces FROM images GROUP BY status ORDER BY status",
        "errors and their reasons": (
            "SELECT regexp_extract(uri, '[^/]+$') AS object, error_kind, error FROM images WHERE status = 'error' ORDER BY uri"
        ),
        "images with the most faces": (
            "SELECT regexp_extract(uri, '[^/]+$') AS object, width, height, num_faces FROM images ORDER BY num_faces DESC LIMIT 8"
        ),
        "face sizes (short side, px)": (
            "SELECT CAST(pow(2, floor(log2(face_size))) AS INTEGER) AS min_px, count(*) AS faces, "
            "round(avg(quality), 3) AS mean_quality FROM faces GROUP BY min_px ORDER BY min_px"
        ),
        "faces with score > 0.9 and quality > 0.5": (
            "SELECT count(*) AS faces, count(DISTINCT uri) AS images FROM faces WHERE score > 0.9 AND quality > 0.5"
        ),
    }
    for title, sql in queries.items():
        print(f"\n-- {title}")
        con.sql(sql).show(max_width=160)


def main() -> ExitCode:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "demo_output", help="where the Parquet dataset goes")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    shared = args.shared if args.shared.is_dir() else None
    if shared is not None and (shared / "weights").is_dir():
        os.environ.setdefault("RETINAFACE_WEIGHTS_DIR", str(shared / "weights"))

    with LocalS3() as s3:
        endpoint = s3.endpoint
        os.environ.update(s3_environment(endpoint))
        count = fill_bucket(shared)
        print(f"demo: S3 server at {endpoint}, bucket s3://{BUCKET}/ with {count} objects", flush=True)
        import ray

        from ._config import from_values
        from .annotate import AnnotateConfig, run
        from .annotate.report import ReportConfig, write_report

        # Started after the S3 variables are exported: workers inherit this environment.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        # The job's defaults but for small shards and batches, and with crops, as flags would give them.
        settings = {
            "input": f"s3://{BUCKET}/", "output": str(args.output), "images_per_shard": 8, "batch_size": 4, "overwrite": True, "crops": 112,
        }  # fmt: skip
        run(from_values(AnnotateConfig, settings))
        ray.shutdown()
        print_summary(args.output)
        report = write_report(ReportConfig(output=str(args.output), out=str(args.output / "contact_sheet.png")))
        print(f"\ndemo: contact sheet of {report.shown} of {report.faces} faces by quality: {report.path}", flush=True)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
