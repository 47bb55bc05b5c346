"""Sample (or item) indices as readers take them: integers, Python's negatives once,
every index checked against the count."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import SampleIndexError


def checked_indices(indices: Iterable[Any] | int, n: int, where: str, noun: str, holder: str) -> np.ndarray:
    """Indices into ``n`` samples (or items) as int64 in ``[0, n)``: Python's negative
    indices, once (``-1`` is the last); anything else (below ``-n``, from ``n``, a float
    or a bool: 1.5 and True read sample 1 before) is a SampleIndexError naming the index
    given, e.g. ``PATH: sample 300 is out of range (the cache has 256 samples)``."""
    if isinstance(indices, range):
        indices = np.arange(indices.start, indices.stop, indices.step)
    elif not isinstance(indices, (np.ndarray, list, tuple, int, np.integer)) and hasattr(indices, "__iter__") \
            and not hasattr(indices, "__len__"):
        indices = list(indices)  # a generator: its values, once
    try:
        given = np.atleast_1d(np.asarray(indices))
    except (TypeError, ValueError):  # ragged nested lists
        raise SampleIndexError(f"{where}: {noun} indices must be a flat sequence of integers") from None
    if given.ndim != 1:
        raise SampleIndexError(f"{where}: {noun} indices must be one flat sequence, got shape {given.shape}")
    if given.dtype == object:  # Python ints beyond int64, or anything else
        values = given.tolist()
        wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
        if wrong:
            raise SampleIndexError(f"{where}: {noun} indices must be integers, got {wrong[0]!r}")
        big = next((int(v) for v in values if not -n <= int(v) < n), None)
        if big is not None:
            raise SampleIndexError(f"{where}: {noun} {big} is out of range ({holder} has {n} {noun}s)")
        given = np.asarray(values, dtype=np.int64)
    if given.size and given.dtype.kind not in "iu":
        flat = given.reshape(-1)
        odd = np.flatnonzero(flat != np.round(flat)) if given.dtype.kind == "f" else np.zeros(1, np.intp)
        raise SampleIndexError(f"{where}: {noun} indices must be integers, got "
                               f"{flat[odd[0] if len(odd) else 0].item()!r} ({given.dtype})")
    if given.dtype.kind == "u" and given.size and int(given.max()) >= n:  # before int64 wraps 2**64 - 1 to -1
        raise SampleIndexError(f"{where}: {noun} {int(given.max())} is out of range ({holder} has {n} {noun}s)")
    idx = given.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = int(idx[(idx < -n) | (idx >= n)][0])
        raise SampleIndexError(f"{where}: {noun} {bad} is out of range ({holder} has {n} {noun}s)")
    return np.where(idx < 0, idx + n, idx)
