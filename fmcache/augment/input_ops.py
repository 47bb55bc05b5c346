"""Input-space augmentation: what a training pipeline does to the image, in plain torch.

Used to compute the true augmented maps ``P(a(x))`` (sensitivity calibration, cached
variants). Shapes: ``(C, H, W)`` or ``(N, C, H, W)``, floating point; the result is a
new tensor of the same shape and dtype.

Order: **flip, then shift, then photometric**, as in the usual
``RandomCrop(padding) -> RandomHorizontalFlip -> ColorJitter`` recipe (crop and flip
commute up to the sign of ``dx``; we fix flip first, and the feature-space counterpart
uses the same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._shift import shift_slices
from .draw import AugDraw
from .errors import AugmentationError


def _shift_zero_fill(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    h, w = x.shape[-2], x.shape[-1]
    dst_h, src_h = shift_slices(h, dy)
    dst_w, src_w = shift_slices(w, dx)
    out = torch.zeros_like(x)
    out[..., dst_h, dst_w] = x[..., src_h, src_w]
    return out


def _photometric(x: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    y = x * brightness
    if contrast != 1.0:
        mean = y.mean(dim=(-3, -2, -1), keepdim=True)
        y = (y - mean) * contrast + mean
    return y


def _apply_one(x: torch.Tensor, draw: AugDraw, value_range: tuple[float, float] | None) -> torch.Tensor:
    y = torch.flip(x, dims=(-1,)) if draw.flip else x
    if draw.dy or draw.dx:
        y = _shift_zero_fill(y, draw.dy, draw.dx)
    if draw.is_photometric:
        y = _photometric(y, draw.brightness, draw.contrast)
    if value_range is not None:
        y = y.clamp(value_range[0], value_range[1])
    return y.clone() if y is x else y


def apply_input(
    x: torch.Tensor,
    draw: AugDraw | Sequence[AugDraw],
    *,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Apply an augmentation to input images.

    Parameters
    ----------
    x : torch.Tensor
        ``(C, H, W)`` or ``(N, C, H, W)`` floating-point images.
    draw : AugDraw or sequence of AugDraw
        One draw for the whole batch, or one per sample (length ``N``).
    value_range : (float, float), optional
        Clamp the result to this range (e.g. ``(0, 1)`` for raw pixels), as
        torchvision's ColorJitter does for float images. Default: no clamp.

    Returns
    -------
    torch.Tensor
        A new tensor, same shape and dtype:

        1. flip: ``f[..., j] = x[..., W-1-j]`` when ``draw.flip`` (else ``f = x``);
        2. shift: ``s[..., i, j] = f[..., i-dy, j-dx]``, zero where that falls outside
           (a random crop with zero padding ``p`` at offset ``(p-dy, p-dx)``);
        3. photometric, per sample: ``y = contrast * (brightness*s - m) + m`` with ``m`` the
           mean of ``brightness*s`` over (C, H, W). Brightness scales, contrast scales the
           deviation from the image mean (torchvision uses the grey-level mean instead).

    Notes
    -----
    The op works on whatever values it is given. Apply it to raw pixels and normalise
    afterwards, as torchvision pipelines do; on normalised inputs brightness would scale
    around the data set mean instead of around black.
    """
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AugmentationError(f"apply_input takes a floating (C, H, W) or (N, C, H, W) tensor, got {shape}")
    if value_range is not None and not value_range[0] <= value_range[1]:
        raise AugmentationError(f"value_range must be (low, high) with low <= high, got {value_range}")
    if isinstance(draw, AugDraw):
        return _apply_one(x, draw, value_range)
    draws = list(draw)
    if x.ndim != 4 or len(draws) != x.shape[0] or not all(isinstance(d, AugDraw) for d in draws):
        raise AugmentationError(
            f"per-sample draws need an (N, C, H, W) batch and N AugDraws; got shape {tuple(x.shape)} "
            f"and {len(draws)} draws"
        )
    return torch.stack([_apply_one(x[i], d, value_range) for i, d in enumerate(draws)])


__all__ = ["apply_input"]
