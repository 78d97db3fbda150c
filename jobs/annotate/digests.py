"""URI digests: the compact form in which the driver compares a listing with the committed output."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def uri_digests(uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 128-bit BLAKE2b digest of each URI's UTF-8 bytes, shape (n, 2) uint64: 16 B per URI.
    Two different URIs share one with probability about n^2 / 2^129 (1e-23 at 10^8 URIs)."""
    chunks = uris.chunks if isinstance(uris, pa.ChunkedArray) else [uris]
    # A slice at a time: its Python strings and digests cost ~150 B per URI while they live.
    slices = (chunk.slice(start, 1 << 16) for chunk in chunks for start in range(0, len(chunk), 1 << 16))
    parts = [
        np.frombuffer(b"".join([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in piece.to_pylist()]), np.uint64)
        for piece in slices
    ]
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
