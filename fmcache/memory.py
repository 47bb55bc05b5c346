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
above ``mmap_threshold_mib`` are still mapped apart and returned at once. The ``fmcache``
command applies it at start; a Python program calls it once itself. glibc only (Linux):
elsewhere, or with the environment variable ``FMCACHE_TUNE_MALLOC`` set to ``0`` (or
``false``, ``no``, ``off``), it does nothing and returns ``None``.

Child processes: forked ones (DataLoader workers by default on Linux) inherit the setting.
For the others (``spawn``, ``forkserver``), :func:`tune_allocator` also writes the thresholds
into ``FMCACHE_TUNE_MALLOC`` (``"256,512"``), and importing fmcache in a process whose
environment holds ``MMAP,TRIM`` there applies them: a spawned worker that unpickles a
FeatureMapDataset imports fmcache, so it is tuned like its parent. Setting the variable
yourself tunes any process that imports fmcache.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings
from dataclasses import dataclass

#: mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: set to 0 to leave the allocator alone (the command line included)
ENV = "FMCACHE_TUNE_MALLOC"
#: a glibc that refuses a larger mmap threshold (older ones allowed at most half their
#: largest heap, 32 MiB on 64-bit builds; 2.36 takes 256 MiB) gets this one instead
GLIBC_SAFE_MMAP_MIB = 32
#: mallopt takes an int of bytes
MAX_MIB = (2**31 - 1) >> 20
#: values of FMCACHE_TUNE_MALLOC that leave malloc alone (case and spaces ignored)
OFF = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`tune_allocator` set: the mmap and trim thresholds, MiB."""

    mmap_threshold_mib: int
    trim_threshold_mib: int

    def __str__(self) -> str:  # how the benchmarks record it
        return f"glibc thresholds fixed: mmap {self.mmap_threshold_mib} MiB, trim {self.trim_threshold_mib} MiB"


_lock = threading.Lock()
_applied: AllocatorSettings | None = None


def tune_allocator(mmap_threshold_mib: int = 256, trim_threshold_mib: int = 512) -> AllocatorSettings | None:
    """Fix glibc malloc's mmap and trim thresholds for this process (see the module doc);
    the settings applied, or ``None`` where nothing was changed (not glibc, ``mallopt``
    refused, or ``FMCACHE_TUNE_MALLOC=0``). Calling it again applies the new values.
    Thresholds are whole MiB in 1..2047 (TypeError, ValueError otherwise, before anything
    changes). An mmap threshold glibc refuses falls back to 32 MiB, and the result says so.
    """
    global _applied
    for what, value in (("mmap_threshold_mib", mmap_threshold_mib), ("trim_threshold_mib", trim_threshold_mib)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int (MiB), got {value!r}")
        if not 1 <= value <= MAX_MIB:
            raise ValueError(f"{what} must lie in 1..{MAX_MIB} MiB (mallopt takes an int of bytes), got {value}")
    if os.environ.get(ENV, "").strip().lower() in OFF or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mib = 1 << 20
    with _lock:
        mmap_mib, trim_mib = mmap_threshold_mib, trim_threshold_mib
        if not mallopt(M_MMAP_THRESHOLD, mmap_mib * mib):
            mmap_mib = min(mmap_threshold_mib, GLIBC_SAFE_MMAP_MIB)
            if not mallopt(M_MMAP_THRESHOLD, mmap_mib * mib):
                return None
        if not mallopt(M_TRIM_THRESHOLD, trim_mib * mib):  # glibc takes any trim threshold
            return None
        _applied = AllocatorSettings(mmap_mib, trim_mib)
        os.environ[ENV] = f"{mmap_mib},{trim_mib}"  # for spawned children (module doc)
        return _applied


def allocator_settings() -> AllocatorSettings | None:
    """What :func:`tune_allocator` last applied in this process (or the process it was
    forked from); ``None`` if it never did."""
    return _applied


def _apply_from_environment() -> None:
    """At import: ``FMCACHE_TUNE_MALLOC=MMAP,TRIM`` (MiB) applies those thresholds (a
    parent's :func:`tune_allocator`, or the user's own); unset or ``0``, nothing. A value
    of another form is a warning, not an import error."""
    value = os.environ.get(ENV, "").strip()
    if not value or value.lower() in OFF:
        return
    try:
        mmap_mib, trim_mib = (int(v) for v in value.split(","))
        tune_allocator(mmap_mib, trim_mib)
    except (ValueError, TypeError):
        warnings.warn(f"{ENV}={value!r} is neither 0 nor 'MMAP,TRIM' (MiB, e.g. '256,512'): malloc left alone",
                      RuntimeWarning, stacklevel=2)


_apply_from_environment()
