"""A CRC-32C per chunk of the HDF5 datasets whose only filter is fletcher32.

fletcher32 sums 16-bit words modulo 65535, so it cannot tell a word 0x0000 from 0xFFFF,
and some edits of several words keep both of its sums: two 0xFF bytes over a stored 0.0
(erased flash reads as 0xFF) read back as NaN or 9.2e-41, and a three-byte edit changed
a stored value, an ``int8`` channel's scale or a label with every check passing (a
helper's sweep, docs/reliability.md §3). fmcache's own Blosc2 chunks carry a CRC-32C
since session 15 (:mod:`.hdf5_frames`); the datasets HDF5 stores as they are (the
``raw`` codec's values, ``int8``/``int4`` scales and offsets, labels, per-sample
checksums) get one here:

* At commit, before the commit record, :func:`seal` writes beside each such dataset
  ``<path>.rows_crc32c`` (:data:`SUFFIX`): ``uint32`` per chunk along the samples, the
  CRC-32C of the chunk's values as numpy reads them (C order, the rows the dataset holds).
  The commit record then covers that dataset too (rows, index, header, zero chunks).
* Reading (:func:`check_rows`), a chunk is checked against it the first time a handle
  reads from it; the chunk's rows come from the read itself where it covers them, else
  from one more slice. A cache committed before session 18 has no such datasets and is
  read as before (fletcher32 and the zero-chunk check).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from crc32c import crc32c

from ..errors import CorruptionError
from .hdf5_frames import CRC_SUFFIX, load_crcs
from .hdf5_index import commit_record, unfiltered

if TYPE_CHECKING:
    from .hdf5_backend import Hdf5Backend

#: the dataset of a fletcher32-only dataset's chunk CRC-32Cs: its path plus this
SUFFIX = ".rows_crc32c"
#: the attribute a read-only handle's h5py Dataset carries: its CRCs and the chunks checked
_STATE = "_fmcache_row_crcs"
_UNSET: Any = object()


def covered(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` gets chunk CRCs: chunked along the samples with fletcher32 alone (not
    itself a table of chunk checksums)."""
    return unfiltered(ds) and not ds.name.endswith((SUFFIX, CRC_SUFFIX))


def chunk_facts(ds: h5py.Dataset) -> tuple[np.ndarray, list[int]]:
    """CRC-32C of each chunk's values (along the first axis; the last chunk's rows only),
    and the chunks that hold only zeros (:func:`.hdf5_index.zero_chunks`), in one pass."""
    per, rows = ds.chunks[0], ds.shape[0]
    crcs, zeros = [], []
    for chunk, lo in enumerate(range(0, rows, per)):
        values = ds[lo:min(rows, lo + per)]
        crcs.append(_crc(values))
        if not values.any():
            zeros.append(chunk)
    return np.array(crcs, dtype="<u4"), zeros


def _crc(values: np.ndarray) -> int:
    """CRC-32C of an array's bytes in C order."""
    return crc32c(np.ascontiguousarray(values).data.cast("B"))


def seal(fh: h5py.File, where: str) -> bytes:
    """Write every covered dataset's ``<path>.rows_crc32c`` (replacing one a killed commit
    left), then return :func:`.hdf5_index.commit_record`, which records them too (and the
    covered datasets' zero chunks, found in the same pass over their chunks)."""
    found: list[h5py.Dataset] = []
    fh.visititems(lambda _n, obj: found.append(obj) if isinstance(obj, h5py.Dataset) and covered(obj) else None)
    zeros: dict[str, list[int]] = {}
    for ds in found:
        crcs, zeros[ds.name.lstrip("/")] = chunk_facts(ds)
        path = ds.name + SUFFIX
        if path in fh:
            del fh[path]
        fh.create_dataset(path, data=crcs, chunks=(max(1, len(crcs)),), maxshape=(None,), fletcher32=True)
    fh.flush()
    return commit_record(fh, where, zeros)


def check_rows(backend: Hdf5Backend, path: str, ds: h5py.Dataset, samples: np.ndarray, rows: np.ndarray,
               where: str) -> None:
    """CorruptionError unless every chunk that rows ``samples`` (read as ``rows``) come from
    holds the values its recorded CRC-32C says; each chunk is checked once per handle.
    Nothing to check where the cache recorded no CRCs for ``path`` (see the module)."""
    state = ds.__dict__.get(_STATE, _UNSET)
    if state is _UNSET:
        state = _load(backend, path, ds, where)
        setattr(ds, _STATE, state)
    if state is None or not len(samples):
        return
    crcs, checked = state
    per, stored = ds.chunks[0], ds.shape[0]
    first = int(samples[0])
    in_order = int(samples[-1]) - first + 1 == len(samples) and bool(np.all(np.diff(samples) == 1))
    for chunk in np.unique(samples // per).tolist():
        if chunk in checked:
            continue
        lo, hi = chunk * per, min(stored, (chunk + 1) * per)
        if in_order and first <= lo and hi <= first + len(samples):
            block = rows[lo - first:hi - first]  # the read covers the chunk
        else:
            block = ds[lo:hi]
        if _crc(block) != int(crcs[chunk]):
            raise CorruptionError(f"{where} sample {lo}: the chunk of samples {lo}-{hi - 1} of {ds.name} fails "
                                  f"its CRC-32C (damaged since the cache was committed; fletcher32 passed it)")
        checked.add(chunk)


def _load(backend: Hdf5Backend, path: str, ds: h5py.Dataset, where: str) -> tuple[np.ndarray, set[int]] | None:
    """The recorded CRCs of ``path`` and an empty set of checked chunks, or None: a build's
    own (writable) handle, a dataset the cache did not record CRCs for."""
    crc_path = path.lstrip("/") + SUFFIX
    if backend.writable or "/" + crc_path not in backend._committed():
        return None
    # opened and checked as any dataset (header, index, rows), then as the frames' CRCs are
    crcs = load_crcs(ds, backend._dataset(crc_path), where)
    return crcs, set()
