"""Casts: ``fp16`` and ``bf16``, each followed by an optional blosc2 stage.

Byte layout of the payload (after the shape header of :mod:`fmcache.codecs.base`)::

    u8 stage (0 = plain, 3 = CRC-32C and blosc2 frame, 2 = bf16's widened frame;
              1 = bare blosc2 frame, format versions 1-5) | body

The body holds the n 16-bit values of the map in C order, little-endian: IEEE half
floats for ``fp16``, bfloat16 bit patterns for ``bf16``; with stage 3 it is ``u32
crc32c(frame)`` and one blosc2 frame of those bytes (typesize 2; :mod:`.stage`). ``bf16`` with blosc2 writes stage 2 (format version
3): ``u32 crc32c(frame)`` then one blosc2 frame (typesize 4) of the float32 words the bfloat16 values stand for
(the bit pattern in the high half, zeros in the low half). The shuffle puts the zero
bytes in planes of their own that LZ4 stores in a few bytes, so it costs about the same
space as stage 1 (docs/benchmarks.md), and it decodes with one blosc2 call straight into
the float32 output: no staging buffer, no widening pass (docs/benchmarks.md).
Stage 1 ``bf16`` records (format versions 1-2) are still read, behind their record CRC. The stage byte comes from the record, not the
config, so a record decodes whatever ``cname`` wrote it, and it keeps a plain body
2-byte aligned (the shape header has odd length).

:class:`~fmcache.codecs.stage.LosslessStage` is the optional blosc2 stage (shared with
:mod:`.quantize`); it lives in :mod:`.stage` and is re-exported here.

The conversions run through torch: float32 -> float16 is ~10x faster there than in
numpy on this machine, and decoding copies into ``out`` without a temporary float32.
"""

from __future__ import annotations

import math
import struct
import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from crc32c import crc32c

from ..errors import CorruptionError, EncodeError
from .base import HEADER_DIMS, MAX_NDIM, Codec, Hdf5Field, batch_views, shape_header
from .lossless import (
    CHUNK_SIZES,
    CRC,
    FRAME_HEADER_BYTES,
    blosc2_compress,
    blosc2_decompress_into,
    checked_frame,
    decompress_sized,
    pack_checked_frame,
    verified_frame,
)
from .registry import register_codec
from .stage import LosslessStage  # also re-exported: `from .cast import LosslessStage` still works

#: bf16's stage byte for a blosc2 frame of the float32 words (format version 3)
_STAGE_WIDE = 2


def _checked_frame(body: memoryview) -> memoryview:
    """The blosc2 frame of a stage-2 body (``2 | u32 crc32c(frame) | frame``), CRC checked."""
    return checked_frame(body, "bf16")


def _frame(body: memoryview) -> memoryview:
    """The blosc2 frame of a stage-2 body that a storage checksum has verified."""
    return verified_frame(body, "bf16")


FP16_MAX = 65504.0
#: the largest float32 that rounds to a finite bfloat16 (0x7F7F7FFF); above it, +-Inf
BF16_MAX_FINITE_INPUT = float(np.array(0x7F7F7FFF, dtype=np.uint32).view(np.float32))


_scratch = threading.local()


def _scratch16(shape: tuple[int, ...], dtype: np.dtype, torch_dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
    """A per-thread reusable 16-bit array of ``shape`` and the torch view of it as
    ``torch_dtype``: decoding stages values there (no allocation, stays in cache) and
    widens from the view (no per-call tensor construction). Valid until the next call."""
    views: dict[tuple[tuple[int, ...], str], tuple[np.ndarray, torch.Tensor]] | None = getattr(_scratch, "views", None)
    if views is None:
        views = _scratch.views = {}
    pair = views.get((shape, dtype.str))
    if pair is None:
        if len(views) >= 32:  # many shapes (e.g. per-layer tiers): start over rather than grow
            views.clear()
        array = np.empty(shape, dtype=dtype)
        pair = views[(shape, dtype.str)] = (array, torch.from_numpy(array.view(np.int16)).view(torch_dtype))
    return pair


def _writable(x: np.ndarray) -> np.ndarray:
    # torch.from_numpy warns on read-only arrays (e.g. views of bytes); copy those only.
    return x if x.flags.writeable else x.copy()


def _check_range(codec_id: str, x: np.ndarray, limit: float, hint: str) -> None:
    """EncodeError if a finite value has ``|x| > limit``; NaN/Inf are allowed."""
    lo, hi = torch.aminmax(torch.from_numpy(x).reshape(-1))
    if -limit <= float(lo) and float(hi) <= limit:  # the fast path: one pass, no NaN
        return
    finite = x[np.isfinite(x)]
    if finite.size and float(np.max(np.abs(finite))) > limit:
        worst = float(np.max(np.abs(finite)))
        raise EncodeError(f"codec {codec_id!r}: |x| up to {worst!r} exceeds its largest encodable value "
                          f"{limit!r}", hint=hint)


class _Cast16(Codec):
    """Shared parts of the two 16-bit casts: the blosc2 stage and the byte face."""

    stores_nonfinite = True
    keeps_zeros = True
    channelwise = True
    _storage_dtype: np.dtype
    _torch_dtype: torch.dtype
    #: the HDF5 dataset holding the 16-bit values
    _hdf5_field: str

    def __init__(self, cname: str = "lz4", clevel: int = 5, shuffle: str = "byte") -> None:
        self.stage = LosslessStage.checked(self.codec_id, cname, clevel, shuffle)

    def params(self) -> dict[str, Any]:
        return self.stage.params()

    @abstractmethod
    def _to16(self, x: np.ndarray) -> np.ndarray:
        """The 16-bit storage array (validated float32 in)."""

    @abstractmethod
    def _from16_into(self, values16: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Widen the writable 16-bit array into the float32 ``out`` of the same shape."""

    def _encode(self, x: np.ndarray) -> bytes:
        return self._encode16_batch(self._to16(x)[None])[0]

    def _encode16_batch(self, bits: np.ndarray) -> list[bytes]:
        """The payloads of a batch of 16-bit arrays (``_to16``'s output, batch axis first)."""
        return [self.stage.pack(b) for b in bits]

    def _to16_batch(self, batch: np.ndarray) -> np.ndarray | None:
        """``_to16`` of a whole batch ``(N, *shape)`` in one range check and one cast; None
        for what is no batch of maps (each map then takes the general path)."""
        x = self._checked_batch(batch)
        return None if x is None else self._to16(x)

    def encode_batch(self, batch: np.ndarray) -> list[bytes]:
        """:meth:`Codec.encode_batch`: the range check and the cast run once over the whole
        batch (one torch call each instead of one per map, about a third of a ``bf16``
        build's encoding time on 16-64 KiB maps), then each map is compressed and framed."""
        bits = self._to16_batch(batch)
        if bits is None:
            return super().encode_batch(batch)
        header = shape_header(bits.shape[1:])
        return [header + body for body in self._encode16_batch(bits)]

    def _to_hdf5(self, batch: np.ndarray) -> np.ndarray:
        """The 16-bit values of a batch for the HDF5 face."""
        bits = self._to16_batch(batch)
        if bits is not None:
            return bits
        values = np.empty(np.shape(batch), dtype=self._storage_dtype)
        for i, sample in enumerate(batch):
            values[i] = self._to16(self._validate(sample))
        return values

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._decode16(payload, shape, out, verified=False)

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._decode16(payload, shape, out, verified=True)

    def _decode16(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None,
                  verified: bool) -> np.ndarray:
        # The 16-bit values go to a reused per-thread buffer (in cache, no allocation),
        # then widen straight into `out`: one pass over the output.
        values16, tensor16 = _scratch16(shape, self._storage_dtype, self._torch_dtype)
        self.stage.unpack(payload, self._storage_dtype, shape, values16, verified=verified)
        if out is not None and out.flags.c_contiguous:
            torch.from_numpy(out).copy_(tensor16)
            return out
        result = self._from16_into(values16, np.empty(shape, dtype=np.float32))
        if out is None:
            return result
        out[...] = result  # a strided `out`: torch cannot take every layout numpy can
        return out

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return self.from_hdf5_into(fields, np.empty((len(fields[self._hdf5_field]), *sample_shape), dtype=np.float32))

    def from_hdf5_into(self, fields: Any, out: np.ndarray) -> np.ndarray:
        """The stored 16-bit values widened straight into ``out`` (no batch in between)."""
        values16 = np.ascontiguousarray(fields[self._hdf5_field], dtype=self._storage_dtype)
        if values16.shape != out.shape:
            raise ValueError(f"stored values of shape {values16.shape}, expected {out.shape}")
        if not out.flags.c_contiguous:
            return super().from_hdf5_into(fields, out)
        return self._from16_into(_writable(values16), out)

    def hdf5_row_reader(self, rows: Any) -> Callable[[int, np.ndarray], np.ndarray]:
        """:meth:`Codec.hdf5_row_reader`: the chunk's 16-bit rows viewed once as torch
        tensors (one ``unbind`` call: a view per row costs less than half of what indexing
        the chunk's tensor costs per read), then each row widened straight into ``out``
        (the per-row dict, checks and views of :meth:`from_hdf5_into` cost about as much
        as widening a 16 KB map)."""
        values = rows.get(self._hdf5_field) if len(rows) == 1 else None
        if (values is None or values.dtype != self._storage_dtype or not values.flags.c_contiguous
                or not values.flags.writeable or values.ndim < 1):
            return super().hdf5_row_reader(rows)
        row_views = torch.from_numpy(values.view(np.int16)).view(self._torch_dtype).unbind(0)
        shape = values.shape[1:]

        def read(k: int, out: np.ndarray) -> np.ndarray:
            if out.shape != shape:
                raise ValueError(f"stored values of shape {shape}, expected {out.shape}")
            torch.from_numpy(out).copy_(row_views[k])
            return out
        return read

    def decode_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """All 16-bit bodies into one reused staging batch, then one widening pass."""
        return self._decode16_batch(payloads, out, verified=False)

    def decode_batch_verified(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        return self._decode16_batch(payloads, out, verified=True)

    def _decode16_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray,
                        verified: bool) -> np.ndarray:
        if not out.flags.c_contiguous:
            return self._decode_rows(payloads, out, verified)
        shape = out.shape[1:]
        values16, tensor16 = _scratch16(out.shape, self._storage_dtype, self._torch_dtype)
        for row, body in enumerate(batch_views(payloads, self.codec_id, shape)):
            self.stage.unpack(body, self._storage_dtype, shape, values16[row], verified=verified)
        torch.from_numpy(out).copy_(tensor16)
        return out


@register_codec
class Fp16(_Cast16):
    """IEEE half precision, then an optional blosc2 stage (default lz4-5, byte shuffle).

    Error contract (round to nearest even)::

        |x - x'| <= 2**-11 * |x|    for 2**-14 <= |x| <= 65504  (fp16 normal range)
        |x - x'| <= 2**-25          for |x| < 2**-14            (fp16 subnormals)

    Finite values with ``|x| > 65504`` raise EncodeError (they would become Inf): use
    ``bf16``, which has float32's range. Zeros (and their sign) are exact; +-Inf are
    exact; NaN decodes to NaN (its payload bits are not kept).

    HDF5: one dataset ``values`` of dtype float16, with the Blosc2 filter unless
    ``cname="none"``, so ``h5dump`` prints the decoded values.
    """

    codec_id = "fp16"
    _storage_dtype = np.dtype("<f2")
    _torch_dtype = torch.float16
    _hdf5_field = "values"

    def _to16(self, x: np.ndarray) -> np.ndarray:
        x = _writable(x)
        _check_range(self.codec_id, x, FP16_MAX, hint="use bf16, which keeps float32's range, or a lossless codec")
        return torch.from_numpy(x).to(torch.float16).numpy()

    def _from16_into(self, values16: np.ndarray, out: np.ndarray) -> np.ndarray:
        torch.from_numpy(out).copy_(torch.from_numpy(values16))
        return out

    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [Hdf5Field("values", self._storage_dtype, sample_shape, self.stage.hdf5_filter())]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": self._to_hdf5(batch)}


@register_codec
class Bf16(_Cast16):
    """bfloat16 (float32's top 16 bits, round to nearest even), then optional blosc2.

    Error contract::

        |x - x'| <= 2**-8 * |x|     for |x| >= 2**-126  (float32 normal range)
        |x - x'| <= 2**-126         for |x| < 2**-126   (float32 subnormals)

    Finite values so large that they round to Inf (``|x| > 3.3961773e38``, the top half
    ulp of float32) raise EncodeError. Zeros (and their sign) are exact; +-Inf are
    exact; NaN decodes to NaN (its payload bits are not kept).

    HDF5: one dataset ``bits`` of dtype uint16 holding the bfloat16 bit patterns (HDF5
    has no bfloat16 type), attribute ``encoding = "bfloat16-bits"``; the Blosc2 filter
    unless ``cname="none"``. Decoded value: ``uint32(bits) << 16`` viewed as float32.
    """

    codec_id = "bf16"
    _storage_dtype = np.dtype("<u2")
    _torch_dtype = torch.bfloat16
    _hdf5_field = "bits"

    def _to16(self, x: np.ndarray) -> np.ndarray:
        x = _writable(x)
        _check_range(self.codec_id, x, BF16_MAX_FINITE_INPUT, hint="these values overflow bfloat16; use raw or blosc2")
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def _from16_into(self, values16: np.ndarray, out: np.ndarray) -> np.ndarray:
        # bf16 -> float32 is exact; torch copies straight into `out` (2x numpy's shift).
        torch.from_numpy(out).copy_(torch.from_numpy(values16.view(np.int16)).view(torch.bfloat16))
        return out

    def _encode16_batch(self, bits: np.ndarray) -> list[bytes]:
        if self.stage.cname == "none":
            return super()._encode16_batch(bits)
        wide = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
        cname, clevel, shuffle = self.stage.cname, self.stage.clevel, self.stage.shuffle
        return [pack_checked_frame(_STAGE_WIDE, blosc2_compress(w, cname, clevel, shuffle)) for w in wide]

    def decode(self, data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`Codec.decode`; a well-formed stage-2 record takes :meth:`_decode_wide`'s
        one-call path, anything else (errors included) the general one."""
        result = self._decode_wide(data, out, check=True)
        return result if result is not None else super().decode(data, out)

    def decode_verified(self, data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        result = self._decode_wide(data, out, check=False)
        return result if result is not None else super().decode_verified(data, out)

    def verified_decoder(self, shape: tuple[int, ...]) -> Callable[[memoryview, np.ndarray], np.ndarray]:
        """:meth:`Codec.verified_decoder` for ``shape``: a stage-2 record of exactly that
        shape (shape header and stage byte checked with one ``struct`` call against the
        expected values, the frame's sizes against the map's) decodes with one blosc2
        call; anything else, damage included, takes :meth:`decode_verified`, which
        decodes it or raises."""
        general = super().verified_decoder(shape)
        head = struct.Struct(f"<B{len(shape)}IB")
        expected = (len(shape), *shape, _STAGE_WIDE)
        frame_at = head.size + CRC.size
        nbytes = 4 * math.prod(shape)
        if not nbytes or len(shape) > MAX_NDIM:
            return general

        def run(payload: memoryview, out: np.ndarray) -> np.ndarray:
            try:
                if head.unpack_from(payload, 0) == expected:
                    size, blocksize, cbytes = CHUNK_SIZES.unpack_from(payload, frame_at + 4)
                    if size == nbytes and cbytes == len(payload) - frame_at:
                        return decompress_sized(payload[frame_at:], out, blocksize >= nbytes)
            except (struct.error, RuntimeError, ValueError):  # short, or blosc2 refused it
                pass
            return general(payload, out)  # names the fault
        return run

    @staticmethod
    def _decode_wide(data: bytes | bytearray | memoryview, out: np.ndarray | None, check: bool) -> np.ndarray | None:
        """A whole stage-2 record (shape header, stage byte, CRC, blosc2 frame) decoded
        in one flat call, or None where anything is unusual: a stage-1 or plain record, a
        strided ``out``, a size that does not add up, a failed CRC. The general path then
        decodes or names the fault. This is the default codec's read path, and the general
        path's layered calls show on small maps (docs/benchmarks.md)."""
        if type(data) is not bytes and not (isinstance(data, memoryview) and data.format == "B"
                                            and data.ndim == 1 and data.c_contiguous):
            return None
        size = len(data)
        ndim = data[0] if size else 0
        start = 1 + 4 * ndim  # the stage byte
        frame_at = start + 1 + CRC.size
        if not 1 <= ndim <= MAX_NDIM or size < frame_at + FRAME_HEADER_BYTES or data[start] != _STAGE_WIDE:
            return None
        shape = HEADER_DIMS[ndim].unpack_from(data, 1)
        nbytes, blocksize, cbytes = CHUNK_SIZES.unpack_from(data, frame_at + 4)
        if cbytes != size - frame_at or nbytes != 4 * math.prod(shape) or not nbytes:
            return None
        frame = memoryview(data)[frame_at:]
        if check and crc32c(frame) != CRC.unpack_from(data, start + 1)[0]:
            return None
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            return None
        try:
            return decompress_sized(frame, out, blocksize >= nbytes)
        except (RuntimeError, ValueError):  # blosc2 refused it: the general path raises CorruptionError
            return None

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._decode_frame(payload, shape, out, check=True)

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        # the storage's checksum covered these bytes: the frame's own CRC would only repeat it
        return self._decode_frame(payload, shape, out, check=False)

    def _decode_frame(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None,
                      check: bool) -> np.ndarray:
        if len(payload) and payload[0] == _STAGE_WIDE:
            frame = _checked_frame(payload) if check else _frame(payload)
            if out is not None and out.flags.c_contiguous:
                return blosc2_decompress_into(frame, out)
            values = blosc2_decompress_into(frame, np.empty(shape, dtype=np.float32))
            if out is None:
                return values
            out[...] = values
            return out
        return self._decode16(payload, shape, out, verified=not check)

    def decode_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """Stage-2 records straight into their rows of ``out``; stage-1 batches through the
        16-bit staging pass; a mix (a cache resumed across versions) row by row."""
        return self._decode_frames(payloads, out, verified=False)

    def decode_batch_verified(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """Verified stage-2 rows through :meth:`verified_decoder` (one call per row: the
        shape checked against the batch's with one ``struct`` call); a batch that starts
        with a stage-1 record, or an ``out`` that is not a C-contiguous float32 batch,
        through the general batch path."""
        shape = out.shape[1:]
        first = payloads[0] if len(payloads) else b""
        if (len(payloads) != len(out) or not out.flags.c_contiguous or out.dtype != np.float32
                or len(first) <= 1 + 4 * len(shape) or first[1 + 4 * len(shape)] != _STAGE_WIDE):
            return self._decode_frames(payloads, out, verified=True)
        decode = self.verified_decoder(shape)
        for row, payload in enumerate(payloads):
            decode(payload if type(payload) is memoryview else memoryview(payload), out[row])
        return out

    def _decode_frames(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray,
                       verified: bool) -> np.ndarray:
        frame_of = _frame if verified else _checked_frame
        if not out.flags.c_contiguous:
            return self._decode16_batch(payloads, out, verified)  # row by row for a strided out
        bodies = batch_views(payloads, self.codec_id, out.shape[1:])
        wide = [len(b) > 0 and b[0] == _STAGE_WIDE for b in bodies]
        if all(wide):
            for row, body in enumerate(bodies):
                try:
                    blosc2_decompress_into(frame_of(body), out[row])
                except ValueError:
                    raise
                except Exception as exc:  # blosc2's own errors: a damaged frame
                    raise CorruptionError(f"codec 'bf16' could not decode a record: {exc}") from exc
            return out
        if not any(wide):
            return self._decode16_batch(payloads, out, verified)
        return self._decode_rows(payloads, out, verified)  # a mix (a cache resumed across versions)

    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [Hdf5Field("bits", self._storage_dtype, sample_shape, self.stage.hdf5_filter(),
                          attrs={"encoding": "bfloat16-bits"})]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"bits": self._to_hdf5(batch)}
