"""The annotation job end to end: a moto S3 server, real Ray, real Parquet, real photos.

What "permission denied" is tested with: moto does not enforce bucket policies without
turning on its IAM emulation for the whole server, so an unreadable object is represented by
a manifest entry whose object does not exist (``not_found``); the mapping of S3's AccessDenied
(a ``PermissionError`` from s3fs) to ``permission_denied`` is tested in ``test_image_io.py``.

The multi-node test runs ``tests/_cluster_job.py`` in a subprocess, because a
``ray.cluster_utils.Cluster`` cannot share a process with the session's ``ray.init``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import duckdb
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs._config import from_values
from jobs._exit import JobError
from jobs._inputs import list_input
from jobs._samples import broken_files, generated_images, oversized_png, shared_photos
from jobs.annotate import AnnotateConfig, run
from jobs.annotate.report import BACKGROUND, TILE, box_tile, tile_origins
from jobs.annotate.report import main as report_main
from jobs.annotate.shards import make_shards
from retinaface_core import Detector, align_faces
from retinaface_core.evaluation import box_iou_plus_one
from retinaface_core.image_io import read_image
from retinaface_core.registry import ModelRegistry
from retinaface_core.training import model_checkpoint_bytes
from retinaface_core.weights import load_weights
from schemas.annotation import ANNOTATION_SCHEMA, LANDMARK_NAMES, SCHEMA_VERSION, SETTINGS_METADATA_KEY, partitioning
from schemas.crops import CROPS_SCHEMA

SCALE = "long:640"
MAX_PIXELS = 3_000_000  # every real photo is below 1.5 MP; the bomb is 3.2 MP
IMAGES_PER_SHARD = 5


def upload(bucket: str, files: dict[str, bytes], prefix: str = "") -> list[str]:
    fs = fsspec.filesystem("s3")
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/{prefix}{name}", data)
    fs.invalidate_cache()
    return [f"s3://{bucket}/{prefix}{name}" for name in files]


def read_output(output: str) -> pd.DataFrame:
    """The committed rows of a job's output, as pandas (shard from the hive path)."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    dataset = pads.dataset(f"{path}/annotations", filesystem=fs, format="parquet", partitioning=partitioning())
    return dataset.to_table().to_pandas()


@pytest.fixture(scope="module")
def bucket_input(shared_dir, make_bucket):
    """A bucket of real photos, generated variants and every kind of bad input, plus a manifest.

    Returns (bucket, manifest URI, {uri: expected error kind or None}).
    """
    bucket = make_bucket("annotate")
    real = shared_photos(shared_dir)
    assert len(real) == 14, f"expected the 14 shared photos, found {sorted(real)}"
    generated = generated_images()
    broken = broken_files(real["shared/images/crowd_baseball.jpg"])
    broken["broken/pixel_bomb.png"] = oversized_png(2000, 1600)
    uris = upload(bucket, {**real, **generated, **broken}, prefix="in/")
    expected = {u: None for u in uris}
    kinds = {"empty.jpg": "empty", "truncated.jpg": "truncated", "not_an_image.jpg": "not_image", "pixel_bomb.png": "too_large"}
    for u in uris:
        name = u.rsplit("/", 1)[1]
        if name in kinds:
            expected[u] = kinds[name]
        elif name == "random_bytes.png":
            expected[u] = "not_image"
    missing = f"s3://{bucket}/in/broken/missing_object.jpg"
    expected[missing] = "not_found"
    manifest = f"s3://{bucket}/manifest.txt"
    fsspec.filesystem("s3").pipe_file(manifest[5:], ("# every object, and one that is absent\n" + "\n".join(expected) + "\n").encode())
    return bucket, manifest, expected


def job_config(input: str, output: str, **overrides) -> AnnotateConfig:
    settings = dict(
        input=input,
        output=output,
        images_per_shard=IMAGES_PER_SHARD,
        scale=SCALE,
        max_pixels=MAX_PIXELS,
        actors=2,
        batch_size=4,
        torch_threads=1,
    )
    return from_values(AnnotateConfig, {**settings, **overrides})


@pytest.fixture(scope="module")
def annotated(ray_session, bucket_input):
    bucket, manifest, expected = bucket_input
    output = f"s3://{bucket}/out"
    summary = run(job_config(manifest, output))
    return output, summary, read_output(output), expected


def faces_of(row) -> pd.DataFrame:
    """The faces of a row; none for an error row (whose ``faces`` is null)."""
    return pd.DataFrame(list(row["faces"] if row["faces"] is not None else []))


def test_prefix_listing_is_recursive_sorted_and_case_insensitive(s3_server, make_bucket):
    bucket = make_bucket("listing")
    names = ["b/z.JPG", "a/x.jpeg", "a/deep/y.PNG", "c.webp", "d.bmp", "notes.txt", "a/anim.gif", "e.Jpg"]
    upload(bucket, {n: b"x" for n in names})
    listed = list_input(f"s3://{bucket}/").uris
    wanted = sorted(f"s3://{bucket}/{n}" for n in names if not n.endswith(".txt"))
    assert listed.to_pylist() == wanted
    shards = make_shards(listed, 2)
    assert [s.id for s in shards] == [s.id for s in make_shards(list_input(f"s3://{bucket}").uris, 2)]
    assert len({s.id for s in shards}) == 4 and [len(s.uris) for s in shards] == [2, 2, 2, 1]
    with fsspec.open(f"s3://{bucket}/manifests/m.parquet", "wb") as f:
        pq.write_table(pa.table({"uri": wanted[::-1]}), f)
    assert list_input(f"s3://{bucket}/manifests/m.parquet").uris.to_pylist() == wanted
    with pytest.raises(JobError, match="nothing below it"):
        list_input(f"s3://{bucket}/nothing-here/")
    upload(bucket, {"only-text/readme.txt": b"x"})
    with pytest.raises(JobError, match="no images found"):
        list_input(f"s3://{bucket}/only-text/")


def test_end_to_end_one_row_per_object_with_reasons(annotated):
    output, summary, rows, expected = annotated
    assert sorted(rows["uri"]) == sorted(expected), "exactly one row per object"
    got = {u: kind if status == "error" else None for u, kind, status in zip(rows["uri"], rows["error_kind"], rows["status"])}
    assert got == expected
    for _, row in rows[rows["status"] == "error"].iterrows():
        assert row["uri"] in row["error"] and pd.isna(row["num_faces"]) and row["faces"] is None
    errors = sum(kind is not None for kind in expected.values())
    assert summary["images"] == len(expected) and summary["errors"] == errors
    assert summary["faces"] == rows["num_faces"].sum()
    assert summary["shards_total"] == summary["shards_processed"] == -(-len(expected) // IMAGES_PER_SHARD)
    assert set(rows["run_id"]) == {summary["run_id"]}
    assert (rows["model_name"] == "mobilenet0.25-1mb").all()
    assert rows["shard"].nunique() == summary["shards_total"]
    fs, path = fsspec.core.url_to_fs(output)
    assert json.loads(fs.cat_file(f"{path}/_runs/{summary['run_id']}/summary.json")) == summary
    assert json.loads(fs.cat_file(f"{path}/_dataset.json"))["schema_version"] == SCHEMA_VERSION
    stored = pads.dataset(f"{path}/annotations", filesystem=fs, format="parquet").schema
    assert stored.remove_metadata().equals(ANNOTATION_SCHEMA.remove_metadata())


def test_end_to_end_faces_equal_the_detector(annotated, shared_dir):
    _, summary, rows, _ = annotated
    detector = Detector(scale=SCALE, score_threshold=0.5)
    real = rows[rows["uri"].str.contains("/in/shared/")]
    assert len(real) == 14
    total = matched = 0
    for _, row in real.iterrows():
        local = shared_dir / row["uri"].split("/in/shared/", 1)[1]
        image = read_image(str(local))
        assert (row["height"], row["width"]) == image.shape[:2]
        want = detector.detect(image)[0]
        got = faces_of(row)
        assert len(got) == row["num_faces"]
        # The job pads images to their batch's canvas (--batching bucket), which moves a few
        # faces near the padded border or the threshold; the rest are the exact-size detector's.
        assert abs(len(got) - len(want)) <= max(2, 0.03 * len(want)), row["uri"]
        total += len(want)
        if len(want) and len(got):
            boxes = got[["x1", "y1", "x2", "y2"]].to_numpy()
            distance = np.abs(boxes[:, None, :] - want.boxes[None]).max(-1)
            pairs = np.argwhere(distance <= 1.0)
            matched += len(np.unique(pairs[:, 1]))
            first, twin = pairs[:, 0], pairs[:, 1]
            np.testing.assert_allclose(got["score"].to_numpy()[first], want.scores[twin], atol=0.02)
            np.testing.assert_allclose(got[["left_eye_x", "left_eye_y"]].to_numpy()[first], want.landmarks[twin, 0], atol=1.5)
            assert (got["face_index"].to_numpy() == np.arange(len(got))).all()
            assert got["quality"].between(0, 1).all()
    assert total > 200 and matched >= 0.95 * total, (matched, total)
    assert 0.5 < summary["batch_fill"] <= 1 and 0 <= summary["padding_fraction"] < 0.3, summary


def test_exif_rotation_and_modes_in_the_job(annotated):
    _, _, rows, _ = annotated
    by_name = {u.rsplit("/", 1)[1]: r for u, r in zip(rows["uri"], rows.to_dict("records"))}
    upright, rotated = by_name["astronaut_portrait.jpg"], by_name["astronaut_exif6.jpg"]
    assert (rotated["width"], rotated["height"]) == (400, 512)
    assert upright["num_faces"] == rotated["num_faces"] == 1
    np.testing.assert_allclose(
        faces_of(rotated)[["x1", "y1", "x2", "y2"]].to_numpy(), faces_of(upright)[["x1", "y1", "x2", "y2"]].to_numpy(), atol=3
    )
    for name in ("astronaut.jpg", "astronaut_grey.JPG", "astronaut_alpha.png", "astronaut_16bit.png", "astronaut_x2.bmp"):
        assert by_name[name]["status"] == "ok" and by_name[name]["num_faces"] >= 1, name


def test_rerun_does_nothing_and_changes_nothing(annotated):
    output, first, rows, _ = annotated
    again = run(job_config(_manifest_of(output), output))
    assert again["shards_skipped_already_committed"] == first["shards_total"]
    assert again["shards_processed"] == 0 and again["images"] == 0
    after = read_output(output)
    assert sorted(after["uri"]) == sorted(rows["uri"]) and set(after["run_id"]) == {first["run_id"]}


def _manifest_of(output: str) -> str:
    return output.rsplit("/", 1)[0] + "/manifest.txt"


def test_job_errors_fail_fast(annotated, tmp_path):
    output, _, _, _ = annotated
    manifest = _manifest_of(output)
    with pytest.raises(JobError, match="model not available"):
        run(job_config(manifest, str(tmp_path / "a"), weights=str(tmp_path / "missing.pth")))
    with pytest.raises(JobError, match="not writable"):
        run(job_config(manifest, "s3://no-such-bucket-for-output/out"))
    with pytest.raises(JobError, match="no such prefix"):
        run(job_config("s3://" + manifest[5:].split("/")[0] + "/nothing-here/", str(tmp_path / "b")))
    with pytest.raises(JobError, match="other settings.*score_threshold"):
        run(job_config(manifest, output, score_threshold=0.7))
    assert not (tmp_path / "a" / "annotations").exists()


def test_decode_in_tasks_gives_the_same_rows(ray_session, bucket_input, annotated, tmp_path):
    bucket, _, expected = bucket_input
    subset = sorted(u for u in expected if "/in/variants/" in u or "crowd_baseball" in u or "broken/empty" in u)
    manifest = tmp_path / "subset.txt"
    manifest.write_text("\n".join(subset))
    summary = run(job_config(str(manifest), str(tmp_path / "out"), decode="tasks", actors=1))
    assert summary["images"] == len(subset)
    tasks = read_output(str(tmp_path / "out")).set_index("uri").sort_index()
    actor = annotated[2].set_index("uri").loc[subset].sort_index()
    assert (tasks["num_faces"] == actor["num_faces"]).all()
    # The subset's images share batches with other mates than in the full run, so bucket padding
    # moves a few boxes by a fraction of a pixel (measured: at most 0.7 px).
    for uri in subset:
        a, b = faces_of(actor.loc[uri]), faces_of(tasks.loc[uri])
        if len(a):
            np.testing.assert_allclose(a[["x1", "y1", "x2", "y2"]], b[["x1", "y1", "x2", "y2"]], atol=1.0)
            np.testing.assert_allclose(a["quality"], b["quality"], atol=0.05)


def test_model_from_the_registry_is_recorded(ray_session, bucket_input, annotated, tmp_path):
    _, _, expected = bucket_input
    registry = ModelRegistry(str(tmp_path / "registry"))
    loaded = load_weights("mobilenet0.25-1mb")
    registry.register(
        model_checkpoint_bytes(loaded.model),
        config={"model": loaded.config.to_dict()},
        metrics={"val": {"data": "none", "ap": {"easy": 0.5, "medium": 0.5, "hard": 0.5}}},
        train_data={},
    )
    with pytest.raises(JobError, match="no current version"):
        run(job_config(str(tmp_path / "none.txt"), str(tmp_path / "out"), model=registry.uri))
    assert registry.promote("v0001").promoted
    subset = sorted(u for u in expected if "crowd_baseball" in u or "broken/empty" in u)
    manifest = tmp_path / "subset.txt"
    manifest.write_text("\n".join(subset))
    with pytest.raises(ValueError, match="not both"):
        job_config(str(manifest), str(tmp_path / "out"), model=registry.uri, weights="mobilenet0.25-1mb")
    run(job_config(str(manifest), str(tmp_path / "out"), model=registry.uri))
    rows = read_output(str(tmp_path / "out")).set_index("uri")
    assert set(rows["model_version"]) == {"v0001"}
    assert set(rows["model_sha256"]) == {registry.get("v0001").sha256}
    # Same weights as the published checkpoint: the same faces as the run that used --weights.
    baseline = annotated[2].set_index("uri")
    assert (rows["num_faces"] == baseline.loc[rows.index, "num_faces"]).all()
    assert set(baseline["model_version"].dropna()) == set()


# --- The four queries of docs/annotate.md, with duckdb and with pandas -----------------------

DUCKDB_VIEWS = """
CREATE VIEW images AS
  SELECT * EXCLUDE (faces) FROM read_parquet('{root}/annotations/*/*.parquet', hive_partitioning = true);
CREATE VIEW faces AS
  SELECT shard, uri, run_id, unnest(faces, recursive := true)
  FROM read_parquet('{root}/annotations/*/*.parquet', hive_partitioning = true);
"""

DUCKDB_QUERIES = {
    "faces_per_shard": "SELECT shard, coalesce(sum(num_faces), 0) AS faces FROM images GROUP BY shard ORDER BY shard",
    "good_faces": ("SELECT uri, face_index, score, quality FROM faces WHERE score > 0.9 AND quality > 0.5 ORDER BY uri, face_index"),
    "errors": "SELECT uri, error_kind, error FROM images WHERE status = 'error' ORDER BY uri",
    "face_sizes": (
        "SELECT CAST(pow(2, floor(log2(face_size))) AS INTEGER) AS min_px, count(*) AS faces FROM faces GROUP BY min_px ORDER BY min_px"
    ),
}


def pandas_queries(root: str) -> dict[str, pd.DataFrame]:
    """The same four queries in pandas (the code shown in docs/annotate.md)."""
    images = pd.read_parquet(f"{root}/annotations", partitioning=partitioning())
    nested = images[["shard", "uri", "run_id", "faces"]].explode("faces").dropna(subset=["faces"])
    faces = pd.concat([nested[["shard", "uri", "run_id"]].reset_index(drop=True), pd.DataFrame(nested["faces"].tolist())], axis=1)
    faces_per_shard = images.groupby("shard", as_index=False)["num_faces"].sum().rename(columns={"num_faces": "faces"})
    good = faces[(faces.score > 0.9) & (faces.quality > 0.5)]
    good_faces = good[["uri", "face_index", "score", "quality"]].sort_values(["uri", "face_index"])
    errors = images.loc[images.status == "error", ["uri", "error_kind", "error"]].sort_values("uri")
    min_px = (2 ** np.floor(np.log2(faces.face_size.astype("float64")))).astype(int).rename("min_px")
    face_sizes = faces.groupby(min_px).size().rename("faces").reset_index()
    return {"faces_per_shard": faces_per_shard, "good_faces": good_faces, "errors": errors, "face_sizes": face_sizes}


def duckdb_queries(root: str) -> dict[str, pd.DataFrame]:
    con = duckdb.connect()
    con.execute(DUCKDB_VIEWS.format(root=root))
    return {name: con.sql(sql).df() for name, sql in DUCKDB_QUERIES.items()}


def test_queries_duckdb_and_pandas_agree(annotated, tmp_path):
    output, summary, rows, expected = annotated
    # duckdb reads local Parquet here (its S3 extension would download itself): copy the output.
    fs, path = fsspec.core.url_to_fs(output)
    fs.get(f"{path}/annotations", str(tmp_path / "annotations"), recursive=True)
    root = str(tmp_path)
    duck, pand = duckdb_queries(root), pandas_queries(root)
    for name in DUCKDB_QUERIES:
        d = duck[name].reset_index(drop=True)
        p = pand[name].reset_index(drop=True)
        assert list(d.columns) == list(p.columns), name
        assert len(d) == len(p), name
        for column in d.columns:
            left, right = d[column].to_numpy(), p[column].to_numpy()
            if np.issubdtype(np.asarray(left).dtype, np.floating):
                np.testing.assert_allclose(left, right.astype(float), rtol=1e-6, err_msg=name)
            else:
                assert [str(v) for v in left] == [str(v) for v in right], (name, column)
    assert duck["faces_per_shard"]["faces"].sum() == summary["faces"]
    assert len(duck["errors"]) == summary["errors"]
    assert duck["face_sizes"]["faces"].sum() == summary["faces"]
    assert len(duck["good_faces"]) > 0


def test_docs_show_the_tested_queries(repo_root):
    docs = re.sub(r"\s+", " ", (repo_root / "docs/annotate.md").read_text())
    for sql in [*DUCKDB_QUERIES.values(), *DUCKDB_VIEWS.strip().split(";")[:2]]:
        assert re.sub(r"\s+", " ", sql.strip()) in docs, sql


# --- Interrupt and rerun, and a node lost mid-run: subprocesses --------------------------------


def subprocess_env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    env.pop("RAY_ADDRESS", None)
    return env


def committed(output: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in output.glob("annotations/shard=*/part-*.parquet")}


def kill_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a job started with start_new_session (its local Ray processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_interrupted_run_resumes_without_recomputing(s3_server, weights_dir, shared_dir, make_bucket, repo_root, tmp_path):
    bucket = make_bucket("interrupt")
    files = {**shared_photos(shared_dir), **generated_images()}
    upload(bucket, files)
    output = tmp_path / "out"
    total_shards = -(-len(files) // 2)
    args = [
        sys.executable, "-m", "jobs.annotate", "--input", f"s3://{bucket}/", "--output", str(output),
        "--images-per-shard", "2", "--scale", "original", "--batch-size", "1", "--torch-threads", "1",
        "--ray-address", "local",
    ]  # fmt: skip
    env = subprocess_env(repo_root)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [*args, "--run-id", "first"], cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while len(committed(output)) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        kill_group(first)
    time.sleep(1)
    before = committed(output)
    assert 3 <= len(before) < total_shards, f"kill came too late: {len(before)} of {total_shards} shards"

    second = subprocess.run(
        [*args, "--run-id", "second"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped_already_committed"] == len(before)
    assert summary["shards_processed"] == total_shards - len(before)
    shards = make_shards(sorted(f"s3://{bucket}/{n}" for n in files), 2)
    assert summary["images"] == sum(len(s.uris) for s in shards if f"shard={s.id}" not in before)
    after = committed(output)
    assert len(after) == total_shards
    assert all(after[shard] == data for shard, data in before.items()), "committed shards were rewritten"
    rows = read_output(str(output))
    assert sorted(rows["uri"]) == sorted(f"s3://{bucket}/{n}" for n in files), "exactly one row per image"
    first_shards = {s.split("=", 1)[1] for s in before}
    assert (rows.loc[rows["shard"].isin(first_shards), "run_id"] == "first").all()
    assert (rows.loc[~rows["shard"].isin(first_shards), "run_id"] == "second").all()


def test_worker_node_lost_mid_run(s3_server, weights_dir, shared_dir, make_bucket, repo_root, tmp_path):
    bucket = make_bucket("cluster")
    files = {**shared_photos(shared_dir), **generated_images()}
    upload(bucket, files)
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(repo_root / "tests/_cluster_job.py"), f"s3://{bucket}/", str(output)],
        cwd=repo_root, env=subprocess_env(repo_root), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["committed_when_node_removed"] < report["summary"]["shards_total"], "node removed too late"
    assert report["actors_on_removed_node"] >= 1
    rows = read_output(str(output))
    assert sorted(rows["uri"]) == sorted(f"s3://{bucket}/{n}" for n in files), "exactly one row per image"
    assert len(committed(output)) == report["summary"]["shards_total"]


def test_config_from_yaml_with_flag_overrides(tmp_path):
    from jobs._config import format_config, parse_config

    path = tmp_path / "job.yaml"
    path.write_text("input: s3://b/in/\noutput: s3://b/out/\nbatch-size: 16\nscale: square:320\ns3_region: eu-west-1\n")
    config = parse_config(AnnotateConfig, ["--config", str(path), "--batch-size", "4", "--overwrite", "--torch-threads", "none"])
    assert (config.input, config.batch_size, config.detector.scale, config.overwrite) == ("s3://b/in/", 4, "square:320", True)
    assert config.s3.region == "eu-west-1" and config.torch_threads is None
    assert "batch_size" in format_config(config) and "detector.scale" in format_config(config)
    # The same settings grouped as the stored config.json groups them.
    path.write_text(
        "input: s3://b/in/\noutput: s3://b/out/\ndetector:\n  scale: long:320\n  score_threshold: 0.7\ns3: {region: eu-west-2}\n"
    )
    config = parse_config(AnnotateConfig, ["--config", str(path), "--score-threshold", "0.8"])
    assert (config.detector.scale, config.detector.score_threshold, config.s3.region) == ("long:320", 0.8, "eu-west-2")
    with pytest.raises(SystemExit):
        parse_config(AnnotateConfig, ["--output", "x"])  # --input missing
    with pytest.raises(SystemExit):
        parse_config(AnnotateConfig, ["--input", "a", "--output", "b", "--weights", "w.pth", "--model", "s3://r"])
    path.write_text("input: a\noutput: b\nbatchsize: 3\n")
    with pytest.raises(SystemExit):
        parse_config(AnnotateConfig, ["--config", str(path)])


def test_default_pool_fills_the_cluster_with_one_actor_per_share():
    from jobs._cluster import pool_size

    assert pool_size({"CPU": 2.0}, 1.0, 0.0) == 2
    assert pool_size({"CPU": 16.0, "GPU": 4.0}, 1.0, 1.0) == 4
    assert pool_size({"CPU": 16.0, "GPU": 4.0}, 1.0, 0.5) == 8
    assert pool_size({"CPU": 7.0}, 2.0, 0.0) == 3
    assert pool_size({"CPU": 0.5}, 1.0, 0.0) == 1, "a cluster smaller than one share still gets one actor"


def test_grown_input_gets_only_its_new_images_and_a_shrunk_one_is_reported(ray_session, make_bucket, tmp_path, capsys):
    photos = generated_images()
    bucket = make_bucket("incremental")
    names = [f"day1/{i:02d}_{n.split('/')[-1]}" for i, n in enumerate(sorted(photos) * 3)][:30]
    upload(bucket, {n: photos[sorted(photos)[i % len(photos)]] for i, n in enumerate(names)})
    output = str(tmp_path / "out")
    config = job_config(f"s3://{bucket}/", output, images_per_shard=8, scale="long:320")
    first = run(config)
    assert first["images"] == 30 and first["images_new"] == 30
    before = committed(tmp_path / "out")

    added = [f"day2/{i:02d}.jpg" for i in range(10)]
    upload(bucket, {n: photos["photos/astronaut.jpg"] for n in added})
    second = run(config)
    assert second["images_listed"] == 40 and second["images_new"] == 10 and second["images"] == 10
    rows = read_output(output)
    assert len(rows) == 40 and rows["uri"].is_unique, "each image exactly once"
    assert set(rows.loc[rows["uri"].str.contains("/day2/"), "run_id"]) == {second["run_id"]}
    assert all(committed(tmp_path / "out")[shard] == data for shard, data in before.items()), "old shards untouched"

    gone = names[:5]
    fs = fsspec.filesystem("s3")
    fs.rm([f"{bucket}/{n}" for n in gone])
    fs.invalidate_cache()
    capsys.readouterr()
    third = run(config)
    assert third["images_removed_from_input"] == 5 and third["images"] == 0
    assert "5 annotated images are no longer in the input" in capsys.readouterr().out
    assert len(read_output(output)) == 40, "rows of deleted objects are reported, not dropped"


def test_tta_is_recorded_and_not_mixed(ray_session, bucket_input, shared_dir, tmp_path):
    _, _, expected = bucket_input
    subset = sorted(u for u in expected if "crowd_baseball" in u or "astronaut_face_crop" in u)
    manifest = tmp_path / "subset.txt"
    manifest.write_text("\n".join(subset))
    output = str(tmp_path / "out")
    # The recommended automatic pyramid: per-photo views, long sides of one ladder.
    run(job_config(str(manifest), output, tta="pyramid:auto+flip", actors=1))
    rows = read_output(output)
    assert set(rows["tta"]) == {"flip+pyramid:auto"} and len(rows) == len(subset)
    assert json.loads((tmp_path / "out" / "_dataset.json").read_text())["tta"] == "flip+pyramid:auto"
    # Its views come back in the photo's pixels: the confident faces of one plain pass are there
    # (all but one at most: where a plain pass places a box between two heads, the views agree
    # on the face next to it).
    baseball = rows[rows["uri"].str.contains("crowd_baseball")].iloc[0]
    plain = Detector(score_threshold=0.9).detect(read_image(str(shared_dir / "images/crowd_baseball.jpg")))[0]
    got = faces_of(baseball)[["x1", "y1", "x2", "y2"]].to_numpy()
    assert len(plain) >= 10 and len(got) >= len(plain)
    assert (box_iou_plus_one(plain.boxes, got).max(axis=1) >= 0.5).sum() >= len(plain) - 1
    with pytest.raises(JobError, match="other settings.*tta"):
        run(job_config(str(manifest), output))


# --- Aligned face crops (--crops), their queries and the contact sheet -------------------------

CROP_MIN_QUALITY = 0.2

DUCKDB_CROPS_VIEW = """
CREATE VIEW crops AS
  SELECT * FROM read_parquet('{root}/crops/*/*.parquet', hive_partitioning = true)
  SEMI JOIN faces USING (shard, uri, run_id, face_index);
"""

DUCKDB_CROPS_QUERY = (
    "SELECT uri, face_index, quality, residual, crop FROM crops JOIN faces USING (shard, uri, run_id, face_index) "
    "WHERE quality > 0.5 ORDER BY quality DESC"
)


def pandas_crops(root: str) -> pd.DataFrame:
    """The committed crops with pandas (the code shown in docs/annotate.md)."""
    images = pd.read_parquet(f"{root}/annotations", partitioning=partitioning())
    nested = images[["shard", "uri", "run_id", "faces"]].explode("faces").dropna(subset=["faces"])
    faces = pd.concat([nested[["shard", "uri", "run_id"]].reset_index(drop=True), pd.DataFrame(nested["faces"].tolist())], axis=1)
    keys = ["shard", "uri", "run_id", "face_index"]
    crops = pd.read_parquet(f"{root}/crops", partitioning=partitioning()).merge(faces[keys], on=keys)
    return crops


@pytest.fixture(scope="module")
def cropped(ray_session, bucket_input, tmp_path_factory):
    """The real photos, the EXIF-rotated astronaut and an empty object, with --crops 112 as PNG."""
    _, _, expected = bucket_input
    subset = sorted(u for u in expected if "/in/shared/" in u or "astronaut_exif6" in u or "broken/empty" in u)
    folder = tmp_path_factory.mktemp("cropped")
    manifest = folder / "subset.txt"
    manifest.write_text("\n".join(subset))
    config = job_config(str(manifest), str(folder / "out"), crops=112, crop_format="png", crop_min_quality=CROP_MIN_QUALITY)
    return config, run(config), str(folder / "out")


def test_crops_are_the_aligned_faces_written_with_their_shard(cropped):
    config, summary, root = cropped
    con = duckdb.connect()
    con.execute(DUCKDB_VIEWS.format(root=root))
    con.execute(DUCKDB_CROPS_VIEW.format(root=root))
    faces = con.sql("SELECT * FROM faces").df()
    crops = con.sql("SELECT * FROM crops ORDER BY uri, face_index").df()
    wanted = faces[(faces.face_size >= config.crop_min_size) & (faces.quality >= CROP_MIN_QUALITY)]
    assert summary["crops"] == len(crops) == len(wanted) > 50 and len(wanted) < len(faces)
    keys = ["shard", "uri", "run_id", "face_index"]
    assert sorted(map(tuple, crops[keys].to_numpy().tolist())) == sorted(map(tuple, wanted[keys].to_numpy().tolist()))
    physical = pd.read_parquet(f"{root}/crops", partitioning=partitioning())
    assert len(physical) == len(crops), "no crop outside the committed rows"
    assert set(crops["size"]) == {112} and set(crops["format"]) == {"png"}
    shards = {p.parent.name for p in Path(root).glob("annotations/shard=*/part-*.parquet")}
    assert {p.parent.name for p in Path(root).glob("crops/shard=*/part-*.parquet")} == shards, "one crops object per committed shard"
    stored = pq.read_schema(next(Path(root).glob("crops/*/*.parquet")))
    assert stored.remove_metadata().equals(CROPS_SCHEMA)
    assert json.loads(stored.metadata[SETTINGS_METADATA_KEY])["crops"]["size"] == 112
    # Each crop is align_faces of its decoded image with the face's landmarks from the rows.
    landmark_columns = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
    by_face = wanted.set_index(["uri", "face_index"])
    for uri, group in crops.groupby("uri"):
        landmarks = by_face.loc[[(uri, i) for i in group["face_index"]], landmark_columns].to_numpy(np.float32).reshape(-1, 5, 2)
        expected = align_faces(read_image(uri), landmarks, 112)
        decoded = np.stack([cv2.imdecode(np.frombuffer(c, np.uint8), cv2.IMREAD_COLOR) for c in group["crop"]])
        np.testing.assert_array_equal(decoded, expected.crops, err_msg=uri)
        np.testing.assert_allclose(np.stack(group["matrix"]).reshape(-1, 2, 3), expected.matrices, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(group["residual"], expected.residuals, atol=1e-5)
    rotated = crops[crops["uri"].str.endswith("astronaut_exif6.jpg")]
    assert len(rotated) == 1, "the EXIF-rotated astronaut is cropped upright, as displayed"


def test_crops_queries_in_duckdb_and_pandas_agree_and_are_documented(cropped, repo_root):
    _, summary, root = cropped
    con = duckdb.connect()
    con.execute(DUCKDB_VIEWS.format(root=root))
    con.execute(DUCKDB_CROPS_VIEW.format(root=root))
    good = con.sql(DUCKDB_CROPS_QUERY).df()
    assert 0 < len(good) < summary["crops"] and good["quality"].is_monotonic_decreasing
    crops = pandas_crops(root)
    assert len(crops) == summary["crops"]
    merged = crops.set_index(["uri", "face_index"]).loc[list(zip(good["uri"], good["face_index"]))]
    assert list(merged["crop"]) == list(good["crop"])
    docs = re.sub(r"\s+", " ", (repo_root / "docs/annotate.md").read_text())
    merge = 'crops = pd.read_parquet(f"{root}/crops", partitioning=partitioning()).merge(faces[keys], on=keys)'
    for text in (DUCKDB_CROPS_VIEW.strip(), DUCKDB_CROPS_QUERY, merge):
        assert re.sub(r"\s+", " ", text) in docs, text


def test_crops_rerun_writes_nothing_and_other_crop_settings_are_refused(cropped):
    config, summary, root = cropped
    before = {p: p.read_bytes() for p in Path(root).glob("crops/*/*.parquet")}
    again = run(config)
    assert again["shards_processed"] == 0 and again["crops"] == 0
    assert {p: p.read_bytes() for p in Path(root).glob("crops/*/*.parquet")} == before
    with pytest.raises(JobError, match="other settings.*crops"):
        run(dataclasses.replace(config, crop_min_size=64.0))
    with pytest.raises(JobError, match="other settings.*crops"):
        run(dataclasses.replace(config, crops=0))
    with pytest.raises(JobError, match="--crops must be 0"):
        run(dataclasses.replace(config, crops=8))
    with pytest.raises(JobError, match="--crop-min-quality in"):
        run(dataclasses.replace(config, crop_min_quality=1.5))


def test_contact_sheet_shows_the_faces_by_quality(cropped, tmp_path, capsys):
    _, summary, root = cropped
    out = tmp_path / "sheet.png"
    assert report_main([root, "--faces", "23", "--out", str(out)]) == 0
    assert f"23 of {summary['faces']} faces" in capsys.readouterr().out
    sheet = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert sheet is not None and sheet.dtype == np.uint8
    origins = tile_origins(30)
    filled = [not (sheet[y : y + TILE, x : x + TILE] == BACKGROUND).all() for x, y in origins if y + TILE <= sheet.shape[0]]
    assert filled[:23] == [True] * 23 and not any(filled[23:]), "23 face tiles, then nothing"
    # The best face comes first, as its aligned crop; the spread ends with the output's worst face.
    con = duckdb.connect()
    con.execute(DUCKDB_VIEWS.format(root=root))
    con.execute(DUCKDB_CROPS_VIEW.format(root=root))
    best = con.sql("SELECT crop FROM crops JOIN faces USING (shard, uri, run_id, face_index) ORDER BY quality DESC LIMIT 1").fetchall()[0][
        0
    ]
    x, y = origins[0]
    np.testing.assert_array_equal(sheet[y : y + TILE, x : x + TILE], cv2.imdecode(np.frombuffer(best, np.uint8), cv2.IMREAD_COLOR))
    worst = con.sql("SELECT uri, x1, y1, x2, y2 FROM faces ORDER BY quality ASC LIMIT 1").fetchall()[0]
    x, y = origins[22]
    np.testing.assert_array_equal(sheet[y : y + TILE, x : x + TILE], box_tile(read_image(worst[0]), worst[1:]))
    assert report_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no committed shard" in capsys.readouterr().err
