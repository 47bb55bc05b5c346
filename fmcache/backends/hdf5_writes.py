"""What an HDF5 build writes: the datasets, and their rows, each chunk once and whole.

A build appends batches that seldom end on a chunk boundary (64 samples a batch, up to
1,024 a chunk). Written as they come, the last, partly filled chunk of a dataset would be
rewritten by the next batch, and a process killed inside that rewrite damages samples the
progress mark already counts as committed (the resume then refuses the whole file). So
each dataset's rows wait (:class:`HeldRows`) until they fill a chunk; only whole chunks
are written, each once, and the progress mark moves to the rows *every* dataset has on
disk. What is held — less than a chunk per dataset — is written by :meth:`HeldRows.drain`
at commit only: a close without commit and a killed process both leave it to the resume,
which recomputes it (docs/format.md, "Commit protocol"). So every chunk below the progress
mark is whole, and no resume writes a chunk again that holds committed samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..codecs import Hdf5Field
from .base import PartSpec, encode_naming_sample
from .hdf5_frames import (
    CRC_SUFFIX,
    FORMAT,
    FORMAT_ATTR,
    ChunkCrcs,
    frame_settings,
    write_frame_rows,
    writes_frames,
    written_as_frames,
)

#: The labels' chunk rows at least (a multiple of the longest chunk of a layer).
LABEL_CHUNK_MIN = 16
_VLEN = h5py.vlen_dtype(np.uint8)


def create_field(fh: h5py.File, path: str, spec: PartSpec, field: Hdf5Field, samples_per_chunk: int) -> None:
    """The dataset of one codec field of a part (unless there), chunked along samples."""
    if path in fh:
        return
    per_chunk = 1 if field.per_sample_chunks else samples_per_chunk
    dtype = _VLEN if field.dtype is None else field.dtype
    ds = fh.create_dataset(path, shape=(0, *field.shape), maxshape=(None, *field.shape),
                           dtype=dtype, chunks=(per_chunk, *field.shape),
                           fletcher32=field.dtype is not None, **dict(field.filter))
    # fixed-length strings: nothing of fmcache's in HDF5's global heap (see _set_attr_blob)
    ds.attrs["codec"] = np.bytes_(json.dumps(spec.codec.get_config()).encode())
    for key, value in field.attrs.items():
        ds.attrs[key] = np.bytes_(value.encode()) if isinstance(value, str) else value
    if writes_frames(field):  # fmcache writes its chunks (hdf5_frames)
        ds.attrs[FORMAT_ATTR] = np.bytes_(FORMAT.encode())
    if field.dtype is None:  # fletcher32 does not cover variable-length data: a CRC per row
        fh.create_dataset(path + ".crc32", shape=(0,), maxshape=(None,), dtype="<u4",
                          chunks=(max(samples_per_chunk, 256),), fletcher32=True)


def create_labels(fh: h5py.File, labels: np.ndarray, longest_chunk: int) -> None:
    """``/labels``, its chunks a multiple of the layers' longest: held back no longer than they."""
    rows = -(-LABEL_CHUNK_MIN // longest_chunk) * longest_chunk
    fh.create_dataset("labels", shape=(0, *labels.shape[1:]), maxshape=(None, *labels.shape[1:]),
                      dtype=labels.dtype, chunks=(rows, *labels.shape[1:]), fletcher32=True)


class HeldRows:
    """Per dataset (by HDF5 path): the rows on disk and the rows held back."""

    def __init__(self) -> None:
        self.on_disk: dict[str, int] = {}
        self._held: dict[str, list[np.ndarray]] = {}
        #: per dataset whose chunks fmcache writes itself: the frames' blosc2 settings
        self._frames: dict[str, dict[str, Any] | None] = {}
        self.crcs = ChunkCrcs()

    def track(self, ds: h5py.Dataset) -> None:
        """Count ``ds``'s rows on disk (a new dataset, or one a resume truncated)."""
        self.on_disk[ds.name] = int(ds.shape[0])
        self._held[ds.name] = []
        self._frames[ds.name] = frame_settings(ds) if written_as_frames(ds) else None
        if ds.chunks:
            self.crcs.forget(ds.name, ds.shape[0] // ds.chunks[0])

    def _write(self, ds: h5py.Dataset, start: int, rows: np.ndarray) -> None:
        cparams = self._frames.get(ds.name)
        if cparams is None:
            write_rows(ds, start, rows)
        else:
            write_frame_rows(ds, start, rows, self.crcs, cparams)

    def held(self, path: str) -> int:
        return sum(len(rows) for rows in self._held.get(path, ()))

    def add(self, ds: h5py.Dataset, start: int, rows: np.ndarray) -> None:
        """Rows ``start ..`` of ``ds``; those already on disk or held are skipped (a
        resume recomputes samples some datasets kept), whole chunks written."""
        path = ds.name
        if path not in self.on_disk:
            self.track(ds)
        have = self.on_disk[path] + self.held(path)
        if start > have:
            raise RuntimeError(f"{path}: rows from {start} given, but only {have} are stored or held")
        if have - start >= len(rows):
            return
        held, new = self._held[path], rows[have - start:]
        full = (have + len(new)) // ds.chunks[0] * ds.chunks[0]
        if full > self.on_disk[path]:
            stacked = np.concatenate([*held, new]) if held else new
            count = full - self.on_disk[path]
            self._write(ds, self.on_disk[path], stacked[:count])
            self.on_disk[path] = full
            rest = stacked[count:]  # a view of the caller's batch where nothing was held: copied
            self._held[path] = [rest.copy()] if len(rest) else []
        else:  # copied: the caller may fill its batch buffer again before this chunk is written
            held.append(new.copy())

    def drain(self, fh: h5py.File) -> None:
        """Write every held row (the last, partly filled chunks): the build is ending."""
        for path, held in self._held.items():
            if held:
                stacked = held[0] if len(held) == 1 else np.concatenate(held)
                self._write(fh[path], self.on_disk[path], stacked)
                self.on_disk[path] += len(stacked)
                self._held[path] = []

    def durable(self) -> int:
        """Samples every dataset has on disk: where a resume starts."""
        return min(self.on_disk.values(), default=0)

    def progress(self, given: bytes) -> bytes:
        """The writer's progress blob with ``samples`` moved back to :meth:`durable`, and
        the rows of datasets that have more (``hdf5_rows``), which a resume keeps."""
        record = json.loads(given)
        record["samples"] = durable = self.durable()
        record["hdf5_rows"] = {path: rows for path, rows in self.on_disk.items() if rows != durable}
        return json.dumps(record, sort_keys=True).encode()

    def truncate(self, fh: h5py.File, samples: int, progress: dict[str, Any]) -> None:
        """Forget rows from ``samples`` on. A resume (``samples`` is the progress mark)
        keeps the whole chunks a dataset had on disk beyond it (the mark's ``hdf5_rows``:
        the same samples, recomputed and skipped), as cutting them would leave a partly
        filled chunk for the next batch to rewrite; kept rows that no longer read are cut."""
        kept = progress.get("hdf5_rows", {}) if progress.get("samples") == samples else {}
        datasets: list[h5py.Dataset] = []
        fh.visititems(lambda _name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for ds in datasets:
            if ds.name.endswith(CRC_SUFFIX):  # a killed commit's chunk checksums: written again at commit
                del fh[ds.name]
                continue
            keep = max(samples, min(int(kept.get(ds.name, samples)), ds.shape[0]))
            if keep > samples and ds.dtype.kind != "O":
                try:
                    ds[samples:keep]  # fletcher32 and the filters: rows past the mark read whole
                except (OSError, RuntimeError):
                    keep = samples
            if ds.shape[0] > keep:
                ds.resize(keep, axis=0)
            self.track(ds)


def write_rows(ds: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    end = start + len(rows)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    if h5py.check_vlen_dtype(ds.dtype) is not None:  # h5py broadcasts equal-length rows as 2-D
        ds.write_direct(np.ascontiguousarray(rows, dtype=object), np.s_[0:len(rows)], np.s_[start:end])
    else:
        ds[start:end] = rows


def to_hdf5(path: Path, layer: str, spec: PartSpec, batch: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """``spec.codec.to_hdf5(batch)``; a refusal names the sample (found map by map)."""
    return encode_naming_sample(path, layer, spec, batch, start, spec.codec.to_hdf5)
