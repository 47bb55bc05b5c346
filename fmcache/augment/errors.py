"""Errors raised by augmentation, SACA composition and sensitivity analysis.

The classes now live in the central error tree, ``fmcache/errors.py``, under
:class:`~fmcache.errors.FmcacheError`; this module re-exports them so that
``from fmcache.augment.errors import ...`` keeps working::

    FmcacheError
    └── AugmentationError (ValueError)    bad draw, family config, shape or mode
        ├── StrideError                   input size not a whole multiple of the map's
        ├── VariantNameError              a variant name that is not canonical
        └── SensitivityError              mismatched maps, rho out of range, no data
"""

from __future__ import annotations

from ..errors import AugmentationError, SensitivityError, StrideError, VariantNameError

__all__ = ["AugmentationError", "SensitivityError", "StrideError", "VariantNameError"]
