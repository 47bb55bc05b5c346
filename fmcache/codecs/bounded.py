"""Shared parts of the float compressors on the 2-D view: ``zfp`` and ``sz3``.

ZFP and SZ3 compress a sample's (prod(shape[:-1]), shape[-1]) view about twice as well
as its 3-D shape (measurements.md), so both codecs see that view, frame their stream the
same way and clamp non-negative inputs the same way. This module holds that common part;
each codec keeps its parameters, its stream encoder/decoder and its HDF5 filter.

Byte layout of the payload (after the shape header of :mod:`fmcache.codecs.base`)::

    u8 mode | u8 flags | body
    mode 1 (stream):  u32 crc32 of mode, flags and stream (little-endian) | codec stream
    mode 0 (raw):     the float32 values, little-endian, C order

``flags`` bit 0 says the input was non-negative: decoded values are then clamped at 0,
which never increases the error. The C decoders are not hardened against damaged input
(a flipped byte can crash zfp), so the stream's CRC-32 is checked before it is handed to
them. Mode 0 (exact) is used when the stream would not be smaller than the raw values
(tiny maps), and by codecs that cannot honour their bound for a sample.

HDF5 face (:class:`BoundedCodec`): dataset ``values`` (float32, per-sample shape = the
2-D view, one chunk per sample) with the codec's native filter, attribute
``sample_shape``; dataset ``nonneg`` (uint8 per sample) for the clamp.
"""

from __future__ import annotations

import math
import struct
import zlib
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import Codec, Hdf5Field, as_2d_view

MODE_RAW = 0
MODE_STREAM = 1
FLAG_NONNEG = 1
_CRC = struct.Struct("<I")


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
    source = decoded.reshape(shape)
    if out is None:
        if mode == MODE_STREAM and source.flags.writeable and source.flags.c_contiguous:
            out = source  # the library's fresh array: no copy (a raw body is the record's, read-only)
        else:
            out = np.empty(shape, dtype=np.float32)
    if flags & FLAG_NONNEG:
        np.maximum(source, 0, out=out)  # the copy and the clamp in one pass
    elif out is not source:
        out[...] = source
    return out


def clamp_nonneg_rows(batch: np.ndarray, nonneg: np.ndarray) -> np.ndarray:
    """Clamp at 0, in place, the samples of ``batch`` whose ``nonneg`` flag is set (HDF5
    face): one pass over the batch when every sample is flagged (post-ReLU maps), else
    one pass per flagged sample; no copy of the batch either way."""
    rows = np.asarray(nonneg).astype(bool).reshape(-1)
    if rows.all():
        np.maximum(batch, 0, out=batch)
    else:
        for row in np.flatnonzero(rows):
            np.maximum(batch[row], 0, out=batch[row])
    return batch


class BoundedCodec(Codec):
    """A float compressor on the 2-D view: the shared HDF5 face (module docstring).

    Subclasses implement the bytes face with :func:`frame` / :func:`unframe_into`,
    :meth:`_hdf5_filter` (h5py ``create_dataset`` kwargs of their native filter), and
    may override :meth:`_hdf5_sample_nonneg` to refuse samples the filter cannot store.
    """

    @abstractmethod
    def _hdf5_filter(self) -> dict[str, Any]:
        """h5py ``create_dataset`` kwargs of the codec's HDF5 filter, in its mode."""

    def _hdf5_sample_nonneg(self, index: int, x: np.ndarray) -> bool:
        """Whether sample ``index`` (validated float32) is non-negative; subclasses raise
        EncodeError here for samples their HDF5 filter cannot store within the contract."""
        return float(x.min()) >= 0

    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [
            Hdf5Field("values", np.dtype("<f4"), view_shape(sample_shape), self._hdf5_filter(),
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
            nonneg[i] = self._hdf5_sample_nonneg(i, x)
            values[i] = as_2d_view(x)
        return {"values": values, "nonneg": nonneg}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return self.from_hdf5_into(fields, np.empty((len(fields["values"]), *sample_shape), dtype=np.float32))

    def from_hdf5_into(self, fields: Any, out: np.ndarray) -> np.ndarray:
        """The filter's decoded values copied once into ``out``, then clamped there in
        place. (The base class's path made a new batch, copied it, gathered and scattered
        the clamped rows and copied the result into ``out``: four passes over the batch
        where one does; docs/benchmarks_history.md, "What session 10 changed".)"""
        values, nonneg = fields["values"], fields["nonneg"]
        if len(values) != len(out) or len(nonneg) != len(out) \
                or math.prod(np.shape(values)[1:]) != math.prod(out.shape[1:]):
            raise ValueError(f"stored rows of shape {np.shape(values)} ({len(nonneg)} flags), "
                             f"expected {out.shape}")
        np.copyto(out, np.reshape(values, out.shape), casting="same_kind")
        return clamp_nonneg_rows(out, nonneg)
