"""Lossless codecs: ``raw`` (float32 bytes) and ``blosc2`` (zstd/lz4/lz4hc with shuffle).

``blosc2`` payloads (format version 4)::

    u8 0xFC | u32 crc32c(frame) | one blosc2 frame of the float32 bytes (typesize 4)

blosc2 trusts a frame's internals, and a damaged typesize-4 frame can crash it
(tests/test_reliability_fuzz.py found one), so :meth:`Blosc2.decode` checks the CRC first.
Format versions 1-3 stored the bare frame; such payloads are decoded only through
:meth:`~fmcache.codecs.base.Codec.decode_verified` (the LMDB record's CRC-32C covered them;
HDF5 never held them: it stores ``blosc2`` maps through its own filter). The marker
cannot start a bare frame, whose first byte is blosc's format version (2-5).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import blosc2
import hdf5plugin
import numpy as np
from crc32c import crc32c

from ..errors import CorruptionError
from .base import Codec, Hdf5Field, check_choice
from .registry import register_codec

#: ``lz4hc`` writes LZ4 streams with a slower, more thorough match search: the same
#: decoder reads them (docs/codecs.md has its ratio and speeds)
CNAMES = {"zstd": blosc2.Codec.ZSTD, "lz4": blosc2.Codec.LZ4, "lz4hc": blosc2.Codec.LZ4HC}
SHUFFLES = {"none": blosc2.Filter.NOFILTER, "byte": blosc2.Filter.SHUFFLE, "bit": blosc2.Filter.BITSHUFFLE}
#: nbytes, blocksize and cbytes in a blosc/blosc2 chunk header: bytes 4-15, little-endian
#: (version, versionlz, flags, typesize, nbytes, blocksize, cbytes; the chunk format spec)
CHUNK_SIZES = struct.Struct("<III")
#: the first byte of a checked ``blosc2`` payload (format version 4); never a blosc version byte
_CHECKED = 0xFC
#: a blosc2 frame (chunk) header's size: a shorter frame is damaged
FRAME_HEADER_BYTES = 32
CRC = struct.Struct("<I")
_H5_SHUFFLE = {"none": hdf5plugin.Blosc2.NOFILTER, "byte": hdf5plugin.Blosc2.SHUFFLE,
               "bit": hdf5plugin.Blosc2.BITSHUFFLE}


def blosc2_compress(data: np.ndarray, cname: str, clevel: int, shuffle: str) -> bytes:
    """Compress a contiguous array's bytes with blosc2, typesize from its dtype."""
    return blosc2.compress2(
        data, codec=CNAMES[cname], clevel=clevel, filters=[SHUFFLES[shuffle]],
        filters_meta=[0], typesize=data.dtype.itemsize, nthreads=1,
    )


@contextmanager
def blosc2_releasing_gil() -> Iterator[None]:
    """blosc2 compresses (``compress2``, ``decompress2``) without holding the GIL inside.

    python-blosc2 keeps the GIL through a compression unless told otherwise (its default;
    ``blosc2.set_releasegil``), so an encoder thread stalls every other thread's Python,
    such as the builder's forward pass, for as long as it compresses. The setting is
    process-wide: it is switched on for the block and restored after. Both calls use
    contexts of their own, so releasing the GIL around them is thread-safe.
    """
    before = blosc2.set_releasegil(True)
    try:
        yield
    finally:
        blosc2.set_releasegil(before)


def blosc2_decompress_into(payload: memoryview, dst: np.ndarray) -> np.ndarray:
    """Decompress into ``dst`` (its byte size must match the stored size)."""
    if len(payload) < FRAME_HEADER_BYTES:
        raise ValueError(f"blosc2 frame of {len(payload)} bytes is shorter than its header")
    nbytes, blocksize, cbytes = CHUNK_SIZES.unpack_from(payload, 4)  # ~20x cheaper than get_cbuffer_sizes
    if nbytes != dst.nbytes or cbytes != len(payload):
        raise ValueError(f"blosc2 frame holds {nbytes} bytes in {cbytes}, expected {dst.nbytes} in {len(payload)}")
    if not dst.flags.c_contiguous:
        dst[...] = np.frombuffer(blosc2.decompress2(payload, nthreads=1), dtype=dst.dtype).reshape(dst.shape)
        return dst
    return decompress_sized(payload, dst, blocksize >= nbytes)


def decompress_sized(frame: memoryview, dst: np.ndarray, one_block: bool) -> np.ndarray:
    """Decompress into the C-contiguous ``dst`` on the calling thread, once the caller has
    checked the frame's sizes against ``dst`` (and its integrity); ``one_block``: the
    frame's blocksize covers all of it."""
    if one_block:
        # One block: blosc2 decodes it on the calling thread whatever its thread count, so
        # the global context (blosc2.decompress, ~3 us a call) does the same work as a
        # fresh single-thread context (decompress2(nthreads=1), ~7 us; ~10 us for zstd).
        blosc2.decompress(frame, dst=dst)
    else:
        # Several blocks: one thread. Per-sample frames are small, and blosc2's default
        # (all cores) costs ~3x the CPU time per call here; parallelism comes from
        # DataLoader workers.
        blosc2.decompress2(frame, dst=dst, nthreads=1)
    return dst


def pack_checked_frame(marker: int, frame: bytes) -> bytes:
    """``u8 marker | u32 crc32c(frame) | frame``: a blosc2 frame behind its CRC-32C (the
    ``blosc2`` codec's payload, and ``bf16``'s stage 2)."""
    return bytes([marker]) + CRC.pack(crc32c(frame)) + frame


def checked_frame(body: memoryview, what: str) -> memoryview:
    """The frame of a :func:`pack_checked_frame` body, its CRC checked: blosc2 trusts a
    frame's internals and a damaged one can crash it (tests/test_reliability_fuzz.py), so
    a damaged frame must never reach it. ValueError naming ``what`` if it fails."""
    if len(body) < 1 + CRC.size or crc32c(body[1 + CRC.size:]) != CRC.unpack_from(body, 1)[0]:
        raise ValueError(f"{what} frame fails its CRC-32C (damaged payload)")
    return body[1 + CRC.size:]


def verified_frame(body: memoryview, what: str) -> memoryview:
    """The frame of a :func:`pack_checked_frame` body whose bytes a storage checksum has
    just verified (an LMDB record's CRC-32C): the frame's own CRC is not recomputed."""
    if len(body) < 1 + CRC.size:
        raise ValueError(f"{what} payload is shorter than its CRC")
    return body[1 + CRC.size:]


def blosc2_hdf5_filter(cname: str, clevel: int, shuffle: str) -> dict[str, Any]:
    # cname was validated against CNAMES (a subset of the plug-in's names)
    return dict(hdf5plugin.Blosc2(cname=cast(Any, cname), clevel=clevel, filters=_H5_SHUFFLE[shuffle]))


def check_blosc2_params(codec_id: str, cname: str, clevel: Any, shuffle: str) -> int:
    check_choice(codec_id, "cname", cname, tuple(CNAMES))
    check_choice(codec_id, "shuffle", shuffle, tuple(SHUFFLES))
    check_choice(codec_id, "clevel", clevel, tuple(range(10)))
    return int(clevel)


@register_codec
class Raw(Codec):
    """float32 bytes as they are. Contract: exact (NaN/Inf included)."""

    codec_id = "raw"
    lossless = True
    stores_nonfinite = True
    keeps_zeros = True
    channelwise = True

    def params(self) -> dict[str, Any]:
        return {}

    def _encode(self, x: np.ndarray) -> memoryview:
        return x.data.cast("B")

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        values = np.frombuffer(payload, dtype="<f4")
        n_values = math.prod(shape)  # not np.prod: a numpy reduction costs ~10 us per call here
        if values.size != n_values:
            raise ValueError(f"payload holds {values.size} values, shape {shape} needs {n_values}")
        if out is None:
            return values.reshape(shape).copy()
        out[...] = values.reshape(shape)
        return out

    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [Hdf5Field("values", np.dtype("<f4"), sample_shape)]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": np.ascontiguousarray(batch, dtype=np.float32)}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(fields["values"], dtype=np.float32)


@register_codec
class Blosc2(Codec):
    """blosc2 with zstd, lz4 or lz4hc and byte/bit shuffle. Contract: exact (NaN/Inf included).

    In HDF5 it is the Blosc2 filter of hdf5plugin, so ``h5dump`` prints the values.
    """

    codec_id = "blosc2"
    lossless = True
    stores_nonfinite = True
    keeps_zeros = True
    channelwise = True

    def __init__(self, cname: str = "zstd", clevel: int = 1, shuffle: str = "byte") -> None:
        self.clevel = check_blosc2_params(self.codec_id, cname, clevel, shuffle)
        self.cname, self.shuffle = cname, shuffle

    def params(self) -> dict[str, Any]:
        return {"cname": self.cname, "clevel": self.clevel, "shuffle": self.shuffle}

    def _encode(self, x: np.ndarray) -> bytes:
        return pack_checked_frame(_CHECKED, blosc2_compress(x, self.cname, self.clevel, self.shuffle))

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        if not len(payload) or payload[0] != _CHECKED:
            raise CorruptionError("codec 'blosc2': payload without its CRC-32C (damaged, or a bare frame of "
                                  "format version 1-3, which only its cache's reader decodes)")
        frame = checked_frame(payload, "blosc2")
        return blosc2_decompress_into(frame, np.empty(shape, dtype=np.float32) if out is None else out)

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        # the storage's checksum covered these bytes: skip the frame's; bare frames are v1-3's
        frame = verified_frame(payload, "blosc2") if len(payload) and payload[0] == _CHECKED else payload
        return blosc2_decompress_into(frame, np.empty(shape, dtype=np.float32) if out is None else out)

    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [Hdf5Field("values", np.dtype("<f4"), sample_shape,
                          blosc2_hdf5_filter(self.cname, self.clevel, self.shuffle))]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": np.ascontiguousarray(batch, dtype=np.float32)}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(fields["values"], dtype=np.float32)
