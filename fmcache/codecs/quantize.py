"""Per-channel affine quantisation: ``int8`` and ``int4``, then an optional blosc2 stage.

Per sample and channel c (axis :func:`~fmcache.codecs.base.channel_axis`)::

    lo_c = min(x_c)   hi_c = max(x_c)   scale_c = (hi_c - lo_c) / (2**bits - 1)
    q = round((x - lo_c) / scale_c)     (q = 0 where scale_c == 0)
    x' = lo_c + q * scale_c             (float32; q == 0 gives lo_c exactly)

Byte layout of the payload (after the shape header of :mod:`fmcache.codecs.base`)::

    C x f32 offset (lo_c) | C x f32 scale | u8 stage | body

all little-endian; the body is :class:`~fmcache.codecs.cast.LosslessStage`'s: the codes
as uint8 in C order (``int8``), or two codes per byte (``int4``: byte k holds code 2k in
its low nibble and code 2k+1 in its high nibble, a last odd code with a zero high
nibble), plain or in one blosc2 frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EncodeError
from .base import Codec, Hdf5Field, batch_views, channel_axis, scratch_array
from .registry import register_codec
from .stage import LosslessStage

_F32_MAX = float(np.finfo(np.float32).max)
_U8 = np.dtype(np.uint8)


def _channels_2d(x: np.ndarray) -> tuple[np.ndarray, int]:
    """A 2-D view with the channels on one axis, and the axis to reduce over.

    (C, ...) -> (C, rest), reduce axis 1; (T, D) / (D,) -> (rest, D), reduce axis 0.
    """
    if channel_axis(x.ndim) == 0:
        return x.reshape(x.shape[0], -1), 1
    return x.reshape(-1, x.shape[-1]), 0


def _n_channels(shape: tuple[int, ...]) -> int:
    return shape[channel_axis(len(shape))]


def quantize(x: np.ndarray, bits: int, codec_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8, shape of ``x``), offsets and scales (float32, one per channel).

    ``x`` is a finite float32 C-contiguous sample. EncodeError if a channel's range
    ``hi - lo`` overflows float32 (values near +-3.4e38 of both signs).
    """
    levels = (1 << bits) - 1
    x2, reduce_axis = _channels_2d(x)
    lo = x2.min(axis=reduce_axis)
    hi = x2.max(axis=reduce_axis)
    # The range in float64: hi - lo of two float32 is exact there, and cannot overflow.
    range64 = hi.astype(np.float64) - lo
    scale = (range64 / levels).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # the float32 steps of encode and decode
        top = lo + np.float32(levels) * scale  # what the largest code decodes to
    if not (np.isfinite(scale).all() and (range64 <= _F32_MAX).all() and np.isfinite(top).all()):
        raise EncodeError(f"codec {codec_id!r}: a channel's value range overflows float32",
                          hint="such values cannot be quantised; use bf16 or a lossless codec")
    # 1/scale, capped so that subnormal scales do not make inf (and then 0 * inf = NaN).
    scale_f64 = scale.astype(np.float64)
    inv = np.divide(1.0, scale_f64, out=np.zeros_like(scale_f64), where=scale_f64 > 0)
    inv = np.minimum(inv, _F32_MAX).astype(np.float32)
    bcast = (slice(None), None) if reduce_axis == 1 else (None, slice(None))
    t = x2 - lo[bcast]
    t *= inv[bcast]
    np.rint(t, out=t)
    np.clip(t, 0, levels, out=t)
    return t.astype(np.uint8).reshape(x.shape), lo, scale


def dequantize_into(q: np.ndarray, lo: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = lo + q * scale`` per channel, in float32, into the C-contiguous ``out``."""
    q2, reduce_axis = _channels_2d(q)
    out2 = out.reshape(q2.shape)  # a view: `out` is C-contiguous
    bcast = (slice(None), None) if reduce_axis == 1 else (None, slice(None))
    np.multiply(q2, scale[bcast], out=out2)
    # q == 0 gives 0 * scale + lo == lo exactly: post-ReLU zeros (lo == 0) stay 0.
    np.add(out2, lo[bcast], out=out2)
    return out


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte: code 2k in the low nibble, 2k+1 in the high one."""
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` codes of :func:`pack_nibbles`' output."""
    q = np.empty(2 * packed.size, dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[0::2])
    np.right_shift(packed, 4, out=q[1::2])
    return q[:n]


class _AffineQuantizer(Codec):
    """Shared parts of ``int8`` and ``int4``."""

    keeps_zeros = True  # for channels whose minimum is 0 (post-ReLU); see the contract
    channelwise = True  # offset and scale per channel
    bits: int

    def __init__(self, cname: str = "lz4", clevel: int = 5, shuffle: str = "bit") -> None:
        self.stage = LosslessStage.checked(self.codec_id, cname, clevel, shuffle)

    def params(self) -> dict[str, Any]:
        return self.stage.params()

    def _code_count(self, n_values: int) -> int:
        """Bytes of stored codes for ``n_values`` values."""
        return n_values if self.bits == 8 else (n_values + 1) // 2

    def _codes_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.bits == 8:
            return sample_shape
        return (self._code_count(int(np.prod(sample_shape))),)

    def _pack(self, q: np.ndarray) -> np.ndarray:
        return q if self.bits == 8 else pack_nibbles(q)

    def _unpack(self, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.bits == 8:
            return codes.reshape(shape)
        return unpack_nibbles(codes.reshape(-1), math.prod(shape)).reshape(shape)

    # ---- bytes face ---------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> bytes:
        q, lo, scale = quantize(x, self.bits, self.codec_id)
        return lo.astype("<f4").tobytes() + scale.astype("<f4").tobytes() + self.stage.pack(self._pack(q))

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._dequantize(payload, shape, out, verified=False)

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._dequantize(payload, shape, out, verified=True)

    def _dequantize(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None,
                    verified: bool) -> np.ndarray:
        n_channels = _n_channels(shape)
        params_bytes = 8 * n_channels
        if len(payload) < params_bytes:
            raise ValueError(f"payload of {len(payload)} bytes is shorter than its {n_channels} channel params")
        lo = np.frombuffer(payload, dtype="<f4", count=n_channels)
        scale = np.frombuffer(payload, dtype="<f4", count=n_channels, offset=4 * n_channels)
        n_codes = self._code_count(math.prod(shape))
        # codes go to a reused per-thread buffer: no allocation per sample
        codes = self.stage.unpack(payload[params_bytes:], _U8, (n_codes,), scratch_array((n_codes,), _U8),
                                  verified=verified)
        result = out if out is not None and out.flags.c_contiguous else np.empty(shape, dtype=np.float32)
        dequantize_into(self._unpack(codes, shape), lo, scale, result)
        if out is not None and result is not out:
            out[...] = result
            return out
        return result

    def decode_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """Codes and channel parameters of every row gathered first, then one unpack and
        one dequantisation pass over the batch (the per-sample numbers of ``decode``)."""
        return self._dequantize_batch(payloads, out, verified=False)

    def decode_batch_verified(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        return self._dequantize_batch(payloads, out, verified=True)

    def _dequantize_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray,
                          verified: bool) -> np.ndarray:
        if not out.flags.c_contiguous:
            return self._decode_rows(payloads, out, verified)
        shape = out.shape[1:]
        n, n_channels = len(out), _n_channels(shape)
        params_bytes = 8 * n_channels
        n_codes = self._code_count(math.prod(shape))
        codes = scratch_array((n, n_codes), _U8)
        params = scratch_array((n, 2 * n_channels), np.dtype("<f4"))
        for row, body in enumerate(batch_views(payloads, self.codec_id, shape)):
            if len(body) < params_bytes:
                raise ValueError(f"payload of {len(body)} bytes is shorter than its {n_channels} channel params")
            params[row] = np.frombuffer(body, dtype="<f4", count=2 * n_channels)
            self.stage.unpack(body[params_bytes:], _U8, (n_codes,), codes[row], verified=verified)
        if self.bits == 8:
            q = codes.reshape(out.shape)
        else:
            q = unpack_nibbles(codes.reshape(-1), 2 * n * n_codes).reshape(n, 2 * n_codes)[:, :math.prod(shape)]
            q = q.reshape(out.shape)
        lo, scale = params[:, :n_channels], params[:, n_channels:]
        # out = q * scale + lo in float32, one rounding per operation as in dequantize_into
        # (no fused multiply-add), in torch: its widening and arithmetic are vectorised,
        # numpy's uint8 -> float32 broadcast multiply runs ~3x slower here.
        bcast: tuple[slice | None, ...]
        if channel_axis(len(shape)) == 0:
            q3, out3, bcast = q.reshape(n, n_channels, -1), out.reshape(n, n_channels, -1), (slice(None), slice(None), None)
        else:
            q3, out3, bcast = q.reshape(n, -1, n_channels), out.reshape(n, -1, n_channels), (slice(None), None, slice(None))
        target = torch.from_numpy(out3)
        target.copy_(torch.from_numpy(q3))
        target.mul_(torch.from_numpy(scale)[bcast])
        target.add_(torch.from_numpy(lo)[bcast])
        return out

    # ---- HDF5 face ----------------------------------------------------------------
    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        n_channels = _n_channels(sample_shape)
        return [
            Hdf5Field("q", np.dtype("u1"), self._codes_shape(sample_shape), self.stage.hdf5_filter(),
                      attrs={"encoding": f"uint{self.bits} codes, x = offset + q * scale per channel"}),
            Hdf5Field("offset", np.dtype("<f4"), (n_channels,)),
            Hdf5Field("scale", np.dtype("<f4"), (n_channels,)),
        ]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        sample_shape = tuple(np.shape(batch)[1:])
        n, n_channels = len(batch), _n_channels(sample_shape)
        codes = np.empty((n, *self._codes_shape(sample_shape)), dtype=np.uint8)
        offsets = np.empty((n, n_channels), dtype=np.float32)
        scales = np.empty((n, n_channels), dtype=np.float32)
        for i, sample in enumerate(batch):
            q, offsets[i], scales[i] = quantize(self._validate(sample), self.bits, self.codec_id)
            codes[i] = self._pack(q).reshape(codes.shape[1:])
        return {"q": codes, "offset": offsets, "scale": scales}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return self.from_hdf5_into(fields, np.empty((len(fields["q"]), *sample_shape), dtype=np.float32))

    def from_hdf5_into(self, fields: Any, out: np.ndarray) -> np.ndarray:
        """Each row dequantised straight into its row of ``out``."""
        if not out.flags.c_contiguous:
            return super().from_hdf5_into(fields, out)
        codes = np.asarray(fields["q"], dtype=np.uint8)
        offsets = np.asarray(fields["offset"], dtype=np.float32)
        scales = np.asarray(fields["scale"], dtype=np.float32)
        if len(codes) != len(out) or len(offsets) != len(out) or len(scales) != len(out):
            raise ValueError(f"stored fields of {len(codes)}/{len(offsets)}/{len(scales)} rows, expected {len(out)}")
        sample_shape = out.shape[1:]
        for i in range(len(codes)):
            dequantize_into(self._unpack(codes[i], sample_shape), offsets[i], scales[i], out[i])
        return out


@register_codec
class Int8(_AffineQuantizer):
    """8-bit per-channel affine quantisation, then blosc2 (default lz4-5, bitshuffle).

    Error contract, per sample and channel c with ``lo_c = min``, ``hi_c = max``::

        |x - x'| <= (hi_c - lo_c) / (2 * 255) + 2**-20 * max(|lo_c|, |hi_c|) + 2**-118

    The first term is half a quantisation step; the second covers float32 rounding in
    encode and decode (about 8 ulp of the channel's largest magnitude); the third only
    matters for channels whose range is below float32's normal range. A constant
    channel decodes exactly. Zeros: ``q == 0`` decodes to ``lo_c`` exactly, so exact
    zeros stay exact in every channel whose minimum is 0 (post-ReLU maps); in a channel
    with negative values a zero decodes within the bound, not exactly. NaN/Inf raise
    EncodeError.

    HDF5: ``q`` (uint8, the sample's shape; the Blosc2 filter unless ``cname="none"``),
    ``offset`` and ``scale`` (float32, one per channel).
    """

    codec_id = "int8"
    bits = 8


@register_codec
class Int4(_AffineQuantizer):
    """4-bit per-channel affine quantisation, two codes per byte, then blosc2.

    Error contract: as ``int8`` with 15 levels instead of 255::

        |x - x'| <= (hi_c - lo_c) / (2 * 15) + 2**-20 * max(|lo_c|, |hi_c|) + 2**-118

    Zeros, constant channels and NaN/Inf as for ``int8``.

    HDF5: ``q`` (uint8, ``ceil(n / 2)`` packed bytes per sample, low nibble first; the
    Blosc2 filter unless ``cname="none"``), ``offset`` and ``scale`` (float32, per channel).
    """

    codec_id = "int4"
    bits = 4
