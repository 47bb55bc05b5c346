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
    given = np.atleast_1d(np.asarray(indices if not isinstance(indices, range) else np.arange(
        indices.start, indices.stop, indices.step)))
    if given.size and given.dtype.kind not in "iu":
        flat = given.reshape(-1)
        odd = np.flatnonzero(flat != np.round(flat)) if given.dtype.kind == "f" else np.zeros(1, np.intp)
        raise SampleIndexError(f"{where}: {noun} indices must be integers, got "
                               f"{flat[odd[0] if len(odd) else 0].item()!r} ({given.dtype})")
    idx = given.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = int(idx[(idx < -n) | (idx >= n)][0])
        raise SampleIndexError(f"{where}: {noun} {bad} is out of range ({holder} has {n} {noun}s)")
    return np.where(idx < 0, idx + n, idx)
