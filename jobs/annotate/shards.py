"""Shards, the annotation job's unit of work and of commit: consecutive URIs named by their hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .._exit import JobError


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
    """The hash naming a shard of these URIs. URIs are joined by newlines; where one holds a
    newline itself (an S3 key may) that join is ambiguous, so such a list is hashed in a
    length-prefixed form instead, set apart by a leading NUL (no URI starts with one): two
    different lists never share a text to hash, and the ids of existing outputs stay as they were."""
    ambiguous = any("\n" in uri for uri in uris)
    text = "\0" + "".join(f"{len(uri)}:{uri}" for uri in uris) if ambiguous else "\n".join(uris)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_table(shards: Sequence[Shard], retry: bool) -> pa.Table:
    """Shards as rows of ``shard`` (id), ``uris`` (list<string>) and ``retry`` (whether it is
    redone for storage errors): what the annotator actors take. URIs stay Arrow strings."""
    arrays = [_string_array(s.uris) for s in shards]
    offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
    values = pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())
    return pa.table(
        {
            "shard": pa.array([s.id for s in shards], pa.string()),
            "uris": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values),
            "retry": pa.array([retry] * len(shards), pa.bool_()),
        }
    )


def _string_array(uris: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(uris, pa.ChunkedArray):
        return uris.combine_chunks()
    if isinstance(uris, pa.Array):
        return uris
    return pa.array(list(uris), pa.string())
