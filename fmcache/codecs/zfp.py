"""``zfp``: ZFP in fixed-accuracy, fixed-rate or fixed-precision mode, on the 2-D view.

ZFP and SZ3 compress a sample's (prod(shape[:-1]), shape[-1]) view about twice as well
as its 3-D shape (measurements.md), so both codecs see that view.

Byte layout of the payload (after the shape header of :mod:`fmcache.codecs.base`)::

    u8 mode | u8 flags | body
    mode 1 (zfp):  u32 crc32 of mode, flags and stream (little-endian) | zfpy stream
    mode 0 (raw):  the float32 values, little-endian, C order

``flags`` bit 0 says the input was non-negative: decoded values are then clamped at 0,
which never increases the error. zfp's decoder is not hardened against damaged input
(a flipped byte can crash the process), so the stream's CRC-32 is checked before it is
handed to zfp. Mode 0 (exact) is used when the stream would not be smaller than the
raw values (tiny maps), and by accuracy mode for samples where ZFP cannot honour the
tolerance (see :class:`Zfp`).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import hdf5plugin
import numpy as np
import zfpy

from ..errors import CodecSpecError, EncodeError
from .base import Codec, Hdf5Field, as_2d_view, check_positive
from .registry import register_codec

MODE_RAW = 0
MODE_STREAM = 1
FLAG_NONNEG = 1
_CRC = struct.Struct("<I")

#: ZFP's block transform can overflow float32 near its maximum: refuse |x| above this.
MAX_ABS = 2.0**100
#: Accuracy mode honours ``tol`` (measured, with 4 bits of margin) when
#: ``tol >= 2**-ACCURACY_HEADROOM_BITS * max|x|`` and ``tol >= MIN_FAST_TOLERANCE``;
#: outside that the encoder checks the decoded sample and stores raw values if needed.
ACCURACY_HEADROOM_BITS = 20
MIN_FAST_TOLERANCE = 2.0**-80


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
    if mode == "rate" and number > 32:
        raise CodecSpecError(f"codec {codec_id!r}: rate={value!r} must be in (0, 32] bits per value")
    return mode, float(number)


def _span(x: np.ndarray) -> tuple[float, float]:
    """(min, max|x|) of a finite array."""
    lo, hi = float(x.min()), float(x.max())
    return lo, max(-lo, hi)


def view_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of :func:`~fmcache.codecs.base.as_2d_view` for a sample shape."""
    return (math.prod(sample_shape[:-1]), sample_shape[-1])


def frame(x: np.ndarray, nonneg: bool, stream: bytes | None) -> bytes:
    """The payload (module docstring): ``stream`` with its CRC-32, or ``x`` raw when
    ``stream`` is None or not smaller than the raw values (tiny maps)."""
    flags = FLAG_NONNEG if nonneg else 0
    if stream is None or _CRC.size + len(stream) >= x.nbytes:
        return bytes([MODE_RAW, flags]) + x.astype("<f4", copy=False).tobytes()
    head = bytes([MODE_STREAM, flags])
    return head + _CRC.pack(zlib.crc32(stream, zlib.crc32(head))) + stream


def unframe_into(payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None,
                 decode_stream: Callable[[memoryview], np.ndarray]) -> np.ndarray:
    """Decode a :func:`frame` payload; ``decode_stream`` turns a CRC-checked stream into
    the 2-D view. ValueError if the payload is malformed or damaged."""
    if len(payload) < 2:
        raise ValueError(f"payload of {len(payload)} bytes has no mode and flags")
    mode, flags, body = payload[0], payload[1], payload[2:]
    if mode == MODE_RAW:
        n_values = math.prod(shape)
        if len(body) != 4 * n_values:
            raise ValueError(f"raw body holds {len(body)} bytes, shape {shape} needs {4 * n_values}")
        decoded = np.frombuffer(body, dtype="<f4")
    elif mode == MODE_STREAM:
        crc = zlib.crc32(body[_CRC.size:], zlib.crc32(payload[:2]))
        if len(body) < _CRC.size or crc != _CRC.unpack_from(body)[0]:
            raise ValueError("compressed stream fails its CRC-32 (damaged record)")
        decoded = decode_stream(body[_CRC.size:])
        expected = view_shape(shape)
        if decoded.dtype != np.float32 or decoded.shape != expected:
            raise ValueError(f"stream holds {decoded.dtype} {decoded.shape}, expected float32 {expected}")
    else:
        raise ValueError(f"unknown mode byte {mode}")
    result = np.empty(shape, dtype=np.float32) if out is None else out
    result[...] = decoded.reshape(shape)
    if flags & FLAG_NONNEG:
        np.maximum(result, 0, out=result)
    return result


def clamp_nonneg_rows(batch: np.ndarray, nonneg: np.ndarray) -> np.ndarray:
    """Clamp at 0 the samples of ``batch`` whose ``nonneg`` flag is set (HDF5 face)."""
    rows = np.asarray(nonneg).astype(bool).reshape(-1)
    if rows.any():
        batch[rows] = np.maximum(batch[rows], 0)
    return batch


@register_codec
class Zfp(Codec):
    """ZFP on the 2-D view; exactly one of ``accuracy``, ``rate``, ``precision``.

    Parameters
    ----------
    accuracy : absolute error tolerance (the default mode, ``accuracy=0.01``).
    rate : bits per value (0 < rate <= 32); fixed size, no error bound.
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
    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        if self.mode == "accuracy":
            zfp_filter = hdf5plugin.Zfp(accuracy=float(self.value))
        elif self.mode == "rate":
            zfp_filter = hdf5plugin.Zfp(rate=float(self.value))
        else:
            zfp_filter = hdf5plugin.Zfp(precision=int(self.value))
        return [
            Hdf5Field("values", np.dtype("<f4"), view_shape(sample_shape), dict(zfp_filter),
                      per_sample_chunks=True, attrs={"sample_shape": list(sample_shape)}),
            Hdf5Field("nonneg", np.dtype("u1"), ()),
        ]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        sample_shape = tuple(np.shape(batch)[1:])
        values = np.empty((n, *view_shape(sample_shape)), dtype=np.float32)
        nonneg = np.zeros(n, dtype=np.uint8)
        for i, sample in enumerate(batch):
            x = self._validate(sample)
            lo, max_abs = _span(x)
            self._check_magnitude(max_abs)
            if self.mode == "accuracy" and not self._accuracy_fast_path(max_abs):
                raise EncodeError(
                    f"codec {self.codec_id!r}: accuracy={self.value} is too tight for sample {i} "
                    f"(|x| up to {max_abs:.6g}) in the HDF5 ZFP filter",
                    hint=f"use accuracy >= {max(max_abs * 2.0**-ACCURACY_HEADROOM_BITS, MIN_FAST_TOLERANCE):.3g}, "
                         "or the LMDB backend, which stores such samples raw",
                )
            values[i] = as_2d_view(x)
            nonneg[i] = lo >= 0
        return {"values": values, "nonneg": nonneg}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        values = np.asarray(fields["values"], dtype=np.float32)
        out = np.array(values.reshape(len(values), *sample_shape), dtype=np.float32)
        return clamp_nonneg_rows(out, fields["nonneg"])
