"""Row reads of HDF5 datasets for :mod:`.hdf5_backend`: the rows a batch asks for, read
as slices where a slice decodes little more than the chunks holding them, and the
helpers of the backend's chunk-row LRU (its entries, rows grouped by chunk, LRU touches), and
the typed errors of opening the file and its datasets. Every read failure becomes a
CorruptionError naming the sample."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import CacheBusyError, CacheError, CorruptionError, FmcacheError, NotACacheError, ReadOnlyError
from .hdf5_frames import CRC_SUFFIX, FORMAT_ATTR, FrameReader, load_crcs, written_as_frames
from .hdf5_index import check_zero_chunks
from .hdf5_rowcrcs import check_rows
from .hdf5_rows import RowDecoder
from .inflight import in_flight
from .pids import PID

if TYPE_CHECKING:
    from .hdf5_backend import Hdf5Backend


def open_file_error(path: Path, writable: bool, exc: OSError) -> CacheError:
    """The typed error for h5py's failure to open the cache file at ``path``."""
    if not path.exists():
        return NotACacheError(f"{path} does not exist: it was moved or deleted after it was opened",
                              hint="point the reader at where the cache is now")
    if writable and (not os.access(path, os.W_OK) or os.statvfs(path.parent).f_flag & os.ST_RDONLY):
        return ReadOnlyError(f"{path}: cannot open it for writing ({exc})")
    if "unable to lock file" in str(exc):  # HDF5's own lock: a writer elsewhere, not damage
        return CacheBusyError(f"{path}: another process has it open for writing (HDF5's file lock: {exc})",
                              hint="wait for that process to close it (an h5py 'r+' or 'a' handle, or a build); "
                                   "HDF5_USE_FILE_LOCKING=FALSE lets readers in at their own risk")
    return CorruptionError(f"{path}: HDF5 cannot open it ({exc})")


def open_dataset(fh: h5py.File, path: str, where: str) -> h5py.Dataset:
    """The dataset at ``path``. CorruptionError where it is missing or its link or object
    header is damaged (HDF5's metadata carries no checksums in the file format fmcache
    writes): h5py's KeyError / RuntimeError / ... otherwise."""
    try:
        ds = fh[path]
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise CorruptionError(f"{where}: dataset {path} is missing or damaged (HDF5: {exc})") from None
    if not isinstance(ds, h5py.Dataset):  # a damaged header's object type
        raise CorruptionError(f"{where}: {path} is a {type(ds).__name__}, not a dataset (damaged)")
    return ds


def frames_of(backend: Hdf5Backend, path: str, ds: h5py.Dataset, where: str) -> FrameReader | None:
    """How to read a dataset whose chunks fmcache wrote (:mod:`.hdf5_frames`): its
    checksums' dataset opened as any other (header and chunk index checked); None for
    other datasets, read through h5py; on a read-only handle, over the mapped file and the
    chunk index the handle checked. A committed cache recorded that dataset; without
    one (a build not committed yet) h5py reads the chunks, and HDF5's fletcher32 checks
    them. Recorded checksums of a dataset without the ``fmcache_chunks`` attribute: the
    attribute is damaged."""
    crc_path = path + CRC_SUFFIX
    recorded = "/" + crc_path.lstrip("/") in backend._committed()
    frames = written_as_frames(ds)
    if not frames and recorded:
        raise CorruptionError(f"{where}: {path} has chunk checksums ({crc_path}) but its "
                              f"{FORMAT_ATTR} attribute is missing or damaged")
    if not frames:
        return None
    if not recorded:
        try:
            if crc_path not in backend._file():
                return None
        except (KeyError, RuntimeError, OSError, ValueError):
            return None
    crcs = load_crcs(ds, backend._dataset(crc_path), where)
    # the checked index, once: the reader keeps the chunk addresses it needs from it
    return FrameReader(ds, crcs, backend.__dict__.get("_h_map"), backend.__dict__.get("_h_index", {}).pop(path, None))


_NEW: Any = object()  # row_decoder's "not made yet"


def row_decoder(backend: Hdf5Backend, layer: str, part: str, entry: tuple[Any, list[tuple[str, str]], int, str]
                ) -> RowDecoder | None:
    """Per (layer, part), handle and process: the :class:`.hdf5_rows.RowDecoder` of a
    one-field part whose chunks fmcache wrote (a sample decoded alone, from the mapped
    file), or None (the row LRU serves it): also where the stored rows of every part of
    the cache fit in the LRU together, which then holds each chunk after its first read,
    in any order (parts that fit alone but not together made it thrash). ``entry``:
    the first of ``Hdf5Backend._entries``."""
    if backend.__dict__.get("_h_rowdec_pid") != PID[0]:
        backend._file()  # a forked worker opens its own handle (and map) first
    key = (layer, part)
    found = backend._h_rowdec.get(key, _NEW)  # one look-up: a close() in another thread may empty it
    return _new_row_decoder(backend, key, entry) if found is _NEW else found


@in_flight  # it opens datasets: a close() in another thread waits for it
def _new_row_decoder(backend: Hdf5Backend, key: tuple[str, str], entry: tuple[Any, list[tuple[str, str]], int, str]
                     ) -> RowDecoder | None:
    codec, fields, _, where = entry
    decoder = None
    if len(fields) == 1:
        name, path = fields[0]
        decoder = RowDecoder.of(backend._frames_of(path, backend._dataset(path), where), codec, name, where)
        from .hdf5_backend import ROW_CACHE_BYTES  # here: hdf5_backend imports this module

        if decoder is not None and decoder.frames.rows * _lru_row_bytes(backend) <= ROW_CACHE_BYTES:
            decoder = None
    backend._h_rowdec[key] = decoder  # the dict of the handle now open (the look-ups above may reopen it)
    return decoder


def _lru_row_bytes(backend: Hdf5Backend) -> int:
    """The bytes one sample's stored rows take in the row LRU, over every layer and part
    of the cache that shares it (fixed-dtype fields in chunks of several samples), once
    per handle: with the sample count, whether the whole cache fits in the LRU."""
    total: int | None = backend.__dict__.get("_h_lru_row_bytes")
    if total is None:
        total = sum(int(np.prod(f.shape, dtype=np.int64)) * f.dtype.itemsize
                    for layer in backend._layers for _, fields in backend._read_fields(layer)
                    for f, _ in fields if f.dtype is not None and not f.per_sample_chunks)
        backend._h_lru_row_bytes = total
    return total


def far_apart(backend: Hdf5Backend, layer: str, part: str, samples: np.ndarray) -> RowDecoder | None:
    """The :func:`row_decoder` of ``part`` where ``samples`` lie in so many of its chunks
    that decoding those chunks whole would decode more than twice as many rows; None
    otherwise (or where the part has none)."""
    entry = backend._entries(layer, part)[0]
    decoder = None if entry is None else row_decoder(backend, layer, part, entry)
    if decoder is None or len(np.unique(samples // decoder.frames.per)) * decoder.frames.per <= 2 * len(samples):
        return None
    return decoder


def rows_alone(backend: Hdf5Backend, layer: str, part: str, shape: tuple[int, ...], samples: np.ndarray,
               out: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """A batch of ``part`` read a sample at a time (:class:`.hdf5_rows.RowDecoder`) where
    its rows lie so far apart that whole chunks would decode more than twice as many
    (a shuffling sampler's batch over a cache larger than the row LRU: one chunk per row);
    into ``out[part]`` where given. None where that does not apply: the caller reads the
    batch through whole chunks."""
    decoder = far_apart(backend, layer, part, samples)
    if decoder is None:
        return None
    dst = None if out is None else out.get(part)
    rows = dst if dst is not None and dst.flags.c_contiguous and dst.dtype == np.float32 \
        else np.empty((len(samples), *shape), dtype=np.float32)
    try:
        for row, sample in enumerate(samples.tolist()):
            if decoder.read(sample, rows[row]) is None:
                return None  # a chunk laid out otherwise, or past the end: the caller's way
    except ValueError as exc:
        raise CorruptionError(f"{decoder.where}: cannot decode samples ({exc})") from exc
    if dst is not None and rows is not dst:
        dst[...] = rows
        return dst
    return rows


@in_flight  # h5py reads: a close() in another thread waits for it
def read_one_plain(backend: Hdf5Backend, sample: int, out: np.ndarray, codec: Any, fields: list[tuple[str, str]],
                   where: str) -> np.ndarray:
    """``Hdf5Backend.read_one`` of a part stored a chunk per sample: one h5py slice per field,
    then the codec's decode into ``out``. The batch path's bookkeeping (sorting,
    de-duplicating, grouping the rows) cost as much per sample as a small map's filter
    decode (docs/benchmarks_history.md, "What session 10 changed")."""
    rows: dict[str, np.ndarray] = {}
    for name, path in fields:
        try:
            ds = backend._dataset(path)
        except KeyError:
            raise CorruptionError(f"{where}: dataset {path} is missing") from None
        if sample >= ds.shape[0]:
            raise CorruptionError(f"{where} sample {sample}: the dataset stops at sample {ds.shape[0]}")
        try:
            rows[name] = ds[sample:sample + 1]
        except OSError as exc:  # a checksum (fletcher32) or filter failure
            raise CorruptionError(f"{where} sample {sample}: HDF5 read failed ({exc})") from None
    try:
        codec.from_hdf5_into(rows, out[None])
    except CorruptionError:
        raise
    except (ValueError, KeyError) as exc:
        raise CorruptionError(f"{where} sample {sample}: cannot decode it ({exc})") from exc
    return out


def chunk_rows(backend: Hdf5Backend, fields: list[tuple[str, str]], lo: int, count: int,
               where: str) -> dict[str, np.ndarray]:
    """The stored rows ``lo .. lo+count-1`` (one chunk's, cut at the dataset's end) of each
    (field name, dataset path): raw where fmcache wrote the chunks, else through h5py."""
    rows: dict[str, np.ndarray] = {}
    for name, path in fields:
        ds = backend._dataset(path)  # CorruptionError where it is missing (open_dataset)
        frames = backend._frames_of(path, ds, where)
        if frames is not None and lo % frames.per == 0 and lo < frames.rows:
            rows[name] = frames.read(ds, lo, count, where)
        else:
            hi = min(lo + count, ds.shape[0])
            rows[name] = _read_rows(backend, path, np.arange(lo, max(hi, lo), dtype=np.int64), where)
    return rows


def _first_unreadable(ds: h5py.Dataset, samples: np.ndarray) -> int | None:
    """The first of ``samples`` whose row cannot be read (error path only: one row at a time)."""
    for sample in samples:
        try:
            ds[int(sample)]
        except OSError:
            return int(sample)
    return None


def _touch(lru: OrderedDict[Any, Any], key: Any) -> None:
    """Mark ``key`` most recently used, unless another thread has evicted it meanwhile."""
    try:
        lru.move_to_end(key)
    except KeyError:
        pass


def _chunk_groups(samples: np.ndarray, per_chunk: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per chunk that ``samples`` touch: (chunk, the batch rows in it, their rows in the chunk)."""
    chunks = samples // per_chunk
    first = int(chunks[0])
    if bool(np.all(chunks == first)):
        return [(first, np.arange(len(samples)), samples - first * per_chunk)]
    order = np.argsort(chunks, kind="stable")
    ordered = chunks[order]
    cuts = np.flatnonzero(np.diff(ordered)) + 1
    return [(int(ordered[rows[0]]), order[rows], samples[order[rows]] - int(ordered[rows[0]]) * per_chunk)
            for rows in np.split(np.arange(len(samples)), cuts)]


#: how many chunks a slice read may decode beyond the ones holding wanted rows, as a
#: share of those (see :func:`_slice_decodes_little_more`)
SLICE_EXTRA_CHUNKS = 0.25


def _slice_decodes_little_more(ds: h5py.Dataset, unique: np.ndarray) -> bool:
    """Whether one slice over the sorted rows ``unique`` decodes at most
    ``SLICE_EXTRA_CHUNKS`` more chunks than the chunks holding them. Counted in chunks,
    not rows: a codec with a chunk per sample (SZ3, ZFP) decodes every row a slice
    covers, so a slice over a sampler's batch (its rows in blocks, gaps between) decoded
    up to four times the rows it served (bench_read's ``loader w0``: SZ3 16 -> 63 MB/s
    with this check; docs/benchmarks.md, "On the issue's own model")."""
    rows = ds.chunks[0] if ds.chunks else 0
    if rows <= 0:  # contiguous: no decode, a slice only copies
        return True
    chunks = unique // rows  # sorted, so the distinct ones are where it changes
    needed = 1 + int(np.count_nonzero(np.diff(chunks)))
    return int(chunks[-1] - chunks[0]) + 1 - needed <= SLICE_EXTRA_CHUNKS * needed


def _rows(ds: h5py.Dataset, samples: np.ndarray) -> np.ndarray:
    """Rows ``samples`` (sorted or not, repeats allowed) of ``ds``, in their order."""
    lo, hi = int(samples[0]), int(samples[-1]) + 1
    if hi - lo == len(samples) and np.all(np.diff(samples) == 1):
        return ds[lo:hi]
    unique, inverse = np.unique(samples, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 4 * len(unique) and _slice_decodes_little_more(ds, unique):
        # A chunk-aware sampler's batch spans a few chunks: one slice read (HDF5 decodes
        # each chunk once) then a gather, instead of h5py's slow point selection.
        return ds[lo:hi][unique - lo][inverse]
    # Scattered rows: one slice per contiguous run of the sorted rows.
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    block = np.concatenate([ds[int(run[0]):int(run[-1]) + 1] for run in np.split(unique, breaks)])
    return block[inverse]


def _read_rows(backend: Hdf5Backend, path: str, samples: np.ndarray, where: str) -> np.ndarray:
    """Rows ``samples`` of a dataset; contiguous runs are read as one slice."""
    ds = None
    try:
        ds = backend._dataset(path)
        if len(samples) == 0:
            return ds[0:0]
        stored = ds.shape[0]
        if int(samples.max()) >= stored:  # a dataset cut short: name the sample, not a shape
            first = int(samples[samples >= stored][0])
            raise CorruptionError(f"{where} sample {first}: the dataset stops at sample {stored}")
        frames = None if backend.writable else backend._frames_of(path, ds, where)
        if frames is not None:  # chunks fmcache wrote: read raw against their CRC-32C
            return frames.gather(ds, samples, where)
        rows = _rows(ds, samples)
        zeros = backend.zero_chunks_of(path)
        if zeros is not None:
            check_zero_chunks(ds, samples, rows, zeros, where)
        check_rows(backend, path, ds, samples, rows, where)  # the chunks' CRC-32Cs (hdf5_rowcrcs)
        return rows
    except FmcacheError:  # from opening the file (moved, replaced, its index damaged): already typed
        raise
    except KeyError:
        raise CorruptionError(f"{where}: dataset {path} is missing") from None
    except OSError as exc:
        # Name the sample: a checksum (fletcher32) or filter failure covers a whole chunk.
        bad = _first_unreadable(ds, samples) if ds is not None else None
        at = f" sample {bad}" if bad is not None else ""
        raise CorruptionError(f"{where}{at}: HDF5 read failed ({exc})") from None


def _picked_rows(chunk_of: Callable[[str, int], Mapping[str, np.ndarray]], samples: np.ndarray,
                 picks: Sequence[str | None], rows: Sequence[int], per_chunk: int,
                 where_of: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The stored rows (field -> array, in ``rows`` order) of each picked row's part and
    sample, copied out of whole chunks (``chunk_of(part, chunk)``: the row LRU's), each
    chunk fetched once and held here, so that an eviction cannot take it mid-batch."""
    chunks: dict[tuple[str, int], Mapping[str, np.ndarray]] = {}
    stored: dict[str, np.ndarray] = {}
    for k, row in enumerate(rows):
        part, sample = picks[row], int(samples[row])
        assert part is not None
        chunk, at = divmod(sample, per_chunk)
        got = chunks.get((part, chunk))
        if got is None:
            got = chunks[(part, chunk)] = chunk_of(part, chunk)
        for field, values in got.items():
            if at >= len(values):
                raise CorruptionError(f"{where_of[part]} sample {sample}: the dataset stops at sample "
                                      f"{chunk * per_chunk + len(values)}")
            dst = stored.get(field)
            if dst is None:
                dst = stored[field] = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
            dst[k] = values[at]
    return stored


class ChunkRows(dict):  # type: ignore[type-arg]  # field name -> stored rows
    """One chunk's stored rows in the row LRU (field name -> rows), with the number of
    rows and, built on the first per-sample read, the codec's row reader
    (:meth:`fmcache.codecs.Codec.hdf5_row_reader`); ``hits``: how many per-sample reads
    found it in the LRU (:meth:`.hdf5_rows.RowDecoder.read_missed` asks)."""

    __slots__ = ("count", "hits", "reader")

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        super().__init__(rows)
        self.count = len(next(iter(rows.values()))) if rows else 0
        self.reader: Callable[[int, np.ndarray], np.ndarray] | None = None
        self.hits = 0
