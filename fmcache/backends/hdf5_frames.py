"""Chunks fmcache writes and reads itself: Blosc2-filtered HDF5 datasets, raw.

Through h5py, a chunk of a Blosc2-filtered dataset is fletcher32 over the stored bytes,
then hdf5plugin's filter: a B2ND frame whose blocks cut samples apart, reassembled into
a buffer HDF5 copies again. That made HDF5's cold ``bf16`` reads 1.7-2.6x LMDB's time
(docs/benchmarks.md, "Why HDF5's ``bf16`` reads were slower than LMDB's"). So fmcache
writes such chunks itself (``write_direct_chunk``): one plain blosc2 frame holding the
chunk's rows (the format hdf5plugin's filter reads, so h5py and ``h5dump`` still decode
them), then its fletcher32, as HDF5's own filter would append it. Reading, fmcache takes
the stored bytes (``read_direct_chunk``), checks them against a CRC-32C recorded at
commit (hardware CRC-32C, far cheaper than fletcher32 here) and decodes the frame's one
blosc2 chunk straight into the rows.

* A dataset written so carries the attribute ``fmcache_chunks = "blosc2-frame-1"``
  (:data:`FORMAT`); one without it (a cache written before session 15) is read through
  h5py as before.
* Its chunks' CRC-32Cs (of the stored bytes, fletcher32 included) are the dataset
  ``<field>.chunk_crc32c`` beside it, ``uint32`` per chunk, written when the writer
  commits (a resume of a commit killed after writing it deletes it) from the
  CRCs it computed as it wrote each chunk (chunks an earlier, killed process wrote are
  read back and their fletcher32 checked first): :class:`ChunkCrcs`.

The dataset's filter parameters (hdf5plugin's ``cd_values``: level, shuffle, codec) are
the frames' settings, so the file describes its chunks whoever reads it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import blosc2
import h5py
import hdf5plugin
import numpy as np
from crc32c import crc32c

from ..codecs import Hdf5Field
from ..codecs.lossless import CHUNK_SIZES, blosc2_decompress_into
from ..errors import CorruptionError
from .hdf5_rows import FileMap, row_blocksize

#: ``fmcache_chunks``: the attribute naming how a dataset's chunks were written
FORMAT_ATTR = "fmcache_chunks"
FORMAT = "blosc2-frame-1"
#: the dataset of a field's chunk CRC-32Cs: its path plus this
CRC_SUFFIX = ".chunk_crc32c"
_FLETCHER = struct.Struct("<I")
#: a cframe's header: fixarray marker, "b2frame\0" (str8), then int32 (marker 0xd2) header size
_FRAME_MAGIC = b"b2frame\x00"


def writes_frames(field: Hdf5Field) -> bool:
    """Whether a field's chunks are written by fmcache: a fixed dtype, Blosc2-filtered,
    chunks of several samples (ZFP/SZ3 and opaque fields go through HDF5's filters)."""
    return (field.dtype is not None and field.dtype.itemsize < 8 and not field.per_sample_chunks
            and dict(field.filter).get("compression") == hdf5plugin.BLOSC2_ID)


def written_as_frames(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` carries ``fmcache_chunks = "blosc2-frame-1"`` (CorruptionError where
    the attribute cannot be read)."""
    try:
        value = ds.attrs.get(FORMAT_ATTR)
        if value is None:
            return False
        return (value if isinstance(value, str) else bytes(value).decode("ascii", "replace")) == FORMAT
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError) as exc:
        raise CorruptionError(f"{ds.file.filename}: the {FORMAT_ATTR} attribute of {ds.name} cannot be read "
                              f"({type(exc).__name__}: {exc}; its header is damaged)") from None


_WEIGHTS: list[np.ndarray] = [np.arange(0, dtype=np.int64)]  # 0, 1, 2, ...: grown as needed
_BLOCK = 1 << 20


def fletcher32(data: bytes | bytearray | memoryview) -> int:
    """HDF5's fletcher32 of ``data`` (``H5_checksum_fletcher32``): 16-bit big-endian words,
    a trailing odd byte as its high half; sums folded mod 65535, where a non-zero sum
    whose residue is 0 stays 65535 (the folds never reach 0 from a positive sum)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    words = raw[:len(raw) // 2 * 2].view(">u2").astype(np.int64)
    if len(raw) % 2:
        words = np.append(words, np.int64(raw[-1]) << 8)
    count = len(words)
    if not count:
        return 0
    if len(_WEIGHTS[0]) < min(count, _BLOCK):
        _WEIGHTS[0] = np.arange(min(_BLOCK, max(count, 2 * len(_WEIGHTS[0]))), dtype=np.int64)
    first = int(words.sum())
    # sum(i * w_i) in blocks of 2**20 words, each within int64 (2**20 * 2**20 * 65535 < 2**63),
    # added up as Python ints: one dot over a 48 MiB chunk wrapped around
    weighted = 0
    for lo in range(0, count, _BLOCK):
        block = words[lo:lo + _BLOCK]
        weighted += lo * int(block.sum()) + int(np.dot(block, _WEIGHTS[0][:len(block)]))
    second = count * first - weighted

    def fold(total: int) -> int:
        return 0 if total == 0 else (total - 1) % 65535 + 1

    return (fold(second) << 16) | fold(first)


def frame_settings(ds: h5py.Dataset) -> dict[str, Any]:
    """blosc2 ``cparams`` from the dataset's Blosc2 filter (hdf5plugin's ``cd_values``:
    4 clevel, 5 shuffle, 6 codec), with blocks that cut no row apart where a row is large
    enough (:func:`.hdf5_rows.row_blocksize`: a sample decodes alone, :class:`.hdf5_rows.RowDecoder`)."""
    values = ds.id.get_create_plist().get_filter_by_id(hdf5plugin.BLOSC2_ID)[1]
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    return {"codec": blosc2.Codec(values[6]), "clevel": int(values[4]), "filters": [blosc2.Filter(values[5])],
            "typesize": ds.dtype.itemsize, "nthreads": 1, "blocksize": row_blocksize(row_bytes, ds.dtype.itemsize)}


#: per (chunk bytes, blosc2 settings): the frame's header and tail around its one chunk
_FRAMES: dict[tuple[int, ...], tuple[bytes, bytes] | None] = {}
_FRAME_LENGTH = struct.Struct(">Q")  # header bytes 16-23 (msgpack uint64, marker 0xcf at 15)
_FRAME_CBYTES = struct.Struct(">q")  # header bytes 39-46 (msgpack int64, marker 0xd3 at 38)


def _frame_around(nbytes: int, cparams: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The header and tail of python-blosc2's frame of one chunk of ``nbytes`` with these
    settings (found once from a probe): the frame is header, the chunk ``compress2``
    gives, and a tail (the offsets chunk, whose one offset is 0, and the trailer) that do
    not depend on the data, but for the frame's length and compressed size in the
    header. None where a probe's frame is not laid out so (then each frame is built by
    python-blosc2's ``SChunk``, which is slower)."""
    key = (nbytes, cparams["codec"].value, int(cparams["clevel"]), cparams["filters"][0].value, int(cparams["typesize"]),
           int(cparams.get("blocksize", 0)))
    if key not in _FRAMES:
        probe = (np.arange(nbytes, dtype=np.uint32) % 251).astype(np.uint8)  # no all-zero chunk
        frame = bytes(blosc2.SChunk(chunksize=nbytes, data=probe, cparams=cparams).to_cframe())
        chunk = blosc2.compress2(probe, **cparams)
        at = struct.unpack_from(">i", frame, 11)[0]
        ok = (frame[10] == 0xD2 and frame[15] == 0xCF and frame[38] == 0xD3 and frame[at:at + len(chunk)] == chunk
              and _FRAME_LENGTH.unpack_from(frame, 16)[0] == len(frame)
              and _FRAME_CBYTES.unpack_from(frame, 39)[0] == len(chunk))
        _FRAMES[key] = (frame[:at], frame[at + len(chunk):]) if ok else None
    return _FRAMES[key]


def encode_chunk(rows: np.ndarray, cparams: dict[str, Any]) -> bytes:
    """A whole chunk's rows as the stored bytes: a blosc2 frame holding them as one
    chunk (python-blosc2's ``SChunk.to_cframe`` layout), then its fletcher32."""
    rows = np.ascontiguousarray(rows)
    around = _frame_around(rows.nbytes, cparams)
    if around is None:
        frame = bytes(blosc2.SChunk(chunksize=rows.nbytes, data=rows, cparams=cparams).to_cframe())
    else:
        header, tail = around
        chunk = blosc2.compress2(rows, **cparams)
        head = bytearray(header)
        _FRAME_LENGTH.pack_into(head, 16, len(header) + len(chunk) + len(tail))
        _FRAME_CBYTES.pack_into(head, 39, len(chunk))
        frame = b"".join((head, chunk, tail))
    return frame + _FLETCHER.pack(fletcher32(frame))


def decode_chunk(stored: bytes | memoryview, crc: int, rows: np.ndarray, where: str) -> np.ndarray:
    """Decode a chunk's stored bytes into ``rows`` (the chunk's C-contiguous rows) after
    checking their CRC-32C against ``crc``; CorruptionError (naming ``where``) otherwise."""
    if crc32c(stored) != crc:
        raise CorruptionError(f"{where}: the chunk fails its CRC-32C (damaged)")
    if not is_own_frame(stored):  # a commit never records the CRC of any other chunk
        raise CorruptionError(f"{where}: the chunk is not a frame fmcache wrote (a B2ND frame of hdf5plugin's "
                              "filter, or other bytes), though its CRC-32C matches")
    try:
        at, _, cbytes = frame_chunk(stored, rows.nbytes, rows.itemsize)
        blosc2_decompress_into(memoryview(stored)[at:at + cbytes], rows)
    except (ValueError, struct.error, RuntimeError):
        # a frame whose one chunk is not where fmcache's are: blosc2 keeps an all-zero
        # chunk as a special value in the frame's offsets, with no data (the CRC held)
        _decode_any_frame(memoryview(stored)[:-_FLETCHER.size], rows, where)
    return rows


def frame_chunk(stored: bytes | memoryview, nbytes: int, itemsize: int) -> tuple[int, int, int]:
    """(offset, blocksize, compressed size) of the one blosc2 chunk in an own frame's stored
    bytes (:func:`is_own_frame`), where it holds ``nbytes`` of ``itemsize``-byte values
    and ends before the fletcher32; ValueError (or struct.error) otherwise."""
    at = struct.unpack_from(">i", stored, 11)[0]
    held, blocksize, cbytes = CHUNK_SIZES.unpack_from(stored, at + 4)
    # the typesize too: where an all-zero chunk left no data, the frame's offsets (8-byte) come first
    if held != nbytes or stored[at + 3] != itemsize or at + cbytes > len(stored) - _FLETCHER.size:
        raise ValueError(f"its frame holds {held} bytes in {cbytes}, the chunk is {nbytes}")
    return at, blocksize, cbytes


def is_own_frame(stored: bytes | bytearray | memoryview) -> bool:
    """Whether stored chunk bytes are a frame as fmcache writes them: a blosc2 frame
    without the ``b2nd`` metalayer hdf5plugin's filter writes (whose blocks cut samples
    apart: decoded as one chunk, its bytes are in the blocks' order, not the array's)."""
    if len(stored) < 16 or bytes(stored[2:10]) != _FRAME_MAGIC or stored[10] != 0xD2:
        return False
    at = struct.unpack_from(">i", stored, 11)[0]
    return 0 < at < len(stored) and b"b2nd" not in bytes(stored[:at])


def _decode_any_frame(frame: memoryview, rows: np.ndarray, where: str) -> None:
    try:
        schunk = blosc2.schunk_from_cframe(frame, copy=True)
        if schunk.nchunks != 1 or schunk.nbytes != rows.nbytes:
            raise ValueError(f"it holds {schunk.nchunks} chunks of {schunk.nbytes} bytes, the chunk is {rows.nbytes}")
        schunk.decompress_chunk(0, dst=rows)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CorruptionError(f"{where}: the chunk is not the frame fmcache writes ({exc})") from None


def chunk_offset(ds: h5py.Dataset, chunk: int) -> tuple[int, ...]:
    return (chunk * ds.chunks[0], *(0,) * (ds.ndim - 1))


class ChunkCrcs:
    """The CRC-32C of every chunk a writer wrote, per dataset, until commit."""

    def __init__(self) -> None:
        self._crcs: dict[str, dict[int, int]] = {}

    def write(self, ds: h5py.Dataset, chunk: int, rows: np.ndarray, cparams: dict[str, Any]) -> None:
        """Write chunk ``chunk`` of ``ds`` (its whole rows, padded past the dataset's end)."""
        stored = encode_chunk(rows, cparams)
        ds.id.write_direct_chunk(chunk_offset(ds, chunk), stored, 0)
        self._crcs.setdefault(ds.name, {})[chunk] = crc32c(stored)

    def forget(self, path: str, from_chunk: int) -> None:
        """Drop the CRCs of chunks from ``from_chunk`` on (a resume cut them)."""
        kept = self._crcs.get(path, {})
        for chunk in [c for c in kept if c >= from_chunk]:
            del kept[chunk]

    def commit(self, fh: h5py.File) -> None:
        """Write every frame-written dataset's ``<path>.chunk_crc32c`` (replacing one a
        killed commit left): CRCs this writer computed, others read back
        (:func:`stored_crc`)."""
        for ds in frame_datasets(fh):
            per, rows = ds.chunks[0], ds.shape[0]
            known = self._crcs.get(ds.name, {})
            crcs = np.empty(-(-rows // per), dtype="<u4")
            cparams = None
            for chunk in range(len(crcs)):
                crc = known.get(chunk)
                if crc is None:
                    cparams = cparams or frame_settings(ds)
                    crc = stored_crc(ds, chunk, cparams)
                crcs[chunk] = crc
            path = ds.name + CRC_SUFFIX
            if path in fh:
                del fh[path]
            fh.create_dataset(path, data=crcs, chunks=(max(1, len(crcs)),), maxshape=(None,), fletcher32=True)


def stored_crc(ds: h5py.Dataset, chunk: int, cparams: dict[str, Any]) -> int:
    """CRC-32C of a chunk on disk that this process did not write, once its fletcher32
    holds. A chunk HDF5's filter wrote (a resume shrank the dataset inside it: HDF5
    rewrites that chunk through its filters) is read through them and written again as
    fmcache writes chunks, so that every chunk a commit records reads raw."""
    where = f"{ds.file.filename}: {ds.name} chunk {chunk}"
    try:
        mask, stored = ds.id.read_direct_chunk(chunk_offset(ds, chunk))
    except (OSError, RuntimeError, ValueError) as exc:
        raise CorruptionError(f"{where}: HDF5 cannot read it ({exc})") from None
    body = memoryview(stored)[:-_FLETCHER.size]
    if mask or len(stored) < _FLETCHER.size or fletcher32(body) != _FLETCHER.unpack_from(stored, len(body))[0]:
        raise CorruptionError(f"{where}: the chunk fails its fletcher32 (damaged since it was written)",
                              hint="the build cannot commit it: start it again with --overwrite")
    if is_own_frame(stored):
        return crc32c(stored)
    per, lo = ds.chunks[0], chunk * ds.chunks[0]
    try:
        rows = ds[lo:min(lo + per, ds.shape[0])]
    except (OSError, RuntimeError, ValueError) as exc:
        raise CorruptionError(f"{where}: HDF5 cannot read it ({exc})") from None
    if len(rows) < per:
        rows = np.concatenate([rows, np.zeros((per - len(rows), *rows.shape[1:]), dtype=rows.dtype)])
    stored = encode_chunk(rows, cparams)
    ds.id.write_direct_chunk(chunk_offset(ds, chunk), stored, 0)
    return crc32c(stored)


def frame_datasets(fh: h5py.File) -> Iterator[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    fh.visititems(lambda _n, obj: found.append(obj) if isinstance(obj, h5py.Dataset) and written_as_frames(obj)
                  else None)
    return iter(found)


def load_crcs(ds: h5py.Dataset, crc_ds: h5py.Dataset, where: str) -> np.ndarray:
    """The recorded CRC-32Cs of a dataset's chunks (``crc_ds``: its ``.chunk_crc32c``
    dataset, or a fletcher32-only dataset's ``.rows_crc32c`` (:mod:`.hdf5_rowcrcs`),
    opened and checked as the backend opens any dataset)."""
    try:
        crcs = np.asarray(crc_ds[...], dtype=np.uint32)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise CorruptionError(f"{where}: the chunk checksums of {ds.name} ({crc_ds.name}) are damaged ({exc})") from None
    chunks = -(-ds.shape[0] // ds.chunks[0])
    if crcs.ndim != 1 or len(crcs) < chunks:  # more: the dataset was cut short, which its reads name
        raise CorruptionError(f"{where}: {crc_ds.name} holds {crcs.size} chunk checksums, {ds.name} has {chunks} chunks")
    return crcs


class FrameReader:
    """Reads whole chunks of one frame-written dataset: the stored bytes, their CRC-32C,
    the frame decoded straight into the rows (its shape found once, not per chunk).

    With a ``source`` (:class:`.hdf5_rows.FileMap` of a read-only handle) and the chunk
    index the handle checked (``entries``, :func:`.hdf5_index.chunk_entries`), a chunk's
    stored bytes are a slice of the mapped file; else, and for any chunk the index does not
    place plainly, HDF5's ``read_direct_chunk``."""

    __slots__ = ("addresses", "crcs", "dtype", "edge", "per", "row_shape", "rows", "sizes", "source", "tail")

    def __init__(self, ds: h5py.Dataset, crcs: np.ndarray, source: FileMap | None = None,
                 entries: np.ndarray | None = None) -> None:
        self.crcs, self.per, self.rows = crcs, int(ds.chunks[0]), int(ds.shape[0])
        self.row_shape, self.dtype, self.tail = tuple(ds.shape[1:]), ds.dtype, (0,) * (ds.ndim - 1)
        chunks = -(-self.rows // self.per)
        # A dataset cut short (damage the reads name) within a chunk: HDF5 rewrote that
        # chunk through its filters when it shrank the dataset, so it is read through them
        self.edge = chunks - 1 if len(crcs) > chunks and self.rows % self.per else -1
        self.source = source if entries is not None else None
        self.addresses = np.full(chunks, -1, dtype=np.int64)
        self.sizes = np.zeros(chunks, dtype=np.int64)
        if self.source is not None and entries is not None and len(entries):
            # (first-axis offset, filter mask, address, size, largest other offset) per entry:
            # only plain ones (every filter applied, at a chunk's start) are read from the map
            offsets, masks, addresses, sizes, other = (entries[:, i].astype(np.int64) for i in range(5))
            plain = (masks == 0) & (other == 0) & (offsets % self.per == 0) & (offsets < self.rows) & (addresses >= 0)
            where = offsets[plain] // self.per
            self.addresses[where], self.sizes[where] = addresses[plain], sizes[plain]
        if self.edge >= 0:
            self.addresses[self.edge] = -1

    def mapped(self, chunk: int) -> memoryview | None:
        """Chunk ``chunk``'s stored bytes in the mapped file, or None (no map, or a chunk
        the map does not hold plainly)."""
        address = int(self.addresses[chunk])
        return None if address < 0 or self.source is None else self.source.stored(address, int(self.sizes[chunk]))

    def read(self, ds: h5py.Dataset, lo: int, count: int, where: str) -> np.ndarray:
        """Rows ``lo ..`` (the first of a chunk), at most ``count`` and the dataset's end."""
        per = self.per
        chunk = lo // per
        if chunk == self.edge:
            return ds[lo:min(lo + count, self.rows)]
        place = f"{where} sample {lo} (the chunk of samples {lo}-{min(lo + per, self.rows) - 1})"
        stored: bytes | memoryview | None = self.mapped(chunk)
        if stored is None:
            try:
                mask, stored = ds.id.read_direct_chunk((lo, *self.tail))
            except (OSError, RuntimeError, ValueError) as exc:
                raise CorruptionError(f"{place}: HDF5 cannot read the chunk of {ds.name} ({exc})") from None
            if mask:
                raise CorruptionError(f"{place}: the chunk of {ds.name} says its filters were skipped (damaged)")
        rows = decode_chunk(stored, int(self.crcs[chunk]), np.empty((per, *self.row_shape), self.dtype), place)
        return rows[:min(count, self.rows - lo)]

    def gather(self, ds: h5py.Dataset, samples: np.ndarray, where: str) -> np.ndarray:
        """Rows ``samples`` (any order, repeats allowed, all below the dataset's end),
        each chunk read once."""
        per = self.per
        chunks = samples // per
        first = int(chunks[0])
        if bool(np.all(chunks == first)):
            return self.read(ds, first * per, per, where)[samples - first * per]
        out = np.empty((len(samples), *self.row_shape), dtype=self.dtype)
        for chunk in np.unique(chunks).tolist():
            picked = chunks == chunk
            out[picked] = self.read(ds, chunk * per, per, where)[samples[picked] - chunk * per]
        return out


def write_frame_rows(ds: h5py.Dataset, start: int, rows: np.ndarray, crcs: ChunkCrcs,
                     cparams: dict[str, Any]) -> None:
    """Rows ``start ..`` of a frame-written dataset, a whole chunk at a time: a first
    chunk begun on disk (a resume after a partly filled last chunk) is read back and
    completed; the last is padded with zeros past the rows given."""
    per, end = ds.chunks[0], start + len(rows)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    head = start % per
    if head:
        rows = np.concatenate([ds[start - head:start], rows])
        start -= head
    for lo in range(0, len(rows), per):
        block = rows[lo:lo + per]
        if len(block) < per:
            block = np.concatenate([block, np.zeros((per - len(block), *rows.shape[1:]), dtype=rows.dtype)])
        crcs.write(ds, (start + lo) // per, block, cparams)
