"""SACA composition: one sample's augmented map from its cached base and variants.

Bulk channels get ``T_a(base)``. Sensitive channels get the cached variant nearest to
``a`` (:func:`~fmcache.augment.variants.nearest_variant`; the base itself counts as the
``identity`` variant), then ``T`` of the residual draw. Pure functions of numpy arrays:
the Dataset calls them in worker processes, with ``out=`` to reuse a buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from .draw import AugDraw
from .errors import AugmentationError
from .feature_ops import apply_feature
from .variants import nearest_variant, parse_variant

AugmentMode = Literal["none", "feature", "saca"]
#: ``none``: the cached map as is; ``feature``: ``T_a`` on every channel; ``saca``: SACA.
AUGMENT_MODES: tuple[str, ...] = ("none", "feature", "saca")


def _check_base(base: np.ndarray) -> None:
    if not isinstance(base, np.ndarray) or base.ndim not in (2, 3):
        what = base.shape if isinstance(base, np.ndarray) else type(base).__name__
        raise AugmentationError(f"base must be one sample's map, (C, H, W) or (T, D) numpy array, got {what}")


def _check_sensitive(sensitive: object, n_channels: int) -> np.ndarray:
    idx = np.asarray(sensitive)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise AugmentationError(
            f"sensitive must be a 1-D array of channel indices, got {idx.dtype} {idx.shape}"
        )
    idx = idx.astype(np.intp, copy=False)
    if idx.size and (idx[0] < 0 or idx[-1] >= n_channels or np.any(np.diff(idx) <= 0)):
        raise AugmentationError(
            f"sensitive must be strictly increasing channel indices in [0, {n_channels}), got {idx.tolist()}",
            hint="use the tier plan's indices, e.g. from fmcache.sensitivity.select_sensitive",
        )
    return idx


def _check_variants(variants: Mapping[str, np.ndarray], expected: tuple[int, ...]) -> None:
    if not isinstance(variants, Mapping):
        raise AugmentationError(f"variants must be a mapping name -> array, got {type(variants).__name__}")
    for name, array in variants.items():
        parse_variant(name)
        if not isinstance(array, np.ndarray) or array.shape != expected:
            shape = array.shape if isinstance(array, np.ndarray) else type(array).__name__
            raise AugmentationError(
                f"variant {name!r} has shape {shape}; the sensitive channels of this map need {expected}"
            )


def saca_compose(
    base: np.ndarray,
    draw: AugDraw,
    stride: int,
    sensitive: np.ndarray,
    variants: Mapping[str, np.ndarray],
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Compose one sample's SACA-augmented map.

    Parameters
    ----------
    base : numpy.ndarray
        The cached base map ``P(x)``: spatial ``(C, H, W)`` or tokens ``(T, D)``
        (channels on the last axis).
    draw : AugDraw
        This sample's augmentation (photometric factors are identity in feature space).
    stride : int
        Input pixels per map pixel.
    sensitive : array of int
        Sorted, unique channel indices of the sensitive tier (may be empty).
    variants : mapping of str to numpy.ndarray
        Canonical variant name -> ``P(a_v(x))`` of the sensitive channels only:
        ``(C_s, H, W)``, or ``(T, C_s)`` for tokens. May be empty.
    out : numpy.ndarray, optional
        Result buffer of ``base``'s shape and dtype, not overlapping ``base``.

    Returns
    -------
    numpy.ndarray
        A new array (or ``out``): bulk channels ``T_a(base)``; sensitive channels
        ``T_r(V)`` with ``(V, r)`` the nearest variant and residual draw. For token maps
        every ``T`` is the identity, so sensitive channels are the nearest variant as is.
    """
    _check_base(base)
    tokens = base.ndim == 2
    n_channels = base.shape[-1] if tokens else base.shape[0]
    idx = _check_sensitive(sensitive, n_channels)
    expected = (base.shape[0], idx.size) if tokens else (idx.size, *base.shape[1:])
    _check_variants(variants, expected)

    result = apply_feature(base, draw, stride, out=out)
    if idx.size == 0:
        return result
    name, residual = nearest_variant(draw, variants)
    if tokens:
        if name in variants:  # identity without a stored entry: already base, nothing to do
            result[:, idx] = variants[name]
        return result
    source = variants[name] if name in variants else base[idx]
    result[idx] = apply_feature(source, residual, stride)
    return result


def augment_map(
    mode: AugmentMode | str,
    base: np.ndarray,
    draw: AugDraw | None,
    stride: int,
    sensitive: np.ndarray | None = None,
    variants: Mapping[str, np.ndarray] | None = None,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One sample's training map under an augmentation mode.

    Parameters
    ----------
    mode : {"none", "feature", "saca"}
        ``none``: ``base`` unchanged (the no-augmentation baseline; ``draw`` may be None);
        ``feature``: ``T_a`` on every channel (the feature-space baseline);
        ``saca``: :func:`saca_compose`.
    base, draw, stride, out
        As in :func:`saca_compose`.
    sensitive, variants
        Needed by ``saca`` only (``variants`` None means none cached); ignored otherwise.

    Returns
    -------
    numpy.ndarray
        Always a new array (or ``out``), never ``base`` itself.
    """
    if mode not in AUGMENT_MODES:
        raise AugmentationError(
            f"unknown augmentation mode {mode!r}; choose one of {', '.join(AUGMENT_MODES)}"
        )
    _check_base(base)
    if mode == "none":
        if out is None:
            return base.copy()
        if out.shape != base.shape or out.dtype != base.dtype:
            raise AugmentationError(
                f"out must have shape {base.shape} and dtype {base.dtype}, got {out.shape} {out.dtype}"
            )
        out[...] = base
        return out
    if not isinstance(draw, AugDraw):
        raise AugmentationError(f"mode {mode!r} needs an AugDraw, got {type(draw).__name__}")
    if mode == "feature":
        return apply_feature(base, draw, stride, out=out)
    if sensitive is None:
        raise AugmentationError(
            "mode 'saca' needs the sensitive channel indices",
            hint="pass sensitive= from the cache's tier plan",
        )
    return saca_compose(base, draw, stride, sensitive, variants if variants is not None else {}, out=out)


__all__ = ["AUGMENT_MODES", "AugmentMode", "augment_map", "saca_compose"]
