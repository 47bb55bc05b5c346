"""Shared pieces of the reliability tests (tests/test_reliability_*.py).

Deterministic synthetic feature maps, a writer loop that can resume, a forked child that
dies by SIGKILL at a chosen point, and byte-level damage helpers. Everything runs on
real LMDB/HDF5 files; fault injection patches only the *child* process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np

import fmcache

BACKENDS = ["lmdb", "hdf5"]
N_SAMPLES = 64
BATCH = 8
SHAPES = {"conv": (6, 8, 8), "tokens": (5, 7)}
#: per backend, a codec exercising its interesting path (LMDB: framed bytes; HDF5: a
#: native filter with per-sample chunks)
CODECS = {"lmdb": "bf16", "hdf5": "zfp:accuracy=0.01"}


def suffix(backend: str) -> str:
    return ".h5" if backend == "hdf5" else ".lmdb"


def synthetic(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Post-ReLU-like maps for every layer, and integer labels."""
    rng = np.random.default_rng(seed)
    maps = {}
    for name, shape in SHAPES.items():
        x = rng.lognormal(-1.0, 1.0, size=(N_SAMPLES, *shape)) * (rng.random((N_SAMPLES, *shape)) > 0.4)
        maps[name] = x.astype(np.float32)
    return maps, rng.integers(0, 10, size=N_SAMPLES)


def write(path: Path, backend: str, *, resume: bool = False, codec: str | None = None, seed: int = 0,
          fingerprints: dict | None = None, **kwargs: object) -> fmcache.Manifest:
    """Build (or finish, with ``resume``) the synthetic cache at ``path``."""
    maps, labels = synthetic(seed)
    fingerprints = fingerprints or {"weights": "w0", "data": f"d{seed}"}
    with fmcache.create_cache(path, backend=backend, resume=resume, fingerprints=fingerprints, **kwargs) as w:
        for name, shape in SHAPES.items():
            w.add_layer(name, shape, codec=codec or CODECS[backend], samples_per_chunk=4)
        for start in range(w.samples, N_SAMPLES, BATCH):
            w.append({k: v[start:start + BATCH] for k, v in maps.items()}, labels[start:start + BATCH])
        return w.commit()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_killed(target: Callable[..., object], *args: object) -> int:
    """Run ``target`` in a forked child (modules already imported: no start-up cost) and
    return its exit code; the target is expected to SIGKILL itself."""
    proc = mp.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(120)
    if proc.is_alive():  # pragma: no cover - a hang is a failure, not a wait
        proc.kill()
        proc.join()
    return int(proc.exitcode if proc.exitcode is not None else 0)


def read_all(cache: fmcache.Cache) -> dict[str, np.ndarray]:
    return {name: cache.read_batch(name, np.arange(len(cache))) for name in cache.layers}


def assert_same_cache(a: Path, b: Path) -> None:
    """Same samples, labels, decoded maps (bit for bit) and stored bytes."""
    with fmcache.open_cache(a) as x, fmcache.open_cache(b) as y:
        assert len(x) == len(y)
        np.testing.assert_array_equal(x.labels, y.labels)
        got, want = read_all(x), read_all(y)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            assert x.layers[name].stored_bytes == y.layers[name].stored_bytes


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ mask]))


def lmdb_record_copies(cache_dir: Path, layer_index: int, sample: int) -> tuple[list[int], int]:
    """(file offsets, length) of every copy of record (layer, sample) in data.mdb. LMDB
    is copy-on-write, so stale copies linger in freed pages: damage them all to be sure
    the live one is hit."""
    import lmdb

    from fmcache.backends.lmdb_backend import record_key

    env = lmdb.open(str(cache_dir), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        value = txn.get(record_key(layer_index, sample))
    env.close()
    data = (cache_dir / "data.mdb").read_bytes()
    offsets, at = [], data.find(value)
    while at >= 0:
        offsets.append(at)
        at = data.find(value, at + 1)
    assert offsets, "the record must be in the file"
    return offsets, len(value)


def flip_everywhere(path: Path, offsets: list[int], delta: int, mask: int = 0x40) -> None:
    for offset in offsets:
        flip_byte(path, offset + delta, mask)


def find_all(blob: bytes, needle: bytes) -> list[int]:
    out, at = [], blob.find(needle)
    while at >= 0:
        out.append(at)
        at = blob.find(needle, at + 1)
    return out


def hdf5_chunk_offset(path: Path, dataset: str, chunk: int) -> tuple[int, int]:
    """(file offset, size) of stored chunk ``chunk`` of ``dataset``."""
    import h5py

    with h5py.File(path, "r") as fh:
        info = fh[dataset].id.get_chunk_info(chunk)
    return int(info.byte_offset), int(info.size)
