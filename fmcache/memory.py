"""The C allocator's settings for this process: keep freed memory for the next batch.

A forward pass allocates the same large tensors batch after batch (a width-16 ResNet's
layer1 activations are 4 MiB a tensor at batch 64), and so do decoding and encoding. glibc's
malloc hands such blocks back to the kernel as soon as they are freed, as long as they sit
above its ``mmap`` threshold or at the top of its heap above its trim threshold (both
adjusted at run time from what the process freed before), so the next batch takes them
again as fresh pages: one page fault (and a page of zeros) per 4 KiB. On this project's
machine that cost more than the convolutions: a plain forward pass of the width-16
layer1 prefix over 2,048 images took 1.72 s with 437,000 page faults and 0.68 s with none,
and which of the two a process got depended on the order of its earlier frees (the
bimodal build times of docs/benchmarks.md). :func:`tune_allocator` fixes both thresholds
(``mallopt``), so freed blocks stay in the heap for the next batch.

The effect is process-wide and lasts until the process ends: up to ``trim_threshold_mib``
of freed memory stays mapped (resident at most where the process once used it), blocks
above ``mmap_threshold_mib`` are still mapped apart and returned at once. Processes forked
afterwards (DataLoader workers) inherit it; spawned ones start with glibc's defaults. The
``fmcache`` command applies it at start; a Python program calls it once itself. glibc only
(Linux): elsewhere, or with the environment variable ``FMCACHE_TUNE_MALLOC=0``, it does
nothing and returns ``None``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from dataclasses import dataclass

#: mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: set to 0 to leave the allocator alone (the command line included)
ENV = "FMCACHE_TUNE_MALLOC"
#: glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit builds
#: whose heaps are not enlarged), so a larger wish falls back to this one
GLIBC_SAFE_MMAP_MIB = 32


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`tune_allocator` set: the mmap and trim thresholds, MiB."""

    mmap_threshold_mib: int
    trim_threshold_mib: int


_lock = threading.Lock()
_applied: AllocatorSettings | None = None


def tune_allocator(mmap_threshold_mib: int = 256, trim_threshold_mib: int = 512) -> AllocatorSettings | None:
    """Fix glibc malloc's mmap and trim thresholds for this process (see the module doc);
    the settings applied, or ``None`` where nothing was changed (not glibc, ``mallopt``
    refused, or ``FMCACHE_TUNE_MALLOC=0``). Calling it again applies the new values.

    An mmap threshold glibc refuses (above half its largest heap) falls back to 32 MiB.
    """
    global _applied
    if mmap_threshold_mib < 1 or trim_threshold_mib < 1:
        raise ValueError(f"thresholds must be at least 1 MiB, got mmap {mmap_threshold_mib}, "
                         f"trim {trim_threshold_mib}")
    if os.environ.get(ENV, "").strip() == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mib = 1 << 20
    with _lock:
        mmap_mib = mmap_threshold_mib
        if not mallopt(M_MMAP_THRESHOLD, min(mmap_mib * mib, 2**31 - 1)):
            mmap_mib = min(mmap_threshold_mib, GLIBC_SAFE_MMAP_MIB)
            if not mallopt(M_MMAP_THRESHOLD, mmap_mib * mib):
                return None
        trim_mib = min(trim_threshold_mib, (2**31 - 1) // mib)
        if not mallopt(M_TRIM_THRESHOLD, trim_mib * mib):
            return None
        _applied = AllocatorSettings(mmap_mib, trim_mib)
        return _applied


def allocator_settings() -> AllocatorSettings | None:
    """What :func:`tune_allocator` last applied in this process (or the process it was
    forked from); ``None`` if it never did."""
    return _applied
