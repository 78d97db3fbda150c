"""The jobs' inputs: the image URIs under a prefix or in a manifest, and the image-name rule.

Every URI goes through :func:`retinaface_core.storage.filesystem` with the job's
:class:`StorageOptions`, so S3 settings given as flags reach the input and the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import s3fs
from fsspec.implementations.local import LocalFileSystem

from retinaface_core.storage import StorageOptions, filesystem, full_uri

from ._exit import JobError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


_IMAGE_NAME = r"\.(" + "|".join(ext[1:] for ext in IMAGE_EXTENSIONS) + r")$"


def image_name_mask(names: pa.Array | pa.ChunkedArray) -> pa.BooleanArray | pa.ChunkedArray:
    """:func:`is_image_name` of every string of ``names`` at once (no Python string per name)."""
    return pc.match_substring_regex(names, _IMAGE_NAME, ignore_case=True)


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
