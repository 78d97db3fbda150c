"""Storage for the annotation job: input listing and sharding, the output folder and its commits.

Every URI goes through :func:`retinaface_core.storage.filesystem` with the job's
:class:`StorageOptions`, so S3 settings given as flags reach the input, the manifest and the
output (and, through the same options, the checkpoint and the registry).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs
import pyarrow.parquet as pq
import s3fs
from fsspec.implementations.local import LocalFileSystem

from retinaface_core.storage import StorageOptions, filesystem, full_uri, write_atomic, write_exclusive
from schemas.annotation import SETTINGS_METADATA_KEY

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")


class JobError(RuntimeError):
    """A problem of the job itself (not of one image): reported before any work starts."""


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


_IMAGE_NAME = r"\.(" + "|".join(ext[1:] for ext in IMAGE_EXTENSIONS) + r")$"


def image_name_mask(names: pa.Array | pa.ChunkedArray) -> pa.BooleanArray | pa.ChunkedArray:
    """:func:`is_image_name` of every string of ``names`` at once (no Python string per name)."""
    return pc.match_substring_regex(names, _IMAGE_NAME, ignore_case=True)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """``fs`` as a pyarrow filesystem (pickles with its settings, so Ray workers open the same store)."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def storage_error(uri: str, exc: Exception) -> JobError:
    if isinstance(exc, PermissionError):
        return JobError(f"{uri}: access denied ({exc}); check the credentials and the S3 settings")
    if isinstance(exc, FileNotFoundError):
        return JobError(f"{uri}: not found")
    return JobError(f"{uri}: cannot be read ({type(exc).__name__}: {exc})")


def list_input(uri: str, options: StorageOptions | None = None) -> pa.ChunkedArray:
    """The sorted, de-duplicated image URIs of a prefix (recursive) or of a manifest file.

    The listing is streamed a page (1,000 keys on S3) at a time, bypassing the client's listing
    cache, and kept as Arrow strings, one chunk per page: about the URI's own bytes plus 4 per
    object, instead of the ~1.5 KB of a cached listing and Python strings.

    A manifest is a file whose name ends in .txt/.lst/.csv (one URI per line; blank lines and
    lines starting with # are skipped) or .parquet (a ``uri`` column). Manifest entries are
    taken as given, whatever their extension: a missing object becomes an error row later.
    """
    fs, path = filesystem(uri, options)
    try:
        if path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
            manifest = _read_manifest(fs, path, uri)
            uris = pa.chunked_array([pc.unique(manifest)], pa.string())
            presorted = False
        else:
            pages = (pa.array([p for p in page if is_image_name(p)], pa.string()) for page in _list_pages(fs, path, uri))
            uris = pa.chunked_array(list(pages), pa.string())
            # S3 lists keys in byte order, which is Arrow's string order: no copy to sort them.
            presorted = isinstance(fs, s3fs.S3FileSystem)
    except JobError:
        raise
    except Exception as exc:
        raise storage_error(uri, exc) from exc
    if not len(uris):
        raise JobError(f"{uri}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return uris if presorted else uris.take(pc.sort_indices(uris))


def _list_pages(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[list[str]]:
    """Full URIs of every object below ``path``, a page at a time (S3: one LIST request each)."""
    if isinstance(fs, s3fs.S3FileSystem):
        bucket, prefix, _ = fs.split_path(path)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        token: dict[str, str] = {}
        found = False
        while True:
            page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, **token)
            keys = [item["Key"] for item in page.get("Contents", [])]
            found = found or bool(keys)
            yield [f"s3://{bucket}/{key}" for key in keys if not key.endswith("/")]
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        if not found:
            raise JobError(f"{uri}: no such prefix, or nothing below it")
    elif isinstance(fs, LocalFileSystem):
        if not os.path.isdir(path):
            raise JobError(f"{uri}: no such prefix or directory")
        for folder, _, files in os.walk(path):
            yield [os.path.join(folder, name) for name in files]
    else:
        if not fs.exists(path):
            raise JobError(f"{uri}: no such prefix or directory")
        yield [full_uri(fs, p) for p in fs.find(path)]


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> pa.Array:
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            if "uri" not in schema.names:
                raise JobError(f"{uri}: a Parquet manifest needs a 'uri' column, found {schema.names}")
            f.seek(0)
            column = pq.read_table(f, columns=["uri"]).column("uri").cast(pa.string()).combine_chunks()
        return column.filter(pc.is_valid(column))
    lines = fs.cat_file(path).decode("utf-8").splitlines()
    return pa.array([line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")], pa.string())


@dataclass(frozen=True)
class Shard:
    """Consecutive URIs of the sorted work to do; ``id`` is a hash of its URIs, so the same URIs
    make the same shard (and a retried or re-run shard replaces its own object)."""

    id: str
    uris: Sequence[str]


def make_shards(uris: Sequence[str] | pa.Array | pa.ChunkedArray, images_per_shard: int) -> list[Shard]:
    """Cut sorted URIs into consecutive shards of ``images_per_shard`` (the last may be smaller)."""
    if images_per_shard < 1:
        raise JobError(f"images per shard must be >= 1, got {images_per_shard}")
    shards = []
    for start in range(0, len(uris), images_per_shard):
        chunk = uris[start : start + images_per_shard]
        names = chunk.to_pylist() if isinstance(chunk, (pa.Array, pa.ChunkedArray)) else list(chunk)
        shards.append(Shard(shard_id(names), chunk))
    return shards


def shard_id(uris: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(uris).encode()).hexdigest()[:16]


def shard_table(shards: Sequence[Shard], retry: bool) -> pa.Table:
    """Shards as rows of ``shard`` (id), ``uris`` (list<string>) and ``retry`` (whether it is
    redone for storage errors): what the annotator actors take. URIs stay Arrow strings."""
    arrays = [_string_array(s.uris) for s in shards]
    offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
    values = pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())
    return pa.table({
        "shard": pa.array([s.id for s in shards], pa.string()),
        "uris": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values),
        "retry": pa.array([retry] * len(shards), pa.bool_()),
    })


def _string_array(uris: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(uris, pa.ChunkedArray):
        return uris.combine_chunks()
    if isinstance(uris, pa.Array):
        return uris
    return pa.array(list(uris), pa.string())


@dataclass(frozen=True)
class OutputListing:
    """What one listing of the output shows: committed shards (id -> settings fingerprint of
    their object) and the shards marked for a retry of their storage errors."""

    committed: dict[str, str]
    retry: set[str]


class OutputStore:
    """The job's output folder.

    Layout (``ROOT`` is ``--output``)::

        ROOT/_dataset.json                                 settings every shard was made with;
                                                           created once, by the first run (exclusive)
        ROOT/annotations/shard=<id>/part-<fingerprint>.parquet
                                                           one object per shard, written last =
                                                           committed; named by its settings
        ROOT/_retry/<id>                                   the shard holds storage-error rows: the
                                                           next run redoes it (written before the
                                                           shard's commit, removed after a clean one)
        ROOT/_runs/<run_id>/config.json                    each run's config, written before work starts
        ROOT/_runs/<run_id>/summary.json                   each run's summary, written at its end
    """

    TABLE = "annotations"
    RETRY = "_retry"
    DATASET = "_dataset.json"

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, options)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shard_path(self, shard_id: str, fingerprint: str) -> str:
        return self.path(self.TABLE, f"shard={shard_id}", f"part-{fingerprint}.parquet")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Make ``data`` appear at ``path`` all at once (see :func:`write_atomic`)."""
        write_atomic(self.fs, path, data)

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(self.path(relative), _json_bytes(obj))

    def create_json(self, relative: str, obj: Any) -> bool:
        """Write ``obj`` unless the object exists; True if this call created it (see :func:`write_exclusive`)."""
        return write_exclusive(self.fs, self.path(relative), _json_bytes(obj))

    def read_json(self, relative: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            return None

    def commit_shard(self, shard_id: str, fingerprint: str, parquet: bytes) -> None:
        self.write_bytes(self.shard_path(shard_id, fingerprint), parquet)

    def mark_retry(self, shard_id: str, uris: Sequence[str]) -> None:
        self.write_json(f"{self.RETRY}/{shard_id}", {"storage_errors": list(uris)})

    def clear_retry(self, shard_id: str) -> None:
        self.fs.rm_file(self.path(self.RETRY, shard_id))

    def listing(self) -> OutputListing:
        """Committed shards and retry marks from one recursive listing of the root (1 LIST request
        per 1,000 objects on S3; not cached)."""
        self.fs.invalidate_cache()
        committed: dict[str, str] = {}
        retry: set[str] = set()
        for path in self.fs.find(self.root):
            relative = path[len(self.root) :].lstrip("/").split("/")
            if len(relative) == 3 and relative[0] == self.TABLE and relative[1].startswith("shard="):
                name = relative[2]
                if name.startswith("part-") and name.endswith(".parquet"):
                    committed[relative[1][len("shard=") :]] = name[len("part-") : -len(".parquet")]
            elif len(relative) == 2 and relative[0] == self.RETRY:
                retry.add(relative[1])
        return OutputListing(committed, retry)

    def read_uris(self, committed: dict[str, str]) -> pa.ChunkedArray:
        """The ``uri`` column of the given committed shards (id -> fingerprint), read in parallel."""
        return pa.chunked_array(list(self.uri_batches(committed)), pa.string())

    def uri_batches(self, committed: dict[str, str]) -> Iterator[pa.Array]:
        """The ``uri`` column of the given committed shards, streamed a record batch at a time
        (files read ahead in parallel), so that no more than a few batches are held at once."""
        if not committed:
            return
        dataset = pads.dataset(
            [self.shard_path(shard, fp) for shard, fp in committed.items()],
            filesystem=arrow_filesystem(self.fs),
            format="parquet",
        )
        for batch in dataset.to_batches(columns=["uri"]):
            yield batch.column("uri")

    def read_settings(self, shard_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The settings a committed shard records in its Parquet metadata (None for shards written
        before shards recorded them)."""
        with self.fs.open(self.shard_path(shard_id, fingerprint), "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
        stored = metadata.get(SETTINGS_METADATA_KEY)
        return json.loads(stored) if stored else None

    def clear(self) -> None:
        """Delete everything the job writes here (``--overwrite``)."""
        for relative in (self.TABLE, self.RETRY, "_runs", self.DATASET):
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


def uri_digests(uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 128-bit BLAKE2b digest of each URI's UTF-8 bytes, shape (n, 2) uint64: 16 B per URI.
    Two different URIs share one with probability about n^2 / 2^129 (1e-23 at 10^8 URIs)."""
    chunks = uris.chunks if isinstance(uris, pa.ChunkedArray) else [uris]
    # A slice at a time: its Python strings and digests cost ~150 B per URI while they live.
    slices = (chunk.slice(start, 1 << 16) for chunk in chunks for start in range(0, len(chunk), 1 << 16))
    parts = [np.frombuffer(b"".join([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in piece.to_pylist()]), np.uint64) for piece in slices]
    return np.concatenate(parts).reshape(-1, 2) if parts else np.zeros((0, 2), np.uint64)


class DigestSet:
    """URI digests (see :func:`uri_digests`) kept sorted, for finding many at once: 24 B per
    member (first and second halves, and the member's index), where Arrow's hash set of the
    URIs themselves costs ~130 B."""

    def __init__(self, digests: np.ndarray) -> None:
        self.order = np.argsort(digests[:, 0])
        self.hi, self.lo = digests[self.order, 0], digests[self.order, 1]

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, digests: np.ndarray) -> np.ndarray:
        """The index (in the order the members were given) of each of ``digests`` (n, 2), -1
        where absent. Queries are sorted first: binary searches in order walk memory in order
        (measured 30x faster than random ones for 10^7 of them)."""
        result = np.full(len(digests), -1, np.int64)
        if not len(self.hi) or not len(digests):
            return result
        order = np.argsort(digests[:, 0])
        hi, lo = digests[order, 0], digests[order, 1]
        at = np.minimum(np.searchsorted(self.hi, hi), len(self.hi) - 1)
        same_hi = self.hi[at] == hi
        found = same_hi & (self.lo[at] == lo)
        # Members whose first halves are equal (about n^2 / 2^65 of them): compare with each.
        for i in np.flatnonzero(same_hi & ~found):
            end = np.searchsorted(self.hi, hi[i], side="right")
            match = np.flatnonzero(self.lo[at[i] : end] == lo[i])
            if len(match):
                at[i], found[i] = at[i] + match[0], True
        result[order[found]] = self.order[at[found]]
        return result


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """12 hex digits naming a set of output settings (schema, model, detector settings, limits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def parquet_bytes(table: Any, **write_options: Any) -> bytes:
    """A pyarrow table serialised as one Parquet file in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **write_options)
    return sink.getvalue()
