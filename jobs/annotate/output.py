"""The annotation job's output folder: its layout, its commits and what it holds.

Every path goes through :func:`retinaface_core.storage.filesystem` with the job's
:class:`StorageOptions`, so S3 settings given as flags reach the output.
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
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from retinaface_core.storage import StorageOptions, filesystem, write_atomic, write_exclusive
from schemas.annotation import SETTINGS_METADATA_KEY

from .._exit import JobError


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """``fs`` as a pyarrow filesystem (pickles with its settings, so Ray workers open the same store)."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


@dataclass(frozen=True)
class OutputListing:
    """What one listing of the output shows: committed shards (id -> settings fingerprint of
    their object), the shards marked for a retry of their storage errors, and the crops objects
    (shard id -> fingerprints: an attempt that died may have left one of another shard)."""

    committed: dict[str, str]
    retry: set[str]
    crops: dict[str, set[str]]

    def orphan_crops(self) -> list[tuple[str, str]]:
        """(shard, fingerprint) of the crops objects without a committed annotation object of the same name."""
        return sorted((shard, fp) for shard, fps in self.crops.items() for fp in fps if self.committed.get(shard) != fp)


class OutputStore:
    """The job's output folder.

    Layout (``ROOT`` is ``--output``)::

        ROOT/_dataset.json                                 settings every shard was made with;
                                                           created once, by the first run (exclusive)
        ROOT/annotations/shard=<id>/part-<fingerprint>.parquet
                                                           one object per shard, written last =
                                                           committed; named by its settings
        ROOT/crops/shard=<id>/part-<fingerprint>.parquet   the shard's aligned face crops (--crops),
                                                           written just before its annotations;
                                                           counts only once they are committed
        ROOT/_retry/<id>                                   the shard holds storage-error rows: the
                                                           next run redoes it (written before the
                                                           shard's commit, removed after a clean one)
        ROOT/_runs/<run_id>/config.json                    each run's config, written before work starts
        ROOT/_runs/<run_id>/summary.json                   each run's summary, written at its end
    """

    TABLE = "annotations"
    CROPS = "crops"
    RETRY = "_retry"
    DATASET = "_dataset.json"

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, options)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shard_path(self, shard_id: str, fingerprint: str, table: str = TABLE) -> str:
        """The object of a shard in ``table`` (the annotations, or :attr:`CROPS`)."""
        return self.path(table, f"shard={shard_id}", f"part-{fingerprint}.parquet")

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

    def write_crops(self, shard_id: str, fingerprint: str, parquet: bytes) -> None:
        """Write a shard's crops object; it counts once :meth:`commit_shard` has written the shard."""
        self.write_bytes(self.shard_path(shard_id, fingerprint, self.CROPS), parquet)

    def remove_crops(self, shards: Sequence[tuple[str, str]]) -> None:
        """Delete the crops objects of these (shard, fingerprint)s: orphans of attempts that died."""
        if shards:
            self.fs.rm([self.shard_path(shard, fp, self.CROPS) for shard, fp in shards])
            self.fs.invalidate_cache()

    def committed_crops(self, listing: OutputListing) -> dict[str, str]:
        """Shard id -> path of the crops object of each committed shard that has one."""
        crops = listing.crops
        return {shard: self.shard_path(shard, fp, self.CROPS) for shard, fp in listing.committed.items() if fp in crops.get(shard, ())}

    def mark_retry(self, shard_id: str, uris: Sequence[str]) -> None:
        self.write_json(f"{self.RETRY}/{shard_id}", {"storage_errors": list(uris)})

    def clear_retry(self, shard_id: str) -> None:
        self.fs.rm_file(self.path(self.RETRY, shard_id))

    def listing(self) -> OutputListing:
        """Committed shards, retry marks and crops objects from one recursive listing of the root
        (1 LIST request per 1,000 objects on S3; not cached)."""
        self.fs.invalidate_cache()
        committed: dict[str, str] = {}
        retry: set[str] = set()
        crops: dict[str, set[str]] = {}
        for path in self.fs.find(self.root):
            relative = path[len(self.root) :].lstrip("/").split("/")
            if len(relative) == 3 and relative[0] in (self.TABLE, self.CROPS) and relative[1].startswith("shard="):
                name = relative[2]
                if name.startswith("part-") and name.endswith(".parquet"):
                    shard, fingerprint = relative[1][len("shard=") :], name[len("part-") : -len(".parquet")]
                    if relative[0] == self.TABLE:
                        committed[shard] = fingerprint
                    else:
                        crops.setdefault(shard, set()).add(fingerprint)
            elif len(relative) == 2 and relative[0] == self.RETRY:
                retry.add(relative[1])
        return OutputListing(committed, retry, crops)

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
        for relative in (self.TABLE, self.CROPS, self.RETRY, "_runs", self.DATASET):
            target = self.path(relative)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache()

    def check_writable(self) -> None:
        """Write and delete a probe object, so a read-only or missing output fails before any work;
        a local folder the probe created is removed again, so a run that fails before it starts
        leaves nothing behind."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        created = _missing_folders(self.root) if isinstance(self.fs, LocalFileSystem) else []
        try:
            self.write_bytes(probe, b"")
            self.fs.rm(probe)
        except Exception as exc:
            raise JobError(f"output {self.uri} is not writable ({type(exc).__name__}: {exc})") from exc
        finally:
            for folder in created:
                try:
                    os.rmdir(folder)
                except OSError:
                    break  # not created, or no longer empty


def _missing_folders(path: str) -> list[str]:
    """``path`` and those of its parent folders that do not exist, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


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
