"""Per-channel augmentation sensitivity: pure functions, arrays in, scores out.

For a freeze boundary with prefix ``P``, the sensitivity of channel ``c`` is

    s_c = 1 - mean over (x, a) of cos( P(a(x))_c , T_a(P(x))_c )

with the cosine taken over the flattened H x W map of that channel (docs/augmentation.md).
``s_c`` is 0 when ``T_a`` reproduces the true augmented map up to scale, 1 when they are
orthogonal, and up to 2 when they are anti-correlated. Measuring is kept apart from
deciding: :func:`select_sensitive` turns scores into the sensitive tier.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .augment.errors import SensitivityError

#: Norm below which a channel's map counts as all zero (absolute, in the map's units).
DEFAULT_EPS = 1e-6
#: Leading rows converted to float64 at a time: bounds the temporary memory to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22
HISTOGRAM_BINS = 10


def _as_channel_rows(x: Any, tokens: bool, what: str) -> np.ndarray:
    """``(..., C, K)`` view: channels then the flattened positions of each channel."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise SensitivityError(f"{what} must be numeric, got dtype {arr.dtype}")
    if tokens:
        if arr.ndim < 2:
            raise SensitivityError(f"{what}: token maps need shape (..., T, D), got {arr.shape}")
        return np.moveaxis(arr, -1, -2)
    if arr.ndim < 3:
        raise SensitivityError(f"{what}: spatial maps need shape (..., C, H, W), got {arr.shape}")
    return arr.reshape(*arr.shape[:-2], arr.shape[-2] * arr.shape[-1])


def channel_cosine(a: Any, b: Any, *, eps: float = DEFAULT_EPS, tokens: bool = False) -> np.ndarray:
    """Cosine similarity per channel between two maps or batches of maps.

    Parameters
    ----------
    a, b : array_like
        Equal shapes ``(..., C, H, W)``; with ``tokens=True``, ``(..., T, D)`` (channels
        on the last axis, the cosine taken over T).
    eps : float
        A channel map whose L2 norm is below ``eps`` counts as all zero.
    tokens : bool
        Treat the inputs as token maps.

    Returns
    -------
    numpy.ndarray
        float64 of shape ``(..., C)``, in ``[-1, 1]``. Rules for ~zero maps: both ~0 ->
        1 (nothing changed, so sensitivity 0); exactly one ~0 -> 0.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise SensitivityError(f"eps must be a finite number >= 0, got {eps!r}")
    rows_a = _as_channel_rows(a, tokens, "a")
    rows_b = _as_channel_rows(b, tokens, "b")
    if rows_a.shape != rows_b.shape:
        raise SensitivityError(f"maps differ in shape: {np.shape(a)} vs {np.shape(b)}")
    lead, (n_channels, n_pos) = rows_a.shape[:-2], rows_a.shape[-2:]
    flat_a = rows_a.reshape(-1, n_channels, n_pos)
    flat_b = rows_b.reshape(-1, n_channels, n_pos)
    cos = np.empty(flat_a.shape[:2], dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_channels * n_pos))
    for start in range(0, len(flat_a), step):
        # float64 per chunk: exact enough for 1 - cos ~ 1e-7, without a float64 copy of it all
        ca = flat_a[start : start + step].astype(np.float64)
        cb = flat_b[start : start + step].astype(np.float64)
        dot = np.einsum("pck,pck->pc", ca, cb)
        norm_a = np.linalg.norm(ca, axis=-1)
        norm_b = np.linalg.norm(cb, axis=-1)
        zero_a, zero_b = norm_a < eps, norm_b < eps
        with np.errstate(divide="ignore", invalid="ignore"):
            chunk = dot / (norm_a * norm_b)
        chunk = np.where(zero_a | zero_b, np.where(zero_a & zero_b, 1.0, 0.0), chunk)
        cos[start : start + step] = chunk
    if not np.isfinite(cos).all():
        raise SensitivityError(
            "cosine is not finite for some channels",
            hint="the maps hold NaN/Inf or overflow float64; check the prefix's activations",
        )
    return np.clip(cos, -1.0, 1.0).reshape(*lead, n_channels)


def sensitivity_scores(
    aug_maps: Any, transformed_base_maps: Any, *, eps: float = DEFAULT_EPS, tokens: bool = False
) -> np.ndarray:
    """Sensitivity per channel: ``1 - mean cos(P(a(x))_c, T_a(P(x))_c)`` over all pairs.

    Parameters
    ----------
    aug_maps, transformed_base_maps : array_like
        ``(..., C, H, W)`` (or ``(..., T, D)`` with ``tokens=True``); every leading index
        is one (sample, draw) pair, matched position by position.
    eps, tokens
        As in :func:`channel_cosine`.

    Returns
    -------
    numpy.ndarray
        float64 ``(C,)`` in ``[0, 2]``.
    """
    cos = channel_cosine(aug_maps, transformed_base_maps, eps=eps, tokens=tokens)
    pairs = cos.reshape(-1, cos.shape[-1])
    return 1.0 - pairs.mean(axis=0)


class SensitivityAccumulator:
    """Streaming :func:`sensitivity_scores`: feed batches, read scores at the end.

    ``scores()`` after any split of the pairs into batches equals
    ``sensitivity_scores`` on all of them (up to float64 rounding); :meth:`merge` adds
    the pairs another accumulator saw (sharded builds).
    """

    def __init__(self, n_channels: int, *, eps: float = DEFAULT_EPS, tokens: bool = False) -> None:
        if isinstance(n_channels, bool) or not isinstance(n_channels, (int, np.integer)) or n_channels < 1:
            raise SensitivityError(f"n_channels must be a positive int, got {n_channels!r}")
        self.n_channels = int(n_channels)
        self.eps = eps
        self.tokens = tokens
        self._cos_sum = np.zeros(self.n_channels, dtype=np.float64)
        self._n_pairs = 0

    @property
    def n_pairs(self) -> int:
        """How many (sample, draw) pairs have been fed."""
        return self._n_pairs

    def update(self, aug_maps: Any, transformed_base_maps: Any) -> None:
        """Add a batch of pairs (shapes as in :func:`sensitivity_scores`)."""
        cos = channel_cosine(aug_maps, transformed_base_maps, eps=self.eps, tokens=self.tokens)
        if cos.shape[-1] != self.n_channels:
            raise SensitivityError(f"maps have {cos.shape[-1]} channels, the accumulator {self.n_channels}")
        pairs = cos.reshape(-1, self.n_channels)
        self._cos_sum += pairs.sum(axis=0)
        self._n_pairs += len(pairs)

    def merge(self, other: SensitivityAccumulator) -> None:
        """Add everything ``other`` has seen to this accumulator."""
        if not isinstance(other, SensitivityAccumulator) or other.n_channels != self.n_channels:
            raise SensitivityError("can only merge an accumulator with the same number of channels")
        self._cos_sum += other._cos_sum
        self._n_pairs += other._n_pairs

    def scores(self) -> np.ndarray:
        """float64 ``(C,)`` sensitivities of all pairs fed so far."""
        if self._n_pairs == 0:
            raise SensitivityError("no pairs fed yet", hint="call update() with at least one batch first")
        return 1.0 - self._cos_sum / self._n_pairs


def _check_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise SensitivityError(
            f"scores must be a non-empty 1-D array of finite numbers, got shape {arr.shape}"
        )
    return arr


def n_sensitive(rho: float, n_channels: int) -> int:
    """How many channels form the sensitive tier: ``ceil(rho * C)``.

    Ceil, so the tier never holds less than the asked fraction (it errs toward
    fidelity) and any ``rho > 0`` keeps at least one channel. The product is first
    rounded to 9 decimals so float noise (``0.1 * 30 = 3.0000000000000004``) does not
    add a channel.
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.floating)) or not 0.0 <= rho <= 1.0:
        raise SensitivityError(f"rho must be a number in [0, 1], got {rho!r}")
    return math.ceil(round(float(rho) * n_channels, 9))


def select_sensitive(scores: Any, rho: float) -> np.ndarray:
    """The sensitive tier: the ``n_sensitive(rho, C)`` highest-scoring channels.

    Parameters
    ----------
    scores : array_like
        ``(C,)`` finite sensitivities.
    rho : float
        Fraction in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Sorted ``intp`` channel indices. Ties are broken by the lower channel index, so the
        result depends on the scores alone.
    """
    arr = _check_scores(scores)
    k = n_sensitive(rho, arr.size)
    order = np.lexsort((np.arange(arr.size), -arr))  # by score descending, then index
    return np.sort(order[:k]).astype(np.intp)


def score_summary(scores: Any) -> dict[str, Any]:
    """Summary of a layer's sensitivities for ``fmcache inspect`` (JSON-serialisable).

    Returns
    -------
    dict
        ``n_channels``, ``min``, ``p10``, ``p50``, ``p90``, ``max``, ``mean`` (floats;
        linear-interpolated percentiles), ``above_1`` (channels with score > 1:
        anti-correlated on average) and ``histogram``: ``edges`` (11 floats on
        ``[0, 1]``) and ``counts`` (10 ints); bin ``i`` holds ``[i/10, (i+1)/10)``, the
        last also 1.0. Scores outside ``[0, 1]`` are counted in the end bins, so the
        counts add up to ``n_channels``.
    """
    arr = _check_scores(scores)
    p10, p50, p90 = (float(v) for v in np.percentile(arr, [10, 50, 90]))
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    # floor(score * bins), not np.histogram: its float edges put 0.3 in the [0.2, 0.3) bin
    bins = np.minimum(np.floor(np.clip(arr, 0.0, 1.0) * HISTOGRAM_BINS).astype(np.intp), HISTOGRAM_BINS - 1)
    counts = np.bincount(bins, minlength=HISTOGRAM_BINS)
    return {
        "n_channels": int(arr.size),
        "min": float(arr.min()),
        "p10": p10,
        "p50": p50,
        "p90": p90,
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "above_1": int(np.count_nonzero(arr > 1.0)),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


__all__ = [
    "DEFAULT_EPS",
    "HISTOGRAM_BINS",
    "SensitivityAccumulator",
    "channel_cosine",
    "n_sensitive",
    "score_summary",
    "select_sensitive",
    "sensitivity_scores",
]
