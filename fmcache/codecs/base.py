"""The codec plug-in interface.

A codec turns one sample's feature map into bytes and back. Every codec has a stable
string ``codec_id`` and a JSON config (``get_config()``, ``{"id": ..., **params}``) that
round-trips through :func:`fmcache.codec_from_config`; two codecs are equal when their
configs are.

Encoded byte layout (produced by :meth:`Codec.encode`)::

    u8 ndim | ndim x u32 dims (little-endian) | codec payload

so ``decode(bytes)`` restores the shape without outside help. Decoded maps are float32.

A codec also has an *HDF5 face*: :meth:`Codec.hdf5_fields` describes the datasets it
stores per sample (dtype, per-sample shape, native HDF5 filter), :meth:`Codec.to_hdf5`
turns a batch into those arrays and :meth:`Codec.from_hdf5` back. The default face stores
the encoded bytes as a variable-length uint8 dataset, so any plug-in codec works in HDF5;
codecs with a native filter (Blosc2, ZFP, SZ3, fp16) override it so that ``h5dump``
shows decoded values.

Channels: a sample of shape (C, H, W) (or any ndim >= 3) has its channels on axis 0; a
token map (T, D) or a vector (D,) has them on the last axis (:func:`channel_axis`).
"""

from __future__ import annotations

import inspect
import math
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import CodecSpecError, CorruptionError, EncodeError

MAX_NDIM = 8
#: header dims of an ndim-D map, one Struct per ndim: one unpack call per decode
HEADER_DIMS = tuple(struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1))
_MAX_VALUES = 2**34
_scratch = threading.local()


def scratch_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable C-contiguous array of ``shape`` and ``dtype``.

    Decoders stage intermediate values (quantised codes, ...) here instead of a fresh
    array per call: allocation, not arithmetic, dominates fast codecs (measurements.md),
    a reused buffer stays in cache, and the array is looked up, not rebuilt, per call.
    The contents are only valid until the next call on the same thread; callers must
    not return it.
    """
    arrays: dict[tuple[tuple[int, ...], str], np.ndarray] | None = getattr(_scratch, "arrays", None)
    if arrays is None:
        arrays = _scratch.arrays = {}
    array = arrays.get((shape, dtype.str))
    if array is None:
        if len(arrays) >= 32:  # many shapes: start over rather than grow
            arrays.clear()
        array = arrays[(shape, dtype.str)] = np.empty(shape, dtype=dtype)
    return array


def channel_axis(ndim: int) -> int:
    """Axis holding the channels of a sample with ``ndim`` dimensions."""
    return ndim - 1 if ndim <= 2 else 0


def as_2d_view(x: np.ndarray) -> np.ndarray:
    """(prod(shape[:-1]), shape[-1]) view: ZFP and SZ3 compress best on it (measurements.md)."""
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


@dataclass(frozen=True)
class Hdf5Field:
    """One dataset a codec stores per tier in HDF5.

    ``shape`` is per sample (the dataset is ``(N, *shape)``); ``dtype`` ``None`` means
    variable-length uint8 (opaque encoded bytes). ``filter`` holds h5py
    ``create_dataset`` keyword arguments (``compression``, ``compression_opts``),
    e.g. from an hdf5plugin filter object. ``per_sample_chunks`` asks for chunks of one
    sample (ZFP/SZ3 then see one 2-D sample, not a stack).
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int, ...]
    filter: Mapping[str, Any] = field(default_factory=dict)
    per_sample_chunks: bool = False
    attrs: Mapping[str, Any] = field(default_factory=dict)


#: Integers up to this magnitude are exact in float32 (its 24-bit significand).
FLOAT32_EXACT_INT = 1 << 24


def as_numpy(array: Any) -> np.ndarray:
    """``array`` as a numpy array; a torch tensor of a dtype numpy lacks (bfloat16) as float32."""
    if hasattr(array, "detach") and hasattr(array, "is_floating_point"):  # a torch tensor
        tensor = array.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return np.asarray(array)


def as_float32(x: np.ndarray, what: str) -> np.ndarray:
    """C-contiguous float32 of ``x``; EncodeError (naming ``what``) where that would change
    a value beyond float32's rounding: finite values past its range (which would become
    ±Inf) and integers past 2**24 (which would round to another integer)."""
    with np.errstate(over="ignore"):  # found below, with the values' names
        y = np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        overflow = np.isinf(y) & np.isfinite(x)
        if overflow.any():
            raise EncodeError(f"{what}: finite {x.dtype} values beyond float32's range (|x| up to "
                              f"{float(np.abs(x[overflow]).max()):.6g}) would be stored as ±Inf",
                              hint="fmcache stores float32 maps: scale the outputs into float32's range "
                                   "(about 3.4e38), or cast them in the model")
    elif x.dtype.kind in "iu" and x.dtype.itemsize > 2 and x.size:
        lo, hi = int(x.min()), int(x.max())
        if max(hi, -lo) > FLOAT32_EXACT_INT:
            raise EncodeError(f"{what}: {x.dtype} values up to {max(hi, -lo)} are not exact in float32 "
                              f"(integers beyond 2**24 round)",
                              hint="fmcache stores float32 maps: cache a float module's output, or split large "
                                   "ids into smaller parts")
    return y


class Codec(ABC):
    """Base class of every codec: one sample's map <-> bytes.

    Subclasses set ``codec_id`` and the class flags, take their parameters as keyword
    arguments (validated in ``__init__``), return them from :meth:`params`, and implement
    :meth:`_encode` and :meth:`_decode`.
    """

    codec_id: ClassVar[str]
    #: decode(encode(x)) == x bit for bit
    lossless: ClassVar[bool] = False
    #: NaN and +-Inf round-trip exactly; otherwise encode refuses them
    stores_nonfinite: ClassVar[bool] = False
    #: exact zeros decode to exact zeros (see docs/codecs.md for conditions); a codec may
    #: set it per instance (``sz3`` with ``algo=nopred``)
    keeps_zeros: bool = False
    #: every channel decodes to the same numbers whichever other channels share its map
    #: (element-wise casts, per-channel quantisers, lossless codecs): tiers that share
    #: such a codec can be stored as one part (fmcache.manifest.WHOLE_PART) without
    #: changing a value; error-bounded codecs, whose bound spans the map, cannot
    channelwise: ClassVar[bool] = False

    # ---- configuration -------------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The codec's parameters, JSON-serialisable, defaults included."""

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **self.params()}

    @classmethod
    def param_names(cls) -> list[str]:
        """The parameters a spec or config may name: ``__init__``'s named arguments (a codec
        without an ``__init__`` of its own shows object's ``*args, **kwargs``: none)."""
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        kwargs = {k: v for k, v in config.items() if k != "id"}
        known = cls.param_names()
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise CodecSpecError(f"codec {cls.codec_id!r} has no parameter {unknown[0]!r}",
                                 hint=f"its parameters: {', '.join(known) or 'none'} (`fmcache codecs` lists them)")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise CodecSpecError(f"codec {cls.codec_id!r}: {exc}") from None

    @property
    def spec(self) -> str:
        """The spec string (``id:key=value,...``) that rebuilds this codec."""
        params = self.params()
        if not params:
            return self.codec_id
        return self.codec_id + ":" + ",".join(f"{k}={v}" for k, v in params.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"

    # ---- bytes face -----------------------------------------------------------------
    def encode(self, array: np.ndarray) -> bytes:
        """Encode one sample's map; see the class docstring for the layout."""
        x = self._validate(array)
        return shape_header(x.shape) + bytes(self._encode(x))

    def encode_batch(self, batch: np.ndarray) -> list[bytes]:
        """:meth:`encode` of each sample of ``batch`` ``(N, *shape)``: the same bytes, which
        a codec may produce in fewer calls (``fp16``/``bf16`` check and cast the whole
        batch at once). An EncodeError does not say which sample failed: a caller that
        needs to know encodes the batch map by map (the backends do)."""
        return [self.encode(x) for x in batch]

    def _checked_batch(self, batch: np.ndarray) -> np.ndarray | None:
        """A batch ``(N, *shape)`` as C-contiguous float32 whose maps all pass
        :meth:`_validate` (its per-map checks of dtype, rank and size hold for every map
        alike, so the first map's stand for all), for an :meth:`encode_batch` that works on
        the whole batch; None for what is no batch of maps, or holds NaN/Inf a codec cannot
        store: the caller then encodes map by map, where the refusal is :meth:`encode`'s."""
        arr = as_numpy(batch)
        if arr.ndim < 2 or len(arr) == 0:
            return None
        self._validate(arr[0])
        x = as_float32(arr, f"codec {self.codec_id!r}")
        if not self.stores_nonfinite and not np.isfinite(x).all():
            return None
        return x

    def decode(self, data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """Decode bytes from :meth:`encode` into a float32 array (into ``out`` if given)."""
        return self._decode_bytes(data, out, self._decode)

    def decode_verified(self, data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`decode` for bytes that a storage layer has just checked against a checksum
        of its own (an LMDB record's CRC-32C covers every payload in it): a codec whose
        payload carries a checksum as well may skip that one (``bf16``'s frame CRC).
        The numbers and every other check are :meth:`decode`'s."""
        return self._decode_bytes(data, out, self._decode_verified)

    def verified_decoder(self, shape: tuple[int, ...]) -> Callable[[memoryview, np.ndarray], np.ndarray]:
        """A function ``(payload, out) -> out``: :meth:`decode_verified` of one sample of
        ``shape`` into ``out``, a C-contiguous float32 array of that shape (the caller
        guarantees it). A backend's per-sample read asks for it once per layer and calls
        it per sample; a codec may return one specialised to ``shape`` that skips the
        general path's parsing (``bf16``), with the same numbers and the same errors."""
        decode = self.decode_verified

        def run(payload: memoryview, out: np.ndarray) -> np.ndarray:
            return decode(payload, out=out)
        return run

    def decode_batch_verified(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """:meth:`decode_batch` for verified bytes (see :meth:`decode_verified`)."""
        return self.decode_batch(payloads, out)

    def _decode_bytes(self, data: bytes | bytearray | memoryview, out: np.ndarray | None,
                      decode: Callable[[memoryview, tuple[int, ...], np.ndarray | None], np.ndarray]) -> np.ndarray:
        buf = data if isinstance(data, memoryview) else memoryview(data)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        shape, offset = parse_header(buf, self.codec_id)
        if out is not None and (out.shape != shape or out.dtype != np.float32):
            raise ValueError(f"out has shape {out.shape} {out.dtype}, the record holds {shape} float32")
        try:
            result = decode(buf[offset:], shape, out)
        except CorruptionError:
            raise
        except Exception as exc:  # a damaged payload must never escape as a raw library error
            raise CorruptionError(f"codec {self.codec_id!r} could not decode a record: {exc}") from exc
        if result.shape != shape:
            raise CorruptionError(f"codec {self.codec_id!r} decoded shape {result.shape}, header says {shape}")
        return result

    def decode_batch(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray) -> np.ndarray:
        """Decode one payload per row of ``out`` (float32, C-contiguous ``(n, *shape)``).

        The numbers are :meth:`decode`'s; codecs whose per-sample work is mostly Python
        overhead (casts, quantisers) override this to do the arithmetic once per batch.
        CorruptionError (or ValueError) if any payload is malformed; callers that need to
        name the sample re-decode the rows one by one (the error path only).
        """
        return self._decode_rows(payloads, out, verified=False)

    def _decode_rows(self, payloads: Sequence[bytes | bytearray | memoryview], out: np.ndarray,
                     verified: bool) -> np.ndarray:
        """Row by row through :meth:`decode` (:meth:`decode_verified` for ``verified``
        bytes): the batch paths' fallback for a strided ``out`` or a mixed batch."""
        decode = self.decode_verified if verified else self.decode
        for row, payload in enumerate(payloads):
            decode(payload, out=out[row])
        return out

    @abstractmethod
    def _encode(self, x: np.ndarray) -> bytes | bytearray | memoryview:
        """Payload for a validated float32 C-contiguous array."""

    @abstractmethod
    def _decode(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        """float32 array of ``shape`` from the payload."""

    def _decode_verified(self, payload: memoryview, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        """:meth:`_decode` for verified bytes; codecs with a checksum of their own override it."""
        return self._decode(payload, shape, out)

    def _validate(self, array: np.ndarray) -> np.ndarray:
        x = as_numpy(array)
        if x.dtype.kind not in "fiub":
            raise EncodeError(f"codec {self.codec_id!r} takes numeric arrays, got dtype {x.dtype}")
        if not 1 <= x.ndim <= MAX_NDIM:
            raise EncodeError(f"codec {self.codec_id!r} takes 1..{MAX_NDIM}-D maps, got shape {x.shape}")
        if x.size == 0:
            raise EncodeError(f"codec {self.codec_id!r} got an empty map of shape {x.shape}")
        x = as_float32(x, f"codec {self.codec_id!r}")
        if not self.stores_nonfinite and not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise EncodeError(
                f"codec {self.codec_id!r} cannot store NaN/Inf ({bad} non-finite values)",
                hint="use raw, blosc2, fp16 or bf16, which store them exactly, or fix the input",
            )
        return x

    # ---- HDF5 face --------------------------------------------------------------------
    def hdf5_fields(self, sample_shape: tuple[int, ...]) -> list[Hdf5Field]:
        """Datasets this codec stores per tier; default: the encoded bytes, opaque."""
        return [Hdf5Field("encoded", None, ())]

    def to_hdf5(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays for :meth:`hdf5_fields` from a batch ``(N, *sample_shape)``."""
        encoded = np.empty(len(batch), dtype=object)
        for i, sample in enumerate(batch):
            encoded[i] = np.frombuffer(self.encode(sample), dtype=np.uint8)
        return {"encoded": encoded}

    def from_hdf5(self, fields: Mapping[str, np.ndarray], sample_shape: tuple[int, ...]) -> np.ndarray:
        """Decoded float32 batch ``(N, *sample_shape)`` from the stored arrays."""
        encoded = fields["encoded"]
        out = np.empty((len(encoded), *sample_shape), dtype=np.float32)
        for i, rec in enumerate(encoded):
            self.decode(np.ascontiguousarray(rec, dtype=np.uint8).data, out=out[i])
        return out

    def from_hdf5_into(self, fields: Mapping[str, np.ndarray], out: np.ndarray) -> np.ndarray:
        """:meth:`from_hdf5` into ``out`` (float32 ``(N, *sample_shape)``, filled and
        returned): the HDF5 reader's path. The default decodes a fresh batch and copies it;
        codecs that can decode straight into ``out`` override it (one pass less over the
        batch). ValueError if the stored arrays do not hold ``out``'s shape."""
        decoded = self.from_hdf5(fields, out.shape[1:])
        if decoded.shape != out.shape:  # np.copyto would broadcast a single row
            raise ValueError(f"stored rows decode to {decoded.shape}, expected {out.shape}")
        np.copyto(out, decoded)
        return out

    def hdf5_row_reader(self, rows: Mapping[str, np.ndarray]) -> Callable[[int, np.ndarray], np.ndarray]:
        """A decoder of one row of ``rows`` (a chunk's stored arrays, as
        :meth:`from_hdf5_into` takes them): ``read(k, out)`` fills the float32 map ``out``
        (C-contiguous, one sample's shape) from row ``k`` and returns it. The HDF5
        backend's per-sample reads build one per chunk they keep, so a codec can prepare
        what every row shares once. ValueError as :meth:`from_hdf5_into`."""
        def read(k: int, out: np.ndarray) -> np.ndarray:
            self.from_hdf5_into({name: r[k:k + 1] for name, r in rows.items()}, out[None])
            return out
        return read


def shape_header(shape: tuple[int, ...]) -> bytes:
    """The header :meth:`Codec.encode` puts before a payload: ``u8 ndim | u32 dims``."""
    return bytes([len(shape)]) + HEADER_DIMS[len(shape)].pack(*shape)


def parse_header(buf: memoryview, codec_id: str) -> tuple[tuple[int, ...], int]:
    """Shape and payload offset of an encoded map; CorruptionError if malformed."""
    if len(buf) < 1:
        raise CorruptionError(f"codec {codec_id!r}: empty record")
    ndim = buf[0]
    end = 1 + 4 * ndim
    if not 1 <= ndim <= MAX_NDIM or len(buf) < end:
        raise CorruptionError(f"codec {codec_id!r}: malformed header (ndim={ndim}, {len(buf)} bytes)")
    shape = HEADER_DIMS[ndim].unpack_from(buf, 1)
    if 0 in shape or math.prod(shape) > _MAX_VALUES:
        raise CorruptionError(f"codec {codec_id!r}: implausible shape {shape} in header")
    return shape, end


def batch_views(payloads: Sequence[bytes | bytearray | memoryview], codec_id: str,
                shape: tuple[int, ...]) -> list[memoryview]:
    """The payload bodies (after the header) of a batch whose headers must all say ``shape``."""
    bodies = []
    for payload in payloads:
        buf = payload if isinstance(payload, memoryview) else memoryview(payload)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        got, offset = parse_header(buf, codec_id)
        if got != shape:
            raise CorruptionError(f"codec {codec_id!r}: a record holds shape {got}, expected {shape}")
        bodies.append(buf[offset:])
    return bodies


def check_choice(codec_id: str, name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    # True == 1 in Python: "clevel=true" is not clevel 1
    if isinstance(value, bool) != any(isinstance(c, bool) for c in choices) or value not in choices:
        raise CodecSpecError(f"codec {codec_id!r}: {name}={value!r} is not one of {', '.join(map(str, choices))}")
    return value


def check_positive(codec_id: str, name: str, value: Any, *, integer: bool = False) -> Any:
    if isinstance(value, bool):
        raise CodecSpecError(f"codec {codec_id!r}: {name}={value!r} is not a number")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise CodecSpecError(f"codec {codec_id!r}: {name}={value!r} is not a number") from None
    if integer and float(value) != number:
        raise CodecSpecError(f"codec {codec_id!r}: {name}={value!r} must be an integer")
    if not number > 0 or not np.isfinite(number):
        raise CodecSpecError(f"codec {codec_id!r}: {name}={value!r} must be > 0")
    return number


def check_bound(codec_id: str, abs: Any, rel: Any, hint: str) -> tuple[str, float]:
    """``("abs", bound)`` or ``("rel", bound)`` from an error-bounded codec's two exclusive
    parameters (``sz3``, ``grid``): CodecSpecError naming the codec, with ``hint``, for
    neither or both, a bound that is no positive number, or ``rel`` not below 1."""
    if (abs is None) == (rel is None):
        raise CodecSpecError(f"codec {codec_id!r} takes exactly one of abs= and rel=", hint=hint)
    if abs is not None:
        return "abs", float(check_positive(codec_id, "abs", abs))
    bound = float(check_positive(codec_id, "rel", rel))
    if bound >= 1:
        raise CodecSpecError(f"codec {codec_id!r}: rel={rel!r} must be below 1 (a fraction of the sample's "
                             "value range)", hint=hint)
    return "rel", bound
