"""The annotation job's contract as a user meets it: one row or one counted skip per object the
input names, whatever its name or format; error rows without face fields; integer columns that
stay integers in pandas; the settings readable from the files; resume semantics that match the
docs; a quiet start; the core's command line with the job's defaults.

Real local folders and the session's moto S3 server, the session's Ray (a subprocess starts its
own for the start-up test), real Parquet, pandas and duckdb.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image

import schemas.annotation
from jobs._config import from_values
from jobs._exit import JobError
from jobs._samples import generated_images
from jobs.annotate import AnnotateConfig, main, run
from retinaface_core.image_io import ERROR_KINDS
from retinaface_core.storage import filesystem
from schemas.annotation import QUALITY_COLUMNS, STATUS_VALUES, partitioning
from tests.test_inputs import LATIN1, png_header

PHOTOS = generated_images()
ASTRONAUT = PHOTOS["photos/astronaut.jpg"]


def config(input: str, output: str, **overrides) -> AnnotateConfig:
    settings = dict(input=input, output=output, scale="long:320", actors=1, batch_size=4, torch_threads=1, images_per_shard=8)
    return from_values(AnnotateConfig, {**settings, **overrides})


def read_rows(output: str) -> pd.DataFrame:
    """The committed rows as pandas reads the folder (pyarrow dataset, hive shard as a string)."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return pads.dataset(f"{path}/annotations", filesystem=fs, format="parquet", partitioning=partitioning()).to_table().to_pandas()


def encoded(mode: str, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(ASTRONAUT)).convert(mode).save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, shared_dir) -> tuple[Path, dict[str, bytes]]:
    """A local folder of images with odd names and formats, bad objects and non-images."""
    folder = tmp_path_factory.mktemp("odd") / "photos"
    files = {
        "a.jpg": ASTRONAUT,
        "sp ace.jpg": ASTRONAUT,
        "h#a?s%h.jpg": ASTRONAUT,
        "new\nline.jpg": ASTRONAUT,
        LATIN1: ASTRONAUT,
        "anim.gif": encoded("P", "GIF"),
        "scan.TIF": encoded("RGB", "TIFF"),
        "scan2.tiff": encoded("CMYK", "TIFF"),
        "cmyk.jpg": encoded("CMYK", "JPEG", quality=90),
        "photo.avif": encoded("RGB", "AVIF"),
        "deep16.png": PHOTOS["variants/astronaut_16bit.png"],
        "crowd.jpg": (shared_dir / "images/crowd_baseball.jpg").read_bytes(),
        "huge.png": png_header(14000, 13000),
        "empty.jpg": b"",
        "notes.txt": b"not an image",
        "sub/.DS_Store": b"\0",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, files


@pytest.fixture(scope="module")
def odd_run(ray_session, odd_folder, tmp_path_factory):
    folder, _ = odd_folder
    output = str(tmp_path_factory.mktemp("odd-out") / "out")
    summary = run(config(str(folder), output, max_pixels=300_000_000))
    return output, summary, read_rows(output)


def test_every_object_of_a_folder_is_one_row_or_one_counted_skip(odd_folder, odd_run):
    folder, files = odd_folder
    output, summary, rows = odd_run
    assert summary["objects_listed"] == len(files)
    assert summary["objects_skipped"] == {"not_an_image_name": 2}
    assert summary["objects_listed"] == summary["images_listed"] + sum(summary["objects_skipped"].values())
    assert summary["images_listed"] == summary["images_new"] + summary["images_already_annotated"] == summary["images"] == len(rows)
    assert rows["uri"].is_unique
    latin1 = f"file://{urllib.parse.quote(str(folder))}/caf%E9.jpg"
    expected = {str(folder / n) for n in files if not n.endswith(("txt", "Store")) and n != LATIN1} | {latin1}
    assert set(rows["uri"]) == expected
    by_name = {u.rsplit("/", 1)[1]: r for u, r in zip(rows["uri"], rows.to_dict("records"))}
    decoded = ("a.jpg", "sp ace.jpg", "h#a?s%h.jpg", "new\nline.jpg", "caf%E9.jpg", "anim.gif", "scan.TIF", "scan2.tiff", "cmyk.jpg")
    decoded += ("deep16.png", "photo.avif")
    for name in decoded:
        assert by_name[name]["status"] == "ok" and by_name[name]["num_faces"] == 1, (name, by_name[name]["error"])
        assert (by_name[name]["width"], by_name[name]["height"]) == (512, 512)
    # 182 MP under --max-pixels 3e8: past every pixel limit, refused only for its broken data.
    assert by_name["huge.png"]["error_kind"] == "corrupt", by_name["huge.png"]["error"]
    assert by_name["empty.jpg"]["error_kind"] == "empty"


def test_error_rows_have_no_face_fields_and_integers_stay_integers(odd_run):
    output, summary, rows = odd_run
    errors = rows[rows["status"] == "error"]
    assert len(errors) == summary["errors"] == 2
    assert errors["num_faces"].isna().all() and errors["faces"].isna().all() and errors["width"].isna().all()
    assert set(rows["status"]) <= set(STATUS_VALUES) and set(errors["error_kind"]) <= set(ERROR_KINDS)
    assert {str(rows[c].dtype) for c in ("width", "height", "num_faces")} == {"Int32"}
    root = fsspec.core.url_to_fs(output)[1]
    assert str(pd.read_parquet(f"{root}/annotations", partitioning=partitioning())["width"].dtype) == "Int32"
    ok = rows[rows["status"] == "ok"]
    assert (ok["num_faces"] == ok["faces"].map(len)).all()
    crowd = pd.DataFrame(list(ok.loc[ok["uri"].str.endswith("crowd.jpg"), "faces"].iloc[0]))
    assert len(crowd) > 5 and (np.diff(crowd["score"]) <= 0).all() and (crowd["face_index"] == np.arange(len(crowd))).all()


def test_the_files_say_which_settings_made_their_faces(odd_run):
    output, _, _ = odd_run
    root = fsspec.core.url_to_fs(output)[1]
    sql = (
        "SELECT DISTINCT decode(key) AS setting, decode(value) AS value "
        f"FROM parquet_kv_metadata('{root}/annotations/*/*.parquet') "
        "WHERE decode(key) LIKE 'retinaface.%' AND decode(key) <> 'retinaface.annotation.settings' ORDER BY setting"
    )
    stored = {row[0].removeprefix("retinaface."): json.loads(row[1]) for row in duckdb.sql(sql).fetchall()}
    dataset = json.loads(Path(root, "_dataset.json").read_text())
    assert stored == {k: v for k, v in dataset.items() if k not in ("inputs", "model_checkpoint")}
    assert stored["score_threshold"] == 0.5 and stored["nms_iou"] == 0.4 and stored["scale"] == "long:320"
    assert stored["tta"] == "none" and len(stored["model_sha256"]) == 64
    docs = re.sub(r"\s+", " ", (Path(__file__).parents[1] / "docs/annotate.md").read_text())
    assert sql.replace(root, "{root}") in docs


def test_an_s3_manifest_annotates_each_object_once_and_counts_the_rest(ray_session, make_bucket, capsys):
    bucket = make_bucket("contract")
    fs, _ = filesystem(f"s3://{bucket}")  # keys as written
    keys = ["in/a b.jpg", "in/h#a?s%h.jpg", "in/anim.gif", "in/50%.png"]
    for key in keys:
        fs.pipe_file(f"{bucket}/{key}", ASTRONAUT if key.endswith("jpg") else encoded("RGB", "GIF" if key.endswith("gif") else "PNG"))
    entries = ["a b.jpg", f"s3a://{bucket}/in/a b.jpg", f"s3://{bucket}/in/h#a?s%h.jpg", "anim.gif", "50%.png", "notes.txt", "folder/"]
    fs.pipe_file(f"{bucket}/in/list.txt", "\n".join(entries).encode())
    output = f"s3://{bucket}/out"
    capsys.readouterr()
    summary = run(config(f"s3://{bucket}/in/list.txt", output))
    log = capsys.readouterr().out
    assert summary["objects_listed"] == len(entries) and summary["images_listed"] == len(keys)
    assert summary["objects_skipped"] == {"duplicate": 1, "folder_marker": 1, "not_an_image_name": 1}
    rows = read_rows(output)
    assert sorted(rows["uri"]) == sorted(f"s3://{bucket}/{k}" for k in keys) and (rows["status"] == "ok").all()
    assert (
        f"{len(entries)} objects listed: {len(keys)} images (0 already annotated in 0 committed shards, {len(keys)} new), 3 skipped" in log
    )
    assert re.search(r"annotate: skipped 1 duplicate \(e\.g\. s3://.*/in/a b\.jpg\); 1 folder_marker .*; 1 not_an_image_name", log)


def test_another_input_is_refused_unless_added_and_stored_settings_are_named(ray_session, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        for i in range(2):
            (folder / f"{i}.jpg").write_bytes(ASTRONAUT)
    output = str(tmp_path / "out")
    run(config(str(first), output))
    with pytest.raises(JobError, match=f"holds the results of another input \\({first}\\), not of {second}: give --add-input"):
        run(config(str(second), output))
    capsys.readouterr()
    added = run(config(str(second), output, add_input=True))
    assert added["images_new"] == 2 and added["images_removed_from_input"] is None
    assert "no longer in the input" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out/_dataset.json").read_text())["inputs"] == [str(first), str(second)]
    assert len(read_rows(output)) == 4
    # Either input resumes without --add-input; the shard size may change (it changes no row).
    (first / "2.jpg").write_bytes(ASTRONAUT)
    again = run(config(f"file://{first}/", output, images_per_shard=1))
    assert again["images_new"] == 1 and again["images_already_annotated"] == 2 and len(read_rows(output)) == 5
    with pytest.raises(JobError) as err:
        run(config(str(first), output, score_threshold=0.7))
    assert f"score_threshold: 0.5 in the output, 0.7 requested; stored in {output}/_dataset.json" in str(err.value)


def test_a_run_that_fails_before_it_starts_leaves_nothing(weights_dir, tmp_path, capsys):
    (tmp_path / "one.jpg").write_bytes(ASTRONAUT)
    for given, message in ((tmp_path / "absent", "no such prefix or directory"), (tmp_path / "one.jpg", "is a single file")):
        output = tmp_path / "new" / "out"
        code = main(["--input", str(given), "--output", str(output)])
        error = capsys.readouterr().err
        assert code == 2 and message in error and error.startswith("annotate: error: "), error
        assert not (tmp_path / "new").exists(), "no _runs/, no empty output folder"


def test_a_local_run_starts_quietly(weights_dir, repo_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(ASTRONAUT)
    (folder / "notes.txt").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.annotate", "--input", str(folder), "--output", str(tmp_path / "out"), "--actors", "1",
         "--scale", "long:320"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Token authentication" not in result.stderr and "constructor arguments" not in result.stderr, result.stderr
    assert not [line for line in result.stderr.splitlines() if "WARNING" in line or re.match(r"\[[^]]* E \d+ \d+\]", line)]
    assert "2 objects listed: 1 images" in result.stdout and "annotate: skipped 1 not_an_image_name" in result.stdout


def test_the_command_line_shares_the_jobs_defaults_and_shows_them(repo_root, capsys):
    from retinaface_core.__main__ import parse_args

    settings = parse_args(["a.jpg"]).settings
    job = from_values(AnnotateConfig, {"input": "a", "output": "b"})
    assert settings.detector == job.detector and settings.max_pixels == job.max_pixels
    assert parse_args(["a.jpg", "--threshold", "0.6"]).settings.detector.score_threshold == 0.6
    assert "--threshold is deprecated, use --score-threshold" in capsys.readouterr().err
    command = [sys.executable, "-m", "retinaface_core", "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, check=True).stdout
    shown = re.sub(r"\s+", " ", shown)
    for flag, default in (("--scale", "long:640"), ("--score-threshold", "0.5"), ("--batching", "bucket"), ("--max-pixels", "100000000")):
        assert re.search(f"{flag} .*?\\(default: {default}\\)", shown), flag


def test_the_schema_and_the_docs_say_what_the_job_does(repo_root):
    from jobs._inputs import SKIP_REASONS

    documented = schemas.annotation.__doc__
    for value in (*STATUS_VALUES, *ERROR_KINDS, *QUALITY_COLUMNS, "face_index", "descending"):
        assert f"``{value}``" in documented or value in documented, value
    assert set(re.findall(r"``(\w+)``", documented.split("``error_kind`` is one of")[1].split("``error`` is")[0])) >= set(ERROR_KINDS)
    docs = (repo_root / "docs/annotate.md").read_text()
    # The exit statuses: every job's are in docs/exit_codes.md; docs/annotate.md says what 2 means for this one.
    status_2 = next(paragraph for paragraph in docs.split("\n\n") if "2 (`FAILED`)" in paragraph)
    assert "--add-input" in status_2 and "shard size" not in status_2
    assert all(f"`{reason}`" in docs for reason in SKIP_REASONS)
