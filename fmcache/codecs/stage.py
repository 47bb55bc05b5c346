"""The optional lossless blosc2 stage after a cast (:mod:`.cast`) or a quantisation
(:mod:`.quantize`).

Byte layout (the tail of those codecs' payloads)::

    u8 stage | body
    stage 0: the values plain
    stage 3: u32 crc32c(frame) | one blosc2 frame of the values   (format version 6)
    stage 1: one blosc2 frame of the values, no CRC                (format versions 1-5)

The values are in C order, little-endian; a frame's typesize is their itemsize. (Stage 2
is ``bf16``'s own, :mod:`.cast`.) The stage byte comes from the record, not the config,
so a record decodes whatever ``cname`` wrote it. A damaged blosc2 frame can crash
blosc2 (tests/test_codecs.py's damaged-records test found one for ``int8``), so a frame
reaches blosc2 only after a CRC: stage 3's own, or, for the bare stage-1 frames of
format versions 1-5, the CRC-32C of the LMDB record that holds them (``verified=True``:
the cache's reader); :meth:`LosslessStage.unpack` refuses a bare frame otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import blosc2
import numpy as np

from ..errors import CorruptionError
from .base import check_choice
from .lossless import (
    CNAMES,
    FRAME_HEADER_BYTES,
    SHUFFLES,
    blosc2_compress,
    blosc2_decompress_into,
    blosc2_hdf5_filter,
    checked_frame,
    pack_checked_frame,
    verified_frame,
)

_STAGE_PLAIN = 0
#: a bare blosc2 frame (format versions 1-5): decoded only behind a storage CRC
_STAGE_BLOSC2 = 1
#: ``u32 crc32c(frame) | frame`` (format version 6)
_STAGE_CHECKED = 3


@dataclass(frozen=True)
class LosslessStage:
    """The optional blosc2 stage after a cast or a quantisation.

    ``cname`` ``"none"`` skips blosc2 (the body is stored plain); ``clevel`` and
    ``shuffle`` are validated and kept in the config either way, so a config stays
    valid when someone switches ``cname`` on.
    """

    cname: str
    clevel: int
    shuffle: str

    @classmethod
    def checked(cls, codec_id: str, cname: Any, clevel: Any, shuffle: Any) -> LosslessStage:
        """Validate the three parameters (CodecSpecError naming the codec)."""
        check_choice(codec_id, "cname", cname, ("none", *CNAMES))
        check_choice(codec_id, "shuffle", shuffle, tuple(SHUFFLES))
        check_choice(codec_id, "clevel", clevel, tuple(range(10)))
        return cls(str(cname), int(clevel), str(shuffle))

    def params(self) -> dict[str, Any]:
        return {"cname": self.cname, "clevel": self.clevel, "shuffle": self.shuffle}

    def pack(self, data: np.ndarray) -> bytes:
        """``stage byte | body`` for a contiguous array (blosc2 typesize = its itemsize)."""
        if self.cname == "none":
            return bytes([_STAGE_PLAIN]) + data.tobytes()
        return pack_checked_frame(_STAGE_CHECKED, blosc2_compress(data, self.cname, self.clevel, self.shuffle))

    @staticmethod
    def unpack(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...],
               out: np.ndarray | None = None, verified: bool = False) -> np.ndarray:
        """An array of ``dtype`` and ``shape`` from ``stage byte | body``: into ``out``
        (C-contiguous, that dtype and shape) if given, else a new array.

        ``verified``: a storage checksum has just covered these bytes (an LMDB record's
        CRC-32C): stage 3's CRC is not recomputed, and a bare stage-1 frame of format
        versions 1-5 is decoded; without it a stage-1 frame is a CorruptionError.
        ValueError if the payload is malformed; the sizes are checked before anything is
        allocated, so a damaged shape header cannot ask for gigabytes.
        """
        if len(payload) < 1:
            raise ValueError("payload has no stage byte")
        stage = payload[0]
        if stage == _STAGE_PLAIN:
            body = payload[1:]
            nbytes = math.prod(shape) * dtype.itemsize
            if len(body) != nbytes:
                raise ValueError(f"plain body holds {len(body)} bytes, expected {nbytes}")
            values = np.frombuffer(body, dtype=dtype).reshape(shape)
            if out is None:
                return values.copy()
            np.copyto(out, values)
            return out
        if stage == _STAGE_CHECKED:
            frame = verified_frame(payload, "blosc2 stage") if verified else checked_frame(payload, "blosc2 stage")
        elif stage == _STAGE_BLOSC2 and verified:
            frame = payload[1:]
        elif stage == _STAGE_BLOSC2:
            raise CorruptionError("blosc2 stage without its CRC-32C (damaged, or a bare frame of format "
                                  "version 1-5, which only its cache's reader decodes)")
        else:
            raise ValueError(f"unknown stage byte {stage}")
        if out is None:
            nbytes = math.prod(shape) * dtype.itemsize
            if len(frame) < FRAME_HEADER_BYTES or blosc2.get_cbuffer_sizes(frame)[0] != nbytes:
                raise ValueError(f"blosc2 body does not hold the {nbytes} bytes the shape needs")
            out = np.empty(shape, dtype=dtype)
        # blosc2_decompress_into checks the frame's sizes against `out` before decoding
        return blosc2_decompress_into(frame, out)

    def hdf5_filter(self) -> dict[str, Any]:
        """h5py ``create_dataset`` kwargs: the Blosc2 filter, or none for ``cname="none"``."""
        if self.cname == "none":
            return {}
        return blosc2_hdf5_filter(self.cname, self.clevel, self.shuffle)
