"""Cached variants: their canonical names, the default set, and the nearest one to a draw.

A variant is the geometric part (flip, dy, dx in input pixels) of an :class:`AugDraw`
whose true augmented map ``P(a_v(x))`` is cached for the sensitive channels. Its name is
a storage key, so every variant has exactly one name::

    identity            no flip, no shift (the base map itself)
    flip                flip only
    shift(+2,-2)        shift by dy=+2, dx=-2 (signed; zero is a bare 0)
    flip+shift(0,+2)    flip, then shift (the order of every draw)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from .draw import IDENTITY, AugDraw
from .errors import AugmentationError, StrideError, VariantNameError

IDENTITY_NAME = "identity"

_NAME_RE = re.compile(r"(?:(flip)|(?:(flip)\+)?shift\(([+-]?\d+),([+-]?\d+)\)|identity)")


def _signed(d: int) -> str:
    return "0" if d == 0 else f"{d:+d}"


def variant_name(draw: AugDraw) -> str:
    """Canonical name of the geometric part of ``draw`` (photometric factors are ignored)."""
    if not isinstance(draw, AugDraw):
        raise AugmentationError(f"variant_name takes an AugDraw, got {type(draw).__name__}")
    if draw.dy == 0 and draw.dx == 0:
        return "flip" if draw.flip else IDENTITY_NAME
    shift = f"shift({_signed(draw.dy)},{_signed(draw.dx)})"
    return "flip+" + shift if draw.flip else shift


def parse_variant(name: str) -> AugDraw:
    """The geometric draw a canonical variant name stands for; inverse of :func:`variant_name`.

    Raises
    ------
    VariantNameError
        If ``name`` does not parse or is not canonical (``shift(2,0)``, ``shift(0,0)``,
        ``shift(+02,0)`` are rejected: names are storage keys and must be unique).
    """
    if not isinstance(name, str):
        raise VariantNameError(f"variant name must be a str, got {type(name).__name__}")
    return _parse(name)


@lru_cache(maxsize=1024)  # called per sample by the Dataset; names come from a small set
def _parse(name: str) -> AugDraw:
    match = _NAME_RE.fullmatch(name)
    if match is None:
        raise VariantNameError(f"malformed variant name {name!r}")
    only_flip, flip_shift, dy, dx = match.groups()
    if only_flip:
        draw = AugDraw(flip=True, dy=0, dx=0)
    elif dy is not None:
        draw = AugDraw(flip=flip_shift is not None, dy=int(dy), dx=int(dx))
    else:
        draw = IDENTITY
    canonical = variant_name(draw)
    if canonical != name:
        raise VariantNameError(f"variant name {name!r} is not canonical; write {canonical!r}")
    return draw


def default_variants(max_shift: int, stride: int, *, flip: bool = True) -> tuple[AugDraw, ...]:
    """The default variants cached for sensitive channels.

    The horizontal flip (when ``flip``), plus four axis shifts ``(+-s, 0)``, ``(0, +-s)``
    with ``s`` the multiple of ``stride`` nearest to ``2 * max_shift / 3`` (ties to the
    smaller), at least ``stride``; no shift variants when ``s > max_shift``.

    Why ``2m/3``: with draws uniform on ``[-m, m]`` and variants at ``0`` and ``+-s``,
    equal nearest-variant cells (``s = 2m/3``) minimise both the largest and the mean
    residual shift per axis. Why a stride multiple: the residual then maps to whole map
    pixels exactly, so ``T`` of the residual is no worse than ``T_a`` on the base. With
    ``max_shift=4``: stride 1 -> 3, stride 2 -> 2, stride 4 -> 4, stride >= 8 -> flip only.

    Returns
    -------
    tuple of AugDraw
        In a fixed order: flip, shift(+s,0), shift(-s,0), shift(0,+s), shift(0,-s).
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise AugmentationError(f"max_shift must be an int >= 0, got {max_shift!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise StrideError(f"stride must be a positive int, got {stride!r}")
    variants = [AugDraw(flip=True, dy=0, dx=0)] if flip else []
    # nearest multiple of stride to 2m/3, exact: k = round(2m / (3 stride)), ties down
    k = max(1, (4 * max_shift + 3 * stride - 1) // (6 * stride))
    s = k * stride
    if s <= max_shift:
        variants += [AugDraw(False, s, 0), AugDraw(False, -s, 0), AugDraw(False, 0, s), AugDraw(False, 0, -s)]
    return tuple(variants)


def residual_draw(draw: AugDraw, variant: AugDraw) -> AugDraw:
    """The geometric draw ``r`` with ``r(variant(x)) == draw(x)`` (flip-then-shift order).

    Same flip: ``r`` is the shift ``draw - variant``. Different flip: ``r`` flips, and
    since ``flip(shift(dy, dx)(x)) == shift(dy, -dx)(flip(x))`` its shift is
    ``(draw.dy - variant.dy, draw.dx + variant.dx)``. Exact for zero-filled shifts.
    """
    flip = draw.flip != variant.flip
    vdx = -variant.dx if flip else variant.dx
    return AugDraw(flip=flip, dy=draw.dy - variant.dy, dx=draw.dx - vdx)


def nearest_variant(draw: AugDraw, names: Iterable[str]) -> tuple[str, AugDraw]:
    """The cached variant nearest to ``draw``, and the residual draw still to apply.

    Candidates are ``names`` plus ``identity`` (the base map is always available).
    Nearest: a candidate with the same flip as ``draw`` first (no residual flip), then
    the smallest squared Euclidean residual shift in input pixels, then ``identity``, then
    the smaller name: a total order, so the choice never depends on dict order.

    Returns
    -------
    (str, AugDraw)
        The chosen name (``"identity"`` for the base) and :func:`residual_draw` to it.
    """
    best: tuple[tuple[bool, int, bool, str], str, AugDraw] | None = None
    for name in {IDENTITY_NAME, *names}:
        residual = residual_draw(draw, parse_variant(name))
        key = (residual.flip, residual.dy**2 + residual.dx**2, name != IDENTITY_NAME, name)
        if best is None or key < best[0]:
            best = (key, name, residual)
    assert best is not None  # identity is always a candidate
    return best[1], best[2]


__all__ = [
    "IDENTITY_NAME",
    "default_variants",
    "nearest_variant",
    "parse_variant",
    "residual_draw",
    "variant_name",
]
