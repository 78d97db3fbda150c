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
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from retinaface_core.storage import TEMPORARY_NAME, StorageOptions, filesystem, full_uri, move, write_atomic, write_exclusive
from schemas.annotation import SETTINGS_METADATA_KEY

from .._exit import JobError


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """``fs`` as a pyarrow filesystem, for readers of the finished output (the contact sheet)."""
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


@dataclass(frozen=True)
class OutputListing:
    """What one listing of the output shows: committed shards (id -> settings fingerprint of
    their object), the shards marked for a retry of their storage errors, the crops objects
    (shard id -> fingerprints: an attempt that died may have left one of another shard), the
    ``foreign`` files under ``annotations/`` that dataset readers would take for data but that
    are not shard objects, and the ``temporaries`` of local writes that never completed."""

    committed: dict[str, str]
    retry: set[str]
    crops: dict[str, set[str]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    def orphan_crops(self) -> list[tuple[str, str]]:
        """(shard, fingerprint) of the crops objects without a committed annotation object of the same name."""
        return sorted((shard, fp) for shard, fps in self.crops.items() for fp in fps if self.committed.get(shard) != fp)


class UnreadableShard(Exception):
    """A shard object whose content is not a shard of this job (truncated, corrupt, foreign);
    the message says why. A store failing to serve it is not this: that raises as it came."""


class LeaseLost(RuntimeError):
    """A commit refused because the run no longer holds the output's lease."""


def read_uri_column(fs: fsspec.AbstractFileSystem, path: str) -> pa.Array:
    """The ``uri`` column of the shard object at ``path``, read on the calling thread.

    Read through a Python file object without pre-buffering or threads: pyarrow's own thread
    pools calling back into a Python filesystem can outlive an error in one file, and then
    abort the interpreter at exit (``terminate called without an active exception``).
    Raises :class:`UnreadableShard` for bad content (not Parquet, truncated, no ``uri`` column);
    what the store raised while reading (a 5xx after the client's retries, a reset) raises as is.
    """
    with fs.open(path, "rb") as raw:
        f = _ReadsWatched(raw)
        try:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            schema = parquet.schema_arrow
            if "uri" not in schema.names or not pa.types.is_string(schema.field("uri").type):
                raise UnreadableShard(f"not an annotation shard: no 'uri' string column (columns: {schema.names})")
            return parquet.read(columns=["uri"], use_threads=False).column("uri").combine_chunks()
        except UnreadableShard:
            raise
        except Exception as exc:
            if f.error is not None:
                raise f.error from exc
            raise UnreadableShard(f"{type(exc).__name__}: {exc}") from exc


class _ReadsWatched:
    """A binary file whose first failed read is kept, to tell a failing store from bad content."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: Exception | None = None

    def read(self, *args: int) -> bytes:
        try:
            return self._f.read(*args)
        except Exception as exc:
            self.error = self.error or exc
            raise

    def seek(self, *args: int) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    @property
    def closed(self) -> bool:
        return self._f.closed


# Shard objects read at once by the driver, and how many it reads ahead of the one it hands
# out: the planner holds about READ_AHEAD uri columns (1,000 URIs each by default).
READ_THREADS = 16
READ_AHEAD = 32


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
        ROOT/_lease/<n>.json                               the run that holds the output: the highest n
                                                           (see :mod:`.lease`)
        ROOT/_quarantine/<run_id>/annotations/...          files under annotations/ that were not readable
                                                           shards, moved aside (kept) by that run
    """

    TABLE = "annotations"
    CROPS = "crops"
    RETRY = "_retry"
    DATASET = "_dataset.json"
    LEASE = "_lease"
    QUARANTINE = "_quarantine"

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, options)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shard_path(self, shard_id: str, fingerprint: str, table: str = TABLE) -> str:
        """The object of a shard in ``table`` (the annotations, or :attr:`CROPS`)."""
        return self.path(table, f"shard={shard_id}", f"part-{fingerprint}.parquet")

    def describe(self, path: str) -> str:
        """A path of this output as a URI to print, with its scheme (``s3://b/k``)."""
        return full_uri(self.fs, path)

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

    def commit_shard(self, shard_id: str, fingerprint: str, parquet: bytes, lease: str) -> None:
        """Write a shard's object, if the run whose lease token is ``lease`` still holds the
        output (else :class:`LeaseLost`): a run taken over after a stall commits nothing more."""
        if not self.holds_lease(lease):
            holder = self.lease_holder() or {}
            raise LeaseLost(f"not committed: the output's lease is no longer this run's (now run {holder.get('run_id')})")
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
        """Committed shards, retry marks, crops objects, foreign files and leftover temporaries from
        one recursive listing of the root (1 LIST request per 1,000 objects on S3; not cached)."""
        self.fs.invalidate_cache()
        committed: dict[str, str] = {}
        retry: set[str] = set()
        crops: dict[str, set[str]] = {}
        foreign: list[str] = []
        temporaries: list[str] = []
        for path in self.fs.find(self.root):
            relative = path[len(self.root) :].lstrip("/").split("/")
            if TEMPORARY_NAME.match(relative[-1]):
                if relative[0] != self.LEASE:  # the lease's own renewals write there meanwhile
                    temporaries.append(path)
            elif relative[0] == self.CROPS and len(relative) > 1:
                if _is_shard_object(relative):
                    crops.setdefault(relative[1][len("shard=") :], set()).add(relative[2][len("part-") : -len(".parquet")])
            elif relative[0] == self.TABLE and len(relative) > 1:
                if _is_shard_object(relative):
                    committed[relative[1][len("shard=") :]] = relative[2][len("part-") : -len(".parquet")]
                elif not any(part.startswith((".", "_")) for part in relative[1:]):
                    # Dataset readers skip hidden and underscore names; they would read this one.
                    foreign.append(path)
            elif len(relative) == 2 and relative[0] == self.RETRY:
                retry.add(relative[1])
        return OutputListing(committed, retry, crops, foreign, temporaries)

    def shard_uris(self, committed: dict[str, str]) -> Iterator[tuple[str, str, pa.Array | UnreadableShard]]:
        """(id, fingerprint, ``uri`` column) of each given committed shard, in order, read
        ``READ_THREADS`` at a time on threads of this process and at most ``READ_AHEAD`` ahead;
        for a shard object that is not readable its :class:`UnreadableShard` in place of the
        column. A store failing raises."""
        items = iter(committed.items())
        pending: deque[tuple[str, str, Future]] = deque()
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-uris") as pool:

            def submit() -> None:
                item = next(items, None)
                if item is not None:
                    pending.append((*item, pool.submit(read_uri_column, self.fs, self.shard_path(*item))))

            for _ in range(READ_AHEAD):
                submit()
            while pending:
                shard, fp, future = pending.popleft()
                submit()
                try:
                    yield shard, fp, future.result()
                except UnreadableShard as exc:
                    yield shard, fp, exc

    def read_uris(self, committed: dict[str, str]) -> pa.ChunkedArray:
        """The ``uri`` column of the given committed shards (id -> fingerprint), read in parallel."""
        return pa.chunked_array(list(self.uri_batches(committed)), pa.string())

    def uri_batches(self, committed: dict[str, str]) -> Iterator[pa.Array]:
        """The ``uri`` column of each given committed shard (see :meth:`shard_uris`); raises
        :class:`UnreadableShard`, naming the object, for one that is not readable."""
        for shard, fp, uris in self.shard_uris(committed):
            if isinstance(uris, UnreadableShard):
                raise UnreadableShard(f"{self.describe(self.shard_path(shard, fp))}: {uris}")
            yield uris

    def quarantine(self, path: str, run_id: str) -> str:
        """Move ``path`` (a file under the root) to ``_quarantine/<run_id>/`` under the same
        relative path, out of every reader's way but kept; returns where it went, as a URI."""
        target = self.path(self.QUARANTINE, run_id, path[len(self.root) :].lstrip("/"))
        move(self.fs, path, target)
        return self.describe(target)

    def lease_name(self, number: int) -> str:
        """Lease object ``number`` relative to the root (see :mod:`.lease`)."""
        return f"{self.LEASE}/{number:012d}.json"

    def lease_numbers(self) -> list[int]:
        """The numbers of the lease objects under ``_lease/``, ascending (one LIST, not cached)."""
        folder = self.path(self.LEASE)
        self.fs.invalidate_cache(folder)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[: -len(".json")]) for n in names if n.endswith(".json") and n[: -len(".json")].isdigit())

    def newest_lease(self) -> tuple[int, bytes | None]:
        """The highest lease number and that object's bytes; (0, None) if there is none."""
        numbers = self.lease_numbers()
        if not numbers:
            return 0, None
        try:
            return numbers[-1], self.fs.cat_file(self.path(self.lease_name(numbers[-1])))
        except FileNotFoundError:
            return numbers[-1], None

    def remove_leases_below(self, number: int) -> None:
        for older in self.lease_numbers():
            if older < number:
                self.fs.rm_file(self.path(self.lease_name(older)))

    def lease_holder(self) -> dict[str, Any] | None:
        """The newest lease object's record (see :mod:`.lease`), None if there is none or it is not JSON."""
        _, data = self.newest_lease()
        try:
            holder = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def holds_lease(self, token: str, starting: bool = False) -> bool:
        """Whether the run whose lease token is ``token`` holds the output: to commit, while its
        lease is not released; to start a shard (``starting``), while it is not stopping either."""
        holder = self.lease_holder()
        if holder is None or holder.get("token") != token:
            return False
        return holder.get("state") == "running" if starting else holder.get("state") != "released"

    def may_start(self, token: str) -> bool:
        """:meth:`holds_lease` for a shard about to start; True when the store cannot tell (the
        commit checks again)."""
        try:
            return self.holds_lease(token, starting=True)
        except Exception:
            return True

    def read_settings(self, shard_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The settings a committed shard records in its Parquet metadata (None for shards written
        before shards recorded them)."""
        with self.fs.open(self.shard_path(shard_id, fingerprint), "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
        stored = metadata.get(SETTINGS_METADATA_KEY)
        return json.loads(stored) if stored else None

    def clear(self) -> None:
        """Delete everything the job writes here (``--overwrite``) but the lease, which the run
        that clears holds."""
        for relative in (self.TABLE, self.CROPS, self.RETRY, "_runs", self.QUARANTINE, self.DATASET):
            target = self.path(relative)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache()

    def check_writable(self) -> None:
        """Write and delete a probe object, so a read-only, missing or full output fails before any
        work (not empty: an empty file still fits on a full disk); a local folder the probe
        created is removed again, so a run that fails before it starts leaves nothing behind."""
        probe = self.path("_runs", f".probe-{uuid.uuid4().hex}")
        created = _missing_folders(self.path("_runs")) if isinstance(self.fs, LocalFileSystem) else []
        try:
            self.write_bytes(probe, b"probe")
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


def _is_shard_object(relative: list[str]) -> bool:
    """Whether a path under the root (split) is ``annotations/shard=<id>/part-<fingerprint>.parquet``."""
    return len(relative) == 3 and relative[1].startswith("shard=") and relative[2].startswith("part-") and relative[2].endswith(".parquet")


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
