"""LMDB backend: one checksummed record per (layer, sample).

Layout of the LMDB environment (a directory holding ``data.mdb``)::

    b"\\x00meta/<key>"            framed blob: manifest, draft, progress
    b"L" u16 layer | u64 sample   framed record (fmcache.record), one part per tier/variant,
                                  each part a codec's encoded bytes (big-endian ints, so
                                  the samples of a layer are stored in order), plus a part
                                  "#key" holding the record's own key
    b"Y" u64 start                framed .npy bytes: labels of one written batch

A batch is one write transaction (many samples), committed together with its progress
blob, so a crash leaves whole batches. The map grows on its own: on ``MapFullError`` the
transaction is retried with a doubled map size. Readers open with ``lock=False``: a
committed cache is immutable (builds write to a separate ``.partial`` location), so they
need no reader-lock slots, and any number of processes can read.

py-lmdb refuses two environments for one path in one process, so environments are
shared per process (:mod:`.lmdb_envs`, which also keeps them safe across ``fork()``).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from threading import get_ident
from typing import Any

import lmdb
import numpy as np

from ..errors import (
    CacheError,
    CorruptionError,
    DiskFullError,
    ReadOnlyError,
)
from ..record import (
    PartPicker,
    pack_blob,
    pack_record,
    record_sizes,
    unpack_blob,
)
from .base import Backend, PartSpec, encode_naming_sample, os_write_failure
from .inflight import handles_lock, wait_for_reads
from .lmdb_envs import (
    FORKING,
    READING,
    busy_or_out_of_files,
    is_read_only,
    reading,
    release_dropped,
    release_env,
    shared_env,
    wait_for_fork,
)
from .pids import PID

_META = b"\x00meta/"
_REC = struct.Struct(">cHQ")
_LABELS = struct.Struct(">cQ")
#: Record part holding the record's own key. LMDB has no page checksums: one flipped bit
#: in a B-tree key (sample 5 -> 4) would serve an intact record, CRC and all, for the
#: wrong sample. Readers compare it with the key they asked for (records without it,
#: written before it existed, are read as before).
KEY_PART = "#key"

def _write_failure(path: Path, exc: lmdb.Error) -> CacheError:
    """The typed error for a failed write transaction (LMDB rolled it back)."""
    if isinstance(exc, lmdb.ReadonlyError) or is_read_only(path):
        return ReadOnlyError(f"{path}: LMDB write failed, the location is read-only ({exc})")
    if isinstance(exc, lmdb.DiskError) or "No space" in str(exc) or shutil.disk_usage(path).free < (4 << 20):
        return DiskFullError(f"{path}: LMDB write failed, the disk is full ({exc}); the batch was rolled back")
    return CacheError(f"{path}: LMDB write failed ({exc}); the batch was rolled back",
                      hint="the batches before it are kept: fix the cause and resume (--resume)")



def _out_array(out: Mapping[str, np.ndarray] | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``out[name]`` (checked) if given, else a new float32 array of ``shape``."""
    given = out.get(name) if out is not None else None
    if given is None:
        return np.empty(shape, dtype=np.float32)
    if given.shape != shape or given.dtype != np.float32:
        raise ValueError(f"out[{name!r}] has shape {given.shape} {given.dtype}, expected {shape} float32")
    return given


def _damaged(where: str, exc: lmdb.Error) -> CacheError:
    """A read's LMDB failure (a damaged B-tree page: MDB_PAGE_NOTFOUND, MDB_CORRUPTED, ...)
    as the CorruptionError that names the file, layer and sample; lmdb's own exceptions
    are not fmcache's, so ``except FmcacheError`` would miss them."""
    busy = busy_or_out_of_files(where, exc)
    if busy is not None:
        return busy
    return CorruptionError(f"{where}: LMDB cannot read it, the database is damaged ({type(exc).__name__}: {exc})")


def record_key(layer_index: int, sample: int) -> bytes:
    return _REC.pack(b"L", layer_index, sample)


def _foreign_record(own_key: memoryview, prefix: str, sample: int) -> CorruptionError:
    """The error for a record whose own key (part ``#key``) is not the key it was read under."""
    return CorruptionError(f"{prefix}{sample}: found the record stored for key {bytes(own_key).hex()} "
                           "(the database's index is damaged)")


def _decode_one(decode: Callable[[memoryview, np.ndarray], np.ndarray], payload: memoryview, out: np.ndarray,
                prefix: str, sample: int, name: str) -> np.ndarray:
    """``decode(payload, out)`` of a payload whose record CRC was checked; a failure
    becomes CorruptionError naming sample and part."""
    try:
        return decode(payload, out)
    except CorruptionError as exc:
        raise CorruptionError(f"{prefix}{sample}, part {name!r}: {exc.message}") from exc
    except ValueError as exc:
        raise CorruptionError(f"{prefix}{sample}, part {name!r}: {exc}") from exc


def _name_the_bad_sample(codec: Any, views: Sequence[memoryview], dst: np.ndarray, samples: np.ndarray,
                         prefix: str, name: str) -> None:
    """After a batch decode failed: decode row by row and raise CorruptionError naming the
    first sample (and part) that does not decode. Returns if every row decodes alone."""
    def decode(payload: memoryview, out: np.ndarray) -> np.ndarray:
        return codec.decode_verified(payload, out=out)

    for row, view in enumerate(views):
        _decode_one(decode, view, dst[row], prefix, int(samples[row]), name)


def _decode_rows(codec: Any, views: Sequence[memoryview], dst: np.ndarray, samples: np.ndarray,
                 prefix: str, name: str) -> None:
    """One batch decode of CRC-checked payloads into ``dst``; on failure, CorruptionError
    naming the first sample (and part) that does not decode."""
    if not views:  # an empty batch: some codecs' batch decoders look at the first record
        return
    try:
        codec.decode_batch_verified(views, dst)  # every record's CRC was checked
    except Exception as exc:  # a damaged payload never escapes as a raw library error
        _name_the_bad_sample(codec, views, dst, samples, prefix, name)
        raise CorruptionError(f"{prefix}{int(samples[0])}..{int(samples[-1])}, part {name!r}: "
                              f"the batch does not decode ({exc})") from exc


class LmdbBackend(Backend):
    """Feature maps in an LMDB environment directory."""

    backend_id = "lmdb"
    _h_env: lmdb.Environment | None  # the shared environment; opened lazily by _env()

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        super().__init__(path, writable=writable)
        #: (layer, part) -> (layer index, record reader, decoder, error prefix): read_one's state
        self._read_one_of: dict[tuple[str, str], tuple[int, Any, Any, str]] = {}
        #: layer -> a reader of all its parts and the own key: batch reads' state
        self._read_all_of: dict[str, PartPicker] = {}

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and (path / "data.mdb").is_file()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_read_one_of"] = {}  # closures and Structs: rebuilt on first use in the new process
        state["_read_all_of"] = {}
        return state

    def declare_layer(self, index: int, name: str, parts: Sequence[PartSpec], samples_per_chunk: int) -> None:
        self._read_one_of.clear()
        self._read_all_of.clear()
        super().declare_layer(index, name, parts, samples_per_chunk)

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            failure = os_write_failure(self.path, exc, "cannot create the cache directory")
            if isinstance(failure, (DiskFullError, ReadOnlyError)):
                raise failure from None
            raise
        self._env()

    # ---- handles -----------------------------------------------------------------------
    def _env(self) -> lmdb.Environment:
        new_process = self._in_new_process()
        env: lmdb.Environment | None = getattr(self, "_h_env", None)
        if new_process or env is None:
            # one opening at a time, and never beside close()'s taking of the handle: a
            # reference the registry counts without its own release, or a release taken
            # for another opening, closed the environment under another handle's reads
            with handles_lock():
                env = None if new_process else getattr(self, "_h_env", None)
                if env is None:
                    env = shared_env(self.path, self.writable)
                    # a backend dropped without close() (a Dataset or Cache garbage collected)
                    # gives its reference back: the registry kept the environment, its
                    # descriptor and its mapping for good (a deleted cache's disk space too)
                    self._h_release: weakref.finalize[Any, Any] | None = weakref.finalize(self, release_dropped, env)
                    self._h_release.atexit = False  # at exit the process's end lets go (inflight: daemon threads)
                    self._h_env = env
                    self._check_reopened()
        return env

    def close(self) -> None:
        """Give the environment back; reads in flight through this handle in other threads
        finish first (:mod:`.inflight`: the last reference unmaps the file under them), and
        a read after this one opens it again."""
        with handles_lock():  # first: a read starting now opens (or shares) an environment of its own
            env: lmdb.Environment | None = getattr(self, "_h_env", None)
            release = getattr(self, "_h_release", None)
            self._h_env = self._h_release = None
        if env is not None and self._pid == PID[0]:
            if not wait_for_reads(self, READING):
                return  # threads read on through it: its finaliser lets it go once this backend is dropped
            try:
                if self.writable:
                    env.sync(True)
            except lmdb.Error:
                pass  # already closed because the path was replaced
            if release is not None:
                release()  # once: release_env(env), and the finaliser is done
            else:
                release_env(env)

    def flush(self) -> None:
        if self.writable:
            self._env().sync(True)

    # ---- writing ---------------------------------------------------------------------------
    def _write_txn(self, puts: list[tuple[bytes, bytes]], deletes: Sequence[bytes] = ()) -> None:
        """One atomic transaction; doubles the map and retries on MapFullError."""
        env = self._env()
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key in deletes:
                        txn.delete(key)
                    for key, value in puts:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.Error as exc:
                raise _write_failure(self.path, exc) from exc

    def _write_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray,
                     progress: bytes) -> dict[str, dict[str, int]]:
        puts: list[tuple[bytes, bytes]] = []
        stored: dict[str, dict[str, int]] = {}
        n = len(labels)
        for layer, parts in maps.items():
            index, specs, _ = self._layers[layer]
            sizes = stored.setdefault(layer, {spec.name: 0 for spec in specs})
            payloads = [(spec.name, encode_naming_sample(self.path, layer, spec, parts[spec.name], start,
                                                     spec.codec.encode_batch)) for spec in specs]
            for name, encoded_part in payloads:
                sizes[name] += sum(map(len, encoded_part))
            for i in range(n):
                encoded = {name: encoded_part[i] for name, encoded_part in payloads}
                key = record_key(index, start + i)
                encoded[KEY_PART] = key
                puts.append((key, pack_record(encoded)))
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(labels), allow_pickle=False)
        puts.append((_LABELS.pack(b"Y", start), pack_blob(buf.getvalue())))
        puts.append((_META + b"progress", pack_blob(progress)))
        self._write_txn(puts)
        return stored

    def _put_meta(self, key: str, data: bytes) -> None:
        self._write_txn([(_META + key.encode(), pack_blob(data))])

    def _truncate(self, samples: int) -> None:
        doomed: list[bytes] = []
        with reading(self) as txn:
            cursor = txn.cursor()
            for index, _specs, _ in self._layers.values():
                if cursor.set_range(record_key(index, samples)):
                    for key in cursor.iternext(values=False):
                        if key[:3] != record_key(index, 0)[:3]:
                            break
                        doomed.append(bytes(key))
            if cursor.set_range(b"Y"):
                for key in cursor.iternext(values=False):
                    if key[:1] != b"Y":
                        break
                    if _LABELS.unpack(key)[1] >= samples:
                        doomed.append(bytes(key))
        if doomed:
            self._write_txn([], doomed)

    # ---- reading -------------------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        try:
            with reading(self, buffers=False) as txn:
                value = txn.get(_META + key.encode())
        except lmdb.Error as exc:
            raise _damaged(f"{self.path}: the {key}", exc) from None
        if value is None:
            return None
        return bytes(unpack_blob(value, f"{self.path}: {key}"))

    def read(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None = None,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return self._read_records(layer, samples, parts, out, None, None)

    def read_picked(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None,
                    out: Mapping[str, np.ndarray] | None, picks: Sequence[str | None],
                    picked_out: np.ndarray | None, replace: str | None = None) -> dict[str, np.ndarray]:
        """One get and one CRC per sample for the base parts and the picked one together
        (the default would fetch and check each picked sample's record a second time);
        with ``replace``, that base part is decoded only for the rows that pick nothing."""
        if len(picks) != len(samples):
            raise ValueError(f"{len(picks)} picks for {len(samples)} samples")
        return self._read_records(layer, samples, parts, out, picks, picked_out, replace)

    def _read_records(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None,
                      out: Mapping[str, np.ndarray] | None, picks: Sequence[str | None] | None,
                      picked_out: np.ndarray | None, replace: str | None = None) -> dict[str, np.ndarray]:
        index, specs, _ = self._layers[layer]
        wanted = [s for s in specs if parts is None or s.name in parts]
        result = {s.name: _out_array(out, s.name, (len(samples), *s.shape)) for s in wanted}
        if replace is not None:
            picked_out = result[replace]  # the picked parts land in that part's rows
        skip = next((k for k, s in enumerate(wanted) if s.name == replace), -1) if picks is not None else -1
        unpicked: list[int] = []  # with replace: the rows whose base part is decoded
        rows = [(result[s.name], s.name, s.codec) for s in wanted]
        prefix = f"{self.path}: layer {layer!r} sample "  # error context, formatted once per call
        # every part of the layer's records and the own key, through one per-layer reader
        pick_all = self._read_all_of.get(layer)
        if pick_all is None:
            pick_all = self._read_all_of[layer] = PartPicker([*(s.name for s in specs), KEY_PART])
        position = {name: k for k, name in enumerate(pick_all.wanted)}
        wanted_at = [position[name] for _, name, _ in rows]
        payloads: list[list[memoryview]] = [[] for _ in rows]
        picked: dict[str, tuple[list[int], list[memoryview]]] = {}  # name -> its rows and payloads
        pack = _REC.pack
        sample = None  # names the record an LMDB failure hit
        me = get_ident()  # lmdb_envs.reading, inline: no fork while this reads
        READING[me] = self  # before the environment is taken: close() waits for this read
        try:
            if FORKING[0]:
                wait_for_fork(me, self)
            with self._env().begin(buffers=True) as txn:  # the views below live as long as txn
                get = txn.get
                for row, sample in enumerate(np.asarray(samples).tolist()):
                    key = pack(b"L", index, sample)
                    value = get(key)
                    if value is None:
                        raise CorruptionError(f"{prefix}{sample}: no record")
                    try:
                        found = pick_all(value, "")  # CRC checked here
                    except CorruptionError as exc:
                        raise CorruptionError(f"{prefix}{sample}{exc.message}") from None
                    own_key = found[-1]
                    if own_key is not None and own_key != key:
                        raise _foreign_record(own_key, prefix, sample)
                    pick = picks[row] if picks is not None else None
                    for k, at in enumerate(wanted_at):
                        payload = found[at]
                        if payload is None:
                            raise CorruptionError(f"{prefix}{sample}: record has no part {rows[k][1]!r}")
                        if k != skip:
                            payloads[k].append(payload)
                        elif pick is None:
                            payloads[k].append(payload)
                            unpicked.append(row)
                    if pick is not None:
                        entry = picked.get(pick)
                        if entry is None:
                            entry = picked[pick] = ([], [])
                        where = position.get(pick)
                        payload = found[where] if where is not None else None
                        if payload is None:
                            raise CorruptionError(f"{prefix}{sample}: record has no part {pick!r}")
                        entry[0].append(row)
                        entry[1].append(payload)
                for k, ((dst, name, codec), views) in enumerate(zip(rows, payloads)):
                    if k != skip or len(unpicked) == len(samples):
                        _decode_rows(codec, views, dst, samples, prefix, name)
                    elif unpicked:
                        part = np.empty((len(unpicked), *dst.shape[1:]), dtype=np.float32)
                        _decode_rows(codec, views, part, samples[unpicked], prefix, name)
                        dst[unpicked] = part
                if picked:
                    assert picked_out is not None
                    codecs = {s.name: s.codec for s in specs}
                    for name, (picked_rows, views) in picked.items():
                        dst = np.empty((len(picked_rows), *picked_out.shape[1:]), dtype=np.float32)
                        _decode_rows(codecs[name], views, dst, samples[picked_rows], prefix, name)
                        picked_out[picked_rows] = dst
        except lmdb.Error as exc:
            raise _damaged(f"{prefix}{sample}" if sample is not None else f"{self.path}: layer {layer!r}", exc) from None
        finally:
            READING.pop(me, None)
        return result

    def read_one(self, layer: str, sample: int, part: str, out: np.ndarray) -> np.ndarray:
        """The per-sample path of ``Cache.read``: one get, one record check, one decode
        (no batch bookkeeping); the same checks and errors as :meth:`read`. Written out
        flat, with a record reader (:class:`~fmcache.record.PartPicker`) and a decoder
        (:meth:`~fmcache.codecs.base.Codec.verified_decoder`) made once per layer and
        part: a read of a small map is short enough that each helper call here shows."""
        entry = self._read_one_of.get((layer, part))
        if entry is None:  # per layer and part, once
            entry = self._read_one_of[(layer, part)] = self._read_one_entry(layer, sample, part)
        index, pair, decode, prefix = entry
        key = _REC.pack(b"L", index, sample)
        me = get_ident()  # lmdb_envs.reading, inline: no fork while this reads
        READING[me] = self  # before the environment is taken: close() waits for this read
        try:
            if FORKING[0]:
                wait_for_fork(me, self)
            env = self.__dict__.get("_h_env")  # self._env(), its common case inline
            if env is None or self._pid != PID[0]:
                env = self._env()
            with env.begin(buffers=True) as txn:
                value = txn.get(key)
                if value is None:
                    raise CorruptionError(f"{prefix}{sample}: no record")
                try:
                    payload, own_key = pair(value, "")  # CRC checked here
                except CorruptionError as exc:
                    raise CorruptionError(f"{prefix}{sample}{exc.message}") from None
                if own_key is not None and own_key != key:
                    raise _foreign_record(own_key, prefix, sample)
                if payload is None:
                    raise CorruptionError(f"{prefix}{sample}: record has no part {part!r}")
                try:  # _decode_one, inline
                    return decode(payload, out)
                except CorruptionError as exc:
                    raise CorruptionError(f"{prefix}{sample}, part {part!r}: {exc.message}") from exc
                except ValueError as exc:
                    raise CorruptionError(f"{prefix}{sample}, part {part!r}: {exc}") from exc
        except lmdb.Error as exc:
            raise _damaged(f"{prefix}{sample}", exc) from None
        finally:
            READING.pop(me, None)

    def _read_one_entry(self, layer: str, sample: int, part: str) -> tuple[int, Any, Any, str]:
        """read_one's per-(layer, part) state: the layer's index, a record reader for the
        part and the own key (:meth:`PartPicker.pair`), the codec's decoder for the map's
        shape, the error prefix."""
        index, specs, _ = self._layers[layer]
        spec = next((s for s in specs if s.name == part), None)
        if spec is None:
            raise CorruptionError(f"{self.path}: layer {layer!r} sample {sample}: layer has no part {part!r}")
        return (index, PartPicker((part, KEY_PART)).pair, spec.codec.verified_decoder(tuple(spec.shape)),
                f"{self.path}: layer {layer!r} sample ")

    def read_labels(self, samples: int) -> np.ndarray | None:
        try:
            return self._read_labels(samples)
        except lmdb.Error as exc:
            raise _damaged(f"{self.path}: labels", exc) from None

    def _read_labels(self, samples: int) -> np.ndarray | None:
        blocks: list[np.ndarray] = []
        expected = 0
        with reading(self) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(b"Y"):
                return None
            for key, value in cursor:
                if key[:1] != b"Y":
                    break
                start = _LABELS.unpack(key)[1]
                if start >= samples:
                    break
                where = f"{self.path}: labels from sample {start}"
                if start != expected:
                    raise CorruptionError(f"{where}: expected a block starting at {expected}")
                try:
                    block = np.load(io.BytesIO(bytes(unpack_blob(value, where))), allow_pickle=False)
                except ValueError as exc:
                    raise CorruptionError(f"{where}: {exc}") from None
                blocks.append(block)
                expected = start + len(block)
        if not blocks:
            return None
        labels = np.concatenate(blocks)
        if len(labels) < samples:
            raise CorruptionError(f"{self.path}: labels stop at sample {len(labels)}, the cache has {samples}")
        return labels[:samples]

    def stored_bytes(self, layer: str) -> dict[str, int]:
        try:
            return self._stored_bytes(layer)
        except lmdb.Error as exc:
            raise _damaged(f"{self.path}: layer {layer!r}", exc) from None

    def _stored_bytes(self, layer: str) -> dict[str, int]:
        index, specs, _ = self._layers[layer]
        sizes = {s.name: 0 for s in specs}
        with reading(self, buffers=True) as txn:
            cursor = txn.cursor()
            prefix = record_key(index, 0)[:3]
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if bytes(key[:3]) != prefix:
                        break
                    for name, size in record_sizes(value, f"{self.path}: layer {layer!r}").items():
                        if name in sizes:
                            sizes[name] += size
        return sizes
