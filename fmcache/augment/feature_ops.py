"""Feature-space counterparts ``T_a`` of input augmentations.

For a spatial map ``(..., H, W)`` at stride ``s`` (input pixels per map pixel):

- flip -> mirror the W axis;
- shift by ``(dy, dx)`` input pixels -> shift by ``(feature_offset(dy, s),
  feature_offset(dx, s))`` map pixels, zero fill, in the same order as the input op
  (flip first, then shift); an axis of one map pixel does not shift (that pixel sums up
  the input's whole extent, as after global pooling: a shift would zero the map);
- photometric -> identity (no feature-space counterpart; the sensitivity measures it).

Token maps ``(T, D)`` and vectors ``(D,)`` have no spatial axes: ``T_a`` is the identity.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from ._shift import shift_slices
from .draw import AugDraw
from .errors import AugmentationError, StrideError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _check_stride(stride: int) -> int:
    if isinstance(stride, (bool, np.bool_)) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise StrideError(f"stride must be a positive int, got {stride!r}")
    return int(stride)


def infer_stride(input_hw: tuple[int, int], map_hw: tuple[int, int]) -> int:
    """The stride of a freeze boundary: input pixels per map pixel.

    Parameters
    ----------
    input_hw, map_hw : (int, int)
        Height and width of the network input and of the feature map.

    Returns
    -------
    int
        ``input_H // map_H``.

    Raises
    ------
    StrideError
        If either ratio is not a whole number, or the two ratios differ.
    """
    try:
        (in_h, in_w), (map_h, map_w) = (int(v) for v in input_hw), (int(v) for v in map_hw)
    except (TypeError, ValueError):
        raise StrideError(
            f"input_hw and map_hw must be (H, W) pairs, got {input_hw!r} and {map_hw!r}"
        ) from None
    if min(in_h, in_w, map_h, map_w) < 1:
        raise StrideError(f"sizes must be positive, got input {input_hw} and map {map_hw}")
    if in_h % map_h or in_w % map_w or in_h // map_h != in_w // map_w:
        raise StrideError(
            f"input {in_h}x{in_w} is not a whole multiple of map {map_h}x{map_w} with one stride "
            f"(ratios {in_h / map_h:g} and {in_w / map_w:g}): flips and shifts move a map as its input "
            "image, which needs the map a whole stride smaller than the input"
        )
    return in_h // map_h


def feature_offset(shift_px: int, stride: int) -> int:
    """Map-pixel shift for an input shift: ``shift_px / stride`` rounded half away from zero.

    Exact integer arithmetic; odd-symmetric (``feature_offset(-d, s) == -feature_offset(d, s)``),
    so a shift and its opposite stay opposite, and a half-cell shift still moves the map.
    """
    stride = _check_stride(stride)
    magnitude = (2 * abs(int(shift_px)) + stride) // (2 * stride)
    return magnitude if shift_px >= 0 else -magnitude


def _check_out(x: ArrayT, out: ArrayT | None) -> None:
    if out is None:
        return
    if type(out) is not type(x) or tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise AugmentationError(
            f"out must be a {type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}, "
            f"got {type(out).__name__} {tuple(out.shape)} {out.dtype}"
        )
    if isinstance(x, np.ndarray):
        overlaps = np.may_share_memory(x, out)
    else:
        overlaps = x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    if overlaps:
        raise AugmentationError("out must not share memory with the input map", hint="pass a separate buffer")


def _flip_w(x: ArrayT) -> ArrayT:
    if isinstance(x, np.ndarray):
        return x[..., ::-1]  # a view: no copy before the single copy into the output
    return torch.flip(x, dims=(-1,))


def apply_feature(
    fmap: ArrayT,
    draw: AugDraw,
    stride: int,
    *,
    out: ArrayT | None = None,
    tokens: bool = False,
) -> ArrayT:
    """Apply ``T_a``, the feature-space counterpart of ``draw``, to a map or a batch.

    Parameters
    ----------
    fmap : numpy.ndarray or torch.Tensor
        A spatial map ``(C, H, W)``, a batch ``(N, C, H, W)`` (any ``ndim >= 3``; the last
        two axes are H and W), or a token map ``(T, D)`` / vector ``(D,)``.
    draw : AugDraw
        The augmentation; its photometric factors are ignored (identity).
    stride : int
        Input pixels per map pixel (:func:`infer_stride`).
    out : same type as ``fmap``, optional
        Preallocated result of the same shape and dtype; must not overlap ``fmap``.
    tokens : bool
        Treat ``fmap`` as token maps whatever its ``ndim`` (for a batch ``(N, T, D)``).
        ``ndim <= 2`` is always treated as tokens.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        A new array (or ``out``): ``out[..., i, j] = F[..., i - oy, j - ox]``, zero where
        that falls outside, with ``F`` the map flipped along W when ``draw.flip`` and
        ``oy, ox = feature_offset(draw.dy, stride), feature_offset(draw.dx, stride)``
        (0 along an axis of length 1).
        Token maps are copied unchanged.
    """
    stride = _check_stride(stride)
    if not isinstance(fmap, (np.ndarray, torch.Tensor)):
        raise AugmentationError(
            f"apply_feature takes a numpy array or torch tensor, got {type(fmap).__name__}"
        )
    if not isinstance(draw, AugDraw):
        raise AugmentationError(f"draw must be an AugDraw, got {type(draw).__name__}")
    _check_out(fmap, out)
    if tokens or fmap.ndim <= 2:
        if out is None:
            return fmap.copy() if isinstance(fmap, np.ndarray) else fmap.clone()
        out[...] = fmap
        return out

    src = _flip_w(fmap) if draw.flip else fmap
    if out is None:
        out = np.empty(fmap.shape, fmap.dtype) if isinstance(fmap, np.ndarray) else torch.empty_like(fmap)
    h, w = fmap.shape[-2], fmap.shape[-1]
    dst_h, src_h = shift_slices(h, feature_offset(draw.dy, stride) if h > 1 else 0)
    dst_w, src_w = shift_slices(w, feature_offset(draw.dx, stride) if w > 1 else 0)
    out[..., dst_h, dst_w] = src[..., src_h, src_w]
    # Zero only the uncovered border strips: rows outside dst_h, then columns outside dst_w.
    out[..., : dst_h.start, :] = 0
    out[..., dst_h.stop :, :] = 0
    out[..., dst_h, : dst_w.start] = 0
    out[..., dst_h, dst_w.stop :] = 0
    return out


__all__ = ["apply_feature", "feature_offset", "infer_stride"]
