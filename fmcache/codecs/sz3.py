"""``sz3``: SZ3 with an absolute or a range-relative error bound, on the 2-D view.

Byte layout of the payload: as :mod:`fmcache.codecs.zfp` (``u8 mode | u8 flags |
body``; mode 1 holds ``u32 crc32 | pysz stream``, mode 0 the raw float32 values), with
the same non-negative clamp. SZ3 handles one-element, constant and all-zero maps (it
stores them losslessly), but its stream carries ~70 bytes of header and config, so maps
where the stream is not smaller than the raw values are stored raw (mode 0, exact).
The zfp module owns the framing helpers (``frame``, ``unframe_into``) both codecs use.
"""

from __future__ import annotations

from typing import Any

import hdf5plugin
import numpy as np
import pysz

from ..errors import CodecSpecError
from .base import Codec, Hdf5Field, as_2d_view, check_positive
from .registry import register_codec
from .zfp import clamp_nonneg_rows, frame, unframe_into, view_shape


@register_codec
class Sz3(Codec):
    """SZ3 (pysz) on the 2-D view; exactly one of ``abs`` and ``rel``, no default.

    Parameters
    ----------
    abs : absolute error bound (> 0).
    rel : error bound relative to the sample's value range (0 < rel < 1).

    Error contract (per sample)::

        abs mode:  max|x - x'| <= abs
        rel mode:  max|x - x'| <= rel * (max(x) - min(x)) * (1 + 2**-23)

    (the factor: SZ3 computes the range in float32, up to half an ulp above the exact
    one, and scales it by ``rel``). SZ3 checks every value against the bound while it encodes and stores the values it
    cannot predict within it losslessly, so the bound is strict. A constant map decodes
    exactly in rel mode (its bound is 0), only within ``abs`` in abs mode. Zeros: SZ3 does not keep exact zeros (decoded values lie within the bound
    around 0, some negative; measurements.md); when the whole input is non-negative the
    decoded values are clamped at 0, which removes the negative ones and never
    increases the error. NaN/Inf raise EncodeError.

    HDF5: dataset ``values`` (float32, per-sample shape = the 2-D view, one chunk per
    sample) with hdf5plugin's SZ3 filter (``absolute=`` or ``relative=``, relative to
    the chunk's range, i.e. the sample's), attribute ``sample_shape``; dataset
    ``nonneg`` (uint8 per sample) for the clamp. The filter is slow (about 22 MB/s to
    encode, measurements.md) and, in rel mode, prints "Only absolute and norm2 modes
    properly tested" to stderr once per dataset.
    """

    codec_id = "sz3"

    def __init__(self, abs: float | None = None, rel: float | None = None) -> None:
        if (abs is None) == (rel is None):
            raise CodecSpecError(f"codec {self.codec_id!r} takes exactly one of abs= and rel=, "
                                 f"e.g. 'sz3:abs=1e-3' or 'sz3:rel=1e-3'")
        if abs is not None:
            self.mode, self.bound = "abs", float(check_positive(self.codec_id, "abs", abs))
        else:
            self.mode, self.bound = "rel", float(check_positive(self.codec_id, "rel", rel))
            if self.bound >= 1:
                raise CodecSpecError(f"codec {self.codec_id!r}: rel={rel!r} must be below 1 "
                                     "(a fraction of the sample's value range)")

    def params(self) -> dict[str, Any]:
        return {self.mode: self.bound}

    def _config(self, shape: tuple[int, ...]) -> Any:
        config = pysz.szConfig(shape)
        if self.mode == "abs":
            config.errorBoundMode = pysz.szErrorBoundMode.ABS
            config.absErrorBound = self.bound
        else:
            config.errorBoundMode = pysz.szErrorBoundMode.REL
            config.relErrorBound = self.bound
        return config

    # ---- bytes face -------------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> bytes:
        view = as_2d_view(x)
        stream, _ratio = pysz.sz.compress(view, self._config(view.shape))
        return frame(x, float(x.min()) >= 0, stream.tobytes())

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        def decode_stream(stream: memoryview) -> np.ndarray:
            decoded, _config = pysz.sz.decompress(np.frombuffer(stream, dtype=np.uint8), np.float32,
                                                  view_shape(shape))
            return np.asarray(decoded)

        return unframe_into(payload, shape, out, decode_stream)

    # ---- HDF5 face --------------------------------------------------------------------
    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        mode_kwarg = {"abs": "absolute", "rel": "relative"}[self.mode]
        sz3_filter = dict(hdf5plugin.SZ3(**{mode_kwarg: self.bound}))
        return [
            Hdf5Field("values", np.dtype("<f4"), view_shape(sample_shape), sz3_filter,
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
            values[i] = as_2d_view(x)
            nonneg[i] = float(x.min()) >= 0
        return {"values": values, "nonneg": nonneg}

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        values = np.asarray(fields["values"], dtype=np.float32)
        out = np.array(values.reshape(len(values), *sample_shape), dtype=np.float32)
        return clamp_nonneg_rows(out, fields["nonneg"])
