"""The optional lossless blosc2 stage after a cast (:mod:`.cast`) or a quantisation
(:mod:`.quantize`).

Byte layout (the tail of those codecs' payloads)::

    u8 stage (0 = plain, 1 = blosc2 frame) | body

The body holds the values in C order, little-endian: plain, or one blosc2 frame of
those bytes (typesize = the values' itemsize). The stage byte comes from the record, not
the config, so a record decodes whatever ``cname`` wrote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import blosc2
import numpy as np

from .base import check_choice
from .lossless import (
    CNAMES,
    FRAME_HEADER_BYTES,
    SHUFFLES,
    blosc2_compress,
    blosc2_decompress_into,
    blosc2_hdf5_filter,
)

_STAGE_PLAIN = 0
_STAGE_BLOSC2 = 1


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
        return bytes([_STAGE_BLOSC2]) + blosc2_compress(data, self.cname, self.clevel, self.shuffle)

    @staticmethod
    def unpack(payload: memoryview, dtype: np.dtype, shape: tuple[int, ...],
               out: np.ndarray | None = None) -> np.ndarray:
        """An array of ``dtype`` and ``shape`` from ``stage byte | body``: into ``out``
        (C-contiguous, that dtype and shape) if given, else a new array.

        ValueError if the payload is malformed; the sizes are checked before anything
        is allocated, so a damaged shape header cannot ask for gigabytes.
        """
        if len(payload) < 1:
            raise ValueError("payload has no stage byte")
        stage, body = payload[0], payload[1:]
        if stage == _STAGE_BLOSC2:
            if out is None:
                nbytes = math.prod(shape) * dtype.itemsize
                if len(body) < FRAME_HEADER_BYTES or blosc2.get_cbuffer_sizes(body)[0] != nbytes:
                    raise ValueError(f"blosc2 body does not hold the {nbytes} bytes the shape needs")
                out = np.empty(shape, dtype=dtype)
            # blosc2_decompress_into checks the frame's sizes against `out` before decoding
            return blosc2_decompress_into(body, out)
        if stage != _STAGE_PLAIN:
            raise ValueError(f"unknown stage byte {stage}")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(body) != nbytes:
            raise ValueError(f"plain body holds {len(body)} bytes, expected {nbytes}")
        values = np.frombuffer(body, dtype=dtype).reshape(shape)
        if out is None:
            return values.copy()
        np.copyto(out, values)
        return out

    def hdf5_filter(self) -> dict[str, Any]:
        """h5py ``create_dataset`` kwargs: the Blosc2 filter, or none for ``cname="none"``."""
        if self.cname == "none":
            return {}
        return blosc2_hdf5_filter(self.cname, self.clevel, self.shuffle)
