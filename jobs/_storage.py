"""Storage for the annotation job: input listing and sharding, the output folder and its commits.

Every URI goes through :func:`retinaface_core.storage.filesystem` with the job's
:class:`StorageOptions`, so S3 settings given as flags reach the input, the manifest and the
output (and, through the same options, the checkpoint and the registry).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

from retinaface_core.storage import StorageOptions, filesystem, full_uri, write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")


class JobError(RuntimeError):
    """A problem of the job itself (not of one image): reported before any work starts."""


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _friendly(uri: str, exc: Exception) -> JobError:
    if isinstance(exc, PermissionError):
        return JobError(f"{uri}: access denied ({exc}); check the credentials and the S3 settings")
    if isinstance(exc, FileNotFoundError):
        return JobError(f"{uri}: not found")
    return JobError(f"{uri}: cannot be read ({type(exc).__name__}: {exc})")


def list_input(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The sorted, de-duplicated image URIs of a prefix (recursive) or of a manifest file.

    A manifest is a file whose name ends in .txt/.lst/.csv (one URI per line; blank lines and
    lines starting with # are skipped) or .parquet (a ``uri`` column). Manifest entries are
    taken as given, whatever their extension: a missing object becomes an error row later.
    """
    fs, path = filesystem(uri, options)
    try:
        if path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
            uris = _read_manifest(fs, path, uri)
        else:
            if not fs.exists(path):
                raise JobError(f"{uri}: no such prefix or directory")
            uris = [full_uri(fs, p) for p in fs.find(path) if is_image_name(p)]
    except JobError:
        raise
    except Exception as exc:
        raise _friendly(uri, exc) from exc
    if not uris:
        raise JobError(f"{uri}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return sorted(set(uris))


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> list[str]:
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if "uri" not in table.column_names:
            raise JobError(f"{uri}: a Parquet manifest needs a 'uri' column, found {table.column_names}")
        return [u for u in table.column("uri").to_pylist() if u]
    lines = fs.cat_file(path).decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the sorted input; ``id`` is a hash of its URIs, so reruns find the same shards."""

    id: str
    uris: tuple[str, ...]


def make_shards(uris: Sequence[str], images_per_shard: int) -> list[Shard]:
    """Cut sorted URIs into consecutive shards of ``images_per_shard`` (the last may be smaller)."""
    if images_per_shard < 1:
        raise JobError(f"images per shard must be >= 1, got {images_per_shard}")
    shards = []
    for start in range(0, len(uris), images_per_shard):
        chunk = tuple(uris[start : start + images_per_shard])
        digest = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16]
        shards.append(Shard(digest, chunk))
    return shards


class OutputStore:
    """The job's output folder.

    Layout (``ROOT`` is ``--output``)::

        ROOT/_dataset.json                          settings every shard was made with
        ROOT/annotations/shard=<id>/part-0.parquet  one object per shard, written last = committed
        ROOT/_runs/<run_id>/config.json             each run's config, written before work starts
        ROOT/_runs/<run_id>/summary.json            each run's summary, written at its end
    """

    TABLE = "annotations"

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, options)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shard_path(self, shard_id: str) -> str:
        return self.path(self.TABLE, f"shard={shard_id}", "part-0.parquet")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Make ``data`` appear at ``path`` all at once (see :func:`write_atomic`)."""
        write_atomic(self.fs, path, data)

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(self.path(relative), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, relative: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            return None

    def commit_shard(self, shard_id: str, parquet: bytes) -> None:
        self.write_bytes(self.shard_path(shard_id), parquet)

    def committed_shards(self) -> set[str]:
        """Ids of the shards whose object exists (the listing is not cached)."""
        self.fs.invalidate_cache()
        pattern = self.path(self.TABLE, "shard=*", "part-0.parquet")
        return {posixpath.basename(posixpath.dirname(p)).split("=", 1)[1] for p in self.fs.glob(pattern)}

    def clear(self) -> None:
        """Delete everything the job writes here (``--overwrite``)."""
        for relative in (self.TABLE, "_runs", "_dataset.json"):
            target = self.path(relative)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache()

    def check_writable(self) -> None:
        """Write and delete a probe object, so a read-only or missing output fails before any work."""
        probe = self.path("_runs", f".probe-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"")
            self.fs.rm(probe)
        except Exception as exc:
            raise JobError(f"output {self.uri} is not writable ({type(exc).__name__}: {exc})") from exc


def parquet_bytes(table: Any, **write_options: Any) -> bytes:
    """A pyarrow table serialised as one Parquet file in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **write_options)
    return sink.getvalue()
