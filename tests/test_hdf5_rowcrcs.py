"""A CRC-32C per chunk of the HDF5 datasets whose only filter is fletcher32
(fmcache/backends/hdf5_rowcrcs.py): damage that fletcher32 cannot see is an error, not
other numbers; caches without the CRCs read as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from crc32c import crc32c

import fmcache
from fmcache.backends.hdf5_backend import Hdf5Backend
from fmcache.backends.hdf5_rowcrcs import SUFFIX
from fmcache.errors import CorruptionError

ROW = 3 * 4 * 4  # values a sample


def build(path: Path, codec: str, n: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.lognormal(size=(n, 3, 4, 4)) * (rng.random((n, 3, 4, 4)) > 0.5)).astype(np.float32)
    with fmcache.create_cache(path, backend="hdf5") as w:
        w.add_layer("L", x.shape[1:], codec=codec, samples_per_chunk=4)
        w.append({"L": x}, (np.arange(n) * 7) % 5)
        w.commit()
    return x


def chunk_at(path: Path, dataset: str, chunk: int) -> int:
    with h5py.File(path, "r") as fh:
        return fh[dataset].id.get_chunk_info(chunk).byte_offset


def patch(path: Path, offset: int, edit) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(16))
        edit(data)
        fh.seek(offset)
        fh.write(data)


def fletcher_neutral(data: bytearray) -> None:
    """+1, -2, +1 on the low bytes of three consecutive big-endian 16-bit words: both of
    fletcher32's sums stay the same."""
    data[1] += 1
    data[3] -= 2
    data[5] += 1


def verify_rc(path: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "fmcache", "verify", "--no-progress", str(path)],
                       check=False, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_every_fletcher32_only_dataset_gets_chunk_crcs_and_the_commit_records_them(tmp_path):
    for codec, fields in (("raw", ["values"]), ("int8", ["offset", "scale"]), ("bf16", [])):
        path = tmp_path / f"{codec}.h5"
        build(path, codec)
        names: list[str] = []
        with h5py.File(path, "r") as fh:
            fh.visit(names.append)
            covered = sorted(n[:-len(SUFFIX)] for n in names if n.endswith(SUFFIX))
            assert covered == sorted(["labels", *(f"layers/L/all/{f}" for f in fields)])
            for name in covered:  # one CRC-32C per chunk of the values as numpy reads them
                ds, crcs = fh[name], fh[name + SUFFIX][...]
                per = ds.chunks[0]
                assert list(crcs) == [crc32c(np.ascontiguousarray(ds[lo:lo + per]).tobytes())
                                      for lo in range(0, ds.shape[0], per)]
            record = fh.attrs["fmcache_chunk_index"]
        assert all(f"{name}{SUFFIX}" in str(record) for name in covered)


@pytest.mark.parametrize("where", ["high", "low"])
def test_ff_bytes_over_a_stored_zero_are_an_error_not_nan(tmp_path, where):
    """Two 0xFF bytes over a stored 0.0 (a 16-bit word 0x0000 -> 0xFFFF): fletcher32 sums
    words mod 65535 and cannot see it; the value read back was NaN (high word) or 9.2e-41
    (low word), verify passing for the latter."""
    path = tmp_path / "raw.h5"
    x = build(path, "raw")
    k = int(np.flatnonzero(x.reshape(-1) == 0)[3])
    chunk, within = divmod(k, 4 * ROW)
    offset = chunk_at(path, "/layers/L/all/values", chunk) + 4 * within + (2 if where == "high" else 0)
    patch(path, offset, lambda d: d.__setitem__(slice(0, 2), b"\xff\xff"))
    with h5py.File(path, "r") as fh:  # HDF5 itself reads it without an error: fletcher32 holds
        got = fh["/layers/L/all/values"][...].reshape(-1)[k]
        assert got != 0 or np.isnan(got)
    sample = k // ROW
    with fmcache.open_cache(path) as cache, pytest.raises(CorruptionError, match="fails its CRC-32C"):
        cache.read("L", sample)
    with fmcache.open_cache(path) as cache:
        with pytest.raises(CorruptionError, match="fails its CRC-32C"):
            cache.read_batch("L", range(20))
        assert np.array_equal(cache.read("L", (sample // 4 + 1) % 5 * 4), x[(sample // 4 + 1) % 5 * 4])  # other chunks read
    with pytest.raises(CorruptionError, match="fails its CRC-32C"):
        fmcache.FeatureMapDataset(path, "L")[sample]
    rc, out = verify_rc(path)
    assert rc == 1 and "fails its CRC-32C" in out


@pytest.mark.parametrize("target", ["values", "scale", "labels"])
def test_an_edit_that_keeps_fletcher32_is_an_error(tmp_path, target):
    """A three-byte edit crafted to keep both fletcher32 sums in a stored value (raw) and an
    int8 layer's per-channel scale (its whole channel rescaled); a label's 0x0000 word set
    to 0xFFFF (2 became 4294901762)."""
    path = tmp_path / "c.h5"
    x = build(path, "raw" if target == "values" else "int8")
    dataset = {"values": "/layers/L/all/values", "scale": "/layers/L/all/scale", "labels": "/labels"}[target]
    with h5py.File(path, "r") as fh:
        before = fh[dataset][...].copy()
        size = fh[dataset].dtype.itemsize
    with fmcache.open_cache(path) as cache:
        clean = cache.read_batch("L", range(20)), cache.labels.copy()
    row = 1  # sample 1's row: its first value's bytes (scale: little-endian float32 of channel 0)
    offset = chunk_at(path, dataset, 0) + row * before[0].size * size
    # a label's upper bytes are zeros: 0x0000 -> 0xFFFF there, which fletcher32 cannot see
    patch(path, offset, fletcher_neutral if target != "labels" else lambda d: d.__setitem__(slice(2, 4), b"\xff\xff"))
    with h5py.File(path, "r") as fh:  # fletcher32 holds, the numbers changed
        after = fh[dataset][...]
        assert not np.array_equal(after, before)
    with fmcache.open_cache(path) as cache, pytest.raises(CorruptionError, match="fails its CRC-32C"):
        _ = cache.labels if target == "labels" else cache.read_batch("L", range(20))
    rc, out = verify_rc(path)
    assert rc == 1 and "fails its CRC-32C" in out
    assert clean[1][1] == 7 % 5 and np.allclose(clean[0], x, atol=0.05 * x.max())


def test_caches_without_chunk_crcs_read_as_before(tmp_path):
    """A cache committed before session 18 has no .rows_crc32c datasets (nor records of
    them): read through fletcher32 and the zero-chunk record alone, values unchanged; a
    leftover CRC dataset the commit did not record is not used."""
    path = tmp_path / "raw.h5"
    x = build(path, "raw")
    with h5py.File(path, "r+") as fh:
        record = fh.attrs["fmcache_chunk_index"]
        names: list[str] = []
        fh.visit(names.append)
        for name in [n for n in names if n.endswith(SUFFIX)]:
            fh[name][0] ^= np.uint32(1)  # wrong CRCs, but not recorded below
        text = record.decode() if isinstance(record, bytes) else str(record)
        blob = {k: v for k, v in json.loads(text).items() if not k.endswith(SUFFIX)}
        Hdf5Backend._set_attr_blob(fh, "chunk_index", json.dumps(blob, sort_keys=True).encode())
    with fmcache.open_cache(path) as cache:
        assert np.array_equal(cache.read_batch("L", range(20)), x)
        assert np.array_equal(cache.read("L", 5), x[5])
        assert list(cache.labels) == list((np.arange(20) * 7) % 5)
