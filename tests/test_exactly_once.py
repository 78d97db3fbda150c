"""Exactly once when things go wrong: overlapping runs, unreadable shards, a full store, a refused
run, SIGINT and SIGTERM. Real Ray, real Parquet, the session's moto S3 server (behind the
fault-injecting proxy of ``tests/_faulty_s3.py`` where a store must refuse writes), a real tmpfs
for a full local disk, and the job as a subprocess wherever its exit status, its aborts or a
signal matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from _faulty_s3 import FaultyS3, Rule

from jobs._config import from_values
from jobs._exit import ExitCode, JobError
from jobs._samples import generated_images
from jobs.annotate import AnnotateConfig, main, run
from jobs.annotate.lease import RunLease
from jobs.annotate.output import LeaseLost, OutputStore
from jobs.annotate.shards import make_shards, shard_id
from retinaface_core.storage import filesystem
from schemas.annotation import partitioning

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """The 12 generated photos, flat names."""
    return {f"{i:02d}_{name.rsplit('/', 1)[1]}": data for i, (name, data) in enumerate(sorted(generated_images().items()))}


def local_input(folder: Path, files: dict[str, bytes]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return str(folder)


def s3_input(bucket: str, files: dict[str, bytes]) -> str:
    fs, _ = filesystem(f"s3://{bucket}")
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/in/{name}", data)
    return f"s3://{bucket}/in/"


def job(input: str, output: str, **overrides) -> AnnotateConfig:
    settings = dict(
        input=input, output=output, images_per_shard=2, scale="long:320", actors=1, batch_size=2, torch_threads=1, retry_backoff=0.05
    )
    return from_values(AnnotateConfig, {**settings, **overrides})


def objects(output: str, pattern: str = "annotations/shard=*/part-*.parquet") -> list[str]:
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return sorted(fs.glob(f"{path}/{pattern}"))


def rows(output: str) -> pd.DataFrame:
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return pads.dataset(f"{path}/annotations", filesystem=fs, format="parquet", partitioning=partitioning()).to_table().to_pandas()


def cli(args: list[str], repo_root: Path, **kwargs) -> subprocess.CompletedProcess:
    """``python -m jobs.annotate ARGS`` on a Ray of its own, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.annotate", *args, "--ray-address", "local"],
        cwd=repo_root, env=subprocess_env(repo_root), capture_output=True, text=True, timeout=600, start_new_session=True, **kwargs,
    )  # fmt: skip


def subprocess_env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    env.pop("RAY_ADDRESS", None)
    return env


def last_json(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.strip().splitlines()) if line.startswith("{")))


# --- 1. Two runs on one output: one at a time, each image once ---------------------------------


def test_shard_ids_of_different_uri_lists_differ_even_when_a_key_holds_a_newline():
    # An S3 key may hold a newline, the separator of the ids' text: one such key must not name
    # the shard of the two URIs its text splits into (one would overwrite the other's rows).
    joined, split = ["s3://b/a\ns3://b/c"], ["s3://b/a", "s3://b/c"]
    assert shard_id(joined) != shard_id(split)
    assert shard_id(["s3://b/x\n", "y"]) != shard_id(["s3://b/x", "\ny"])
    # Lists without such a key keep the ids existing outputs were written with.
    assert shard_id(split) == hashlib.sha256(b"s3://b/a\ns3://b/c").hexdigest()[:16]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_runs_annotate_each_image_once(ray_session, make_bucket, photos, tmp_path, where):
    """A second run started while the first works, at several points of it (each with a random
    delay), with another pool size (so that it would cut what it finds uncommitted otherwise)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    bucket = make_bucket("overlap")
    source = local_input(tmp_path / "in", photos) if where == "local" else s3_input(bucket, photos)
    base = str(tmp_path) if where == "local" else f"s3://{bucket}"
    for committed_first in (0, 1, 2):
        output = f"{base}/out{committed_first}"
        first = job(source, output, images_per_shard=4, batch_size=1, run_id=f"first{committed_first}")
        second = job(source, output, images_per_shard=4, batch_size=1, actors=3, run_id=f"second{committed_first}")
        with ThreadPoolExecutor(2) as pool:
            started = pool.submit(run, first)
            deadline = time.monotonic() + 300
            while len(objects(output)) < committed_first and not started.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
            later = pool.submit(run, second)
            summaries = [started.result(timeout=600), later.result(timeout=600)]
        found = rows(output)
        context = f"seed {seed}, second run after {committed_first} shards: {[s['images'] for s in summaries]}"
        assert len(found) == found["uri"].nunique() == len(photos), context
        assert sum(s["images"] for s in summaries) == len(photos), f"an image annotated twice ({context})"


def test_one_run_holds_an_output_others_wait_and_a_gone_or_stale_one_is_taken_over(s3_server, make_bucket, tmp_path, repo_root):
    for output in (str(tmp_path / "out"), f"s3://{make_bucket('lease')}/out"):
        store = OutputStore(output)
        first = RunLease.acquire(store, "first", seconds=1.0)
        said: list[str] = []
        got: list[RunLease] = []
        waiter = threading.Thread(target=_acquire_into, args=(got, store, "second", said))
        waiter.start()
        time.sleep(3.0)  # three times the expiry: the first renews its lease meanwhile
        assert not got, "a second run took an output whose run is alive"
        assert "is being annotated by run first" in said[0] and "waiting" in said[0]
        first.release()
        waiter.join(30)
        second = got[0]
        assert second.number == first.number + 1 and store.holds_lease(second.token, starting=True)
        # The first run's workers can neither start nor commit a shard any more.
        assert not store.may_start(first.token)
        with pytest.raises(LeaseLost, match="run second"):
            store.commit_shard("0123456789abcdef", "fingerprint", b"", first.token)
        assert not objects(output)

        # A run that takes over the lease of one that stalled: the stalled one notices at its next beat.
        store.create_json(store.lease_name(second.number + 1), {"run_id": "elsewhere", "token": "t", "seconds": 1.0, "state": "running"})
        deadline = time.monotonic() + 10
        while not second.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.lost_to["run_id"] == "elsewhere"
        second.release()
        assert store.lease_holder()["run_id"] == "elsewhere", "a run that lost its lease released another's"

        # That lease is never renewed (its machine is gone): taken over after its expiry.
        start = time.monotonic()
        said.clear()
        third = RunLease.acquire(store, "third", 1.0, say=said.append)
        assert time.monotonic() - start >= 1.0 and "taking over the lease of run elsewhere" in said[-1], said
        third.release()

    # A run whose process died on this machine (SIGKILL) is taken over at once, whatever its expiry.
    output = str(tmp_path / "killed")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jobs.annotate.lease import RunLease; from jobs.annotate.output import OutputStore; "
         "RunLease.acquire(OutputStore(sys.argv[1]), 'killed', 600.0); print('held', flush=True); time.sleep(600)", output],
        cwd=repo_root, env=subprocess_env(repo_root), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    said.clear()
    start = time.monotonic()
    lease = RunLease.acquire(OutputStore(output), "after", 600.0, say=said.append)
    assert time.monotonic() - start < 30 and "its process is gone" in said[-1], said
    lease.release()


def _acquire_into(got: list[RunLease], store: OutputStore, run_id: str, said: list[str]) -> None:
    got.append(RunLease.acquire(store, run_id, 1.0, say=said.append))


# --- 2. A truncated or foreign file under annotations/: quarantined, redone, readers fine ------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_unreadable_shard_is_quarantined_and_redone(ray_session, make_bucket, photos, tmp_path, repo_root, where):
    files = dict(list(photos.items())[:6])
    bucket = make_bucket("corrupt")
    source = local_input(tmp_path / "in", files) if where == "local" else s3_input(bucket, files)
    output = str(tmp_path / "out") if where == "local" else f"s3://{bucket}/out"
    run(job(source, output))
    fs, root = fsspec.core.url_to_fs(output)
    truncated = objects(output)[1]
    data = fs.cat_file(truncated)
    fs.pipe_file(truncated, data[: len(data) // 2])
    fs.pipe_file(f"{root}/annotations/notes.txt", b"not a shard")
    shown = truncated if where == "local" else f"s3://{truncated}"

    args = ["--input", source, "--output", output, "--scale", "long:320", "--images-per-shard", "2", "--actors", "1", "--run-id", "again"]
    rerun = cli(args, repo_root)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert "terminate called" not in log and "Fatal Python error" not in log
    said = next(line for line in rerun.stdout.splitlines() if shown in line)
    assert "Parquet" in said and "_quarantine/again/annotations/" in said and "annotated again" in said, said
    summary = last_json(rerun.stdout)
    assert sorted(summary["shards_quarantined"]) == sorted([shown, shown.split("/annotations/")[0] + "/annotations/notes.txt"])
    assert summary["shards_processed"] == 1 and summary["images"] == 2
    moved = truncated.replace("/annotations/", "/_quarantine/again/annotations/")
    fs.invalidate_cache()
    assert fs.cat_file(moved) == data[: len(data) // 2], "the quarantined object is kept as it was"
    assert not fs.exists(f"{root}/annotations/notes.txt")
    # Its images, cut alike, make the same shard again: a whole object at the same name.
    assert pq.read_table(pa.BufferReader(fs.cat_file(truncated))).num_rows == 2
    expected = sorted(f"{source.rstrip('/')}/{name}" for name in files)
    assert sorted(rows(output)["uri"]) == expected, "exactly one row per image"
    # Every reader takes the dataset whole again.
    local = tmp_path / "copy"
    fs.get(f"{root}/annotations", str(local / "annotations"), recursive=True)
    assert sorted(pd.read_parquet(local / "annotations", partitioning=partitioning())["uri"]) == expected
    found = duckdb.sql(f"SELECT uri FROM read_parquet('{local}/annotations/*/*.parquet', hive_partitioning = true) ORDER BY uri")
    assert [r[0] for r in found.fetchall()] == expected


def test_unreadable_shard_is_quarantined_with_an_inventory(ray_session, photos, tmp_path, capsys):
    files = dict(list(photos.items())[:6])
    source = local_input(tmp_path / "in", files)
    uris = sorted(str(tmp_path / "in" / name) for name in files)
    pq.write_table(pa.table({"uri": uris}), tmp_path / "inventory.parquet")
    output = str(tmp_path / "out")
    config = job(source, output, inventory=str(tmp_path / "inventory.parquet"))
    run(config)
    broken = objects(output)[0]
    Path(broken).write_bytes(Path(broken).read_bytes()[:100])
    summary = run(config)
    assert summary["shards_quarantined"] == [broken] and summary["images"] == 2
    assert broken in capsys.readouterr().out
    assert sorted(rows(output)["uri"]) == uris


# --- 3. A store that refuses writes: rc 3, every failed shard named, no temporary left -------------


def test_store_refusing_writes_names_every_failed_shard(ray_session, s3_server, make_bucket, photos, capsys):
    files = dict(list(photos.items())[:4])
    bucket = make_bucket("full")
    source = s3_input(bucket, files)
    with FaultyS3(s3_server) as proxy:
        # The shards' commits and the summary fail; the lease, _dataset.json and config.json go through.
        proxy.add(Rule("PUT", "/part-"))
        proxy.add(Rule("PUT", "/summary.json"))
        argv = [
            "--input", source, "--output", f"s3://{bucket}/out", "--s3-endpoint-url", proxy.endpoint, "--images-per-shard", "2",
            "--scale", "long:320", "--actors", "1", "--torch-threads", "1", "--retry-backoff", "0.05", "--shard-attempts", "2",
        ]  # fmt: skip
        assert main(argv) == ExitCode.SHARDS_FAILED
    printed = capsys.readouterr()
    shards = make_shards(sorted(f"{source}{name}" for name in files), 2)
    summary = last_json(printed.out)
    assert sorted(summary["shards_failed"]) == sorted(s.id for s in shards)
    assert "could not write the summary" in printed.err and "resume with: python -m jobs.annotate" in printed.err
    assert not objects(f"s3://{bucket}/out") and not objects(f"s3://{bucket}/out", "_runs/*/summary.json")


def test_full_local_disk_gives_rc3_a_summary_and_no_temporary(photos, tmp_path, repo_root, weights_dir):
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], capture_output=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace of its own here ({probe.stderr.decode().strip()})")
    source = local_input(tmp_path / "in", dict(list(photos.items())[:4]))
    disk = tmp_path / "disk"
    disk.mkdir()
    # 16 KiB: the lease, _dataset.json and config.json fit; a shard (14 KB and more) never does.
    args = [
        "--input", source, "--output", f"{disk}/out", "--images-per-shard", "2", "--scale", "long:320", "--actors", "1",
        "--torch-threads", "1", "--retry-backoff", "0.05", "--ray-address", "local", "--run-id", "full",
    ]  # fmt: skip
    script = (
        f"mount -t tmpfs -o size=16k tmpfs {shlex.quote(str(disk))} && "
        f"{shlex.quote(sys.executable)} -m jobs.annotate {shlex.join(args)}; rc=$?; "
        f"find {shlex.quote(str(disk))} -name '*.tmp' -printf 'LEFT %p %s\\n'; "
        f"cat {shlex.quote(str(disk))}/out/_runs/full/summary.json 2>/dev/null | tr -d '\\n' | sed 's/^/WRITTEN /'; echo; exit $rc"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=repo_root, env=subprocess_env(repo_root), capture_output=True, text=True, timeout=600,
        start_new_session=True,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == ExitCode.SHARDS_FAILED, log[-4000:]
    assert "No space left on device" in log
    left = [line for line in result.stdout.splitlines() if line.startswith("LEFT ")]
    assert not left, f"temporary files left behind: {left}"
    written = [line[len("WRITTEN ") :] for line in result.stdout.splitlines() if line.startswith("WRITTEN {")]
    summary = json.loads(written[0]) if written else last_json(result.stdout)
    shards = make_shards(sorted(f"{source}/{name}" for name in list(photos)[:4]), 2)
    assert sorted(summary["shards_failed"]) == sorted(s.id for s in shards), summary


# --- 4. A refused run writes nothing ----------------------------------------------------------------


def test_refused_run_leaves_the_output_settings_unchanged(ray_session, photos, tmp_path):
    source = local_input(tmp_path / "in", dict(list(photos.items())[:4]))
    output = tmp_path / "out"
    run(job(source, str(output)))
    dataset = output / "_dataset.json"
    saved = dataset.read_bytes()
    with pytest.raises(JobError, match="other settings"):
        run(job(source, str(output), score_threshold=0.6))
    assert dataset.read_bytes() == saved
    dataset.unlink()
    with pytest.raises(JobError, match="committed shards made with other settings"):
        run(job(source, str(output), score_threshold=0.6))
    assert not dataset.exists(), "a refused run wrote its settings into the output"
    again = run(job(source, str(output)))
    assert again["shards_processed"] == 0 and again["shards_skipped_already_committed"] == 2
    assert json.loads(dataset.read_bytes())["score_threshold"] == 0.5


# --- 5. SIGINT and SIGTERM: no new shard, summary, the resume command, 130 ---------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_the_printed_command_resumes(photos, tmp_path, repo_root, weights_dir, signum):
    source = local_input(tmp_path / "in", photos)
    output = tmp_path / "out"
    args = [
        "--input", source, "--output", str(output), "--images-per-shard", "1", "--scale", "long:320", "--batch-size", "1",
        "--actors", "1", "--torch-threads", "1", "--ray-address", "local", "--run-id", "stopped",
    ]  # fmt: skip
    with open(tmp_path / "out.log", "w") as out_log, open(tmp_path / "err.log", "w") as err_log:
        job_process = subprocess.Popen(
            [sys.executable, "-m", "jobs.annotate", *args], cwd=repo_root, env=subprocess_env(repo_root), stdout=out_log, stderr=err_log,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(objects(str(output))) < 2:
            assert job_process.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.05)
        at_signal = len(objects(str(output)))
        os.kill(job_process.pid, signum)
        job_process.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job_process.pid, signal.SIGKILL)
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert job_process.returncode == ExitCode.INTERRUPTED, out[-3000:] + err[-3000:]
    assert "KeyboardInterrupt" not in err, err[-3000:]
    after = len(objects(str(output)))
    # No new shard starts: at most the one in flight (and one between the poll and the signal) commits.
    assert at_signal <= after <= at_signal + 2 and after < len(photos), (at_signal, after)
    summary = json.loads((output / "_runs" / "stopped" / "summary.json").read_text())
    assert summary["interrupted"] and summary["shards_processed"] == after and summary["shards_left"] == len(photos) - after
    assert not list(output.rglob("*.tmp"))
    assert json.loads((output / "_lease" / "000000000001.json").read_text())["state"] == "released"
    command = next(line for line in err.splitlines() if line.startswith("annotate: resume with: "))[len("annotate: resume with: ") :]
    assert shlex.split(command) == ["python", "-m", "jobs.annotate", *args]
    if signum != signal.SIGINT:
        return  # resuming is the same after either
    resumed = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], cwd=repo_root, env=subprocess_env(repo_root), capture_output=True, text=True,
        timeout=600, start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["images"] == len(photos) - after
    found = rows(str(output))
    assert len(found) == found["uri"].nunique() == len(photos)
