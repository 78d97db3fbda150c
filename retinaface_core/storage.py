"""Writing objects so that readers see them whole or not at all, on any fsspec filesystem."""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
