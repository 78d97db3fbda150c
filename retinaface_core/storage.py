"""Opening any URI the same way: S3 settings given once, atomic writes on any fsspec filesystem.

Every function of the project that opens a local path, ``file://`` or any fsspec URI takes a
:class:`StorageOptions` and goes through :func:`filesystem`, so that S3 settings given as job
flags (endpoint, anonymous access, region) reach checkpoints, registries, WIDER files, training
data, inputs and outputs alike. Settings not given come from the standard AWS environment and
config files.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

S3_PROTOCOLS = ("s3", "s3a")


@dataclass(frozen=True)
class StorageOptions:
    """Object-storage settings; ``None`` leaves a setting to the AWS environment/config."""

    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: $AWS_ENDPOINT_URL / AWS config)"})
    anonymous: bool = field(default=False, metadata={"help": "access S3 without credentials"})
    region: str | None = field(default=None, metadata={"help": "S3 region (default: AWS environment/config)"})

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for a filesystem of ``protocol``."""
        if protocol not in S3_PROTOCOLS:
            return {}
        options: dict[str, Any] = {"anon": self.anonymous}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path, ``file://`` or any fsspec URI."""
    protocol = fsspec.utils.get_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri, **(options or StorageOptions()).for_protocol(protocol))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as a URI any reader can open: ``s3://b/k``; local files stay plain paths."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def canonical_uri(uri: str, options: StorageOptions | None = None) -> str:
    """One spelling per location, for comparing URIs: ``s3://b/k`` (not ``s3a://``, no trailing
    slash), an absolute local path (not ``file://``, not relative). Nothing is read."""
    return full_uri(*filesystem(uri, options))


def read_file(uri: str, options: StorageOptions | None = None) -> bytes:
    """All bytes of the object at ``uri``."""
    fs, path = filesystem(uri, options)
    return fs.cat_file(path)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` appear at ``path`` all at once, replacing any previous object.

    Object stores get a single PUT, which they make visible only when complete. A local file is
    written under a hidden temporary name in the same folder, then renamed over the final name
    (a rename within a folder is atomic on POSIX); the dot keeps the temporary name out of
    globs and dataset discovery.
    """
    if isinstance(fs, LocalFileSystem):
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_file(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (see :func:`write_atomic`), creating local folders."""
    fs, path = filesystem(uri, options)
    write_atomic(fs, path, data)
