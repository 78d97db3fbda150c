"""Process-level settings that CPU inference depends on."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_MIB = 1 << 20


@functools.cache
def keep_freed_memory(mmap_threshold: int = 32 * _MIB, trim_threshold: int = 512 * _MIB) -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    A forward pass allocates and frees large activation buffers. With glibc's defaults, blocks
    above its (moving) mmap threshold come from fresh ``mmap`` pages and a freed heap top is
    trimmed, so every call page-faults its way through new memory again, a cost of the same
    order as the arithmetic of a small network's pass (``docs/annotate.md``, "Figures behind
    the code's choices"). This is what jemalloc or tcmalloc, which PyTorch's CPU performance
    guide recommends preloading, do; resident memory stays at the high-water mark of one pass.

    Process-wide and idempotent; returns False (and changes nothing) where the C library is not
    glibc. ``mmap_threshold`` may be at most 32 MiB on 64-bit glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def bound_kernel_caches(entries: int = 256) -> None:
    """Cap the oneDNN kernel caches that PyTorch keeps per input shape, unless already set.

    PyTorch's CPU convolutions cache a compiled oneDNN primitive per layer and input shape, in
    ideep's LRU (``LRU_CACHE_CAPACITY``) and oneDNN's own (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``),
    1,024 entries each by default. Photos of ever new sizes (``original`` or ``long:N``) fill
    them, so a process's memory grows with every new size. ``entries`` (256 by default) holds
    several shapes' worth of RetinaFace's convolutions: memory levels off, and a fixed
    ``square:N`` keeps every primitive it needs, where a much smaller cap would re-create
    primitives on every pass (``docs/annotate.md``, "Figures behind the code's choices").

    Both libraries read the variables when they first build a primitive: call this before the
    process's first convolution. Environment variables already set are left as they are.
    """
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None
