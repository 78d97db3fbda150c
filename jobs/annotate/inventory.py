"""The annotation job's input from an inventory, planned with Ray Data: the driver holds the
inventory's file names, the committed shard files' names and counts, never the URIs.

Inventories (``--inventory``):

- **S3 Inventory**: its ``manifest.json``. ``fileFormat`` ``CSV`` (gzip'd, headerless data files
  whose columns ``fileSchema`` names, e.g. ``Bucket, Key, Size, LastModifiedDate``; keys are
  URL-encoded, decoded here as form-encoded: ``+`` is a space) or ``Parquet`` (``bucket`` and
  ``key`` columns). The objects under the ``--input`` prefix (which must be in the inventory's
  source bucket); of a versioned inventory, the latest, not deleted, version.
- a **Parquet file, or a folder of them, with a ``uri`` column**: its URIs under ``--input``,
  taken as given (not made canonical, not checked to exist).

Of either, the images by the jobs' one rule (:func:`jobs._inputs.skip_reasons`); what it skips,
and entries named twice, are counted by reason.

The plan, as three Ray Data stages whose data stay in the object store:

1. read the inventory (one task per data file, streamed a record batch at a time) and the
   ``uri`` column of every committed shard file (the paths of those that are not readable
   shards come back to the driver, which quarantines them);
2. anti-join: both sides, tagged with their side, are grouped by a stable hash of the URI into
   groups of about ``JOIN_GROUP_ROWS`` URIs; each group yields its listed URIs that no shard
   holds (new) and its committed URIs no longer listed (removed);
3. cut: the new URIs are grouped again by the same hash, about ``CUT_GROUP_SHARDS`` shards'
   worth per group, and each group is sorted and cut into consecutive shards whose id is
   :func:`shard_id` of their URIs. A task run again makes the same shards (the same object
   names, replaced rather than duplicated); up to ``CUT_GROUP_SHARDS`` shards' worth of new
   URIs form one group, cut exactly as the driver planner cuts them.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from retinaface_core.storage import StorageOptions, canonical_uri, filesystem, full_uri

from .._exit import JobError
from .._inputs import SKIP_REASONS, SkipCounts, skip_reasons, storage_error
from .output import UnreadableShard, read_uri_column
from .shards import make_shards, shard_table

if TYPE_CHECKING:
    import ray.data

# URIs per anti-join group (both sides): a group is held whole by one task, so this bounds a
# task's memory to that many URIs' strings.
JOIN_GROUP_ROWS = 2_000_000
# Shards' worth of new URIs per cutting group: each group's last shard may be short, so this
# bounds the short files to 1 in CUT_GROUP_SHARDS.
CUT_GROUP_SHARDS = 100

# Blocks of file names, so read tasks each read a run of files; the driver holds this many
# block references, whatever the number of files.
READ_TASKS = 256
# URIs per block the read tasks yield: blocks far above Ray's 100 KB limit for results held in
# the driver's memory.
BLOCK_ROWS = 1 << 16

S3_INVENTORY_FORMATS = ("CSV", "Parquet")
# Column names of an S3 Inventory by data file format: key, bucket, latest version, delete marker.
_S3_COLUMNS = {
    "CSV": ("Key", "Bucket", "IsLatest", "IsDeleteMarker"),
    "Parquet": ("key", "bucket", "is_latest", "is_delete_marker"),
}
_LISTED, _DONE, _UNREADABLE = 0, 1, 2
# Sides of the inventory's entries the image rule skips, one per reason.
_SKIPPED = {reason: 3 + i for i, reason in enumerate(SKIP_REASONS)}


class InventoryError(ValueError):
    """An inventory data file that cannot be read as its manifest says; the message names it."""


@dataclass(frozen=True)
class Inventory:
    """An input inventory, checked on the driver: its data files (paths on ``fs``) and how to
    read them. ``format`` is ``CSV`` or ``Parquet`` (S3 Inventory) or ``uri`` (Parquet with a
    ``uri`` column); ``columns`` the CSV column names; ``prefix`` what every selected URI starts
    with (S3 Inventory: the key prefix within ``bucket``)."""

    uri: str
    fs: fsspec.AbstractFileSystem
    files: tuple[str, ...]
    format: str
    prefix: str
    bucket: str = ""
    columns: tuple[str, ...] = ()

    def describe(self, path: str) -> str:
        return full_uri(self.fs, path)


def open_inventory(uri: str, input_uri: str, options: StorageOptions | None = None) -> Inventory:
    """The inventory at ``uri`` (an S3 Inventory ``manifest.json``, or a Parquet file or folder
    with a ``uri`` column), selecting what is under ``input_uri``.

    Raises :class:`JobError` naming the manifest or data file at fault: missing, unreadable,
    without the columns it needs, or of another bucket than ``input_uri``.
    """
    fs, path = filesystem(uri, options)
    try:
        if path.endswith(".json"):
            inventory = _s3_inventory(fs, path, uri, input_uri, options)
        else:
            inventory = _uri_inventory(fs, path, uri, input_uri, options)
        _check_files(inventory)
    except JobError:
        raise
    except Exception as exc:
        raise storage_error(uri, exc) from exc
    return inventory


def _s3_inventory(fs: fsspec.AbstractFileSystem, path: str, uri: str, input_uri: str, options: StorageOptions | None) -> Inventory:
    try:
        manifest = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise JobError(f"{uri}: not JSON ({exc})") from exc
    fields = ("sourceBucket", "destinationBucket", "fileFormat", "files")
    if not isinstance(manifest, dict) or any(f not in manifest for f in fields) or not isinstance(manifest["files"], list):
        raise JobError(f"{uri}: not an S3 Inventory manifest (needs {', '.join(fields)})")
    if manifest["fileFormat"] not in S3_INVENTORY_FORMATS:
        raise JobError(f"{uri}: fileFormat {manifest['fileFormat']!r} is not supported ({' or '.join(S3_INVENTORY_FORMATS)})")
    input_fs, input_path = filesystem(input_uri, options)
    if fs.protocol != input_fs.protocol:
        raise JobError(f"{uri}: an S3 Inventory manifest and --input ({input_uri}) must both be s3:// URIs")
    bucket, _, key_prefix = input_path.partition("/")
    if bucket != manifest["sourceBucket"]:
        raise JobError(f"{uri}: inventory of bucket {manifest['sourceBucket']!r}, but --input {input_uri} is in bucket {bucket!r}")
    destination = manifest["destinationBucket"].rsplit(":", 1)[-1]  # arn:aws:s3:::NAME
    files = tuple(posixpath.join(destination, f["key"]) for f in manifest["files"])
    if not files:
        raise JobError(f"{uri}: the manifest lists no data files")
    columns: tuple[str, ...] = ()
    if manifest["fileFormat"] == "CSV":
        columns = tuple(c.strip() for c in str(manifest.get("fileSchema", "")).split(","))
        if not {"Bucket", "Key"} <= set(columns):
            raise JobError(f"{uri}: fileSchema {manifest.get('fileSchema')!r} has no Bucket and Key columns")
    return Inventory(uri, fs, files, manifest["fileFormat"], key_prefix.rstrip("/") + "/" if key_prefix else "", bucket, columns)


def _uri_inventory(fs: fsspec.AbstractFileSystem, path: str, uri: str, input_uri: str, options: StorageOptions | None) -> Inventory:
    if fs.isfile(path):
        files: tuple[str, ...] = (path,)
    else:
        # Hidden and underscore names are not data (pyarrow's and Spark's convention).
        files = tuple(sorted(
            p for p in fs.find(path)
            if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
        ))  # fmt: skip
        if not files:
            raise JobError(f"{uri}: no such Parquet file, nor a folder holding .parquet files")
    return Inventory(uri, fs, files, "uri", canonical_uri(input_uri, options).rstrip("/") + "/")


def _check_files(inventory: Inventory) -> None:
    """Every data file exists and has the columns the reader needs (in parallel: one or two
    requests per file), so a malformed inventory stops the job before any Ray work."""
    with ThreadPoolExecutor(16) as pool:
        problems = [p for p in pool.map(lambda path: _file_problem(inventory, path), inventory.files) if p]
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        raise JobError(f"{inventory.uri}: {problems[0]}{more}")


def _file_problem(inventory: Inventory, path: str) -> str | None:
    name = inventory.describe(path)
    try:
        if inventory.format == "CSV":
            with inventory.fs.open(path, "rb", compression="gzip") as f:
                first = f.readline()
            width = (
                pacsv.read_csv(pa.py_buffer(first), pacsv.ReadOptions(autogenerate_column_names=True)).num_columns
                if first.strip()
                else len(inventory.columns)
            )
            if width != len(inventory.columns):
                return f"data file {name} has {width} columns, but fileSchema names {len(inventory.columns)}"
            return None
        with inventory.fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
        needed = ["uri"] if inventory.format == "uri" else ["bucket", "key"]
        missing = [c for c in needed if c not in names]
        return f"data file {name} has no {', '.join(repr(c) for c in missing)} column (found {names})" if missing else None
    except FileNotFoundError:
        return f"data file {name} not found"
    except Exception as exc:
        return f"data file {name} cannot be read ({type(exc).__name__}: {exc})"


def stable_hash(strings: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (uint64, one per string; nulls hash as empty):
    the same on every worker and in every run, unlike Python's salted ``hash()``. Vectorised
    over the Arrow buffers, one numpy pass per byte position of the longest string."""
    strings = strings.cast(pa.large_string())
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64, n + 1, strings.offset * 8)
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(n, 0xCBF29CE484222325, np.uint64)
    prime = np.uint64(0x100000001B3)
    # Strings by length, longest first: at byte position i the live ones are a prefix.
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    for position in range(int(sorted_lengths[0]) if n else 0):
        live = order[: np.searchsorted(-sorted_lengths, -position, side="left")]
        hashes[live] = (hashes[live] ^ data[starts[live] + position]) * prime
    return hashes


def _select(inventory: Inventory, batch: pa.RecordBatch) -> pa.Array:
    """The URIs of one record batch of an inventory data file that are under the input prefix."""
    if inventory.format == "uri":
        uris = batch.column("uri").cast(pa.string())
        return uris.filter(pc.and_kleene(pc.is_valid(uris), pc.starts_with(uris, inventory.prefix)))
    key_name, _, latest, deleted = _S3_COLUMNS[inventory.format]
    keys = batch.column(key_name).cast(pa.string())
    if inventory.format == "CSV":
        keys = _url_decoded(keys)
    keep = pc.starts_with(keys, inventory.prefix)
    names = batch.schema.names
    if latest in names:
        keep = pc.and_(keep, pc.fill_null(batch.column(latest), True))
    if deleted in names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(batch.column(deleted), False)))
    return pc.binary_join_element_wise(f"s3://{inventory.bucket}/", keys.filter(pc.fill_null(keep, False)), "")


def _url_decoded(keys: pa.Array) -> pa.Array:
    """S3 Inventory CSV keys decoded (``%XX`` escapes, ``+`` for a space); only the keys that
    hold an escape go through Python."""
    encoded = pc.fill_null(pc.match_substring_regex(keys, "[%+]"), False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = [unquote_plus(k) for k in keys.filter(encoded).to_pylist()]
    return pc.replace_with_mask(keys, encoded, pa.array(decoded, pa.string()))


def _batches(inventory: Inventory, path: str) -> Iterator[pa.RecordBatch]:
    """An inventory data file's record batches, streamed (columns the selection needs only)."""
    if inventory.format == "CSV":
        key, _, latest, deleted = _S3_COLUMNS["CSV"]
        wanted = [c for c in (key, latest, deleted) if c in inventory.columns]
        with inventory.fs.open(path, "rb", compression="gzip") as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=list(inventory.columns), block_size=8 << 20),
                convert_options=pacsv.ConvertOptions(
                    include_columns=wanted, column_types={key: pa.string(), latest: pa.bool_(), deleted: pa.bool_()}
                ),
            )
            yield from reader
        return
    with inventory.fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if inventory.format == "uri":
            wanted = ["uri"]
        else:
            wanted = [c for c in _S3_COLUMNS["Parquet"] if c in parquet.schema_arrow.names and c != "bucket"]
        yield from parquet.iter_batches(batch_size=1 << 16, columns=wanted)


def _read_inventory_files(batch: pa.Table, inventory: Inventory) -> Iterator[pa.Table]:
    """Ray Data UDF: rows of data file ``path`` -> their selected URIs (column ``uri``, side listed)."""
    yield from _blocks(_inventory_uris(inventory, path) for path in batch.column("path").to_pylist())


def _inventory_uris(inventory: Inventory, path: str) -> Iterator[pa.Array]:
    try:
        for records in _batches(inventory, path):
            yield _select(inventory, records)
    except Exception as exc:
        raise InventoryError(f"{inventory.uri}: data file {inventory.describe(path)} cannot be read ({type(exc).__name__}: {exc})") from exc


def _read_committed(batch: pa.Table, fs: fsspec.AbstractFileSystem) -> Iterator[pa.Table]:
    """Ray Data UDF: rows of committed shard file ``path`` -> their ``uri`` column (side done);
    the path of a file that is not a readable shard (:class:`UnreadableShard`), side unreadable."""
    unreadable: list[str] = []

    def columns() -> Iterator[list[pa.Array]]:
        for path in batch.column("path").to_pylist():
            try:
                yield [read_uri_column(fs, path)]
            except UnreadableShard:
                unreadable.append(path)

    yield from _blocks(columns(), _DONE)
    if unreadable:
        yield _tagged(pa.array(unreadable, pa.string()), _UNREADABLE)


def _side(batch: pa.Table, side: int) -> pa.Table:
    return batch.filter(pc.equal(batch.column("side"), side))


def _why_unreadable(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Why a read task found the shard object at ``path`` unreadable (read again on the driver)."""
    try:
        read_uri_column(fs, path)
    except UnreadableShard as exc:
        return str(exc)
    return "not readable when planned"


def _blocks(files: Iterator[Iterable[pa.Array]], side: int = _LISTED) -> Iterator[pa.Table]:
    """The URIs of every file, tagged with their side, in blocks of at least ``BLOCK_ROWS``
    (the last may be smaller): Ray hands a task's results under 100 KB to the driver's own
    memory, so blocks of one shard file's 1,000 URIs would pile up there."""
    held: list[pa.Array] = []
    for uris in (uris for file in files for uris in file):
        held.append(uris.cast(pa.string()))
        if sum(map(len, held)) >= BLOCK_ROWS:
            yield _tagged(pa.concat_arrays(held), side)
            held = []
    if held:
        yield _tagged(pa.concat_arrays(held), side)


def _tagged(uris: pa.Array, side: int) -> pa.Table:
    """``uris`` with their side; a listed URI the image rule skips gets its reason's side instead."""
    sides = np.full(len(uris), side, np.int8)
    if side == _LISTED:
        reasons = skip_reasons(uris)
        for reason, code in _SKIPPED.items():
            sides[pc.fill_null(pc.equal(reasons, reason), False).to_numpy(zero_copy_only=False)] = code
    return pa.table({"uri": uris, "side": pa.array(sides)})


def _side_counts(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: a block -> its row count per side."""
    counts = pc.value_counts(batch.column("side").combine_chunks())
    return pa.table({"side": counts.field("values"), "rows": counts.field("counts")})


def _with_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    """Ray Data UDF: adds ``bucket``, the URI's stable hash modulo ``buckets``."""
    return batch.append_column(
        "bucket", pa.array((stable_hash(batch.column("uri").combine_chunks()) % np.uint64(buckets)).astype(np.int64))
    )


def _anti_join(group: pa.Table) -> pa.Table:
    """Ray Data group UDF: one hash group of both sides -> its new URIs (``removed`` false: listed,
    not committed; de-duplicated) and its removed ones (``removed`` true: committed, not listed);
    the paths of unreadable shard objects are neither side."""
    side = group.column("side")
    uris = group.column("uri")
    listed = pc.unique(uris.filter(pc.equal(side, _LISTED)))
    done = uris.filter(pc.equal(side, _DONE)).combine_chunks()
    new = listed.filter(pc.invert(pc.is_in(listed, value_set=done)))
    removed = done.filter(pc.invert(pc.is_in(done, value_set=listed)))
    return pa.table(
        {
            "uri": pa.concat_arrays([new, removed]),
            "removed": pa.array(np.arange(len(new) + len(removed)) >= len(new)),
        }
    )


def _keep(batch: pa.Table, removed: bool) -> pa.Table:
    mask = batch.column("removed")
    return batch.select(["uri"]).filter(mask if removed else pc.invert(mask))


def _cut(group: pa.Table, images_per_shard: int) -> pa.Table:
    """Ray Data group UDF: new URIs of one hash group -> shard rows (sorted, consecutive shards)."""
    uris = group.column("uri").combine_chunks()
    return shard_table(make_shards(uris.take(pc.sort_indices(uris)), images_per_shard), retry=False)


def union(datasets: list[ray.data.Dataset]) -> ray.data.Dataset:
    """The rows of all ``datasets`` (Ray's ``union`` needs two or more)."""
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _groups(rows: int, per_group: int) -> int:
    return max(1, -(-rows // per_group))


def _paths(paths: list[str] | tuple[str, ...]) -> ray.data.Dataset:
    """One row per file, in up to ``READ_TASKS`` blocks: a block is one read task."""
    import ray

    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=min(len(paths), READ_TASKS))


@dataclass
class InventoryImages:
    """The new URIs of an inventory plan: a materialized Ray dataset (column ``uri``) in the
    object store, and their count on the driver."""

    dataset: ray.data.Dataset
    count: int

    def __len__(self) -> int:
        return self.count

    def shard_rows(self, images_per_shard: int) -> ray.data.Dataset | None:
        """Shard rows (``shard``, ``uris``, ``retry``) of ``images_per_shard`` new URIs, one block
        each, materialized (the driver holds one block reference per shard)."""
        if not self.count:
            return None
        groups = _groups(self.count, images_per_shard * CUT_GROUP_SHARDS)
        return (
            self.dataset.map_batches(_with_bucket, fn_kwargs={"buckets": groups}, batch_format="pyarrow", batch_size=None)
            .groupby("bucket", num_partitions=groups)
            .map_groups(_cut, fn_kwargs={"images_per_shard": images_per_shard}, batch_format="pyarrow")
            .repartition(target_num_rows_per_block=1)
            .materialize()
        )


@dataclass
class InventoryPlan:
    """What an inventory says against the committed output: ``objects`` (its entries under the
    input), of which ``listed`` images (de-duplicated) and ``skipped`` the rest by reason, ``new``
    (listed, not committed), ``removed`` (committed, not listed) and up to 3 of those;
    ``unreadable`` the committed files that are not readable shards (path, why), left out."""

    listed: int
    new: InventoryImages
    removed: int
    removed_examples: list[str]
    objects: int
    skipped: SkipCounts
    unreadable: list[tuple[str, str]]


def plan_inventory(inventory: Inventory, committed_files: list[str], output_fs: fsspec.AbstractFileSystem) -> InventoryPlan:
    """The anti-join of ``inventory`` against the ``uri`` column of ``committed_files`` (paths on
    ``output_fs``), in Ray Data on the current Ray. Raises :class:`JobError` naming a data file
    that cannot be read."""
    try:
        return _plan(inventory, committed_files, output_fs)
    except Exception as exc:
        cause = _inventory_error(exc)
        if cause is None:
            raise
        raise JobError(cause.args[0]) from None


def _plan(inventory: Inventory, committed_files: list[str], output_fs: fsspec.AbstractFileSystem) -> InventoryPlan:
    read = (
        _paths(inventory.files)
        .map_batches(_read_inventory_files, fn_kwargs={"inventory": inventory}, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    rows: dict[int, int] = {}
    for row in read.map_batches(_side_counts, batch_format="pyarrow", batch_size=None).iter_rows():
        rows[int(row["side"])] = rows.get(int(row["side"]), 0) + int(row["rows"])
    skipped = SkipCounts()
    for reason, side in _SKIPPED.items():
        if rows.get(side):
            examples = read.map_batches(_side, fn_kwargs={"side": side}, batch_format="pyarrow", batch_size=None).take(3)
            skipped.add(reason, [row["uri"] for row in examples], rows[side])
    listed = read.map_batches(_side, fn_kwargs={"side": _LISTED}, batch_format="pyarrow", batch_size=None)
    sides = [listed]
    unreadable: list[str] = []
    if committed_files:
        read = _paths(committed_files).map_batches(
            _read_committed, fn_kwargs={"fs": output_fs}, batch_format="pyarrow", batch_size=None
        ).materialize()  # fmt: skip
        # A few rows at most; the anti-join takes only the listed and the done sides.
        unreadable = [row["uri"] for row in read.map_batches(
            _side, fn_kwargs={"side": _UNREADABLE}, batch_format="pyarrow", batch_size=None
        ).take_all()]  # fmt: skip
        sides.append(read)
    groups = _groups(sum(side.count() for side in sides), JOIN_GROUP_ROWS)
    committed = sides[1].count() - len(unreadable) if committed_files else 0
    joined = (
        union(sides)
        .map_batches(_with_bucket, fn_kwargs={"buckets": groups}, batch_format="pyarrow", batch_size=None)
        .groupby("bucket", num_partitions=groups)
        .map_groups(_anti_join, batch_format="pyarrow")
        .materialize()
    )  # fmt: skip
    new = joined.map_batches(_keep, fn_kwargs={"removed": False}, batch_format="pyarrow", batch_size=None).materialize()
    removed = joined.map_batches(_keep, fn_kwargs={"removed": True}, batch_format="pyarrow", batch_size=None).materialize()
    new_count, removed_count = new.count(), removed.count()
    examples = [row["uri"] for row in removed.take(3)] if removed_count else []
    # Every committed URI is either listed (and so not new) or removed.
    unique = new_count + committed - removed_count
    duplicates = rows.get(_LISTED, 0) - unique
    if duplicates:
        skipped.add("duplicate", [], duplicates)
    why = [(path, _why_unreadable(output_fs, path)) for path in unreadable]
    return InventoryPlan(unique, InventoryImages(new, new_count), removed_count, examples, sum(rows.values()), skipped, why)


def _inventory_error(exc: BaseException | None) -> InventoryError | None:
    """The :class:`InventoryError` a Ray task raised, however Ray Data wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InventoryError):
            return exc
        exc = exc.__cause__ or getattr(exc, "cause", None)
    return None
