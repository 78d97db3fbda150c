"""The annotation job planned from an inventory (``--inventory``) with Ray Data: S3 Inventory
manifests with CSV and Parquet data files and ``uri`` Parquet folders, in a moto S3 server, with
the session's Ray, real Parquet and generated photos."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from urllib.parse import quote_plus

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs._samples import generated_images
from jobs.annotate import main, run
from jobs.annotate.shards import make_shards
from tests.test_annotate import committed, job_config, read_output, upload

PHOTOS = generated_images()
PHOTO_NAMES = sorted(PHOTOS)


def photos(bucket: str, names: list[str]) -> list[str]:
    """Upload a generated photo under each name; returns their URIs."""
    return upload(bucket, {n: PHOTOS[PHOTO_NAMES[i % len(PHOTO_NAMES)]] for i, n in enumerate(names)})


def write_s3_inventory(bucket: str, keys: list[str], file_format: str, files: int = 2) -> str:
    """An S3 Inventory of ``keys`` in ``bucket``, as S3 publishes one (destination: the same
    bucket under ``inventory/``), split into ``files`` data files; returns the manifest's URI."""
    fs = fsspec.filesystem("s3")
    run_folder = f"inventory/{bucket}/daily/{uuid.uuid4().hex[:8]}"
    entries = []
    for i in range(files):
        part = keys[i::files]
        if file_format == "CSV":
            lines = "".join(f'"{bucket}","{quote_plus(k, safe="/")}","1234","2026-12-01T00:00:00.000Z"\n' for k in part)
            name, data = f"{run_folder}/data/{i}.csv.gz", gzip.compress(lines.encode())
        else:
            sink = io.BytesIO()
            pq.write_table(pa.table({"bucket": [bucket] * len(part), "key": part, "size": [1234] * len(part)}), sink)
            name, data = f"{run_folder}/data/{i}.parquet", sink.getvalue()
        fs.pipe_file(f"{bucket}/{name}", data)
        entries.append({"key": name, "size": len(data), "MD5checksum": "0"})
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "version": "2016-11-30",
        "creationTimestamp": "1764547200000",
        "fileFormat": file_format,
        "fileSchema": "Bucket, Key, Size, LastModifiedDate"
        if file_format == "CSV"
        else "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional int64 size; }",
        "files": entries,
    }
    fs.pipe_file(f"{bucket}/{run_folder}/manifest.json", json.dumps(manifest).encode())
    fs.invalidate_cache()
    return f"s3://{bucket}/{run_folder}/manifest.json"


def test_csv_inventory_grows_and_shrinks(ray_session, make_bucket, tmp_path, capsys):
    bucket = make_bucket("inventory-csv")
    # A space and a plus in names (URL-encoded in CSV inventories), an image outside the prefix
    # and a non-image inside it, both in the inventory and neither annotated.
    names = [f"photos/day1/{i:02d} shot+{i}.jpg" for i in range(30)]
    day1 = photos(bucket, names)
    upload(bucket, {"photos/notes.txt": b"x"})
    photos(bucket, ["other/outside.jpg"])
    output = str(tmp_path / "out")

    def config(inventory: str):
        return job_config(f"s3://{bucket}/photos/", output, inventory=inventory, images_per_shard=8, scale="long:320")

    first = run(config(write_s3_inventory(bucket, [*names, "photos/notes.txt", "other/outside.jpg"], "CSV")))
    assert first["images_listed"] == first["images_new"] == first["images"] == 30
    assert first["objects_listed"] == 31 and first["objects_skipped"] == {"not_an_image_name": 1}, "notes.txt: counted, not annotated"
    rows = read_output(output)
    assert sorted(rows["uri"]) == sorted(day1) and (rows["status"] == "ok").all()
    before = committed(tmp_path / "out")

    added = [f"photos/day2/{i:02d}.jpg" for i in range(10)]
    photos(bucket, added)
    second = run(config(write_s3_inventory(bucket, [*names, *added, "photos/notes.txt"], "CSV", files=3)))
    assert second["images_listed"] == 40 and second["images_new"] == 10 and second["images"] == 10
    rows = read_output(output)
    assert len(rows) == 40 and rows["uri"].is_unique, "each image exactly once"
    assert set(rows.loc[rows["uri"].str.contains("/day2/"), "run_id"]) == {second["run_id"]}
    assert all(committed(tmp_path / "out")[shard] == data for shard, data in before.items()), "old shards untouched"

    capsys.readouterr()
    third = run(config(write_s3_inventory(bucket, [*names[5:], *added], "CSV")))
    assert third["images_removed_from_input"] == 5 and third["images"] == 0 and third["images_listed"] == 35
    warning = next(line for line in capsys.readouterr().out.splitlines() if "no longer in the input" in line)
    assert warning.startswith("annotate: warning: 5 annotated images") and sum(u in warning for u in day1[:5]) == 3
    assert len(read_output(output)) == 40, "rows of deleted objects are reported, not dropped"


def test_parquet_inventory_cuts_the_shards_the_driver_would(ray_session, make_bucket, tmp_path):
    bucket = make_bucket("inventory-parquet")
    names = [f"in/{i:02d}.jpg" for i in range(12)]
    uris = photos(bucket, names)
    inventory = write_s3_inventory(bucket, [*names, "in/readme.md"], "Parquet")
    summary = run(job_config(f"s3://{bucket}/in", str(tmp_path / "out"), inventory=inventory, scale="long:320"))
    assert summary["images"] == summary["images_listed"] == 12 and summary["shards_processed"] == 3
    assert sorted(read_output(str(tmp_path / "out"))["uri"]) == sorted(uris)
    # 12 new images, 2 actors, 5 per shard: one cutting group, cut as the driver cuts a listing.
    assert set(committed(tmp_path / "out")) == {f"shard={s.id}" for s in make_shards(sorted(uris), 5)}


def test_uri_parquet_folder_entries_are_taken_as_given(ray_session, make_bucket, tmp_path):
    bucket = make_bucket("inventory-uri")
    uris = photos(bucket, [f"set/{i}.png" for i in range(4)])
    missing = f"s3://{bucket}/set/missing.jpg"
    folder = tmp_path / "uris"
    folder.mkdir()
    pq.write_table(pa.table({"uri": [uris[0], uris[1], missing], "n": [1, 2, 3]}), folder / "a.parquet")
    pq.write_table(pa.table({"uri": [uris[2], uris[3], uris[0], f"s3://{bucket}-other/x.jpg"]}), folder / "b.parquet")
    (folder / "_SUCCESS").write_text("")
    summary = run(job_config(f"s3://{bucket}/set/", str(tmp_path / "out"), inventory=str(folder), scale="long:320"))
    assert summary["images_listed"] == 5, "de-duplicated, under --input only"
    assert summary["objects_listed"] == 6 and summary["objects_skipped"] == {"duplicate": 1}
    rows = read_output(str(tmp_path / "out")).set_index("uri")
    assert sorted(rows.index) == sorted([*uris, missing])
    assert rows.loc[missing, "error_kind"] == "not_found"


def test_malformed_inventories_are_one_error_line(ray_session, make_bucket, tmp_path, capsys):
    bucket = make_bucket("inventory-bad")
    photos(bucket, ["in/0.jpg", "in/1.jpg"])
    fs = fsspec.filesystem("s3")
    good = write_s3_inventory(bucket, ["in/0.jpg", "in/1.jpg"], "CSV")
    manifest = json.loads(fs.cat_file(good[5:]))
    cases = {}

    lost = {**manifest, "files": [*manifest["files"], {"key": "inventory/gone.csv.gz", "size": 1, "MD5checksum": "0"}]}
    cases["lost"] = (lost, f"data file s3://{bucket}/inventory/gone.csv.gz not found")
    narrow = {**manifest, "fileSchema": "Bucket, Key, Size"}
    cases["narrow"] = (narrow, "has 4 columns, but fileSchema names 3")
    # A data file whose first rows are right and a later one is not: found by the Ray read.
    ragged = f"inventory/{bucket}/ragged.csv.gz"
    fs.pipe_file(f"{bucket}/{ragged}", gzip.compress(f'"{bucket}","in/0.jpg","1","t"\n"{bucket}","in/1.jpg"\n'.encode()))
    cases["ragged"] = (
        {**manifest, "files": [{"key": ragged, "size": 1, "MD5checksum": "0"}]},
        f"data file s3://{bucket}/{ragged} cannot be read",
    )
    no_key = f"inventory/{bucket}/nokey.parquet"
    with fs.open(f"{bucket}/{no_key}", "wb") as f:
        pq.write_table(pa.table({"bucket": [bucket], "name": ["in/0.jpg"]}), f)
    cases["no_key"] = (
        {**manifest, "fileFormat": "Parquet", "files": [{"key": no_key}]},
        f"data file s3://{bucket}/{no_key} has no 'key' column",
    )
    cases["orc"] = ({**manifest, "fileFormat": "ORC"}, "fileFormat 'ORC' is not supported")
    for name, (content, message) in cases.items():
        fs.pipe_file(f"{bucket}/bad/{name}/manifest.json", json.dumps(content).encode())

    pq.write_table(pa.table({"url": ["s3://x/y.jpg"]}), tmp_path / "no_uri.parquet")
    runs = [(f"s3://{bucket}/bad/{name}/manifest.json", f"s3://{bucket}/in/", message) for name, (_, message) in cases.items()]
    runs += [
        (str(tmp_path / "no_uri.parquet"), f"s3://{bucket}/in/", "has no 'uri' column"),
        (good, "s3://some-other-bucket/in/", "inventory of bucket"),
        (f"s3://{bucket}/bad/absent/manifest.json", f"s3://{bucket}/in/", "not found"),
    ]
    for inventory, input_uri, message in runs:
        capsys.readouterr()
        code = main(["--input", input_uri, "--inventory", inventory, "--output", str(tmp_path / "out"), "--actors", "1"])
        # Ray Data may log to stderr too (the read that finds a ragged row runs in Ray).
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("annotate: error: ")]
        assert code == 2 and len(errors) == 1, (inventory, errors)
        assert message in errors[0] and inventory in errors[0], (message, errors[0])
    assert not (tmp_path / "out" / "annotations").exists()
