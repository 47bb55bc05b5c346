"""The storage backend interface.

A backend moves per-sample arrays of named *parts* (a layer's tiers and variants) in and
out of one storage location, encoding each part with the codec it was declared with. It
knows nothing of tiers, sensitivity or training: :mod:`fmcache.cache` maps those onto
parts. Read-only enforcement lives here, once: every mutating public method checks it.

Lifecycle: ``create(path)`` or ``open(path, writable=...)``; handles open lazily on first
use in the current process and are never pickled (a backend pickles as its path).
"""

from __future__ import annotations

import errno
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from ..codecs import Codec
from ..errors import CacheError, CacheReplacedError, CodecSpecError, DiskFullError, EncodeError, ReadOnlyError
from .pids import PID

T = TypeVar("T")

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


@dataclass(frozen=True)
class PartSpec:
    """One stored part of a layer: its per-sample shape and codec."""

    name: str
    shape: tuple[int, ...]
    codec: Codec


class Backend(ABC):
    """Storage for parts of layers, labels and small metadata blobs."""

    backend_id: ClassVar[str]
    #: True when a process killed inside any write leaves the last committed state intact
    #: (LMDB transactions); False makes a resume re-read everything committed first.
    crash_atomic: ClassVar[bool] = True
    #: the codec face the backend stores: "bytes" (a record per sample) or "hdf5" (the
    #: codec's HDF5 datasets and filters), checked for every part when a layer is declared
    codec_face: ClassVar[str] = "bytes"

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = Path(os.path.abspath(path))  # a worker that reopens it may run in another directory
        self.writable = writable
        self._layers: dict[str, tuple[int, list[PartSpec], int]] = {}
        self._pid: int | None = None
        #: CRC-32 of the manifest the reading Cache was opened with (None while writing,
        #: or before it is read): a handle opened anew checks it (:meth:`_check_reopened`)
        self.manifest_crc: int | None = None

    # ---- detection / creation ---------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """True when ``path`` holds storage of this backend (complete or not)."""

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Backend:
        """Fresh, empty, writable storage at ``path`` (which must not exist)."""
        backend = cls(path, writable=True)
        backend._create()
        return backend

    @abstractmethod
    def _create(self) -> None: ...

    # ---- layers ------------------------------------------------------------------------
    @classmethod
    def check_codec(cls, codec: Codec, shape: tuple[int, ...]) -> None:
        """CodecSpecError if this backend cannot store ``codec`` for maps of ``shape``
        (the codec's HDF5 face refuses it, for an HDF5 backend)."""
        if cls.codec_face == "hdf5":
            codec.hdf5_fields(shape)

    def declare_layer(self, index: int, name: str, parts: Sequence[PartSpec], samples_per_chunk: int) -> None:
        """Make a layer known (again, after a reopen); creates storage when writable. A
        part whose codec this backend cannot store (an HDF5 face the codec refuses) raises
        its CodecSpecError, naming the layer and part, before anything is declared."""
        if self.writable:
            for spec in parts:
                try:
                    self.check_codec(spec.codec, spec.shape)
                except CodecSpecError as exc:
                    raise CodecSpecError(f"layer {name!r}, part {spec.name!r}: {exc.message}",
                                         hint=exc.hint) from None
        self._layers[name] = (index, list(parts), samples_per_chunk)
        if self.writable:
            self._declare(name)

    def _declare(self, name: str) -> None:
        """Create per-layer storage if needed (idempotent)."""

    def part_specs(self, layer: str) -> list[PartSpec]:
        return self._layers[layer][1]

    # ---- writing -------------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: cannot {what}, the cache is open read-only")

    def write_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray,
                    progress: bytes) -> dict[str, dict[str, int]]:
        """Write samples ``start .. start+N-1`` of every layer, their labels, and ``progress``
        as one atomic step. Returns the bytes stored per layer and part (where known)."""
        self._check_writable("write samples")
        return self._write_batch(start, maps, labels, progress)

    @abstractmethod
    def _write_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray,
                     progress: bytes) -> dict[str, dict[str, int]]: ...

    def finish(self, progress: bytes | None = None) -> None:
        """The build is being committed (``progress`` None; called before
        :meth:`stored_bytes` and the manifest): write what the backend held back for a
        chunk still filling (HDF5). Or it is closed to be resumed later (``progress``: the
        writer's last mark): a backend may keep what it holds to itself, since the resume
        recomputes everything after the stored mark (HDF5 does)."""
        self._check_writable("finish writing")
        self._finish(progress)

    def _finish(self, progress: bytes | None) -> None:
        """Nothing held back: every batch was written whole, with its progress (LMDB)."""

    def put_meta(self, key: str, data: bytes) -> None:
        """Store a small checksummed blob (manifest, draft, progress)."""
        self._check_writable(f"write {key}")
        self._put_meta(key, data)

    @abstractmethod
    def _put_meta(self, key: str, data: bytes) -> None: ...

    def truncate(self, samples: int) -> None:
        """Forget every sample from index ``samples`` on (resume after a crash)."""
        self._check_writable("truncate")
        self._truncate(samples)

    @abstractmethod
    def _truncate(self, samples: int) -> None: ...

    # ---- reading -------------------------------------------------------------------------
    @abstractmethod
    def get_meta(self, key: str) -> bytes | None:
        """A blob stored with :meth:`put_meta`, or None; CorruptionError if damaged."""

    @abstractmethod
    def read(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None = None,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """part -> decoded float32 batch ``(len(samples), *part_shape)``; parts named in
        ``out`` are decoded into those arrays (C-contiguous, exactly that shape)."""

    def read_picked(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None,
                    out: Mapping[str, np.ndarray] | None, picks: Sequence[str | None],
                    picked_out: np.ndarray | None, replace: str | None = None) -> dict[str, np.ndarray]:
        """:meth:`read`, and for each row ``r`` with a name in ``picks[r]`` that part of
        sample ``samples[r]`` decoded into ``picked_out[r]`` (rows without one are left as
        they are; every picked part has ``picked_out``'s row shape). What a SACA batch
        needs: the base tiers of every sample and one chosen variant each.

        With ``replace`` (a part among ``parts``, of the picked parts' shape) the picked
        part goes into that part's row of the result instead, and ``picked_out`` is not
        used: a backend need not decode the base part of those rows at all.

        This default reads the base parts once and each picked name once; backends that
        keep all parts of a sample in one record override it to fetch each record once."""
        result = self.read(layer, samples, parts, out)
        target = picked_out if replace is None else result[replace]
        assert target is not None, "picked_out or replace"
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(picks):
            if name is not None:
                rows_of.setdefault(name, []).append(row)
        for name, rows in rows_of.items():
            target[rows] = self._read_picked_part(layer, samples[rows], name)
        return result

    def _read_picked_part(self, layer: str, samples: np.ndarray, name: str) -> np.ndarray:
        """Part ``name`` of ``samples``, the rows of a batch that picked it (what
        :meth:`read_picked` reads per picked name; a backend may read such sparse rows
        its own way)."""
        return self.read(layer, samples, (name,))[name]

    def read_one(self, layer: str, sample: int, part: str, out: np.ndarray) -> np.ndarray:
        """One part of one sample, decoded into ``out`` (C-contiguous float32 of the part's
        shape): what ``Cache.read`` uses. Backends may override it with a leaner path."""
        self.read(layer, np.array([sample], dtype=np.int64), (part,), out={part: out[None]})
        return out

    @abstractmethod
    def read_labels(self, samples: int) -> np.ndarray | None:
        """Labels of samples ``0 .. samples-1`` (None when none were written)."""

    @abstractmethod
    def stored_bytes(self, layer: str) -> dict[str, int]:
        """Bytes on disk per part of ``layer`` (payload, excluding backend overhead)."""

    @abstractmethod
    def close(self) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable."""

    # ---- process safety ------------------------------------------------------------------
    def _in_new_process(self) -> bool:
        """True (and remembers the pid) when handles were opened by another process."""
        pid = PID[0]  # os.getpid() without its system call
        if self._pid != pid:
            self._pid = pid
            return True
        return False

    def _check_reopened(self) -> None:
        """After a handle was opened anew (in a DataLoader worker, or after close): the
        manifest on disk must be the one the reading Cache was opened with. A cache
        replaced under the path meanwhile would otherwise be read with the old layout:
        other maps served as if nothing changed, or records failing to decode as if
        damaged (a new-user sweep saw both)."""
        if self.manifest_crc is None:
            return
        raw = self.get_meta("manifest")
        if raw is None or zlib.crc32(raw) != self.manifest_crc:
            raise CacheReplacedError(f"{self.path} was replaced since it was opened: this process would read the "
                                     "new cache with the old one's layout")

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_h_")}
        state["_pid"] = None
        return state

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_failure(path: Path, layer: str, part: str, where: str, exc: EncodeError) -> EncodeError:
    """A codec's EncodeError (which knows only the map) naming the cache, layer, part and
    ``where`` ("sample 5")."""
    return EncodeError(f"{path}: layer {layer!r} part {part!r}, {where}: {exc.message}", hint=exc.hint)


def encode_naming_sample(path: Path, layer: str, spec: PartSpec, batch: np.ndarray, start: int,
                         encode: Callable[[np.ndarray], T]) -> T:
    """``encode(batch)`` (a codec's batch face: ``encode_batch``, ``to_hdf5``); a refusal
    names the sample (the batch's first is sample ``start``), found map by map."""
    try:
        return encode(batch)
    except EncodeError as exc:
        for i in range(len(batch)):
            try:
                encode(batch[i:i + 1])
            except EncodeError as one:
                raise encode_failure(path, layer, spec.name, f"sample {start + i}", one) from None
        raise encode_failure(path, layer, spec.name, f"samples {start}-{start + len(batch) - 1}", exc) from None


def os_write_failure(path: Path, exc: BaseException, what: str) -> CacheError:
    """The typed error for a failed write at ``path`` (an OSError, or h5py's OSError /
    RuntimeError carrying the OS's text): DiskFullError, ReadOnlyError, else CacheError."""
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space" in text:
        return DiskFullError(f"{path}: {what}: the disk is full ({text[:200]})")
    if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) or "Read-only" in text \
            or "Permission denied" in text:
        return ReadOnlyError(f"{path}: {what}: the location is not writable ({text[:200]})")
    return CacheError(f"{path}: {what} ({text[:300]})",
                      hint="the batches before it are kept: fix the cause and resume (--resume)")
