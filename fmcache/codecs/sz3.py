"""``sz3``: SZ3 with an absolute or a range-relative error bound, on the 2-D view.

Byte layout of the payload: :mod:`fmcache.codecs.bounded`'s, as for ``zfp`` (``u8
mode | u8 flags | body``; mode 1 holds ``u32 crc32 | pysz stream``, mode 0 the raw
float32 values), with the same non-negative clamp. SZ3 handles one-element, constant and
all-zero maps (it stores them losslessly), but its stream carries ~70 bytes of header
and config, so maps where the stream is not smaller than the raw values are stored raw
(mode 0, exact). The framing helpers (``frame``, ``unframe_into``) and the HDF5 face are
:mod:`fmcache.codecs.bounded`'s, shared with ``zfp``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import hdf5plugin
import numpy as np
import pysz

from ..errors import CodecSpecError, EncodeError
from . import sz3_child
from .base import as_2d_view, check_bound, shape_header
from .bounded import BoundedCodec, frame, unframe_into, view_shape
from .registry import register_codec
from .sz3_process import ProcessGone, active_process


@register_codec
class Sz3(BoundedCodec):
    """SZ3 (pysz) on the 2-D view; exactly one of ``abs`` and ``rel``, no default.

    Parameters
    ----------
    abs : absolute error bound (> 0).
    rel : error bound relative to the sample's value range (0 < rel < 1).
    algo : SZ3's predictor, ``interp-lorenzo`` (SZ3's default, left out of the config),
        ``interp``, ``lorenzo-reg`` or ``nopred`` (no prediction: the values quantized
        within the bound, then Huffman and zstd coded). The bound holds for each alike; on
        post-ReLU feature maps, whose zeros and edges prediction does not help,
        ``nopred`` stored up to 1.4x smaller, encoded about 2x and decoded 1.1-1.25x
        faster than the default, and it keeps exact zeros (docs/codecs.md). The stream
        names its predictor, so decoding needs nothing. LMDB (and the bytes face) only:
        hdf5plugin's SZ3 filter takes the error bound alone, so an HDF5 layer with another
        ``algo`` is refused (CodecSpecError) rather than stored with a predictor its
        config does not name.

    Error contract (per sample)::

        abs mode:  max|x - x'| <= abs
        rel mode:  max|x - x'| <= rel * (max(x) - min(x)) * (1 + 2**-23)

    (the factor: SZ3 computes the range in float32, up to half an ulp above the exact
    one, and scales it by ``rel``). SZ3 checks every value against the bound while it
    encodes and stores the values it cannot predict within it losslessly, so the bound is
    strict. A constant map decodes exactly in rel mode (its bound is 0), only within
    ``abs`` in abs mode. Zeros: SZ3 does not keep exact zeros (decoded values lie within
    the bound around 0, some negative; measurements.md), except with ``algo=nopred``
    (``keeps_zeros``); when the whole input is non-negative the decoded values are clamped
    at 0, which removes the negative ones and never increases the error. NaN/Inf raise
    EncodeError.

    HDF5: dataset ``values`` (float32, per-sample shape = the 2-D view, one chunk per
    sample) with hdf5plugin's SZ3 filter (``absolute=`` or ``relative=``, relative to
    the chunk's range, i.e. the sample's), attribute ``sample_shape``; dataset
    ``nonneg`` (uint8 per sample) for the clamp. The filter is slow (about 22 MB/s to
    encode, measurements.md) and, in rel mode, prints "Only absolute and norm2 modes
    properly tested" to stderr once per dataset.
    """

    codec_id = "sz3"
    #: ``algo`` names -> pysz's predictor names; the first is SZ3's default
    ALGOS: ClassVar[dict[str, str]] = {"interp-lorenzo": "INTERP_LORENZO", "interp": "INTERP", "lorenzo-reg": "LORENZO_REG",
                                       "nopred": "NOPRED"}
    DEFAULT_ALGO = "interp-lorenzo"

    def __init__(self, abs: float | None = None, rel: float | None = None, algo: str = DEFAULT_ALGO) -> None:
        if not isinstance(algo, str) or algo not in self.ALGOS:
            raise CodecSpecError(f"codec {self.codec_id!r}: algo={algo!r} is not one of {', '.join(self.ALGOS)}",
                                 hint="e.g. 'sz3:abs=0.02,algo=nopred'; leave algo out for SZ3's default")
        self.algo = algo
        # without prediction a value is quantized on its own, and 0 lands on the zero bin,
        # which decodes to 0 exactly (tested with the contracts, tests/test_codecs.py)
        self.keeps_zeros = algo == "nopred"
        self.mode, self.bound = check_bound(self.codec_id, abs, rel, "e.g. 'sz3:abs=1e-3' or 'sz3:rel=1e-3'")

    def params(self) -> dict[str, Any]:
        return {self.mode: self.bound, **({"algo": self.algo} if self.algo != self.DEFAULT_ALGO else {})}

    def _config(self, shape: tuple[int, ...]) -> Any:
        # the one place a config is built, here and in the build's SZ3 process alike
        return sz3_child.config(shape, self.mode, self.bound, self.ALGOS[self.algo])

    # ---- bytes face -------------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> bytes:
        view = as_2d_view(x)
        stream, _ratio = pysz.sz.compress(view, self._config(view.shape))
        return self._framed(x, stream.tobytes())

    @staticmethod
    def _framed(x: np.ndarray, stream: bytes) -> bytes:
        """The payload of map ``x`` and its pysz ``stream`` (the clamp flag from ``x``)."""
        return frame(x, float(x.min()) >= 0, stream)

    def encode_batch(self, batch: np.ndarray) -> list[bytes]:
        """:meth:`Codec.encode_batch`; while a build's SZ3 encoding process runs
        (:mod:`fmcache.codecs.sz3_process`), the maps are compressed there, with the same
        bytes, and framed here. Anything the process cannot take (no batch of maps,
        NaN/Inf, which ``encode`` refuses by name) and a process that has ended leave the
        batch to this thread."""
        process = active_process()
        x = self._checked_batch(batch) if process is not None else None
        if process is None or x is None:
            return super().encode_batch(batch)
        rows, cols = view_shape(x.shape[1:])
        try:
            streams = process.compress(x.reshape(len(x), rows, cols), self.mode, self.bound, self.ALGOS[self.algo])
        except ProcessGone as exc:
            warnings.warn(f"{exc}; SZ3 encodes on the build's thread from here (the same bytes)", RuntimeWarning,
                          stacklevel=2)
            return super().encode_batch(batch)
        header = shape_header(x.shape[1:])
        payloads = []
        for i, stream in enumerate(streams):
            if isinstance(stream, str):
                raise EncodeError(f"codec {self.codec_id!r}: SZ3 failed on map {i} of the batch: {stream}")
            payloads.append(header + self._framed(x[i], stream))
        return payloads

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        def decode_stream(stream: memoryview) -> np.ndarray:
            decoded, _config = pysz.sz.decompress(np.frombuffer(stream, dtype=np.uint8), np.float32,
                                                  view_shape(shape))
            return np.asarray(decoded)

        return unframe_into(payload, shape, out, decode_stream)

    # ---- HDF5 face --------------------------------------------------------------------
    def _hdf5_filter(self) -> dict[str, Any]:
        if self.algo != self.DEFAULT_ALGO:
            raise CodecSpecError(f"codec {self.spec!r}: hdf5plugin's SZ3 filter takes only the error bound, "
                                 f"not algo={self.algo}",
                                 hint="store this layer in LMDB, or give it an sz3 codec without algo= "
                                      "(SZ3's default predictor) for HDF5 (fmcache compact --codec, a "
                                      "build's --codec or policy)")
        mode_kwarg = {"abs": "absolute", "rel": "relative"}[self.mode]
        return dict(hdf5plugin.SZ3(**{mode_kwarg: self.bound}))
