"""HDF5 backend: a group per layer, a dataset per tier/variant field, chunked along samples.

Layout (see docs/format.md)::

    /                                  attrs fmcache_<key> (JSON text) + fmcache_<key>_crc32
    /labels                            (N, *label_shape), fletcher32
    /layers/<layer>/<part>/<field>     (N, *field_shape), chunked along samples, fletcher32

``<layer>`` and ``<part>`` are percent-escaped ('%' and '/'). Fields come from the
part's codec (:meth:`fmcache.codecs.Codec.hdf5_fields`): codecs with a native HDF5
filter (Blosc2, ZFP, SZ3 from hdf5plugin; fp16 as the stored dtype) are stored with it,
so ``h5dump`` (with ``HDF5_PLUGIN_PATH`` set to hdf5plugin's plugin folder) prints
decoded values. Opaque variable-length fields get a companion ``<field>.crc32`` dataset,
because fletcher32 does not cover variable-length data.

hdf5plugin's filters are registered explicitly (``register(force=True)``): with
``HDF5_PLUGIN_PATH`` exported, HDF5 would otherwise load the plugin folder's copies,
which fail in h5py's process with "error during user callback".
"""

from __future__ import annotations

import json
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from ..codecs import Hdf5Field
from ..errors import CorruptionError, ReadOnlyError
from .base import Backend, PartSpec, os_write_failure
from .hdf5_frames import FrameReader
from .hdf5_index import Committed, check_chunk_index, check_header, parse_commit_record
from .hdf5_reads import (
    ChunkRows,
    _chunk_groups,
    _picked_rows,
    _read_rows,
    _touch,
    chunk_rows,
    far_apart,
    frames_of,
    open_dataset,
    open_file_error,
    read_one_plain,
    row_decoder,
    rows_alone,
)
from .hdf5_rowcrcs import seal
from .hdf5_rows import FileMap, RowDecoder
from .hdf5_writes import HeldRows, create_field, create_labels, to_hdf5
from .inflight import handles_lock, in_flight, wait_for_reads
from .pids import PID

hdf5plugin.register(force=True)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: the root attribute (``fmcache_chunk_index``) holding each chunked dataset's index
#: digest, written at commit just before the manifest (caches committed before fmcache
#: wrote it have none, and their indexes are checked without it)
CHUNK_INDEX_KEY = "chunk_index"
CHUNK_CACHE_BYTES = 64 << 20
#: Root attributes (manifest, draft, progress, chunk index) up to this size are stored as
#: fixed-length strings (see ``Hdf5Backend._set_attr_blob``).
ATTR_INLINE_BYTES = 60_000
#: Stored rows (HDF5's filters undone, the codec not yet) of whole chunks that one process
#: keeps for per-sample reads (:meth:`Hdf5Backend.read_one`) and batch reads, LRU out.
ROW_CACHE_BYTES = 32 << 20
#: Batch reads use that LRU too where this many chunks of every part of a layer fit in it.
ROWS_OPEN_CHUNKS = 12
#: ... and for a picked part (a SACA variant) only where a chunk holds this many samples.
PICKED_CHUNK_ROWS = 32


def escape_name(name: str) -> str:
    """A layer or part name as one HDF5 link name: ``%`` ``/`` and NUL (where HDF5 ends a
    name) escaped, and the names ``.`` and ``..`` (which a path would resolve away)."""
    escaped = name.replace("%", "%25").replace("/", "%2F").replace("\x00", "%00")
    return escaped.replace(".", "%2E") if escaped in (".", "..") else escaped


def dataset_path(layer: str, part: str, field: str) -> str:
    return f"/layers/{escape_name(layer)}/{escape_name(part)}/{field}"


class Hdf5Backend(Backend):
    """Feature maps in one HDF5 file."""

    backend_id = "hdf5"
    #: HDF5 has no transactions: a process killed inside a batch can leave the file's
    #: metadata half written, so a resume first re-reads what was committed.
    crash_atomic, codec_face = False, "hdf5"
    _h_rows: OrderedDict[tuple[str, str, int], ChunkRows]
    _h_lock: threading.Lock
    _h_rows_pid: int
    _h_rows_bytes: int
    _h_lru_row_bytes: int

    @classmethod
    def detect(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE

    def _create(self) -> None:
        if self.path.exists():
            raise ReadOnlyError(f"{self.path} already exists")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The default (earliest) file format: newer superblocks carry a "file is open
            # for writing" flag that a crashed build leaves set, which blocks --resume.
            with h5py.File(self.path, "w") as fh:
                fh.attrs["fmcache"] = np.bytes_(b"feature-map cache; see fmcache_manifest")
        except OSError as exc:
            raise os_write_failure(self.path, exc, "cannot create the cache file") from None

    # ---- handles -----------------------------------------------------------------------
    def _file(self) -> h5py.File:
        new_process = self._in_new_process()
        handle = getattr(self, "_h_file", None)  # once: a close() in another thread may drop it
        if new_process or handle is None:
            with handles_lock():  # one opening at a time (:mod:`.inflight`)
                handle = None if new_process else getattr(self, "_h_file", None)
                handle = self._open_file() if handle is None else handle
        return handle

    def _open_file(self) -> h5py.File:
        try:
            handle = h5py.File(self.path, "a" if self.writable else "r",
                               rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007, rdcc_w0=1.0)
        except OSError as exc:
            raise open_file_error(self.path, self.writable, exc) from None
        self._h_datasets: dict[str, h5py.Dataset] = {}
        self._h_frames: dict[str, FrameReader | None] = {}
        self._h_index: dict[str, np.ndarray] = {}  # path -> its checked chunk index
        self._h_rowdec: dict[tuple[str, str], RowDecoder | None] = {}
        self._h_rowdec_pid = PID[0]
        # the file's bytes for reads of fmcache's own chunks; an earlier map goes when the
        # last reader holding it lets go (see hdf5_rows.FileMap)
        self._h_map, self._h_file = None if self.writable else FileMap.of(handle), handle
        self._check_reopened()
        return handle

    def _dataset(self, path: str) -> h5py.Dataset:
        """An open dataset, kept open: HDF5's chunk cache lives with the open dataset, so
        reopening it per read would decompress a whole chunk for every sample."""
        self._file()  # open; its dict taken before the handle again: that handle's, or an older
        datasets, fh = self._h_datasets, self._file()  # one a close() dropped (then kept for nobody)
        ds = datasets.get(path)
        if ds is None:
            ds = open_dataset(fh, path, str(self.path))
            if not self.writable:  # a build's own handle may hold chunks not yet flushed
                # nothing recorded (an older cache): only the checks that need no record
                record = self._committed().get("/" + path.lstrip("/"), Committed(-1, 0))
                check_header(ds, str(self.path), record.rows if record.rows >= 0 else None, record.header)
                # a dataset cut short has lost chunks: the read names its first missing sample
                entries = check_chunk_index(ds, str(self.path), record.index if record.rows == ds.shape[0] else None)
                if entries is not None and ds.chunks[0] > 1:  # kept for frames_of (never a chunk a sample)
                    self._h_index[path] = entries
            datasets[path] = ds
        return ds

    def _committed(self) -> dict[str, Committed]:
        """:func:`.hdf5_index.parse_commit_record` of this cache's ``chunk_index``
        attribute, read once per handle (a fork's copy holds the same file's values)."""
        found: dict[str, Committed] | None = self.__dict__.get("_h_committed")
        if found is None:
            found = self._h_committed = parse_commit_record(self.get_meta(CHUNK_INDEX_KEY))
        return found

    def zero_chunks_of(self, path: str) -> frozenset[int] | None:
        """The chunks of the unfiltered dataset at ``path`` that held only zeros at commit;
        None where nothing was recorded (a filtered dataset, a cache committed before
        session 12, a writable handle)."""
        record = None if self.writable else self._committed().get("/" + path.lstrip("/"))
        return None if record is None else record.zeros

    def _read_fields(self, layer: str) -> list[tuple[PartSpec, list[tuple[Hdf5Field, str]]]]:
        """Per part of ``layer``: its fields with their dataset paths (built once per process)."""
        cache: dict[str, Any] = self.__dict__.setdefault("_h_read_fields", {})
        fields = cache.get(layer)
        if fields is None:
            _, specs, _ = self._layers[layer]
            fields = cache[layer] = [(spec, [(f, dataset_path(layer, spec.name, f.name))
                                             for f in spec.codec.hdf5_fields(spec.shape)]) for spec in specs]
        return fields

    def close(self) -> None:
        """Close the file after the reads in flight through it in other threads (:mod:`.inflight`)."""
        with handles_lock():
            handle = getattr(self, "_h_file", None)
            self._h_file, self._h_datasets, self._h_frames, self._h_rowdec, self._h_map = None, {}, {}, {}, None
        self.__dict__.pop("_h_rows", None)
        if handle is not None and self._pid == PID[0] and wait_for_reads(self):
            handle.close()  # else threads read on through it: dropped, it goes with their last dataset

    def flush(self) -> None:
        if self.writable:
            self._file().flush()

    # ---- layers ----------------------------------------------------------------------------
    def _fields(self, layer: str) -> list[tuple[str, list[Hdf5Field]]]:
        _, specs, _ = self._layers[layer]
        return [(spec.name, spec.codec.hdf5_fields(spec.shape)) for spec in specs]

    def _declare(self, name: str) -> None:
        _, specs, samples_per_chunk = self._layers[name]
        fh = self._file()
        for spec in specs:
            for field in spec.codec.hdf5_fields(spec.shape):
                create_field(fh, dataset_path(name, spec.name, field.name), spec, field, samples_per_chunk)

    # ---- writing -------------------------------------------------------------------------
    def _write_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray,
                     progress: bytes) -> dict[str, dict[str, int]]:
        try:
            self._write_rows_of_batch(start, maps, labels)
            # Progress only moves once the batch's data are out of HDF5's caches: a crash
            # between the two flushes leaves data past the progress mark (truncated on resume).
            fh = self._file()
            fh.flush()
            self._set_attr_blob(fh, "progress", self._held().progress(progress))
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise os_write_failure(self.path, exc, f"writing samples from {start} failed") from exc
        return {}

    def _held(self) -> HeldRows:
        held: HeldRows | None = self.__dict__.get("_h_held")
        if held is None:
            held = self._h_held = HeldRows()
        return held

    def _write_rows_of_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]],
                             labels: np.ndarray) -> None:
        fh, held = self._file(), self._held()
        for layer, parts in maps.items():
            _, specs, _ = self._layers[layer]
            for spec in specs:
                arrays = to_hdf5(self.path, layer, spec, parts[spec.name], start)
                for field in spec.codec.hdf5_fields(spec.shape):
                    path = dataset_path(layer, spec.name, field.name)
                    held.add(fh[path], start, arrays[field.name])
                    if field.dtype is None:
                        crcs = np.array([zlib.crc32(np.ascontiguousarray(r, np.uint8).data)
                                         for r in arrays[field.name]], "<u4")
                        held.add(fh[path + ".crc32"], start, crcs)
        labels = np.ascontiguousarray(labels)
        if "labels" not in fh:
            create_labels(fh, labels, max(spc for _, _, spc in self._layers.values()))
        held.add(fh["labels"], start, labels)

    def _finish(self, progress: bytes | None) -> None:
        if progress is not None:
            # Closed to be resumed: the rows held for chunks still filling are dropped, and
            # the resume recomputes them from the progress mark (each dataset's whole chunks).
            # Written now, a partly filled chunk would hold samples the mark counts, and the
            # resume would write that chunk again in place: a process killed inside that
            # rewrite lost them, and the resume refused the file (a helper's sweep).
            return
        try:
            fh = self._file()
            held = self._held()
            held.drain(fh)
            held.crcs.commit(fh)  # the checksums of the chunks fmcache wrote (hdf5_frames)
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise os_write_failure(self.path, exc, "writing the last, partly filled chunks failed") from exc

    def _put_meta(self, key: str, data: bytes) -> None:
        fh = self._file()
        try:
            if key == "manifest":  # chunk CRCs and the chunk index record, just before the manifest (last)
                fh.flush()
                self._set_attr_blob(fh, CHUNK_INDEX_KEY, seal(fh, str(self.path)))
            self._set_attr_blob(fh, key, data)
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise os_write_failure(self.path, exc, f"writing the {key} failed") from exc

    @staticmethod
    def _set_attr_blob(fh: h5py.File, key: str, data: bytes) -> None:
        # A fixed-length string, held in the root group's object header: a variable-length
        # one lives in HDF5's global heap, whose damage (a zeroed block) made HDF5 loop
        # forever reading it. Object header messages stop at 64 KiB: larger blobs stay
        # variable-length (ATTR_INLINE_BYTES).
        fh.attrs[f"fmcache_{key}"] = np.bytes_(data) if len(data) <= ATTR_INLINE_BYTES else data.decode()
        fh.attrs[f"fmcache_{key}_crc32"] = np.uint32(zlib.crc32(data))

    def _truncate(self, samples: int) -> None:
        fh = self._file()
        try:
            self._held().truncate(fh, samples, json.loads(self.get_meta("progress") or b"{}"))
            fh.flush()
        except (OSError, RuntimeError) as exc:  # a file killed while its layers were declared
            raise CorruptionError(f"{self.path}: HDF5 cannot list or cut its datasets ({exc})") from None

    # ---- reading -------------------------------------------------------------------------
    @in_flight
    def get_meta(self, key: str) -> bytes | None:
        fh = self._file()
        try:
            attrs = fh.attrs
            text = attrs.get(f"fmcache_{key}")
            if text is None:
                return None
            data = (text if isinstance(text, str) else bytes(text).decode()).encode()
            crc = None if (raw := attrs.get(f"fmcache_{key}_crc32")) is None else int(raw)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError) as exc:  # h5py: damaged types
            raise CorruptionError(f"{self.path}: the {key} attribute cannot be read ({type(exc).__name__}: {exc})") from None
        if crc is None or crc != zlib.crc32(data):
            raise CorruptionError(f"{self.path}: the {key} attribute fails its checksum")
        return data

    @in_flight
    def read(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None = None,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return self._read(layer, samples, parts, out, gather=True)

    @in_flight
    def read_picked(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None,
                    out: Mapping[str, np.ndarray] | None, picks: Sequence[str | None],
                    picked_out: np.ndarray | None, replace: str | None = None) -> dict[str, np.ndarray]:
        """Where the picked parts' rows come from whole chunks in the row LRU (see
        :meth:`_read_picked_part`) and share one codec: every picked row's stored row
        copied out of its chunk in one pass over the batch, then one decode for them all
        (rather than a gather and a decode per picked name: five variants, each picked by
        a few rows of a batch, cost 5-6x the base read that way). Rows far apart in a
        cache larger than the LRU: each picked row decoded alone (the default's way)."""
        names = sorted({p for p in picks if p is not None})
        per_chunk = self._layers[layer][2]
        entry_of = {}
        if len(picks) == len(samples) and per_chunk >= PICKED_CHUNK_ROWS and self._rows_fit(layer) \
                and not (names and far_apart(self, layer, names[0], samples[[p is not None for p in picks]])):
            for name in names:
                entry = self._entries(layer, name)[0]
                if entry is None:
                    break
                entry_of[name] = entry
        codecs = {entry[0].spec for entry in entry_of.values()}
        if not names or len(entry_of) != len(names) or len(codecs) != 1:
            return super().read_picked(layer, samples, parts, out, picks, picked_out, replace)
        result = self.read(layer, samples, parts, out)
        target = picked_out if replace is None else result[replace]
        assert target is not None, "picked_out or replace"
        rows = [row for row, pick in enumerate(picks) if pick is not None]
        stored = _picked_rows(lambda part, chunk: self._cached_chunk(layer, part, chunk, entry_of[part]),
                              samples, picks, rows, per_chunk, {name: e[3] for name, e in entry_of.items()})
        codec, spec_shape = entry_of[names[0]][0], target.shape[1:]
        where = f"{self.path}: layer {layer!r} parts {', '.join(names)}"
        try:
            if len(rows) == len(samples) and target.flags.c_contiguous:
                codec.from_hdf5_into(stored, target)
            else:
                target[rows] = codec.from_hdf5(stored, tuple(spec_shape))
        except CorruptionError:
            raise
        except (ValueError, KeyError) as exc:
            raise CorruptionError(f"{where}: cannot decode samples ({exc})") from exc
        return result

    def _read_picked_part(self, layer: str, samples: np.ndarray, name: str) -> np.ndarray:
        """A picked part (a SACA variant; with five variants each is picked by a few rows
        of a batch) goes through the row LRU too only where a chunk holds at least
        :data:`PICKED_CHUNK_ROWS` samples (then :meth:`read_picked` takes all picked
        names in one pass): a whole chunk read then serves enough rows over the epoch to beat one
        h5py read per row (tens of µs each); with fewer samples per chunk (larger maps)
        copying its chunks whole cost more than the rows it served, and the rows come
        through HDF5's own reads (its chunk cache keeps the decoded chunks). Measured by
        tools/bench_picked_rows.py (docs/benchmarks_history.md, "What session 7 changed")."""
        gather = self._layers[layer][2] >= PICKED_CHUNK_ROWS
        return self._read(layer, samples, (name,), None, gather=gather)[name]

    def _read(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None,
              out: Mapping[str, np.ndarray] | None, *, gather: bool) -> dict[str, np.ndarray]:
        samples = np.asarray(samples, dtype=np.int64)
        result: dict[str, np.ndarray] = {}
        groups = None  # the batch's rows grouped by chunk, once for every part
        # consecutive samples are one slice per field already; others come from whole
        # chunks kept in the row LRU where the layer's open chunks fit in it
        scattered = gather and len(samples) > 1 and not (int(samples[-1]) - int(samples[0]) == len(samples) - 1
                                              and bool(np.all(np.diff(samples) == 1)))
        for spec, spec_fields in self._read_fields(layer):
            if parts is not None and spec.name not in parts:
                continue
            where = f"{self.path}: layer {layer!r} part {spec.name!r}"
            alone = rows_alone(self, layer, spec.name, spec.shape, samples, out)  # rows far apart, or None
            if alone is not None:
                result[spec.name] = alone
                continue
            fields: dict[str, np.ndarray] = {}
            entry = self._entries(layer, spec.name)[0] if scattered and self._rows_fit(layer) else None
            if entry is not None:
                if groups is None:
                    groups = _chunk_groups(samples, entry[2])
                fields = self._gather_rows(layer, spec.name, entry, samples, groups)
            for field, path in spec_fields if entry is None else ():
                fields[field.name] = _read_rows(self, path, samples, where)
                if field.dtype is None:
                    crcs = _read_rows(self, path + ".crc32", samples, where)
                    for row, (rec, crc) in enumerate(zip(fields[field.name], crcs)):
                        if zlib.crc32(np.ascontiguousarray(rec, np.uint8).data) != int(crc):
                            raise CorruptionError(f"{where} sample {int(samples[row])}: checksum mismatch")
            dst = None if out is None else out.get(spec.name)
            try:
                result[spec.name] = (spec.codec.from_hdf5(fields, spec.shape) if dst is None
                                     else spec.codec.from_hdf5_into(fields, dst))
            except CorruptionError:
                raise
            except (ValueError, KeyError) as exc:
                raise CorruptionError(f"{where}: cannot decode samples ({exc})") from exc
        return result

    def read_one(self, layer: str, sample: int, part: str, out: np.ndarray) -> np.ndarray:
        """The per-sample path of ``Cache.read``.

        h5py costs tens of microseconds per ``Dataset.__getitem__`` call (selection,
        type conversion, the filter pipeline's bookkeeping), more than decoding a 32 KB
        map. So a read of sample ``i`` reads the stored rows of its whole chunk once
        (one slice per field: the chunk HDF5 decodes anyway) and keeps them in a per-process
        LRU of :data:`ROW_CACHE_BYTES`; the next samples of that chunk cost a dict look-up
        and the codec's decode of one row. Rows hold stored values (fletcher32 checked by
        HDF5 when read), never decoded maps. Opaque (variable-length) fields and writable
        caches take the plain path. In a cache larger than the LRU, reads out of order
        (which decoded a chunk per sample), and reads in order of rows of 16 KiB or more,
        decode their sample alone where its chunk's blocks hold whole rows
        (:meth:`.hdf5_rows.RowDecoder.read_missed`). Not marked itself (:mod:`.inflight`):
        the calls that touch the file are (an LRU hit does not; the row decoder reads the map)."""
        entry, plain = self._entries(layer, part)
        if entry is None:
            if plain is None:
                return super().read_one(layer, sample, part, out)
            return read_one_plain(self, sample, out, *plain)
        codec, _, per_chunk, where = entry
        chunk = sample // per_chunk
        # the LRU hit inline (what _cached_chunk does first): a call costs 2-5 % of a read
        rows_cache = self.__dict__.get("_h_rows")
        key = (layer, part, chunk)
        rows = None
        if rows_cache is not None and self._h_rows_pid == PID[0]:
            rows = rows_cache.get(key)
            if rows is not None:
                _touch(rows_cache, key)
                rows.hits += 1
        if rows is None:
            decoder = row_decoder(self, layer, part, entry)
            if decoder is not None:
                try:
                    done = decoder.read_missed(chunk, sample, out)
                except ValueError as exc:
                    raise CorruptionError(f"{where} sample {sample}: cannot decode it ({exc})") from exc
                if done is not None:
                    return done
            rows = self._cached_chunk(layer, part, chunk, entry)
            if decoder is not None:
                decoder.sent = rows
        k = sample - chunk * per_chunk
        if k >= rows.count:
            raise CorruptionError(f"{where} sample {sample}: the dataset stops at sample {chunk * per_chunk + rows.count}")
        try:
            reader = rows.reader
            if reader is None:  # once per chunk and process (threads may both build it: same result)
                reader = rows.reader = codec.hdf5_row_reader(rows)
            return reader(k, out)
        except CorruptionError:
            raise
        except (ValueError, KeyError) as exc:
            raise CorruptionError(f"{where} sample {sample}: cannot decode it ({exc})") from exc

    def _entries(self, layer: str, part: str) -> tuple[Any, Any]:
        """Per (layer, part), once: (codec, (field name, dataset path) pairs, samples per
        chunk, error prefix) of a part read through the row LRU, and (codec, pairs, error
        prefix) of a part stored a chunk per sample (ZFP, SZ3: their filters decode whole
        chunks, so the row LRU has nothing to keep; :func:`.hdf5_reads.read_one_plain`),
        each None where it does not apply; both None for a writable cache and for a part
        with an opaque (variable-length) field."""
        entries: dict[tuple[str, str], tuple[Any, Any]] = self.__dict__.setdefault("_h_entries", {})
        found = entries.get((layer, part))
        if found is None:
            rows = plain = None
            spec_fields = None if self.writable else next(
                ((spec, fields) for spec, fields in self._read_fields(layer) if spec.name == part), None)
            if spec_fields is not None and all(f.dtype is not None for f, _ in spec_fields[1]):
                spec, fields = spec_fields
                names = [(f.name, path) for f, path in fields]
                where = f"{self.path}: layer {layer!r} part {part!r}"
                if any(f.per_sample_chunks for f, _ in fields):
                    plain = (spec.codec, names, where)
                else:
                    rows = (spec.codec, names, self._layers[layer][2], where)
            found = entries[(layer, part)] = (rows, plain)
        return found

    @in_flight
    def _cached_chunk(self, layer: str, part: str, chunk: int, entry: tuple[Any, list[tuple[str, str]], int, str]
                      ) -> ChunkRows:
        """The stored rows of one chunk of ``part`` (field -> rows), from this process's
        LRU of :data:`ROW_CACHE_BYTES`, read (one slice per field) when missing. Threads
        sharing the cache may read at once: a miss is filled under a lock, and a hit whose
        entry another thread evicts meanwhile keeps the rows it already holds."""
        rows_cache = self.__dict__.get("_h_rows")
        if rows_cache is None or self._h_rows_pid != PID[0]:
            # a new process (a forked worker) starts with its own LRU and its own lock: one
            # inherited from fork could be held by a thread that does not exist here
            self._h_lock = threading.Lock()
            rows_cache = self._h_rows = OrderedDict()
            self._h_rows_pid, self._h_rows_bytes = PID[0], 0
        key = (layer, part, chunk)
        rows = rows_cache.get(key)
        if rows is not None:
            _touch(rows_cache, key)
            return rows
        with self._h_lock:
            rows = rows_cache.get(key)
            if rows is None:
                _, fields, per_chunk, where = entry
                rows = ChunkRows(chunk_rows(self, fields, chunk * per_chunk, per_chunk, where))
                rows_cache[key] = rows
                self._h_rows_bytes += sum(r.nbytes for r in rows.values())
                while self._h_rows_bytes > ROW_CACHE_BYTES and len(rows_cache) > 1:
                    _, old = rows_cache.popitem(last=False)
                    self._h_rows_bytes -= sum(r.nbytes for r in old.values())
        return rows

    def _rows_fit(self, layer: str) -> bool:
        """Whether batch reads of ``layer`` go through the chunk-row LRU: when
        :data:`ROWS_OPEN_CHUNKS` chunks of every part of it fit in :data:`ROW_CACHE_BYTES`
        (a chunk-aware sampler keeps about 8 chunks open; then each chunk is read from
        HDF5 once per pass, not a span of rows per batch)."""
        fits: dict[str, bool] = self.__dict__.setdefault("_h_fits", {})
        fit = fits.get(layer)
        if fit is None:
            _, specs, per_chunk = self._layers[layer]
            chunk_bytes = sum(per_chunk * int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize
                              for spec in specs for f in spec.codec.hdf5_fields(spec.shape) if f.dtype is not None)
            fit = fits[layer] = not self.writable and ROWS_OPEN_CHUNKS * chunk_bytes <= ROW_CACHE_BYTES
        return fit

    def _gather_rows(self, layer: str, part: str, entry: tuple[Any, list[tuple[str, str]], int, str],
                     samples: np.ndarray, groups: list[tuple[int, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stored rows ``samples`` of ``part`` gathered from the cached chunks (``groups``:
        per chunk, the batch rows in it and their positions in the chunk)."""
        where = entry[3]
        out: dict[str, np.ndarray] = {}
        for chunk, batch_rows, in_chunk in groups:
            rows = self._cached_chunk(layer, part, chunk, entry)
            stored = len(next(iter(rows.values())))
            if int(in_chunk.max()) >= stored:
                first = int(samples[batch_rows[in_chunk >= stored][0]])
                raise CorruptionError(f"{where} sample {first}: the dataset stops at sample "
                                      f"{chunk * entry[2] + stored}")
            for name, r in rows.items():
                if len(groups) == 1:
                    out[name] = r[in_chunk]
                    continue
                dst = out.get(name)
                if dst is None:
                    dst = out[name] = np.empty((len(samples), *r.shape[1:]), dtype=r.dtype)
                dst[batch_rows] = r[in_chunk]
        return out

    def _frames_of(self, path: str, ds: h5py.Dataset, where: str) -> FrameReader | None:
        """:func:`.hdf5_reads.frames_of`, once per handle."""
        known = self._h_frames
        if path not in known:
            known[path] = frames_of(self, path, ds, where)
        return known[path]

    @in_flight
    def read_labels(self, samples: int) -> np.ndarray | None:
        fh = self._file()
        try:
            if "labels" not in fh:
                return None  # Cache.labels checks that against the manifest
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            raise CorruptionError(f"{self.path}: HDF5 cannot look the labels up ({exc})") from None
        ds = self._dataset("labels")
        if ds.shape[0] < samples:
            raise CorruptionError(f"{self.path}: labels stop at sample {ds.shape[0]}, the cache has {samples}")
        return _read_rows(self, "labels", np.arange(samples), f"{self.path}: labels")

    @in_flight
    def stored_bytes(self, layer: str) -> dict[str, int]:
        fh = self._file()
        sizes: dict[str, int] = {}
        for part, fields in self._fields(layer):
            total = 0
            for field in fields:
                ds = fh[dataset_path(layer, part, field.name)]
                total += ds.id.get_storage_size()
            sizes[part] = total
        return sizes

