"""``grid``: error-bounded uniform quantisation, then blosc2 -- the fast compact codec.

Every value is rounded to the nearest point of a grid ``k * step`` with ``step`` just
under twice the bound: SZ3's linear quantiser without its predictor (``sz3:algo=nopred``
stores about as small on post-ReLU maps), with the codes in the narrowest integer type
that holds them and blosc2 (zstd-1, byte shuffle by default) in place of SZ3's Huffman
and zstd stages: 2.4-4x SZ3's decode speed per sample (docs/codecs.md, "grid").

Error contract, per sample: ``|x - x'| <= abs``, or ``<= rel * (max(x) - min(x))``.
Exact zeros decode to exact zeros (0 is a grid point), non-negative maps stay
non-negative, NaN/Inf raise EncodeError. A sample the grid cannot bound (a constant map
in ``rel`` mode, magnitudes of 2**20 times the bound or more, a step below float32's
normal range) is stored exactly: the bound holds for every sample. A map this codec
decoded keeps its grid when it is encoded again (:func:`_existing_grid`).

Byte layout of the payload (after the shape header of :mod:`fmcache.codecs.base`)::

    u8 kind | f32 step | u32 crc32(kind, step) | stage payload (:mod:`.stage`)
    kind 0: the float32 values, exact (step 0)
    kind 1 / 2 / 3: int8 / int16 / int32 codes q, C order;  x' = float32(q) * step

all little-endian. The head's CRC and the stage's frame CRC (its default blosc2 stage)
cover every byte, so a damaged payload is a CorruptionError, never other numbers.

HDF5 face: ``q`` (int32, the sample's shape, the Blosc2 filter unless ``cname="none"``;
byte shuffle leaves the unused high bytes to compress to nearly nothing) and ``step``
(float32 per sample): ``x = q * step``; where ``step`` is NaN the sample is stored
exactly and ``q`` holds its float32 bit patterns.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import CorruptionError
from .base import Codec, Hdf5Field, batch_views, check_bound, scratch_array
from .registry import register_codec
from .stage import LosslessStage

KIND_EXACT = 0
#: kind byte -> the codes' dtype
CODE_DTYPES: dict[int, np.dtype] = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4")}
_LIMITS = ((1, 127), (2, 32767), (3, 1 << 24))  # float32 holds integers up to 2**24 exactly
_HEAD = struct.Struct("<Bf")
_HEAD_CRC = struct.Struct("<I")
_HEAD_BYTES = _HEAD.size + _HEAD_CRC.size
_F32 = np.dtype(np.float32)
_I32 = np.dtype("<i4")
#: the step is at least this much under twice the bound; the margin absorbs float32's
#: rounding of ``x / step`` and ``q * step``, which grows with the sample's magnitude
#: (:func:`grid_step`)
STEP_MARGIN = 2.0**-7
_TINY = float(np.finfo(np.float32).tiny)
_SPEC_HINT = ("e.g. 'grid:abs=0.02' (every value within 0.02) or 'grid:rel=0.01' (within 1 % of each "
              "sample's value range)")
#: values :func:`_existing_grid` probes before it checks a whole map
_PROBE = 256


def sample_bound(x: np.ndarray, mode: str, bound: float) -> float:
    """The sample's error bound: ``abs``, or ``rel`` times its value range (float64)."""
    if mode == "abs":
        return bound
    return bound * (float(x.max()) - float(x.min()))


def grid_step(max_abs: float, bound: float) -> float:
    """The grid's step for a sample whose largest magnitude is ``max_abs``: twice the
    bound less a margin of at least ``STEP_MARGIN`` and at least ``max_abs * 2**-21``
    (four times float32's relative rounding of the largest value, which is what
    ``x / step`` and ``q * step`` can add to the half step); 0 where that margin would
    reach half the bound (values within a few ulps of float32 of the bound: stored
    exactly)."""
    margin = max(STEP_MARGIN, max_abs * 2.0**-21 / bound)
    if margin >= 0.5:
        return 0.0
    return float(np.float32(2.0 * bound * (1.0 - margin)))


def _kind_for(top: float) -> int | None:
    """The narrowest code kind whose integers reach ``top`` (None: past 2**24)."""
    return next((k for k, limit in _LIMITS if top <= limit), None)


def _existing_grid(x: np.ndarray, step: float, high: float, low: float,
                   follows_range: bool) -> tuple[int, float, np.ndarray] | None:
    """``(kind, s, codes)`` where every value of ``x`` is exactly ``float32(q) * s`` for a
    step ``s`` no finer than half of ``step``, the one the sample would get: a map this
    codec decoded (``compact`` without a new codec, a cache read and written again).
    Storing it on its own grid keeps every value, where a new grid would round them
    again (in ``rel`` mode the decoded range moves the step). None otherwise.

    Candidates for ``s``: the smallest magnitude among a strided probe and the extremes
    ``high``/``low`` (a sparse map's probe may hold no other) divided by its step count
    ``k``, estimated from ``step`` and, where the step follows the sample's range
    (``follows_range``: rel mode, whose decoded range moves it), also from the range over
    a whole number of steps (a decoded range is one) -- which finds the grid of maps far
    from 0, whose ``k`` is large. Each is checked cheaply on a few values, then on the
    probe, then on every value.
    """
    extreme = high if high >= -low else low
    if extreme == 0:
        return None
    flat = x.reshape(-1)
    probe = flat[::max(1, flat.size // _PROBE)]
    nonzero = probe[probe != 0]
    smallest = min(float(np.abs(nonzero).min()), abs(extreme)) if nonzero.size else abs(extreme)
    few = [*nonzero[:3].tolist(), high, low]  # Python floats: cheaper for a few values
    # approximate steps: the one the sample would get, and, where the step follows the
    # range (rel), the range over a whole number of steps; each gives the smallest
    # magnitude's step count k within two, and smallest / k the grid's step to the ulp
    approx = [(step, 2)]
    span = high - low
    if follows_range and span > 0 and round(span / step) <= 1 << 20:
        # the range's own rounding (an ulp of the extremes at each end) blurs span / n,
        # and smallest / (span / n) by that much more: the window widens with it
        blur = 4 * float(np.spacing(np.float32(abs(extreme)))) / span
        approx += [(span / n, 2 + math.ceil(smallest / (span / n) * blur))
                   for n in range(max(1, round(span / step) - 2), round(span / step) + 3)]
    ks = sorted({k for a, width in approx if round(smallest / a) <= 1 << 20 and width <= 64
                 for k in range(max(1, round(smallest / a) - width), round(smallest / a) + width + 1)})
    candidates = [smallest / k for k in ks]
    tried: set[float] = set()
    for c in candidates:
        if c < step / 2 or any(abs(v / c - round(v / c)) > 1e-3 + 1e-6 * abs(v / c) for v in few):
            continue
        base = np.float32(c)
        up, down = np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))
        for s in (base, up, down, np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))):
            if float(s) in tried or not (s >= step / 2 and s >= _TINY):
                continue
            tried.add(float(s))
            inv = np.float32(1.0) / s
            if not np.isfinite(inv) or not np.array_equal(np.rint(nonzero * inv) * s, nonzero):
                continue
            q = x * inv
            np.rint(q, out=q)
            kind = _kind_for(max(float(q.max()), -float(q.min())))
            if kind is not None and np.array_equal(q * s, x):
                return kind, float(s), q.astype(CODE_DTYPES[kind])
    return None


def _grid(x: np.ndarray, bound: float, follows_range: bool = False) -> tuple[int, float, np.ndarray | None]:
    """``(kind, step, codes)`` of a finite float32 sample for its ``bound``; kind 0 (and
    codes None) where no grid within float32 honours the bound.

    The codes come from float32 arithmetic; every sample's decoded values are checked
    against the bound (in float32, against a threshold 2**-20 under it, which float32's
    rounding of the difference cannot cross); a sample that fails (none should, with
    :func:`grid_step`'s margin) is redone in float64, then stored exactly if that fails
    too. A sample already on a grid (:func:`_existing_grid`) keeps it, and its values.
    """
    if not bound > 0:
        return KIND_EXACT, 0.0, None
    high, low = float(x.max()), float(x.min())
    with np.errstate(over="ignore"):  # a bound past float32's range: no grid (stored exactly)
        step = np.float32(grid_step(max(high, -low), bound))
    if not np.isfinite(step) or step < _TINY or not np.isfinite(np.float32(1.0) / step):
        return KIND_EXACT, 0.0, None
    existing = _existing_grid(x, float(step), high, low, follows_range)
    if existing is not None:
        return existing
    threshold = np.float32(bound * (1.0 - 2.0**-20))
    for wide in (False, True):
        with np.errstate(over="ignore", invalid="ignore"):
            if wide:
                q = np.rint(x.astype(np.float64) / np.float64(step)).astype(np.float32)
            else:
                q = x * (np.float32(1.0) / step)
                np.rint(q, out=q)
            top = max(float(q.max()), -float(q.min()))
        kind = _kind_for(top)
        if kind is None:
            return KIND_EXACT, 0.0, None
        decoded = q * step  # float32(q) * step, as the decoder computes it
        np.subtract(x, decoded, out=decoded)
        np.abs(decoded, out=decoded)
        if float(decoded.max()) <= threshold:
            return kind, float(step), q.astype(CODE_DTYPES[kind])
    return KIND_EXACT, 0.0, None


def dequantize_into(codes: np.ndarray, step: float, out: np.ndarray) -> np.ndarray:
    """``out = float32(codes) * step`` in float32 (one rounding), into the C-contiguous
    ``out`` of the codes' shape; torch widens and multiplies faster than numpy's mixed
    int/float ufunc loop (torch takes no read-only array: such codes are copied first)."""
    target = torch.from_numpy(out)
    target.copy_(torch.from_numpy(codes if codes.flags.writeable else codes.copy()))
    target.mul_(step)
    return out


@register_codec
class Grid(Codec):
    """Error-bounded uniform quantisation (the module docstring), then blosc2.

    ``grid:abs=0.02`` bounds every value's error by 0.02; ``grid:rel=0.01`` by 1 % of
    the sample's value range. ``cname``/``clevel``/``shuffle`` set the blosc2 stage
    (default zstd-1 with byte shuffle; ``cname=none`` stores the codes plain).
    """

    codec_id = "grid"
    keeps_zeros = True

    def __init__(self, abs: float | None = None, rel: float | None = None, cname: str = "zstd", clevel: int = 1,
                 shuffle: str = "byte") -> None:
        self.mode, self.bound = check_bound(self.codec_id, abs, rel, _SPEC_HINT)
        self.stage = LosslessStage.checked(self.codec_id, cname, clevel, shuffle)

    def params(self) -> dict[str, Any]:
        return {self.mode: self.bound, **self.stage.params()}

    def grid(self, x: np.ndarray) -> tuple[int, float, np.ndarray | None]:
        """``(kind, step, codes)`` of a validated float32 sample (see :func:`_grid`)."""
        return _grid(x, sample_bound(x, self.mode, self.bound), self.mode == "rel")

    # ---- bytes face -------------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> bytes:
        kind, step, codes = self.grid(x)
        body = x if codes is None else codes
        head = _HEAD.pack(kind, step)
        return head + _HEAD_CRC.pack(zlib.crc32(head)) + self.stage.pack(body)

    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._dequantize(payload, shape, out, verified=False)

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        return self._dequantize(payload, shape, out, verified=True)

    def _dequantize(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None,
                    verified: bool) -> np.ndarray:
        if len(payload) < _HEAD_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes has no kind and step")
        kind, step = _HEAD.unpack_from(payload)
        if not verified and zlib.crc32(payload[:_HEAD.size]) != _HEAD_CRC.unpack_from(payload, _HEAD.size)[0]:
            raise CorruptionError(f"codec {self.codec_id!r}: the kind and step fail their CRC-32 (damaged record)")
        body = payload[_HEAD_BYTES:]
        result = out if out is not None and out.flags.c_contiguous else np.empty(shape, dtype=np.float32)
        if kind == KIND_EXACT:
            self.stage.unpack(body, _F32, shape, result, verified=verified)
        else:
            dtype = CODE_DTYPES.get(kind)
            if dtype is None:
                raise ValueError(f"unknown kind byte {kind}")
            if not (np.isfinite(step) and step > 0):
                raise ValueError(f"step {step!r} is no grid step")
            codes = self.stage.unpack(body, dtype, shape, scratch_array(shape, dtype), verified=verified)
            dequantize_into(codes, step, result)
        if out is not None and result is not out:
            out[...] = result
            return out
        return result

    def decode_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        return self._dequantize_rows(payloads, out, verified=False)

    def decode_batch_verified(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        return self._dequantize_rows(payloads, out, verified=True)

    def _dequantize_rows(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray,
                         verified: bool) -> np.ndarray:
        """Row by row (each row has its own code width and step) into the rows of ``out``,
        the shape headers checked by :func:`batch_views` instead of decode's general path."""
        if not out.flags.c_contiguous:
            return self._decode_rows(payloads, out, verified)
        shape = out.shape[1:]
        for row, body in enumerate(batch_views(payloads, self.codec_id, shape)):
            self._dequantize(body, shape, out[row], verified)
        return out

    # ---- HDF5 face --------------------------------------------------------------------
    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        return [
            Hdf5Field("q", _I32, sample_shape, self.stage.hdf5_filter(),
                      attrs={"encoding": "x = q * step; where step is NaN, q holds the float32 bits (stored exactly)"}),
            Hdf5Field("step", _F32, (), attrs={"encoding": "each sample's grid step: x = q * step; NaN: the sample "
                                                           "is stored exactly, q holds its float32 bits"}),
        ]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        codes = np.empty(np.shape(batch), dtype=_I32)
        steps = np.empty(len(batch), dtype=_F32)
        for i, sample in enumerate(batch):
            x = self._validate(sample)
            _kind, step, q = self.grid(x)
            if q is None:
                codes[i] = x.view(_I32)
                steps[i] = np.nan
            else:
                codes[i] = q
                steps[i] = step
        return {"q": codes, "step": steps}

    def hdf5_row_reader(self, rows: Any) -> Callable[[int, np.ndarray], np.ndarray]:
        """:meth:`Codec.hdf5_row_reader`: the chunk's codes viewed once as torch rows and
        its steps as Python floats, then each row widened and scaled straight into ``out``
        (the per-row dict and slices of :meth:`from_hdf5_into` cost about as much as the
        arithmetic on a 16-32 KiB map)."""
        codes, steps = rows.get("q"), rows.get("step")
        if (codes is None or steps is None or codes.dtype != _I32 or not codes.flags.c_contiguous
                or codes.ndim < 1 or len(steps) != len(codes)):
            return super().hdf5_row_reader(rows)
        row_views = torch.from_numpy(codes).unbind(0) if codes.flags.writeable else None
        step_list = [float(s) for s in np.asarray(steps, dtype=_F32).reshape(-1)]
        shape = codes.shape[1:]

        def read(k: int, out: np.ndarray) -> np.ndarray:
            if out.shape != shape:
                raise ValueError(f"stored codes of shape {shape}, expected {out.shape}")
            step = step_list[k]
            if math.isnan(step):  # stored exactly, the float32 bits
                out[...] = codes[k].view(_F32)
            elif not (0 < step < float("inf")):
                raise ValueError(f"row {k}: step {step!r} is no grid step")
            elif row_views is None or not out.flags.c_contiguous:
                out[...] = codes[k].astype(_F32) * np.float32(step)
            else:
                target = torch.from_numpy(out)
                target.copy_(row_views[k])
                target.mul_(step)
            return out
        return read

    def from_hdf5(self, fields: Any, sample_shape: tuple[int, ...]) -> np.ndarray:
        return self.from_hdf5_into(fields, np.empty((len(fields["q"]), *sample_shape), dtype=np.float32))

    def from_hdf5_into(self, fields: Any, out: np.ndarray) -> np.ndarray:
        """Each row widened and scaled straight into its row of ``out``; rows stored
        exactly (step NaN) reinterpreted."""
        if not out.flags.c_contiguous:
            return super().from_hdf5_into(fields, out)
        codes = np.ascontiguousarray(fields["q"], dtype=_I32)
        steps = np.asarray(fields["step"], dtype=_F32).reshape(-1)
        if codes.shape != out.shape or len(steps) != len(out):
            raise ValueError(f"stored fields of {codes.shape} and {len(steps)} steps, expected {out.shape}")
        for i in range(len(out)):
            step = float(steps[i])
            if np.isnan(step):
                out[i] = codes[i].view(_F32)
            elif step > 0 and np.isfinite(step):
                dequantize_into(codes[i], step, out[i])
            else:
                raise ValueError(f"row {i}: step {step!r} is no grid step")
        return out
