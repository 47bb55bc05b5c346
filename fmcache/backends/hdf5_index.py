"""HDF5's metadata, checked: fmcache's HDF5 files are in HDF5's earliest format, whose
chunk index (B-trees) and object headers have no checksums, and fletcher32 covers a
chunk's bytes (and is 0 for zeros), not the index that finds them or the header that says
how to read them. What a commit records per dataset (:class:`Committed`, the
``fmcache_chunk_index`` attribute) and the checks against it: :func:`check_chunk_index`
looks every chunk up the way a read does and compares the index with its digest;
:func:`check_header` the datatype, rows and header digest; :func:`check_zero_chunks` a
chunk that reads as all zeros (docs/format.md; docs/reliability.md)."""

from __future__ import annotations

import ctypes
import json
import zlib
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from h5py._objects import phil

from ..errors import CorruptionError

FLETCHER32 = 3  # H5Z_FILTER_FLETCHER32


def chunk_entries(ds: h5py.Dataset, where: str) -> np.ndarray:
    """HDF5's chunk index of ``ds`` as ``chunk_iter`` lists it: rows of (first-axis
    offset, filter mask, file address, stored size, largest other-axis offset), uint64,
    in index order."""
    entries: list[tuple[int, int, int, int, int]] = []

    def visit(info: Any) -> None:
        offset = tuple(info.chunk_offset)
        entries.append((offset[0], info.filter_mask, -1 if info.byte_offset is None else info.byte_offset,
                        info.size, max(offset[1:], default=0)))

    try:
        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(visit)
        else:  # HDF5 before 1.14: one call per chunk
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
    except (OSError, RuntimeError, ValueError) as exc:
        raise CorruptionError(f"{where}: HDF5 cannot read the chunk index of {ds.name} ({exc})") from None
    try:
        return np.array(entries, dtype=np.int64).reshape(-1, 5).astype(np.uint64)
    except OverflowError:  # a damaged key: no offset, address or size of fmcache's reaches 2**63
        raise CorruptionError(f"{where}: the chunk index of {ds.name} is damaged (an entry holds a value "
                              f"past 2**63)") from None


def index_digest(entries: np.ndarray) -> int:
    """CRC-32 of :func:`chunk_entries`' rows (little-endian u64): what a committed
    cache's ``chunk_index`` attribute records per dataset."""
    return zlib.crc32(np.ascontiguousarray(entries, dtype="<u8").tobytes())


def header_digest(ds: h5py.Dataset) -> int:
    """CRC-32 of what a dataset's object header says about reading it: the stored datatype
    (HDF5's own encoding of it), the per-sample shape, the chunk shape and the filter
    pipeline (ids, flags, parameters). HDF5's earliest file format keeps object headers
    without checksums: one flipped bit in the datatype's mantissa size converted every
    float read into other numbers, and one in a filter id could swap fletcher32 for
    another filter. Recorded at commit beside the index digest."""
    dcpl = ds.id.get_create_plist()
    filters = [list(dcpl.get_filter(i)[:3]) for i in range(dcpl.get_nfilters())] if ds.chunks else []
    text = json.dumps([ds.id.get_type().encode().hex(), list(ds.shape[1:]), list(ds.chunks or ()),
                       [[int(f), int(flags), [int(v) for v in values]] for f, flags, values in filters]])
    return zlib.crc32(text.encode())


def unfiltered(ds: h5py.Dataset) -> bool:
    """Whether a chunked dataset's only filter is fletcher32: its chunks are the values."""
    if h5py.check_vlen_dtype(ds.dtype) is not None:  # references into the global heap, not values
        return False
    dcpl = ds.id.get_create_plist()
    return bool(ds.chunks) and all(dcpl.get_filter(i)[0] == FLETCHER32 for i in range(dcpl.get_nfilters()))


def zero_chunks(ds: h5py.Dataset) -> list[int]:
    """The chunks (along the first axis) of an unfiltered dataset whose values are all
    zero: recorded at commit, so that a chunk zeroed later is told from one written so
    (:func:`check_zero_chunks`)."""
    per, rows = ds.chunks[0], ds.shape[0]
    return [k for k in range(-(-rows // per)) if not ds[k * per:min(rows, (k + 1) * per)].any()]


def check_zero_chunks(ds: h5py.Dataset, samples: np.ndarray, values: np.ndarray, recorded: frozenset[int],
                      where: str) -> None:
    """CorruptionError if rows ``samples`` of an unfiltered dataset (``values``) come from
    a chunk that is all zeros now but was not at commit (``recorded``: :func:`zero_chunks`).
    fletcher32 of zeros is 0, so a block zeroed over a whole small chunk and its checksum
    (a crash, a bad sector) read as zeros with no error: an ``int8`` layer's scales, and
    so its maps, came back all zero (a damage sweep, tools/sweep_damage.py). The
    common case costs one pass over the rows read; only a chunk whose rows read here are
    all zero is read whole."""
    if not len(samples):
        return
    nonzero = values.reshape(len(samples), -1).any(axis=1)
    if nonzero.all():
        return
    per = ds.chunks[0]
    chunks = samples // per
    for chunk in sorted(set(chunks[~nonzero].tolist()) - set(chunks[nonzero].tolist()) - recorded):
        lo = chunk * per
        if not ds[lo:min(ds.shape[0], lo + per)].any():
            raise CorruptionError(f"{where} sample {lo}: the chunk of samples {lo}-{lo + per - 1} of {ds.name} "
                                  "reads as all zeros, which it did not hold when the cache was committed "
                                  "(a zeroed block passes fletcher32)")


def check_header(ds: h5py.Dataset, where: str, rows: int | None, digest: int | None) -> None:
    """CorruptionError unless ``ds``'s object header reads as committed: its datatype is
    the standard one of its numpy dtype (any cache; a damaged type description makes HDF5
    convert values into others), it holds at most the ``rows`` committed (a damaged
    dataspace claimed 2**41 rows), and its :func:`header_digest` matches ``digest``
    (caches that recorded one). Errors h5py raises on a damaged header become
    CorruptionErrors too."""
    try:
        stored = ds.id.get_type()
        if ds.dtype.kind in "iufb" and not stored.equal(h5py.h5t.py_create(ds.dtype)):
            raise CorruptionError(f"{where}: dataset {ds.name} has a damaged datatype (not the standard {ds.dtype})")
        if rows is not None and ds.shape[0] > rows:
            raise CorruptionError(f"{where}: dataset {ds.name} claims {ds.shape[0]} rows, {rows} were committed "
                                  "(its dataspace is damaged)")
        if digest is not None and header_digest(ds) != digest:
            raise CorruptionError(f"{where}: the object header of {ds.name} differs from the one the cache was "
                                  "committed with (datatype, shape, chunks or filters damaged, or the file "
                                  "rewritten by a tool such as h5repack)",
                                  hint="copy or convert caches with `fmcache compact SRC DST`; a file no tool "
                                       "rewrote is damaged: rebuild it")
    except (KeyError, RuntimeError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptionError(f"{where}: HDF5 cannot read the header of {ds.name} ({exc})") from None


def check_chunk_index(ds: h5py.Dataset, where: str, digest: int | None = None) -> np.ndarray | None:
    """:func:`chunk_entries` of ``ds`` (None where it is not chunked), once checked:
    CorruptionError unless HDF5's chunk index is the one the cache was committed with
    (``digest``: :func:`index_digest` at commit; None for caches committed before
    fmcache recorded it) and a read's own look-up finds a chunk, every filter applied, at each chunk
    offset covering the dataset's rows.

    Files in HDF5's earliest format (fmcache's, see ``Hdf5Backend._create``) keep the
    chunk index in B-trees without checksums, and fletcher32 covers a chunk's bytes, not
    the index that finds them: a damaged key made HDF5 take written chunks for unwritten
    ones and return the fill value (zeros) with no error; a damaged address pointing at
    zeroed file space passes fletcher32 (the checksum of zeros is 0); a damaged filter
    mask skips the filters on read. Checked once per dataset and process
    (tests/test_reliability_corruption.py flips each byte of the index)."""
    rows, chunks = ds.shape[0] if ds.shape else 0, ds.chunks
    if not chunks:
        return None
    entries = chunk_entries(ds, where)
    if digest is not None and index_digest(entries) != digest:
        raise CorruptionError(f"{where}: the chunk index of {ds.name} differs from the one the cache was "
                              f"committed with (HDF5's B-tree is damaged, or the file was rewritten by a tool "
                              f"such as h5repack, which moves every chunk)",
                              hint="copy or convert caches with `fmcache compact SRC DST` (its index is "
                                   "recorded anew); a file no tool rewrote is damaged: rebuild it")
    if not rows:
        return entries
    per = chunks[0]
    offsets, masks, addresses, other = entries[:, 0], entries[:, 1], entries[:, 2], entries[:, 4]
    # A filter mask says HDF5 skipped an optional filter on that chunk. It does so when
    # writing, for a chunk the filter cannot shrink (ZFP on a one-value sample): the chunk
    # is stored as is and read back as is. The index digest (matched above) holds the
    # masks as committed; without one, a mask may be damage that skips a filter on read.
    skipped = masks != 0 if digest is None else np.zeros(len(masks), dtype=bool)
    bad = skipped | (addresses == np.uint64(2**64 - 1)) | (other != 0) | (offsets % np.uint64(per) != 0)
    held = np.zeros(-(-rows // per), dtype=bool)
    good = offsets[~bad]
    held[(good[good < rows] // np.uint64(per)).astype(np.int64)] = True
    if held.all() and not bad.any():
        # chunk_iter lists the index's entries; a read finds a chunk by comparing keys,
        # some of which it does not report (a key's element offset, a node's last key):
        # look every chunk up the way a read does
        found = _found_by_lookup(ds, per, len(held))
        if found is not None:
            held &= found
    if bad.any() or not held.all():
        missing = np.flatnonzero(~held)
        what = (f"samples {int(missing[0]) * per}-{min(int(missing[0]) * per + per, rows) - 1} have no stored chunk"
                if len(missing) else f"a chunk entry is malformed ({entries[np.flatnonzero(bad)[0]].tolist()})")
        raise CorruptionError(f"{where}: the chunk index of {ds.name} is damaged: {what} "
                              f"({len(missing)} of {len(held)} chunks missing, {int(bad.sum())} malformed)")
    return entries


_LOOKUP: list[Any] = []  # [H5Dget_chunk_storage_size or None], found once per process


def _chunk_storage_size() -> Any:
    """libhdf5's public ``H5Dget_chunk_storage_size`` (a read's own chunk look-up), from
    the copy of libhdf5 that h5py loaded (found in /proc/self/maps), or None where it
    cannot be found (then only ``chunk_iter``'s view is checked)."""
    if not _LOOKUP:
        fn = None
        try:
            with open("/proc/self/maps") as maps:
                libs = sorted({line.split()[-1] for line in maps if "/libhdf5" in line and "_hl" not in line
                               and ".so" in line})
            for lib in libs:
                try:
                    fn = ctypes.CDLL(lib).H5Dget_chunk_storage_size
                except (OSError, AttributeError):
                    continue
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
                break
        except OSError:
            fn = None
        _LOOKUP.append(fn)
    return _LOOKUP[0]


def _found_by_lookup(ds: h5py.Dataset, per: int, chunks: int) -> np.ndarray | None:
    """Per chunk along the first axis: whether a read's look-up finds it stored (None
    where that look-up is not available)."""
    fn = _chunk_storage_size()
    if fn is None:
        return None
    offset = (ctypes.c_uint64 * len(ds.shape))()
    size = ctypes.c_uint64()
    found = np.zeros(chunks, dtype=bool)
    with phil:  # h5py's lock: libhdf5 is not thread-safe
        dataset = ds.id.id
        for chunk in range(chunks):
            offset[0] = chunk * per
            size.value = 0
            found[chunk] = fn(dataset, offset, ctypes.byref(size)) >= 0 and size.value > 0
    return found


@dataclass(frozen=True)
class Committed:
    """What the ``chunk_index`` attribute recorded of one chunked dataset at commit."""

    rows: int
    index: int  #: :func:`index_digest`
    header: int | None = None  #: :func:`header_digest` (None: committed before session 12)
    zeros: frozenset[int] | None = None  #: :func:`zero_chunks` of an unfiltered dataset


def commit_record(fh: h5py.File, where: str, zeros: dict[str, list[int]] | None = None) -> bytes:
    """The ``chunk_index`` attribute's JSON: per chunked dataset (path without the leading
    '/'), ``[rows, index digest, header digest]``, and its all-zero chunks for an
    unfiltered one (from ``zeros``, by path, where a caller read its chunks already)."""
    record: dict[str, list[Any]] = {}
    known = zeros or {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.chunks:
            record[name] = [obj.shape[0], index_digest(chunk_entries(obj, where)), header_digest(obj)]
            if unfiltered(obj):
                record[name].append(known[name] if name in known else zero_chunks(obj))

    fh.visititems(visit)
    return json.dumps(record, sort_keys=True).encode()


def parse_commit_record(blob: bytes | None) -> dict[str, Committed]:
    """:func:`commit_record`'s JSON by dataset path (with its leading '/'); empty for
    caches committed before fmcache recorded it."""
    if blob is None:
        return {}
    return {"/" + name: Committed(int(v[0]), int(v[1]), int(v[2]) if len(v) > 2 else None,
                                  frozenset(int(c) for c in v[3]) if len(v) > 3 else None)
            for name, v in json.loads(blob).items()}
