"""Errors raised by augmentation, SACA composition and sensitivity analysis.

They hang off the package's root error like the rest of the tree (``fmcache/errors.py``)
and derive from :class:`ValueError`, because every one of them is bad input::

    FmcacheError
    └── AugmentationError (ValueError)    bad draw, family config, shape or mode
        ├── StrideError                   input size not a whole multiple of the map's
        ├── VariantNameError              a variant name that is not canonical
        └── SensitivityError              mismatched maps, rho out of range, no data
"""

from __future__ import annotations

from ..errors import FmcacheError


class AugmentationError(FmcacheError, ValueError):
    """Bad input to an augmentation function (draw, family, shapes, mode)."""

    default_hint = "see docs/augmentation.md for the conventions (shapes, units, order)"


class StrideError(AugmentationError):
    """The stride of a freeze boundary is not a positive whole number."""

    default_hint = (
        "the input height and width must be the same whole multiple of the map's "
        "(stride = input_H / map_H = input_W / map_W)"
    )


class VariantNameError(AugmentationError):
    """A variant name that does not parse, or is not in canonical form."""

    default_hint = (
        "variant names read identity | flip | shift(DY,DX) | flip+shift(DY,DX) with signed "
        "non-zero offsets and a bare 0, e.g. 'flip+shift(0,+2)'; build them with variant_name()"
    )


class SensitivityError(AugmentationError):
    """Bad input to the sensitivity measurement or channel selection."""

    default_hint = "pass maps of equal shape (..., C, H, W) and rho in [0, 1]; see docs/augmentation.md"


__all__ = ["AugmentationError", "SensitivityError", "StrideError", "VariantNameError"]
