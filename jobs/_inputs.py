"""The jobs' inputs: the image URIs under a prefix or in a manifest, and the one rule for which
objects are images.

Every object an input names is accounted for: it is an image, which the job annotates (one row),
or it is skipped for one of :data:`SKIP_REASONS`, counted (:class:`SkipCounts`). The rule is the
same for prefix listings, manifests and inventories (``jobs/annotate/inventory.py``): a name
ending in ``/`` is a folder marker, a name without an image extension (:data:`IMAGE_EXTENSIONS`,
any case) is not an image, and a manifest or inventory entry naming an object already named is
a duplicate.

Names are kept whatever their bytes: a local name that is not valid UTF-8 is written as a
percent-encoded ``file://`` URI (:func:`retinaface_core.storage.local_uri`), which every reader
of the jobs opens.

Every URI goes through :func:`retinaface_core.storage.filesystem` with the job's
:class:`StorageOptions`, so S3 settings given as flags reach the input and the manifest.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from retinaface_core.storage import StorageOptions, canonical_uri, filesystem, full_uri, is_s3, local_uri

from ._exit import JobError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")

SKIP_REASONS = {
    "folder_marker": "a name ending in '/': the empty object S3 consoles create for a folder",
    "not_an_image_name": f"the name does not end in an image extension ({' '.join(IMAGE_EXTENSIONS)}, any case)",
    "duplicate": "a manifest or inventory entry naming an object named before it (compared as canonical URIs)",
    "name_not_utf8": "a manifest entry on an object store whose name is not valid UTF-8 (no store holds such a name)",
}
"""Why an object an input names is not annotated: the keys of the summary's ``objects_skipped``."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IMAGE_NAME = r"\.(" + "|".join(ext[1:] for ext in IMAGE_EXTENSIONS) + r")$"
_EXAMPLES = 3


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_name_mask(names: pa.Array | pa.ChunkedArray) -> pa.BooleanArray | pa.ChunkedArray:
    """:func:`is_image_name` of every string of ``names`` at once (no Python string per name)."""
    return pc.match_substring_regex(names, _IMAGE_NAME, ignore_case=True)


def skip_reasons(names: pa.Array) -> pa.Array:
    """Per name, why the rule skips it (``folder_marker`` or ``not_an_image_name``), null for an image."""
    marker = pc.ends_with(names, "/")
    image = image_name_mask(names)
    return pc.if_else(marker, "folder_marker", pc.if_else(image, pa.scalar(None, pa.string()), "not_an_image_name"))


@dataclass
class SkipCounts:
    """The objects an input named that are not annotated: a count and up to 3 examples per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, names: list[str], count: int | None = None) -> None:
        count = len(names) if count is None else count
        if count:
            self.counts[reason] += count
            held = self.examples.setdefault(reason, [])
            held += names[: _EXAMPLES - len(held)]

    def keep_images(self, names: pa.Array) -> pa.Array:
        """``names`` less what the image rule skips, which is counted."""
        reasons = skip_reasons(names)
        skipped = pc.is_valid(reasons)
        if not pc.any(skipped).as_py():
            return names
        for reason in SKIP_REASONS:
            which = pc.equal(reasons, reason)
            count = pc.sum(which).as_py() or 0
            self.add(reason, names.filter(which)[:_EXAMPLES].to_pylist(), count)
        return names.filter(pc.invert(skipped))

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``3 not_an_image_name (e.g. a.txt, b.xmp); 1 duplicate (e.g. …)``, or ``""``."""
        examples = {reason: f" (e.g. {', '.join(map(printable, names))})" if names else "" for reason, names in self.examples.items()}
        return "; ".join(f"{n} {reason}{examples[reason]}" for reason, n in sorted(self.counts.items()))


def printable(name: str) -> str:
    """``name`` with its control characters (a newline) as ``\\xNN``, so that a log line stays one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", name)


@dataclass(frozen=True)
class Listing:
    """What an input names: ``uris`` its images (sorted, unique, canonical URIs) and ``skipped``
    the other objects, by reason; ``objects`` is their sum."""

    uris: pa.ChunkedArray
    skipped: SkipCounts

    @property
    def objects(self) -> int:
        return len(self.uris) + self.skipped.total()


def storage_error(uri: str, exc: Exception) -> JobError:
    if isinstance(exc, PermissionError):
        return JobError(f"{uri}: access denied ({exc}); check the credentials and the S3 settings")
    if isinstance(exc, FileNotFoundError):
        return JobError(f"{uri}: not found")
    return JobError(f"{uri}: cannot be read ({type(exc).__name__}: {exc})")


def list_input(uri: str, options: StorageOptions | None = None) -> Listing:
    """The images of a prefix (listed recursively) or of a manifest file, and what was skipped.

    The listing is streamed a page (1,000 keys on S3) at a time, bypassing the client's listing
    cache, and kept as Arrow strings, one chunk per page: the URI's own bytes plus a 4-byte
    offset per object, where a cached listing holds a dict per object and Python strings an
    object each (``docs/annotate.md``, "Scale notes and limits").

    A manifest is a file whose name ends in .txt/.lst/.csv (one URI per line, surrounding spaces
    and tabs stripped; blank lines and lines starting with # are not entries) or .parquet (a
    ``uri`` column, string or binary; nulls are not entries). Its entries are made canonical
    (:func:`retinaface_core.storage.canonical_uri`: ``file:///p/a.jpg`` is ``/p/a.jpg``), relative
    ones taken from the manifest's folder, then the image rule applies and duplicates are
    skipped. A missing object becomes an error row later.
    """
    fs, path = filesystem(uri, options)
    skipped = SkipCounts()
    try:
        if path.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
            uris = pa.chunked_array([_read_manifest(fs, path, uri, options, skipped)], pa.string())
            presorted = False
        else:
            uris = pa.chunked_array([skipped.keep_images(page) for page in _list_pages(fs, path, uri)], pa.string())
            # S3 lists keys in byte order, which is Arrow's string order: no copy to sort them.
            presorted = is_s3(fs)
    except JobError:
        raise
    except Exception as exc:
        raise storage_error(uri, exc) from exc
    if not len(uris):
        found = f"; skipped {skipped.describe()}" if skipped.total() else ""
        raise JobError(f"{uri}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case{found})")
    return Listing(uris if presorted else uris.take(pc.sort_indices(uris)), skipped)


def _not_a_folder(uri: str) -> JobError:
    return JobError(
        f"{uri} is a single file, not a folder or prefix: --input takes a folder or prefix (listed recursively) "
        f"or a manifest ({'/'.join(MANIFEST_EXTENSIONS)}) that lists the images"
    )


def _list_pages(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Iterator[pa.Array]:
    """Full URIs of every object below ``path``, a page at a time (S3: one LIST request each)."""
    if is_s3(fs):
        bucket, prefix, _ = fs.split_path(path)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        token: dict[str, str] = {}
        found = False
        while True:
            page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, **token)
            keys = [item["Key"] for item in page.get("Contents", [])]
            found = found or bool(keys)
            yield pa.array([f"s3://{bucket}/{key}" for key in keys], pa.string())
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        if not found:
            if prefix and fs.isfile(path):
                raise _not_a_folder(uri)
            raise JobError(f"{uri}: no such prefix, or nothing below it")
    elif isinstance(fs, LocalFileSystem):
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise _not_a_folder(uri)
            raise JobError(f"{uri}: no such prefix or directory")

        def unreadable(exc: OSError) -> None:
            raise JobError(f"{local_uri(exc.filename or path)}: a folder under --input cannot be listed ({exc.strerror})")

        for folder, _, files in os.walk(path, onerror=unreadable):
            yield _strings([os.path.join(folder, name) for name in files])
    else:
        if not fs.exists(path):
            raise JobError(f"{uri}: no such prefix or directory")
        if fs.isfile(path):
            raise _not_a_folder(uri)
        yield pa.array([full_uri(fs, p) for p in fs.find(path)], pa.string())


def _strings(paths: list[str]) -> pa.Array:
    """Local paths as Arrow strings, those that are not valid UTF-8 escaped (see :func:`local_uri`)."""
    try:
        return pa.array(paths, pa.string())
    except UnicodeEncodeError:
        return pa.array([local_uri(p) for p in paths], pa.string())


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Entries already in canonical form, left to Arrow: S3 URIs (keys as written) and normalised
# absolute local paths (no empty, "." or ".." component).
_CANONICAL = r"^s3://[^/]+/.|^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str, options: StorageOptions | None, skipped: SkipCounts) -> pa.Array:
    """The manifest's images: canonical, unique URIs; the rest counted in ``skipped``."""
    entries, invalid = _manifest_entries(fs, path, uri)
    folder = os.path.dirname(path) if isinstance(fs, LocalFileSystem) else full_uri(fs, posixpath.dirname(path))
    markers = pc.ends_with(entries, "/")
    skipped.add("folder_marker", entries.filter(markers)[:_EXAMPLES].to_pylist(), pc.sum(markers).as_py() or 0)
    entries = entries.filter(pc.invert(markers))
    ready = pc.match_substring_regex(entries, _CANONICAL)
    others = [_canonical_entry(e, folder, options) for e in entries.filter(pc.invert(ready)).to_pylist()]
    shown = {e: os.fsencode(e).decode("utf-8", "backslashreplace") for e in invalid}
    skipped.add("folder_marker", [shown[e] for e in invalid if e.endswith("/")])
    remote = [e for e in invalid if _SCHEME.match(e) and not e.startswith("file://") and not e.endswith("/")]
    skipped.add("name_not_utf8", [shown[e] for e in remote])
    others += [_canonical_entry(e, folder, options) for e in invalid if e not in remote and not e.endswith("/")]
    canonical = pa.concat_arrays([entries.filter(ready), pa.array(others, pa.string())])
    images = skipped.keep_images(canonical)
    unique = pc.unique(images)
    if len(unique) < len(images):
        counts = pc.value_counts(images)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        skipped.add("duplicate", repeated.field("values")[:_EXAMPLES].to_pylist(), len(images) - len(unique))
    return unique


def _canonical_entry(entry: str, folder: str, options: StorageOptions | None) -> str:
    """A manifest entry as a canonical URI, a relative one taken from the manifest's ``folder``;
    one that names no store this process knows is kept as given (its row will say why)."""
    if not _SCHEME.match(entry) and not entry.startswith("/"):
        entry = os.path.join(folder, entry) if not _SCHEME.match(folder) else f"{folder.rstrip('/')}/{entry}"
    try:
        return canonical_uri(entry, options)
    except Exception:
        return local_uri(entry)


def _manifest_entries(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[pa.Array, list[str]]:
    """The manifest's entries as given: Arrow strings, and the entries whose bytes are not valid
    UTF-8 as Python strings (the bytes held as lone surrogates)."""
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            if "uri" not in schema.names:
                raise JobError(f"{uri}: a Parquet manifest needs a 'uri' column, found {schema.names}")
            f.seek(0)
            column = pq.read_table(f, columns=["uri"]).column("uri").combine_chunks()
        column = column.filter(pc.is_valid(column))
        try:
            return column.cast(pa.string()), []
        except pa.ArrowInvalid:  # a binary column holding names that are not UTF-8
            return _split_valid([bytes(b).decode("utf-8", "surrogateescape") for b in column.to_pylist()])
    data = fs.cat_file(path)
    try:
        text, valid = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, valid = data.decode("utf-8", "surrogateescape"), False
    lines = (line.strip(" \t\r") for line in text.split("\n"))
    entries = [line for line in lines if line and not line.startswith("#")]
    return (pa.array(entries, pa.string()), []) if valid else _split_valid(entries)


def _split_valid(entries: list[str]) -> tuple[pa.Array, list[str]]:
    valid, invalid = [], []
    for entry in entries:
        try:
            entry.encode("utf-8")
            valid.append(entry)
        except UnicodeEncodeError:
            invalid.append(entry)
    return pa.array(valid, pa.string()), invalid
