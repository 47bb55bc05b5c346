"""LMDB backend: one checksummed record per (layer, sample).

Layout of the LMDB environment (a directory holding ``data.mdb``)::

    b"\\x00meta/<key>"            framed blob: manifest, draft, progress
    b"L" u16 layer | u64 sample   framed record (fmcache.record), one part per tier/variant,
                                  each part a codec's encoded bytes (big-endian ints, so
                                  the samples of a layer are stored in order)
    b"Y" u64 start                framed .npy bytes: labels of one written batch

A batch is one write transaction (many samples), committed together with its progress
blob, so a crash leaves whole batches. The map grows on its own: on ``MapFullError`` the
transaction is retried with a doubled map size. Readers open with ``lock=False``: a
committed cache is immutable (builds write to a separate ``.partial`` location), so they
need no reader-lock slots, and any number of processes can read.

py-lmdb refuses two environments for one path in one process, so environments are
shared per process (:func:`_shared_env`).
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from ..errors import CorruptionError, ReadOnlyError, SampleIndexError
from ..record import pack_blob, pack_record, unpack_blob, unpack_record
from .base import Backend

_META = b"\x00meta/"
_REC = struct.Struct(">cHQ")
_LABELS = struct.Struct(">cQ")
INITIAL_MAP_SIZE_BYTES = 64 << 20

_envs: dict[tuple[int, int, int], list[Any]] = {}  # (pid, dev, inode of data.mdb) -> [env, refcount, writable]
_envs_lock = threading.Lock()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path / "data.mdb")
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _shared_env(path: Path, writable: bool) -> lmdb.Environment:
    """One environment per LMDB file per process (py-lmdb refuses a second one for the same
    file, even under another path after a rename), shared by reference count."""
    with _envs_lock:
        _forget_inherited()
        ident = _identity(path)
        entry = _envs.get((os.getpid(), *ident)) if ident else None
        if entry is not None:
            if entry[2] != writable:
                raise ReadOnlyError(f"{path} is open {'for writing' if entry[2] else 'read-only'} in this process",
                                    hint="close the other handle first")
            entry[1] += 1
            return entry[0]
        if writable:
            env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE_BYTES, subdir=True, max_dbs=0,
                            readahead=False, meminit=False)
        else:
            try:
                env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=0,
                                readahead=False, max_spare_txns=4)
            except lmdb.Error as exc:
                raise CorruptionError(f"{path}: LMDB cannot open it ({exc})") from None
        ident = _identity(path)
        if ident is not None:
            _envs[(os.getpid(), *ident)] = [env, 1, writable]
        return env


def _forget_inherited() -> None:
    """Drop environments inherited through fork(): LMDB handles must not be used in a
    child, and py-lmdb would refuse to open the same file again while they are open.
    Closing a read-only, lock-free environment only unmaps the child's copy."""
    pid = os.getpid()
    for key in [k for k in _envs if k[0] != pid]:
        env, _count, writable = _envs.pop(key)
        if not writable:
            env.close()


def _release_env(env: lmdb.Environment) -> None:
    with _envs_lock:
        for key, entry in list(_envs.items()):
            if entry[0] is env and key[0] == os.getpid():
                entry[1] -= 1
                if entry[1] <= 0:
                    del _envs[key]
                    env.close()
                return


def record_key(layer_index: int, sample: int) -> bytes:
    return _REC.pack(b"L", layer_index, sample)


class LmdbBackend(Backend):
    """Feature maps in an LMDB environment directory."""

    backend_id = "lmdb"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and (path / "data.mdb").is_file()

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except PermissionError as exc:
            raise ReadOnlyError(f"{self.path}: cannot create the cache directory ({exc.strerror})") from None
        self._env()

    # ---- handles -----------------------------------------------------------------------
    def _env(self) -> lmdb.Environment:
        if self._in_new_process() or getattr(self, "_h_env", None) is None:
            self._h_env = _shared_env(self.path, self.writable)
        return self._h_env

    def close(self) -> None:
        if getattr(self, "_h_env", None) is not None and self._pid == os.getpid():
            try:
                if self.writable:
                    self._h_env.sync(True)
            except lmdb.Error:
                pass  # already closed because the path was replaced
            _release_env(self._h_env)
        self._h_env = None

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

    def _write_batch(self, start: int, maps: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray,
                     progress: bytes) -> dict[str, dict[str, int]]:
        puts: list[tuple[bytes, bytes]] = []
        stored: dict[str, dict[str, int]] = {}
        n = len(labels)
        for layer, parts in maps.items():
            index, specs, _ = self._layers[layer]
            sizes = stored.setdefault(layer, {spec.name: 0 for spec in specs})
            codecs = [(spec.name, spec.codec, parts[spec.name]) for spec in specs]
            for i in range(n):
                encoded = {}
                for name, codec, batch in codecs:
                    payload = codec.encode(batch[i])
                    sizes[name] += len(payload)
                    encoded[name] = payload
                puts.append((record_key(index, start + i), pack_record(encoded)))
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
        with self._env().begin() as txn:
            cursor = txn.cursor()
            for _name, (index, _specs, _) in self._layers.items():
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
        with self._env().begin(buffers=False) as txn:
            value = txn.get(_META + key.encode())
        if value is None:
            return None
        return bytes(unpack_blob(value, f"{self.path}: {key}"))

    def read(self, layer: str, samples: np.ndarray, parts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        index, specs, _ = self._layers[layer]
        wanted = [s for s in specs if parts is None or s.name in parts]
        out = {s.name: np.empty((len(samples), *s.shape), dtype=np.float32) for s in wanted}
        with self._env().begin(buffers=True) as txn:
            for row, sample in enumerate(samples):
                value = txn.get(record_key(index, int(sample)))
                where = f"{self.path}: layer {layer!r} sample {int(sample)}"
                if value is None:
                    raise SampleIndexError(f"{where}: no record", hint="the cache may be incomplete; verify it")
                record = unpack_record(value, where)
                for spec in wanted:
                    payload = record.get(spec.name)
                    if payload is None:
                        raise CorruptionError(f"{where}: record has no part {spec.name!r}")
                    try:
                        spec.codec.decode(payload, out=out[spec.name][row])
                    except CorruptionError as exc:
                        raise CorruptionError(f"{where}, part {spec.name!r}: {exc.message}") from exc
                    except ValueError as exc:
                        raise CorruptionError(f"{where}, part {spec.name!r}: {exc}") from exc
        return out

    def read_labels(self, samples: int) -> np.ndarray | None:
        blocks: list[np.ndarray] = []
        expected = 0
        with self._env().begin() as txn:
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
        index, specs, _ = self._layers[layer]
        sizes = {s.name: 0 for s in specs}
        with self._env().begin(buffers=True) as txn:
            cursor = txn.cursor()
            prefix = record_key(index, 0)[:3]
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if bytes(key[:3]) != prefix:
                        break
                    for name, payload in unpack_record(value, f"{self.path}: layer {layer!r}").items():
                        if name in sizes:
                            sizes[name] += len(payload)
        return sizes
