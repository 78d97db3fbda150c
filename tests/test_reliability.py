"""The annotation job under a failing store, concurrent runs, odd objects, a stale Ray and secrets.

Faults come from a real HTTP proxy in front of the session's moto S3 server
(``tests/_faulty_s3.py``); the jobs reach it through ``--s3-endpoint-url`` only, with real Ray
and real Parquet.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from _faulty_s3 import FaultyS3, Rule
from PIL import Image

from jobs._config import from_values
from jobs._exit import ExitCode, JobError
from jobs._samples import generated_images
from jobs.annotate import AnnotateConfig, ShardsFailed, main, run
from jobs.annotate.shards import make_shards
from jobs.annotate.worker import decode_ahead
from retinaface_core.image_io import fetch_image
from retinaface_core.storage import filesystem
from schemas.annotation import partitioning

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def proxy(s3_server):
    with FaultyS3(s3_server) as faulty:
        yield faulty


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return dict(list(generated_images().items())[:6])


def upload(bucket: str, files: dict[str, bytes]) -> None:
    fs, _ = filesystem(f"s3://{bucket}")  # keys as written, "?" included
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/{name}", data)


def config(input: str, output: str, endpoint: str, **overrides) -> AnnotateConfig:
    settings = dict(
        input=input, output=output, s3_endpoint_url=endpoint, images_per_shard=2, scale="long:320", actors=1,
        batch_size=2, torch_threads=1, retry_backoff=0.05,
    )  # fmt: skip
    return from_values(AnnotateConfig, {**settings, **overrides})


def read_rows(output: str, table: str = "annotations") -> pd.DataFrame:
    """Every row of ``table`` (annotations or crops) under ``output``, ``shard`` from the folder names."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return pads.dataset(f"{path}/{table}", filesystem=fs, format="parquet", partitioning=partitioning()).to_table().to_pandas()


def shard_objects(output: str, table: str = "annotations") -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return {p.split("/")[-2]: fs.cat_file(p) for p in fs.glob(f"{path}/{table}/shard=*/part-*.parquet")}


def test_storage_errors_are_retried_then_marked_then_redone(ray_session, proxy, make_bucket, photos, weights_dir):
    bucket = make_bucket("brownout")
    names = sorted(photos)
    upload(bucket, photos)
    brief, lasting = names[0], names[3]
    # 6 failed requests: the client's own retries (5 attempts) give up once, the job's second read works.
    proxy.add(Rule("GET", f"/{bucket}/{brief}", times=6))
    proxy.add(Rule("GET", f"/{bucket}/{lasting}"))
    output = f"s3://{bucket}/out"
    first = run(config(f"s3://{bucket}/", output, proxy.endpoint, read_attempts=2))
    rows = read_rows(output).set_index("uri")
    assert rows.loc[f"s3://{bucket}/{brief}", "status"] == "ok", "a brief brownout became an error row"
    assert rows.loc[f"s3://{bucket}/{lasting}", "error_kind"] == "storage"
    assert first["shards_with_storage_errors"] == 1 and first["errors_by_kind"] == {"storage": 1}
    before = shard_objects(output)
    marked = fsspec.filesystem("s3").ls(f"{bucket}/out/_retry")
    assert len(marked) == 1

    proxy.clear()
    second = run(config(f"s3://{bucket}/", output, proxy.endpoint))
    assert second["shards_redone_for_storage_errors"] == 1 and second["shards_processed"] == 1
    rows = read_rows(output)
    assert sorted(rows["uri"]) == sorted(f"s3://{bucket}/{n}" for n in names), "exactly one row per image"
    assert (rows["status"] == "ok").all()
    after = shard_objects(output)
    changed = [shard for shard in after if after[shard] != before[shard]]
    assert changed == [marked[0].rsplit("/", 1)[1].join(["shard=", ""])], "only the marked shard is redone"
    assert not fsspec.filesystem("s3").exists(f"{bucket}/out/_retry/{marked[0].rsplit('/', 1)[1]}")
    third = run(config(f"s3://{bucket}/", output, proxy.endpoint))
    assert third["shards_processed"] == 0


def test_failed_commits_are_retried_and_persistent_ones_reported(ray_session, proxy, make_bucket, photos, weights_dir, capsys):
    bucket = make_bucket("commits")
    upload(bucket, photos)
    shards = make_shards(sorted(f"s3://{bucket}/{n}" for n in photos), 2)
    flaky, broken = shards[0].id, shards[1].id
    # One whole commit fails (5 client attempts), the next attempt at the shard gets through.
    proxy.add(Rule("PUT", f"{flaky}/part-", times=5))
    proxy.add(Rule("PUT", f"{broken}/part-"))
    output = f"s3://{bucket}/out"
    argv = [
        "--input", f"s3://{bucket}/", "--output", output, "--s3-endpoint-url", proxy.endpoint, "--images-per-shard", "2",
        "--scale", "long:320", "--actors", "1", "--torch-threads", "1", "--retry-backoff", "0.05", "--run-id", "flaky",
    ]  # fmt: skip
    assert main(argv) == ExitCode.SHARDS_FAILED == 3
    err = capsys.readouterr().err
    assert f"1 of {len(shards)} shards did not commit after 3 attempts ({broken}:" in err and "rerun" in err
    summary = json.loads(fsspec.filesystem("s3").cat_file(f"{bucket}/out/_runs/flaky/summary.json"))
    assert list(summary["shards_failed"]) == [broken] and summary["shards_processed"] == len(shards) - 1
    assert set(shard_objects(output)) == {f"shard={s.id}" for s in shards} - {f"shard={broken}"}

    proxy.clear()
    assert main([*argv[:-1], "again"]) == 0
    assert len(read_rows(output)) == len(photos)


def test_concurrent_runs_with_other_settings_cannot_both_commit(ray_session, proxy, make_bucket, photos, weights_dir):
    bucket = make_bucket("race")
    upload(bucket, photos)
    # Listings slowed down: both runs pass every check before either writes _dataset.json.
    proxy.add(Rule("GET", "list-type=2", fail=False, delay=3.0))
    output = f"s3://{bucket}/out"
    runs = [config(f"s3://{bucket}/", output, proxy.endpoint, score_threshold=t, run_id=f"t{t}") for t in (0.5, 0.95)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda c: _outcome(run, c), runs))
    won = [o for o in outcomes if isinstance(o, dict)]
    lost = [o for o in outcomes if isinstance(o, JobError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "other settings" in str(lost[0]) and "score_threshold" in str(lost[0])
    proxy.clear()
    dataset = json.loads(fsspec.filesystem("s3").cat_file(f"{bucket}/out/_dataset.json"))
    rows = read_rows(output)
    assert len(rows) == len(photos) and set(rows["run_id"]) == {won[0]["run_id"]}
    assert f"t{dataset['score_threshold']}" == won[0]["run_id"]


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def test_shards_describe_their_settings_so_a_mixed_output_is_refused(ray_session, make_bucket, photos, weights_dir, s3_server):
    bucket = make_bucket("mixed")
    upload(bucket, photos)
    output = f"s3://{bucket}/out"
    run(config(f"s3://{bucket}/", output, s3_server))
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    first = sorted(fs.glob(f"{bucket}/out/annotations/shard=*/part-*.parquet"))[0]
    settings = json.loads(pads.dataset(first, filesystem=fs).schema.metadata[b"retinaface.annotation.settings"])
    assert settings["score_threshold"] == 0.5 and settings["scale"] == "long:320"
    # A shard of other settings, as a writer that never read _dataset.json would leave it.
    fs.mv(first, first.rsplit("/", 1)[0] + "/part-0123456789ab.parquet")
    with pytest.raises(JobError, match="1 committed shards made with other settings .*'score_threshold': 0.5"):
        run(config(f"s3://{bucket}/", output, s3_server))


def test_odd_keys_and_oversized_objects(ray_session, make_bucket, photos, weights_dir, s3_server):
    bucket = make_bucket("odd")
    odd = {
        "a/photo?versionId=3.jpg": photos["photos/astronaut.jpg"],
        "a/huge.jpg": b"\0" * 3_000_000,
        "a/fine.png": photos["photos/camera.png"],
    }
    upload(bucket, odd)
    output = f"s3://{bucket}/out"
    run(config(f"s3://{bucket}/a/", output, s3_server, max_bytes=1_000_000))
    rows = read_rows(output).set_index("uri")
    assert rows.loc[f"s3://{bucket}/a/photo?versionId=3.jpg", "status"] == "ok"
    assert rows.loc[f"s3://{bucket}/a/photo?versionId=3.jpg", "num_faces"] >= 1
    assert rows.loc[f"s3://{bucket}/a/huge.jpg", "error_kind"] == "too_large"
    assert "1,000,000 bytes" in rows.loc[f"s3://{bucket}/a/huge.jpg", "error"]


def test_decode_window_is_bounded_in_bytes(tmp_path):
    # 12 images of 3 MB decoded each; the window admits 16 images but only 4 MiB of pixels.
    side = 1000
    for i in range(12):
        Image.fromarray(np.full((side, side, 3), i * 20, np.uint8)).save(tmp_path / f"{i:02d}.png")
    started = []

    def fetch_one(uri: str):
        started.append(uri)
        return fetch_image(uri)

    uris = sorted(str(p) for p in tmp_path.glob("*.png"))
    consumed = most_waiting = 0
    threads = 2
    with ThreadPoolExecutor(threads) as pool:
        for item in decode_ahead(pool, fetch_one, uris, window=16, budget=4 * 2**20, threads=threads):
            consumed += 1
            time.sleep(0.3)  # a slow detector: decoding runs ahead as far as it may
            waiting = len(started) - consumed
            most_waiting = max(most_waiting, waiting)
            # The budget holds one 3 MB image and part of a second; the threads may add one each.
            assert waiting * side * side * 3 <= 4 * 2**20 + (threads + 1) * side * side * 3
            assert item.image is not None and item.image.shape == (side, side, 3)
    assert consumed == 12
    assert most_waiting >= 2, "decoding never ran ahead of the consumer"


def test_local_command_ignores_a_stale_ray_address_file(weights_dir, repo_root, tmp_path, photos):
    from ray._private.utils import get_ray_address_file

    images = tmp_path / "in"
    images.mkdir()
    for name in list(photos)[:2]:
        (images / name.replace("/", "_")).write_bytes(photos[name])
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:1")  # a cluster that no longer exists
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(repo_root)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "jobs.annotate", "--input", str(images), "--output", str(tmp_path / "out"), "--scale", "long:320"],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=240, start_new_session=True,
        )  # fmt: skip
    finally:
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(saved)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["images"] == 2


def test_secrets_in_urls_are_never_printed_or_stored(ray_session, make_bucket, photos, weights_dir, s3_server, tmp_path, capfd):
    secret_endpoint, secret_weights = "S3cretEndp0int", "S3cretWe1ghts"
    bucket = make_bucket("secret")
    upload(bucket, dict(list(photos.items())[:2]))
    # An endpoint with credentials in its URL: the S3 client refuses it, the job stops with a clear error.
    endpoint = s3_server.replace("http://", f"http://user:{secret_endpoint}@")
    code = main(["--input", f"s3://{bucket}/", "--output", f"s3://{bucket}/x", "--s3-endpoint-url", endpoint])
    assert code == 2
    # A checkpoint served over HTTP with credentials in its URL: the job runs and records it.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(weights_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        weights = f"http://user:{secret_weights}@127.0.0.1:{server.server_address[1]}/mobilenet0.25_Final.pth"
        output = tmp_path / "out"
        code = main(["--input", f"s3://{bucket}/", "--output", str(output), "--weights", weights, "--scale", "long:320", "--actors", "1"])
    finally:
        server.shutdown()
    assert code == 0
    printed = capfd.readouterr()
    stored = [p.read_bytes() for p in output.rglob("*") if p.is_file()]
    assert any(b"user:***@" in data for data in stored)
    for secret in (secret_endpoint, secret_weights):
        assert secret not in printed.out and secret not in printed.err
        assert not any(secret.encode() in data for data in stored)


def visible_crops(output: str) -> pd.DataFrame:
    """The crops a reader sees: those whose face is in the committed rows (shard, uri, run_id,
    face_index), as docs/annotate.md joins them."""
    rows = read_rows(output)
    keys = pd.DataFrame(
        [(r.shard, r.uri, r.run_id, face["face_index"]) for r in rows.itertuples() for face in (r.faces if r.faces is not None else [])],
        columns=["shard", "uri", "run_id", "face_index"],
    )
    return read_rows(output, "crops").merge(keys, on=list(keys.columns))


def test_crops_and_rows_of_a_shard_appear_together_or_not_at_all(ray_session, proxy, make_bucket, photos, weights_dir):
    bucket = make_bucket("crops")
    upload(bucket, photos)
    uris = sorted(f"s3://{bucket}/{n}" for n in photos)
    dead, refused, redone = make_shards(uris, 2)  # astronaut + camera, chelsea + coffee, the two astronaut variants
    # Keys as the S3 client sends them ("=" percent-encoded).
    annotations, crops = "annotations/shard%3D", "crops/shard%3D"
    # An attempt that dies between the two writes: its crops are written, its commit never is.
    proxy.add(Rule("PUT", f"{annotations}{dead.id}/part-"))
    # Crops the store never takes: the shard's rows must not be committed without them.
    proxy.add(Rule("PUT", f"{crops}{refused.id}/part-"))
    # Crops written at the job's second try (the client's 5 attempts fail once), and an image the
    # store fails to serve: the shard commits, marked to be redone.
    flaky = proxy.add(Rule("PUT", f"{crops}{redone.id}/part-", times=5))
    proxy.add(Rule("GET", redone.uris[0].split("/", 3)[3]))
    output = f"s3://{bucket}/out"
    with pytest.raises(ShardsFailed, match="2 of 3 shards"):
        run(config(f"s3://{bucket}/", output, proxy.endpoint, crops=112, read_attempts=1, run_id="faulty"))
    rows = read_rows(output)
    assert flaky.failed == 5 and flaky.matched == 6
    assert set(rows["shard"]) == {redone.id} and set(rows["status"]) == {"ok", "error"}
    assert set(shard_objects(output, "crops")) == {f"shard={dead.id}", f"shard={redone.id}"}, "the dead attempt's crops are there"
    seen = visible_crops(output)
    assert set(seen["uri"]) == {redone.uris[1]} and len(seen) == rows["num_faces"].sum() == 1, "only the committed shard's crops"

    proxy.clear()
    # Cut otherwise this time (4 images a shard): the dead attempt's shard never comes back to overwrite its crops.
    second = run(config(f"s3://{bucket}/", output, proxy.endpoint, crops=112, images_per_shard=4))
    assert second["shards_redone_for_storage_errors"] == 1 and second["shards_processed"] == 2
    rows = read_rows(output)
    assert sorted(rows["uri"]) == uris and (rows["status"] == "ok").all()
    committed = {f"shard={s}" for s in rows["shard"]}
    assert set(shard_objects(output, "crops")) == committed, "the orphan is gone, each committed shard has its crops"
    every, seen = read_rows(output, "crops"), visible_crops(output)
    assert len(every) == len(seen) == second["crops"] >= 3, "no crop outside the committed rows"
    assert not every.duplicated(["uri", "face_index"]).any(), "no face cropped twice"
    faces = pd.DataFrame([face for r in rows.itertuples() for face in r.faces])
    assert len(seen) == (faces["face_size"] >= 32).sum(), "every face of the default --crop-min-size has its crop"
    assert set(seen.loc[seen["shard"] == redone.id, "run_id"]) == {second["run_id"]}

    before = shard_objects(output, "crops")
    third = run(config(f"s3://{bucket}/", output, proxy.endpoint, crops=112, images_per_shard=4))
    assert third["shards_processed"] == 0 and shard_objects(output, "crops") == before
