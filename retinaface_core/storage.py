"""Opening any URI the same way: S3 settings given once, atomic writes on any fsspec filesystem.

Every function of the project that opens a local path, ``file://`` or any fsspec URI takes a
:class:`StorageOptions` and goes through :func:`filesystem`, so that S3 settings given as job
flags (endpoint, anonymous access, region) reach checkpoints, registries, WIDER files, training
data, inputs and outputs alike. Settings not given come from the standard AWS environment and
config files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

S3_PROTOCOLS = ("s3", "s3a")

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]*)@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it replaced,
    for anything printed or stored (settings, error messages)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


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


@functools.cache
def keys_as_written_s3() -> type[fsspec.AbstractFileSystem]:
    """s3fs's filesystem reading every key as written: ``photo?versionId=3.jpg`` is a key, not a version.

    s3fs takes ``?versionId=`` in a path for an object version (and turns version-aware mode on
    for such a URL), so objects whose names hold it could not be read; the jobs never address
    object versions. Built on first use, so that s3fs is needed only where an ``s3://`` URI is
    opened (a GPU host reading local folders has no s3fs).
    """
    import s3fs

    class KeysAsWrittenS3FileSystem(s3fs.S3FileSystem):
        def split_path(self, path: str) -> tuple[str, str, None]:
            trail = path[len(path.rstrip("/")) :]
            path = self._strip_protocol(path).lstrip("/")
            if "/" not in path:
                return path, "", None
            bucket, key = self._find_bucket_key(path)
            return bucket, key + trail, None

    # Pickled by reference, as this module's attribute (see __getattr__ below): a class pickled by
    # value takes its instance cache along, whose locks cannot be pickled, and Ray ships the
    # filesystems of inventories and outputs to its tasks.
    KeysAsWrittenS3FileSystem.__module__ = __name__
    KeysAsWrittenS3FileSystem.__qualname__ = KeysAsWrittenS3FileSystem.__name__
    return KeysAsWrittenS3FileSystem


def __getattr__(name: str) -> Any:
    """``KeysAsWrittenS3FileSystem``, built on first use (:func:`keys_as_written_s3`)."""
    if name == "KeysAsWrittenS3FileSystem":
        return keys_as_written_s3()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an S3 filesystem (without importing s3fs where none is used)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in S3_PROTOCOLS for p in protocols)


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path, ``file://`` or any fsspec URI."""
    protocol = fsspec.utils.get_protocol(uri)
    kwargs = (options or StorageOptions()).for_protocol(protocol)
    if protocol in S3_PROTOCOLS:
        fs: fsspec.AbstractFileSystem = keys_as_written_s3()(**kwargs)
        path = fs._strip_protocol(uri)
    else:
        fs, path = fsspec.core.url_to_fs(uri, **kwargs)
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
        tmp = _local_temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)


# What _local_temporary names its files: ``.<final name>.<32 hex digits>.tmp``.
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def _local_temporary(path: str, data: bytes) -> str:
    """``data`` written and synced to a hidden temporary file beside ``path``; returns its name.
    A write that fails (a full disk, a quota, an interrupt) removes what it had written."""
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: str) -> None:
    """Remove a local file if it is there, without hiding the error being handled."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move ``source`` to ``target`` on ``fs``: a rename on local disks (creating the target's
    folder), a copy then a delete on object stores."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        os.replace(source, target)
    else:
        fs.mv(source, target)


def write_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    Of two writers racing for the same name exactly one wins, whole: object stores get a
    conditional PUT (``If-None-Match: *``, which S3 and compatible stores honour); a local file
    is written under a temporary name and hard-linked to the final one, which fails if the
    name exists.
    """
    if isinstance(fs, LocalFileSystem):
        tmp = _local_temporary(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_file(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (see :func:`write_atomic`), creating local folders."""
    fs, path = filesystem(uri, options)
    write_atomic(fs, path, data)
