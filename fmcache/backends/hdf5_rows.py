"""Rows an HDF5 build holds back until their chunk is full.

A build appends batches that seldom end on a chunk boundary (64 samples a batch, up to
1,024 a chunk). Written as they come, the last, partly filled chunk of a dataset would be
rewritten by the next batch, and a process killed inside that rewrite damages samples the
progress mark already counts as committed (the resume then refuses the whole file). So
each dataset's rows wait here until they fill a chunk; only whole chunks are written,
each once, and the progress mark moves to the rows *every* dataset has on disk. What is
held — less than a chunk per dataset — is written by :meth:`HeldRows.drain` at commit,
or dropped by a close without commit, and recomputed by the resume.
"""

from __future__ import annotations

import h5py
import numpy as np


class HeldRows:
    """Per dataset (by HDF5 path): the rows on disk and the rows held back."""

    def __init__(self) -> None:
        self.on_disk: dict[str, int] = {}
        self._held: dict[str, list[np.ndarray]] = {}

    def track(self, ds: h5py.Dataset) -> None:
        """Count ``ds``'s rows on disk (a new dataset, or one a resume truncated)."""
        self.on_disk[ds.name] = int(ds.shape[0])
        self._held[ds.name] = []

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
        held = self._held[path]
        held.append(rows[have - start:])
        chunk = ds.chunks[0]
        full = (have + len(held[-1])) // chunk * chunk
        if full > self.on_disk[path]:
            stacked = held[0] if len(held) == 1 else np.concatenate(held)
            count = full - self.on_disk[path]
            write_rows(ds, self.on_disk[path], stacked[:count])
            self.on_disk[path] = full
            self._held[path] = [stacked[count:]] if len(stacked) > count else []

    def drain(self, fh: h5py.File) -> None:
        """Write every held row (the last, partly filled chunks): the build is ending."""
        for path, held in self._held.items():
            if held:
                stacked = held[0] if len(held) == 1 else np.concatenate(held)
                write_rows(fh[path], self.on_disk[path], stacked)
                self.on_disk[path] += len(stacked)
                self._held[path] = []

    def durable(self) -> int:
        """Samples every dataset has on disk: where a resume starts."""
        return min(self.on_disk.values(), default=0)


def write_rows(ds: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    end = start + len(rows)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    ds[start:end] = rows
