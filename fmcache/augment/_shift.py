"""Index arithmetic of a zero-filled translation, shared by the input and feature ops."""

from __future__ import annotations


def shift_slices(n: int, d: int) -> tuple[slice, slice]:
    """Destination and source slices of ``out[i] = src[i - d]`` along an axis of length ``n``.

    Positions whose source falls outside ``[0, n)`` are not covered by the destination
    slice; the caller zero-fills them. ``|d| >= n`` gives two empty slices.
    """
    if d >= 0:
        return slice(min(d, n), n), slice(0, max(n - d, 0))
    return slice(0, max(n + d, 0)), slice(min(-d, n), n)
