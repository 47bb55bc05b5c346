"""One sample of a frame-written HDF5 chunk, decoded straight from the file's bytes.

A read of a Blosc2-filtered field that the backend's row LRU misses decodes the sample's
whole chunk (8-32 samples) into the LRU. For a pass in order, or a layer the LRU holds,
that serves the chunk's other samples; for reads out of order over a layer larger than
the LRU (a shuffling sampler, per sample or in batches) it decoded a chunk per sample,
0.06-0.11x the bare codec's speed where LMDB reads 0.77-0.91x (tools/bench_shuffled.py,
docs/benchmarks.md). Such reads decode only their sample here, and so do reads in order
of rows of 16 KiB or more (:data:`ALONE_ROW_BYTES`; a pass in order over smaller rows
still decodes whole chunks into the LRU):

* :class:`FileMap`: the cache file mapped read-only, so a chunk's stored bytes are a
  slice of memory (no ``read_direct_chunk`` copy); where they lie comes from HDF5's chunk
  index, which the reader checked against the one recorded at commit
  (:func:`.hdf5_index.check_chunk_index`).
* Chunks written since session 16 use blosc2 blocks that cut no row apart
  (:func:`row_blocksize`), so libblosc2's ``blosc2_getitem`` decodes only one sample's
  blocks (or, for rows under 8 KiB, the one block of a few rows holding it) into a
  per-thread row buffer (a row of one block: straight into it, no copy inside blosc2),
  which the codec widens into the caller's map (:class:`RowDecoder`).
* A chunk's CRC-32C (recorded at commit) and its frame's layout are checked the first time
  a process reads from it; a chunk that fails the CRC is never decoded
  (CorruptionError), one laid out otherwise (blocks across rows, written before session
  16; an all-zero chunk blosc2 stored as a special value) goes the row LRU's way.

``blosc2_getitem`` is reached through ctypes in the ``libblosc2`` that python-blosc2
ships (python-blosc2 has no per-item call on a chunk; its own copy is linked into its
extension statically, so this is a second copy of the same library); where it cannot be
loaded, every read takes the row LRU's way. The call makes a decompression context of
its own each time, so threads may call it at once (and ctypes releases the GIL around it).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blosc2
import h5py
import numpy as np
from crc32c import crc32c

from ..errors import CorruptionError

if TYPE_CHECKING:
    from .hdf5_frames import FrameReader

#: the largest blosc2 block of a frame-written chunk: a row's bytes where they fit, else
#: the largest part of a row that divides it (then a sample is a run of whole blocks)
MAX_ROW_BLOCK = 1 << 18
#: the smallest: a block this small still compresses well; smaller rows share blocks
#: (then a sample's block holds a few whole rows)
MIN_ROW_BLOCK = 1 << 13
#: rows of at least this many stored bytes are decoded alone in any order, passes in order
#: included (rather than their whole chunk into the row LRU): per sample, one getitem call
#: into a row buffer that stays in the CPU's cache beats decoding 8-32 rows into a new
#: buffer and reading them back from memory from about here on (one-off cold passes: 16 KiB
#: rows 1.02-1.08x as fast alone, 8 KiB ones 0.95x; ``tools/bench_shuffled.py``'s in-order
#: rows 1.11x at 16 KiB, docs/benchmarks.md); below it the call's fixed cost wins
ALONE_ROW_BYTES = 1 << 14
_FLAGS_AT = 2  # a blosc2 chunk's header: version, versionlz, flags, typesize, then CHUNK_SIZES
_MEMCPYED = 0x02


def row_blocksize(row_bytes: int, typesize: int) -> int:
    """The blosc2 ``blocksize`` for chunks of rows of ``row_bytes`` (0: blosc2's own choice):
    ``row_bytes`` where it lies in [:data:`MIN_ROW_BLOCK`, :data:`MAX_ROW_BLOCK`]; for
    smaller rows the fewest whole rows that reach :data:`MIN_ROW_BLOCK`; for larger ones
    the largest part of a row that divides it, is a whole number of values and is at least
    :data:`MIN_ROW_BLOCK` (0 where there is none)."""
    if row_bytes <= 0 or row_bytes % typesize:
        return 0
    if row_bytes < MIN_ROW_BLOCK:
        return -(-MIN_ROW_BLOCK // row_bytes) * row_bytes
    if row_bytes <= MAX_ROW_BLOCK:
        return row_bytes
    for parts in range(-(-row_bytes // MAX_ROW_BLOCK), row_bytes // MIN_ROW_BLOCK + 1):
        if row_bytes % parts == 0 and (row_bytes // parts) % typesize == 0:
            return row_bytes // parts
    return 0


_GETITEM: list[Any] = []  # [blosc2_getitem or None], found once per process


def _blosc2_getitem() -> Any:
    """``blosc2_getitem(src, srcsize, start, nitems, dest, destsize)`` of the libblosc2
    python-blosc2 ships, or None where it cannot be loaded."""
    if not _GETITEM:
        fn = None
        for lib in sorted((Path(blosc2.__file__).parent / "lib").glob("libblosc2.so*")):
            try:
                dll = ctypes.CDLL(str(lib))
                dll.blosc2_init()
                fn = dll.blosc2_getitem
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                           ctypes.c_int32]
            break
        _GETITEM.append(fn)
    return _GETITEM[0]


class FileMap:
    """An HDF5 file's bytes, mapped read-only: ``view`` (a memoryview), ``address`` (where
    file offset 0, past any user block, lies in memory) and ``base`` (the user block's size,
    which HDF5's chunk addresses do not count). It is never unmapped explicitly: a handle
    that closes drops its map, which goes when the last reader holding it (a thread still
    inside a read, say) lets go, so no read ever touches an unmapped address."""

    __slots__ = ("_array", "_map", "address", "base", "view")

    def __init__(self, fh: h5py.File) -> None:
        self._map = mmap.mmap(fh.id.get_vfd_handle(), 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self._map)
        self._array = np.frombuffer(self.view, dtype=np.uint8)
        self.base = int(fh.userblock_size)
        self.address = int(self._array.ctypes.data) + self.base

    @classmethod
    def of(cls, fh: h5py.File) -> FileMap | None:
        """The map of ``fh``, or None where it cannot be made (a driver other than HDF5's
        default one, an empty file, no mmap)."""
        try:
            return cls(fh)
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError):
            return None

    def stored(self, address: int, size: int) -> memoryview | None:
        """The ``size`` bytes at HDF5 address ``address``; None past the mapped end."""
        start = self.base + address
        if address < 0 or size <= 0 or start + size > len(self.view):
            return None
        return self.view[start:start + size]


class RowDecoder:
    """Per-sample reads of one frame-written field of a read-only cache: ``read(sample,
    out)`` decodes the sample's blocks with ``blosc2_getitem`` into a per-thread row
    buffer and widens it with the codec's row reader; None where the sample's chunk is not
    laid out for it (the caller reads through the row LRU). CorruptionError where the
    chunk fails its CRC-32C."""

    __slots__ = ("_getitem", "_local", "_sizes", "_starts", "alone", "codec", "dtype", "field", "frames", "items",
                 "last_chunk", "last_sample", "row_bytes", "row_shape", "sent", "where")

    def __init__(self, frames: FrameReader, codec: Any, field: str, where: str) -> None:
        self.frames, self.codec, self.field, self.where = frames, codec, field, where
        self.row_shape, self.dtype = frames.row_shape, frames.dtype
        self.items = int(np.prod(self.row_shape, dtype=np.int64))
        self.row_bytes = self.items * self.dtype.itemsize
        #: whether every read is decoded alone, in order too (:data:`ALONE_ROW_BYTES`)
        self.alone = self.row_bytes >= ALONE_ROW_BYTES
        chunks = len(frames.addresses)
        # per chunk: 0 not looked at yet, -1 read through the row LRU, else where its blosc2
        # chunk starts in memory (with its compressed size in _sizes); 8 bytes a chunk
        self._starts = array("q", bytes(8 * chunks))
        self._sizes = array("q", bytes(8 * chunks))
        self._local = threading.local()
        self._getitem = _blosc2_getitem()
        #: the chunk and sample of the last read the row LRU missed (the backend's choice
        #: between this decoder and the LRU; threads may overwrite them, which only moves
        #: that choice)
        self.last_chunk = self.last_sample = -2
        #: the LRU's rows of the chunk the last miss was sent there for (the caller's)
        self.sent: Any = None

    @classmethod
    def of(cls, frames: FrameReader | None, codec: Any, field: str, where: str) -> RowDecoder | None:
        """A decoder for ``frames`` (a :class:`.hdf5_frames.FrameReader` over a file map),
        or None where it has no map or libblosc2's getitem is missing."""
        if frames is None or frames.source is None or _blosc2_getitem() is None:
            return None
        return cls(frames, codec, field, where)

    def read_missed(self, chunk: int, sample: int, out: np.ndarray) -> np.ndarray | None:
        """:meth:`read`, for a read the row LRU missed (``chunk``: the sample's), unless
        its rows are under :data:`ALONE_ROW_BYTES` and it continues a pass in order; None
        for one that does, which the caller sends to the LRU (and then sets :attr:`sent`
        to the chunk's rows). In order means: the sample after the previous miss's, in the
        same chunk (a pass starting), or a step to the next chunk once the chunk the LRU got
        for the previous miss served more than half its rows (a pass going on). Anything
        looser decoded whole chunks for few of their samples: a shuffled order steps to the
        next chunk once in every (chunks / 2) reads, and a stride of k samples uses a
        chunk's rows once in k."""
        if self.alone:
            return self.read(sample, out)
        last_sample, self.last_sample = self.last_sample, sample
        last_chunk, self.last_chunk = self.last_chunk, chunk
        sent, self.sent = self.sent, None
        if (chunk == last_chunk and sample == last_sample + 1) or (
                chunk == last_chunk + 1 and sent is not None and 2 * (sent.hits + 1) > self.frames.per):
            return None
        return self.read(sample, out)

    def read(self, sample: int, out: np.ndarray) -> np.ndarray | None:
        frames = self.frames
        if sample >= frames.rows:
            return None  # the row LRU's read names it
        chunk = sample // frames.per
        start = self._starts[chunk]
        if start <= 0:
            start = self._look(chunk) if start == 0 else -1
            if start < 0:
                return None
        pair = getattr(self._local, "pair", None)
        if pair is None:
            pair = self._row()
        k = sample - chunk * frames.per
        got = self._getitem(start, self._sizes[chunk], k * self.items, self.items, pair[0], self.row_bytes)
        if got != self.row_bytes:  # a chunk blosc2 will not take item by item: decode it whole
            self._starts[chunk] = -1
            return None
        return pair[1](0, out)

    def _row(self) -> tuple[int, Any, np.ndarray]:
        """This thread's row buffer (1, *row shape): its address, the codec's row reader
        over it, the buffer."""
        row = np.empty((1, *self.row_shape), dtype=self.dtype)
        pair = self._local.pair = (int(row.ctypes.data), self.codec.hdf5_row_reader({self.field: row}), row)
        return pair

    def _look(self, chunk: int) -> int:
        """Check chunk ``chunk`` once (its CRC-32C, its frame's layout) and note where its
        blosc2 chunk starts, or -1 where it is read through the row LRU."""
        frames = self.frames
        stored = frames.mapped(chunk)
        start = -1
        if stored is not None:
            if crc32c(stored) != int(frames.crcs[chunk]):
                lo = chunk * frames.per
                raise CorruptionError(f"{self.where} sample {lo} (the chunk of samples {lo}-"
                                      f"{min(lo + frames.per, frames.rows) - 1}): the chunk fails its CRC-32C (damaged)")
            start, size = self._layout(stored)
            if start >= 0 and frames.source is not None:
                self._sizes[chunk] = size
                start += frames.source.address + int(frames.addresses[chunk])
        self._starts[chunk] = start
        return start

    def _layout(self, stored: memoryview) -> tuple[int, int]:
        """(offset of the frame's one blosc2 chunk in ``stored``, its compressed size)
        where that chunk is fmcache's (:func:`.hdf5_frames.is_own_frame`), holds the
        whole chunk's rows of this dtype and its blocks cut no row apart (a row is whole
        blocks, or a block whole rows); (-1, 0) else."""
        from .hdf5_frames import frame_chunk, is_own_frame  # here: hdf5_frames imports this module

        try:
            if not is_own_frame(stored):
                return -1, 0
            at, blocksize, cbytes = frame_chunk(stored, self.frames.per * self.row_bytes, self.dtype.itemsize)
        except (ValueError, struct.error):
            return -1, 0
        if blocksize <= 0 or (self.row_bytes % blocksize and blocksize % self.row_bytes
                              and not stored[at + _FLAGS_AT] & _MEMCPYED):
            return -1, 0
        return at, cbytes
