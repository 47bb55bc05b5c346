"""Feature-space augmentation of a whole batch at once: what the Dataset runs.

The per-sample functions (:func:`~fmcache.augment.apply_feature`,
:func:`~fmcache.augment.saca_compose`) are the definition; this module computes the same
numbers, bit for bit, for ``B`` samples with a handful of array operations instead of
``B`` times a dozen: the batch is zero-padded once, every row's flip is applied in one
pass, and every row's shifted window is gathered in one fancy-indexing copy. Python
work per batch is then independent of the batch size (tests/test_augment_batch.py checks
the equality against the per-sample path on random draws).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .draw import AugDraw, DrawBatch
from .feature_ops import _check_stride
from .variants import nearest_variant

if TYPE_CHECKING:
    from ..tiers import TierPlan


def feature_offsets(shift_px: np.ndarray, stride: int) -> np.ndarray:
    """:func:`~fmcache.augment.feature_offset` of every entry (int64 array)."""
    stride = _check_stride(stride)
    d = np.asarray(shift_px, dtype=np.int64)
    magnitude = (2 * np.abs(d) + stride) // (2 * stride)
    return np.where(d >= 0, magnitude, -magnitude)


def shift_flip_batch(x: np.ndarray, flip: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """A new float array: row ``b`` of ``x`` (``(B, C, H, W)``) flipped along W when
    ``flip[b]``, then shifted by ``(oy[b], ox[b])`` map pixels with zero fill, i.e.
    ``out[b, :, i, j] = F_b[:, i - oy[b], j - ox[b]]`` (zero outside). Any ``ndim >= 3``:
    the last two axes are H and W.

    The result starts zeroed, then one slice copy per row (its flip folded into the
    column slice): a few microseconds of Python per row, against a gather through a 6-D
    window view, which numpy runs element by element (the ``feature`` rows of
    tools/bench_saca_items.py, docs/benchmarks.md)."""
    if x.ndim != 4:
        return shift_flip_batch(x.reshape(len(x), -1, *x.shape[-2:]), flip, oy, ox).reshape(x.shape)
    n, _, h, w = x.shape
    flips = np.asarray(flip, dtype=bool).tolist()
    # an axis of one pixel does not shift (apply_feature: a pooled map would be zeroed)
    oys = np.clip(np.asarray(oy, dtype=np.int64), -h, h).tolist() if h > 1 else [0] * n
    oxs = np.clip(np.asarray(ox, dtype=np.int64), -w, w).tolist() if w > 1 else [0] * n
    # zero-filled once, then one slice copy per row: the strips a shift uncovers are
    # already zero (np.zeros: calloc, which skips the fill where the memory comes fresh
    # from the kernel; zeros_like always writes them: 40 against 31 us for a 1 MiB batch
    # and its copies in a one-off timing)
    out = np.zeros(x.shape, dtype=x.dtype)
    for b in range(n):
        dy, dx = oys[b], oxs[b]
        if dy == 0 and dx == 0:
            out[b] = x[b, :, :, ::-1] if flips[b] else x[b]
            continue
        if abs(dy) >= h or abs(dx) >= w:  # shifted out of the map entirely: zeros
            continue
        # rows i of the output take source rows i - dy, columns j source columns j - dx
        ys, yd = _SLICES[h][dy]
        xs, xd = _SLICES[w][dx]
        if flips[b]:  # column j of the flipped map is column w - 1 - j of the row
            xs = slice(w - 1 - xs.start, (w - 1 - xs.stop) if xs.stop < w else None, -1)
        out[b, :, yd, xd] = x[b, :, ys, xs]
    return out


class _ShiftSlices(dict):  # type: ignore[type-arg]
    """n -> {d: (source slice, destination slice)} of a shift by ``d`` along an axis of
    ``n`` (``|d| <= n``), made on first use."""

    def __missing__(self, n: int) -> dict[int, tuple[slice, slice]]:
        table = self[n] = {d: ((slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d)))
                           for d in range(-n, n + 1)}
        return table


_SLICES = _ShiftSlices()


def feature_batch(base: np.ndarray, draws: DrawBatch, stride: int, *, tokens: bool = False) -> np.ndarray:
    """``T_a`` of each row of ``base`` under its own draw (``feature`` mode, batched).

    ``base`` is ``(B, C, H, W)``; token batches ``(B, T, D)`` (``tokens=True`` or
    ``ndim <= 3`` with ``tokens``) are copied unchanged, as ``T`` is the identity there.
    """
    if tokens:
        return base.copy()
    return shift_flip_batch(base, draws.flip, feature_offsets(draws.dy, stride), feature_offsets(draws.dx, stride))


@lru_cache(maxsize=4096)
def _nearest(flip: bool, dy: int, dx: int, names: frozenset[str]) -> tuple[str, bool, int, int]:
    name, residual = nearest_variant(AugDraw(flip=flip, dy=dy, dx=dx), names)
    return name, residual.flip, residual.dy, residual.dx


def nearest_batch(draws: DrawBatch, names: Iterable[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the nearest cached variant's name (``"identity"`` for the base) and the
    residual draw's flip, dy, dx (input pixels), as :func:`nearest_variant` decides."""
    key = frozenset(names)
    picked = [_nearest(bool(f), int(dy), int(dx), key) for f, dy, dx in zip(draws.flip, draws.dy, draws.dx)]
    chosen = [p[0] for p in picked]
    rflip = np.fromiter((p[1] for p in picked), dtype=bool, count=len(picked))
    rdy = np.fromiter((p[2] for p in picked), dtype=np.int64, count=len(picked))
    rdx = np.fromiter((p[3] for p in picked), dtype=np.int64, count=len(picked))
    return chosen, rflip, rdy, rdx


def saca_batch(base: np.ndarray, draws: DrawBatch, stride: int, sensitive: np.ndarray, source: np.ndarray,
               residual: tuple[np.ndarray, np.ndarray, np.ndarray], *, tokens: bool = False) -> np.ndarray:
    """SACA for a batch: every channel ``T_a(base)``, then the sensitive channels replaced
    by ``T_r(source)``.

    ``source`` holds, per row, the sensitive channels of the nearest cached variant (or of
    the base where the nearest is ``identity``): ``(B, C_s, H, W)``, or ``(B, T, C_s)``
    for tokens, where every ``T`` is the identity. ``residual`` is ``(flip, dy, dx)`` per
    row from :func:`nearest_batch`.
    """
    out = feature_batch(base, draws, stride, tokens=tokens)
    if len(sensitive) == 0:
        return out
    if tokens:
        out[:, :, sensitive] = source
        return out
    rflip, rdy, rdx = residual
    out[:, sensitive] = shift_flip_batch(source, rflip, feature_offsets(rdy, stride), feature_offsets(rdx, stride))
    return out




def saca_tiers(parts: Mapping[str, np.ndarray], plan: TierPlan, draws: DrawBatch, stride: int, source: np.ndarray,
               residual: tuple[np.ndarray, np.ndarray, np.ndarray], *, sensitive_tier: str = "sensitive",
               tokens: bool = False) -> np.ndarray:
    """:func:`saca_batch` of ``plan.merge(parts)``, computed tier by tier: every tier but
    ``sensitive_tier`` shifted by ``T_a``, ``source`` (that tier's channels, per row from
    the chosen variant or the base) by ``T_r``, then one merge into the result.

    The same numbers bit for bit (every transform acts on each channel alone), with one
    pass less over the batch than merging first: the merged base is never built and the
    sensitive channels are not shifted twice (tests/test_augment_batch.py)."""
    shifted: dict[str, np.ndarray] = {}
    for tier in plan.tiers:
        if tier.name != sensitive_tier:  # T is the identity on tokens; merge copies them
            part = parts[tier.name]
            shifted[tier.name] = part if tokens else feature_batch(part, draws, stride)
    if tokens:
        shifted[sensitive_tier] = source
    else:
        rflip, rdy, rdx = residual
        shifted[sensitive_tier] = shift_flip_batch(source, rflip, feature_offsets(rdy, stride),
                                                   feature_offsets(rdx, stride))
    return plan.merge(shifted, batched=True)


__all__ = ["feature_batch", "feature_offsets", "nearest_batch", "saca_batch", "saca_tiers", "shift_flip_batch"]
