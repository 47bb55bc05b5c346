"""``zfp``: ZFP in fixed-accuracy, fixed-rate or fixed-precision mode, on the 2-D view.

Byte layout of the payload: :mod:`fmcache.codecs.bounded`'s (``u8 mode | u8 flags |
body``; mode 1 holds ``u32 crc32 | zfpy stream``, mode 0 the raw float32 values), with
its non-negative clamp; zfp's decoder is not hardened against damaged input (a flipped
byte can crash the process), hence the CRC-32 checked before the stream reaches it.
Mode 0 (exact) is used when the stream would not be smaller than the raw values (tiny
maps), and by accuracy mode for samples where ZFP cannot honour the tolerance (see
:class:`Zfp`). The HDF5 face is :class:`~fmcache.codecs.bounded.BoundedCodec`'s.
"""

from __future__ import annotations

from typing import Any

import hdf5plugin
import numpy as np
import zfpy

from ..errors import CodecSpecError, EncodeError
from .base import as_2d_view, check_positive
from .bounded import BoundedCodec, frame, unframe_into
from .registry import register_codec

#: ZFP's block transform can overflow float32 near its maximum: refuse |x| above this.
MAX_ABS = 2.0**100
#: Accuracy mode honours ``tol`` (measured, with 4 bits of margin) when
#: ``tol >= 2**-ACCURACY_HEADROOM_BITS * max|x|`` and ``tol >= MIN_FAST_TOLERANCE``;
#: outside that the encoder checks the decoded sample and stores raw values if needed.
ACCURACY_HEADROOM_BITS = 20
MIN_FAST_TOLERANCE = 2.0**-80


#: The smallest ``rate`` accepted. zfpy's fixed-rate encoder overran its buffer (heap
#: corruption, a segfault or glibc abort later) at 0.5 bits per value and below on the 2-D
#: view (8 bits for a 4x4 block, less than its header); 0.75 and 1 ran clean on every
#: shape tried. One whole bit leaves a margin.
MIN_RATE = 1.0


def _check_mode(codec_id: str, accuracy: Any, rate: Any, precision: Any) -> tuple[str, float | int]:
    given = {name: value for name, value in
             (("accuracy", accuracy), ("rate", rate), ("precision", precision)) if value is not None}
    if len(given) != 1:
        raise CodecSpecError(f"codec {codec_id!r} takes exactly one of accuracy=, rate=, precision=; "
                             f"got {', '.join(given) or 'none'}")
    (mode, value), = given.items()
    if mode == "precision":
        precision = check_positive(codec_id, "precision", value, integer=True)
        if precision > 32:
            raise CodecSpecError(f"codec {codec_id!r}: precision={value!r} must be 1..32 bit planes (float32)")
        return mode, int(precision)
    number = check_positive(codec_id, mode, value)
    if mode == "rate" and not MIN_RATE <= number <= 32:
        raise CodecSpecError(f"codec {codec_id!r}: rate={value!r} must be in [{MIN_RATE:g}, 32] bits per value",
                             hint="below one bit per value ZFP's fixed-rate streams overran their buffer "
                                  "(memory corruption); for smaller records use accuracy= or sz3")
    return mode, float(number)


def _span(x: np.ndarray) -> tuple[float, float]:
    """(min, max|x|) of a finite array."""
    lo, hi = float(x.min()), float(x.max())
    return lo, max(-lo, hi)


@register_codec
class Zfp(BoundedCodec):
    """ZFP on the 2-D view; exactly one of ``accuracy``, ``rate``, ``precision``.

    Parameters
    ----------
    accuracy : absolute error tolerance (the default mode, ``accuracy=0.01``).
    rate : bits per value (1 <= rate <= 32); fixed size, no error bound.
    precision : bit planes kept per block (1..32); no absolute error bound.

    Error contract
    --------------
    accuracy mode: ``max|x - x'| <= accuracy``. ZFP honours the tolerance when
    ``accuracy >= 2**-20 * max|x|`` (float32 has 24 significant bits; ZFP's block
    floating point needs a few) and ``accuracy >= 2**-80``; for samples outside that the
    encoder decodes its own output, and stores the raw float32 values (exact, ratio 1)
    if the bound does not hold.

    rate / precision modes: ZFP guarantees the size (``rate`` bits per value) or the
    number of bit planes, not an error. The error scales with the magnitude of each
    4x4 block; the tests check ``max|x - x'| <= 2**(8 - precision) * max|x|`` and
    ``<= 2**(6 - rate) * max|x|`` for rate >= 8, on random and post-ReLU maps: a
    regression check, not a promise.

    All modes: when the input is non-negative the decoded values are clamped at 0
    (ZFP's undershoot near zeros removed; the error can only shrink). Exact zeros are
    not kept in general (ZFP keeps 19-84 % of them). NaN/Inf raise EncodeError, as does
    ``|x| > 2**100`` (ZFP's transform can overflow float32 near its maximum).

    HDF5: dataset ``values`` (float32, per-sample shape = the 2-D view, one chunk per
    sample) with hdf5plugin's ZFP filter in the same mode, attribute ``sample_shape``;
    dataset ``nonneg`` (uint8 per sample) for the clamp. The filter cannot fall back to
    raw values, so in accuracy mode a sample outside the fast-path condition above
    raises EncodeError there.
    """

    codec_id = "zfp"

    def __init__(self, accuracy: float | None = None, rate: float | None = None,
                 precision: int | None = None) -> None:
        if accuracy is None and rate is None and precision is None:
            accuracy = 0.01
        self.mode, self.value = _check_mode(self.codec_id, accuracy, rate, precision)

    def params(self) -> dict[str, Any]:
        return {self.mode: self.value}

    # ---- helpers ----------------------------------------------------------------------
    def _zfpy_kwargs(self) -> dict[str, Any]:
        return {{"accuracy": "tolerance"}.get(self.mode, self.mode): self.value}

    def _check_magnitude(self, max_abs: float) -> None:
        if max_abs > MAX_ABS:
            raise EncodeError(f"codec {self.codec_id!r}: |x| up to {max_abs:.6g} exceeds {MAX_ABS:.6g}, "
                              "where ZFP's transform can overflow float32",
                              hint="use bf16 or a lossless codec for such values")

    def _accuracy_fast_path(self, max_abs: float) -> bool:
        """True when ZFP is known to honour the tolerance for this magnitude."""
        return self.value >= max(max_abs * 2.0**-ACCURACY_HEADROOM_BITS, MIN_FAST_TOLERANCE)

    # ---- bytes face -------------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> bytes:
        lo, max_abs = _span(x)
        self._check_magnitude(max_abs)
        view = as_2d_view(x)
        stream: bytes | None = zfpy.compress_numpy(view, **self._zfpy_kwargs())
        if self.mode == "accuracy" and not self._accuracy_fast_path(max_abs):
            decoded = zfpy.decompress_numpy(stream)
            if lo >= 0:
                np.maximum(decoded, 0, out=decoded)
            if not float(np.max(np.abs(decoded.astype(np.float64) - view))) <= self.value:
                stream = None  # ZFP missed the tolerance: store the values raw
        return frame(x, lo >= 0, stream)

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return unframe_into(payload, shape, out, zfpy.decompress_numpy)

    # ---- HDF5 face --------------------------------------------------------------------
    def _hdf5_filter(self) -> dict[str, Any]:
        if self.mode == "accuracy":
            zfp_filter = hdf5plugin.Zfp(accuracy=float(self.value))
        elif self.mode == "rate":
            zfp_filter = hdf5plugin.Zfp(rate=float(self.value))
        else:
            zfp_filter = hdf5plugin.Zfp(precision=int(self.value))
        return dict(zfp_filter)

    def _hdf5_sample_nonneg(self, index: int, x: np.ndarray) -> bool:
        lo, max_abs = _span(x)
        self._check_magnitude(max_abs)
        if self.mode == "accuracy" and not self._accuracy_fast_path(max_abs):
            raise EncodeError(
                f"codec {self.codec_id!r}: accuracy={self.value} is too tight for a map with "
                f"|x| up to {max_abs:.6g} in the HDF5 ZFP filter",
                hint=f"use accuracy >= {max(max_abs * 2.0**-ACCURACY_HEADROOM_BITS, MIN_FAST_TOLERANCE):.3g}, "
                     "or the LMDB backend, which stores such samples raw",
            )
        return lo >= 0
