"""HDF5 chunks fmcache writes itself (fmcache/backends/hdf5_frames.py): HDF5's own
fletcher32 and hdf5plugin's filter read them, fmcache reads them raw against a CRC-32C,
and damage is caught either way."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import blosc2
import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fmcache
from fmcache.backends import hdf5_frames, hdf5_writes
from fmcache.backends.hdf5_backend import dataset_path
from fmcache.backends.hdf5_frames import CRC_SUFFIX, FORMAT_ATTR, fletcher32, written_as_frames
from fmcache.codecs import lossless
from fmcache.errors import CorruptionError

hdf5plugin.register(force=True)


def libhdf5_fletcher32():
    """libhdf5's own ``H5_checksum_fletcher32`` where h5py's copy exports it (not public API)."""
    libs = Path(h5py.__file__).parent.parent / "h5py.libs"
    for lib in sorted(libs.glob("libhdf5-*.so*")) + sorted(libs.glob("libhdf5.so*")):
        try:
            fn = ctypes.CDLL(str(lib)).H5_checksum_fletcher32
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_size_t]
        return fn
    return None


LIBHDF5_FLETCHER = libhdf5_fletcher32()


@pytest.mark.skipif(LIBHDF5_FLETCHER is None, reason="this h5py's libhdf5 does not export H5_checksum_fletcher32")
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=3000),
                 st.integers(0, 2000).map(lambda n: b"\xff" * n),  # sums whose residue is 0
                 st.integers(0, 2000).map(lambda n: b"\x00" * n)))
def test_fletcher32_is_libhdf5s(data):
    assert fletcher32(data) == LIBHDF5_FLETCHER(data, len(data))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 719, 720, 721, 65_537])
def test_hdf5_reads_a_chunk_with_fmcaches_fletcher32(tmp_path, size):
    """HDF5 checks the fletcher32 of what write_direct_chunk stored: a wrong one is an
    error, so a read that works means fmcache's checksum is HDF5's."""
    rng = np.random.default_rng(size)
    rows = rng.integers(0, 2**16, size=(4, max(size, 1)), dtype=np.uint16)
    rows[:, : size // 2] = 0  # runs blosc2 compresses, so the frames' lengths vary
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("x", shape=rows.shape, dtype=rows.dtype, chunks=rows.shape, fletcher32=True,
                               **hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE))
        crcs = hdf5_frames.ChunkCrcs()
        crcs.write(ds, 0, rows, hdf5_frames.frame_settings(ds))
        stored = ds.id.read_direct_chunk((0, 0))[1]
        ds.id.write_direct_chunk((0, 0), stored[:-4] + struct.pack("<I", fletcher32(stored[:-4]) ^ 1), 0)
    with h5py.File(path, "r") as fh, pytest.raises(OSError):
        fh["x"][...]
    with h5py.File(path, "r+") as fh:
        fh["x"].id.write_direct_chunk((0, 0), stored, 0)
    with h5py.File(path, "r") as fh:
        np.testing.assert_array_equal(fh["x"][...], rows)


CODECS = ["bf16", "fp16", "int8", "blosc2:cname=zstd,clevel=1,shuffle=bit", "bf16:cname=zstd,clevel=1,shuffle=byte"]


def maps(n: int, shape=(6, 5, 4), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(size=(n, *shape)) * (rng.random((n, *shape)) > 0.4)).astype(np.float32)


def build(path: Path, x: np.ndarray, codec: str, batches=(7, 16, 3), spc: int = 8) -> None:
    with fmcache.create_cache(path) as w:
        w.add_layer("layer/1", x.shape[1:], codec=codec, samples_per_chunk=spc)
        lo = 0
        for size in batches:
            w.append({"layer/1": x[lo:lo + size]}, np.arange(lo, lo + size) % 3)
            lo += size
        assert lo == len(x)
        w.commit()


def b2nd(stored: bytes) -> bool:
    """Whether a stored chunk is a B2ND frame (hdf5plugin's filter writes them: a ``b2nd``
    metalayer in the frame's header), not the plain frame fmcache writes."""
    assert stored[2:10] == b"b2frame\x00"
    return b"b2nd" in stored[:struct.unpack_from(">i", stored, 11)[0]]


def frame_fields(path: Path) -> list[str]:
    with h5py.File(path, "r") as fh:
        found: list[str] = []
        fh.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                      and written_as_frames(obj) else None)
        return found


@pytest.mark.parametrize("codec", CODECS)
def test_frames_read_the_same_through_fmcache_h5py_and_lmdb(tmp_path, codec):
    """Every Blosc2-filtered field is written as frames with one CRC-32C per chunk (the
    last chunk partly filled); fmcache's raw reads, h5py's filter reads and an LMDB cache
    of the same maps give the same numbers."""
    x = maps(26)
    build(tmp_path / "c.h5", x, codec)
    build(tmp_path / "c.lmdb", x, codec)
    fields = frame_fields(tmp_path / "c.h5")
    assert fields, "no field was written as frames"
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        for name in fields:
            ds = fh[name]
            assert ds.chunks[0] == 8
            crcs = fh[name + CRC_SUFFIX][...]
            assert crcs.shape == (4,)  # 26 rows, 8 a chunk
            for chunk, crc in enumerate(crcs):
                stored = ds.id.read_direct_chunk((chunk * 8, *(0,) * (ds.ndim - 1)))[1]
                assert hdf5_frames.crc32c(stored) == crc
                assert not b2nd(stored)  # fmcache's frame, not the filter's B2ND one
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        everything = np.arange(26)
        np.testing.assert_array_equal(h5.read_batch("layer/1", everything), lm.read_batch("layer/1", everything))
        for i in (0, 7, 8, 25, 3):  # per-sample reads: the row LRU's raw chunk reads
            np.testing.assert_array_equal(h5.read("layer/1", i), lm.read("layer/1", i))
        shuffled = np.random.default_rng(1).permutation(26)
        np.testing.assert_array_equal(h5.read_batch("layer/1", shuffled), lm.read_batch("layer/1", shuffled))
    hdf5_frames_off = tmp_path / "off.h5"  # the same cache through HDF5's filters only
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5_writes, "writes_frames", lambda field: False)
        build(hdf5_frames_off, x, codec)
    assert frame_fields(hdf5_frames_off) == []
    with h5py.File(tmp_path / "c.h5", "r") as a, h5py.File(hdf5_frames_off, "r") as b:
        for name in fields:
            np.testing.assert_array_equal(a[name][...], b[name][...])


def test_a_cache_written_before_frames_still_reads(tmp_path):
    """Datasets without the ``fmcache_chunks`` attribute (caches of earlier versions,
    written through hdf5plugin's filter) are read through h5py."""
    x = maps(20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5_writes, "writes_frames", lambda field: False)
        build(tmp_path / "old.h5", x, "bf16", batches=(20,))
    with h5py.File(tmp_path / "old.h5", "r") as fh:
        ds = fh[dataset_path("layer/1", "all", "bits")]
        assert FORMAT_ATTR not in ds.attrs and (ds.name + CRC_SUFFIX) not in fh
        assert b2nd(ds.id.read_direct_chunk((0, 0, 0, 0))[1])
    build(tmp_path / "new.h5", x, "bf16", batches=(20,))
    with fmcache.open_cache(tmp_path / "old.h5") as old, fmcache.open_cache(tmp_path / "new.h5") as new:
        for i in range(20):
            np.testing.assert_array_equal(old.read("layer/1", i), new.read("layer/1", i))


def chunk_place(path: Path, name: str, chunk: int) -> tuple[int, int]:
    with h5py.File(path, "r") as fh:
        ds = fh[name]
        info = ds.id.get_chunk_info_by_coord((chunk * ds.chunks[0], *(0,) * (ds.ndim - 1)))
        return info.byte_offset, info.size


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("where", ["frame header", "compressed data", "fletcher32"])
def test_a_damaged_chunk_is_an_error_in_fmcache_and_in_h5py(tmp_path, where):
    x = maps(26)
    path = tmp_path / "c.h5"
    build(path, x, "bf16")
    name = dataset_path("layer/1", "all", "bits")
    with fmcache.open_cache(path) as cache:
        first = cache.read("layer/1", 0)
    offset, size = chunk_place(path, name, 1)
    flip(path, offset + {"frame header": 20, "compressed data": size // 2, "fletcher32": size - 2}[where])
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read("layer/1", 0), first)  # chunk 0 still reads
        for read in (lambda: cache.read("layer/1", 9), lambda: cache.read_batch("layer/1", np.array([15, 2, 9]))):
            with pytest.raises(CorruptionError, match=r"sample 8 \(the chunk of samples 8-15\).*CRC-32C"):
                read()
    with h5py.File(path, "r") as fh, pytest.raises(OSError):
        fh[name][8:16]  # HDF5's own fletcher32 catches it too


def test_damaged_or_missing_chunk_checksums_are_errors(tmp_path):
    x = maps(26)
    path = tmp_path / "c.h5"
    build(path, x, "bf16")
    name = dataset_path("layer/1", "all", "bits")
    with fmcache.open_cache(path) as cache:
        good = cache.read_batch("layer/1", np.arange(26))
    offset, _ = chunk_place(path, name + CRC_SUFFIX, 0)
    flip(path, offset + 5)  # the second CRC's bytes: fletcher32 of the checksum dataset fails
    with fmcache.open_cache(path) as cache, pytest.raises(CorruptionError, match="chunk checksums"):
        cache.read("layer/1", 3)
    flip(path, offset + 5)
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read_batch("layer/1", np.arange(26)), good)
    with h5py.File(path, "r+") as fh:
        del fh[name + CRC_SUFFIX]
    with pytest.raises(CorruptionError, match="chunk_crc32c is missing"), fmcache.open_cache(path) as cache:
        cache.read("layer/1", 3)  # the commit recorded the checksums' dataset


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 11), min_size=1, max_size=6), st.integers(0, 5), st.integers(1, 9))
def test_a_resumed_build_gives_the_clean_caches_frames(tmp_path_factory, batches, stop_after, spc):
    """Closed without commit after some batches (the last chunk written partly filled),
    resumed with other batches: the committed cache reads as one built in one go, and its
    checksums cover chunks the first process wrote (read back at commit)."""
    tmp = tmp_path_factory.mktemp("resume")
    n = sum(batches)
    x = maps(n, shape=(3, 4, 2), seed=n)
    clean = tmp / "clean.h5"
    build(clean, x, "bf16", batches=tuple(batches), spc=spc)
    path = tmp / "c.h5"
    stop = min(stop_after, len(batches) - 1)
    w = fmcache.create_cache(path)
    w.add_layer("layer/1", x.shape[1:], codec="bf16", samples_per_chunk=spc)
    lo = 0
    for size in batches[:stop]:
        w.append({"layer/1": x[lo:lo + size]}, np.arange(lo, lo + size) % 3)
        lo += size
    if stop:
        w.close()
        w = fmcache.create_cache(path, resume=True)
        lo = w.samples
    for size in (5,) * (-(-(n - lo) // 5)):
        size = min(size, n - lo)
        w.append({"layer/1": x[lo:lo + size]}, np.arange(lo, lo + size) % 3)
        lo += size
    w.commit()
    with fmcache.open_cache(path) as got, fmcache.open_cache(clean) as want:
        np.testing.assert_array_equal(got.read_batch("layer/1", np.arange(n)), want.read_batch("layer/1", np.arange(n)))
        for i in range(n):
            np.testing.assert_array_equal(got.read("layer/1", i), want.read("layer/1", i))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([1, 2, 4]), st.sampled_from(["lz4", "zstd", "lz4hc"]),
       st.integers(0, 9), st.sampled_from([0, 1, 2]), st.sampled_from(["random", "zeros", "runs"]))
def test_encoded_chunks_are_python_blosc2s_frames(count, typesize, cname, clevel, shuffle, kind):
    """encode_chunk builds the frame from a template around compress2's chunk: byte for
    byte what python-blosc2's SChunk.to_cframe writes (all-zero data aside, which SChunk
    keeps as a special value in the frame's offsets and encode_chunk as a special chunk
    inline), and every frame decodes to the rows."""
    rng = np.random.default_rng(count)
    dtype = {1: np.uint8, 2: np.uint16, 4: np.float32}[typesize]
    rows = {"random": rng.integers(0, 200, size=count).astype(dtype), "zeros": np.zeros(count, dtype),
            "runs": np.repeat(rng.integers(0, 3, size=-(-count // 50)), 50)[:count].astype(dtype)}[kind]
    cparams = {"codec": lossless.CNAMES[cname], "clevel": clevel, "filters": [blosc2.Filter(shuffle)],
               "typesize": typesize, "nthreads": 1}
    stored = hdf5_frames.encode_chunk(rows, cparams)
    frame = stored[:-4]
    assert struct.unpack("<I", stored[-4:])[0] == fletcher32(frame)
    if rows.any():
        assert frame == bytes(blosc2.SChunk(chunksize=rows.nbytes, data=rows, cparams=cparams).to_cframe())
    assert blosc2.schunk_from_cframe(frame).decompress_chunk(0) == rows.tobytes()
    out = np.empty_like(rows)
    hdf5_frames.decode_chunk(stored, hdf5_frames.crc32c(stored), out, "here")
    np.testing.assert_array_equal(out, rows)


def test_all_zero_chunks_read_as_zeros_everywhere(tmp_path):
    x = maps(20)
    x[8:16] = 0  # chunk 1 all zeros
    build(tmp_path / "c.h5", x, "bf16", batches=(20,))
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        assert not fh[dataset_path("layer/1", "all", "bits")][8:16].any()
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        assert not cache.read_batch("layer/1", np.arange(8, 16)).any()
        assert not cache.read("layer/1", 9).any() and cache.read("layer/1", 16).any()


@pytest.mark.skipif(LIBHDF5_FLETCHER is None, reason="this h5py's libhdf5 does not export H5_checksum_fletcher32")
def test_fletcher32_of_a_chunk_past_48_mib_is_libhdf5s():
    """One int64 dot over the weighted words wrapped around from about 48 MiB on (a
    64 MiB float32 map stored a chunk a sample): h5py then refused the chunk."""
    data = np.random.default_rng(0).integers(0, 256, size=(56 << 20) + 1, dtype=np.uint8).tobytes()
    assert fletcher32(data) == LIBHDF5_FLETCHER(data, len(data))


def _resume_append_and_die(path: Path, x: np.ndarray, lo: int) -> None:
    """Resume, append samples ``lo ..``, and die once their chunks are written, before the
    progress mark moves (as a SIGKILL there would)."""
    import os

    from fmcache.backends import hdf5_backend
    w = fmcache.create_cache(path, resume=True)
    real = hdf5_backend.Hdf5Backend._set_attr_blob

    def die(fh, key, data):
        if key == "progress":
            os._exit(9)
        real(fh, key, data)

    hdf5_backend.Hdf5Backend._set_attr_blob = staticmethod(die)
    w.append({"layer/1": x[lo:]}, np.arange(lo, len(x)) % 3)


@pytest.mark.parametrize("shape", [(64, 64, 64), (16, 32, 32), (1024,)])
def test_a_chunk_hdf5s_filter_rewrote_on_resume_is_written_again_before_commit(tmp_path, shape):
    """A resume that cuts a dataset inside a chunk makes HDF5 rewrite that chunk through
    hdf5plugin's filter (a B2ND frame, its blocks cutting samples apart). Committed
    without appending again, that chunk was recorded and decoded raw as fmcache's own:
    samples 8-13 came back as other values and verify passed (a helper's sweep). Now the
    commit writes such a chunk again as fmcache writes chunks."""
    import multiprocessing as mp

    from fmcache.backends import hdf5_backend
    per, first = 8, 14
    x = maps(2 * per + 12, shape=shape, seed=3)
    path = tmp_path / "c.h5"
    w = fmcache.create_cache(path)
    w.add_layer("layer/1", shape, codec="bf16", samples_per_chunk=per)
    w.append({"layer/1": x[:first]}, np.arange(first) % 3)

    def drain_on_close(self, progress):  # what a close did before session 15 (a partial of then)
        fh, held = self._file(), self._held()
        held.drain(fh)
        held.crcs.commit(fh)
        fh.flush()
        self._set_attr_blob(fh, "progress", held.progress(progress))
        fh.flush()

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(hdf5_backend.Hdf5Backend, "_finish", drain_on_close)
        w.close()
    child = mp.get_context("fork").Process(target=_resume_append_and_die, args=(path, x, first))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    w = fmcache.create_cache(path, resume=True)
    assert w.samples == first
    w.commit()
    clean = tmp_path / "clean.lmdb"
    build(clean, x[:first], "bf16", batches=(first,), spc=per)
    with fmcache.open_cache(path) as got, fmcache.open_cache(clean) as want:
        for i in range(first):
            np.testing.assert_array_equal(got.read("layer/1", i), want.read("layer/1", i))
        np.testing.assert_array_equal(got.read_batch("layer/1", np.arange(first)),
                                      want.read_batch("layer/1", np.arange(first)))
    with h5py.File(path, "r") as fh:
        ds = fh[dataset_path("layer/1", "all", "bits")]
        for chunk in range(2):
            assert not b2nd(ds.id.read_direct_chunk((chunk * per, *(0,) * len(shape)))[1])


def test_a_b2nd_chunk_with_a_matching_crc_is_refused(tmp_path):
    """Were a B2ND chunk (hdf5plugin's filter's) ever recorded with its CRC, the raw read
    refuses it rather than decode its blocks as rows (the chunk index digest would refuse
    a swapped chunk first: this is the decoder's own check)."""
    x = maps(8, shape=(16, 32, 32))
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        ds = fh.create_dataset("x", data=x, chunks=x.shape, fletcher32=True,
                               **hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE))
        foreign = ds.id.read_direct_chunk((0, 0, 0, 0))[1]
    assert b2nd(foreign) and not hdf5_frames.is_own_frame(foreign)
    with pytest.raises(CorruptionError, match="not a frame fmcache wrote"):
        hdf5_frames.decode_chunk(foreign, hdf5_frames.crc32c(foreign), np.empty_like(x), "here")
    own = hdf5_frames.encode_chunk(x, {"codec": blosc2.Codec.LZ4, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE],
                                       "typesize": 4, "nthreads": 1})
    assert hdf5_frames.is_own_frame(own)
    np.testing.assert_array_equal(hdf5_frames.decode_chunk(own, hdf5_frames.crc32c(own), np.empty_like(x), "here"), x)


def test_a_damaged_chunks_attribute_is_a_corruption_error(tmp_path):
    """Each byte of the ``fmcache_chunks`` attribute's header message flipped in turn: the
    values read as committed (a damaged name: read through h5py) or a typed error; one
    flip made h5py raise "Unknown string encoding", a bare TypeError (a helper's sweep)."""
    x = maps(11, shape=(3, 16))
    path = tmp_path / "c.h5"
    build(path, x, "bf16", batches=(6, 5), spc=4)
    with fmcache.open_cache(path) as cache:
        truth = cache.read_batch("layer/1", np.arange(11))
    blob = bytearray(path.read_bytes())
    at = blob.find(FORMAT_ATTR.encode())
    assert at > 0
    outcomes = set()
    for k in range(at - 24, at + len(FORMAT_ATTR) + 40):
        damaged = bytearray(blob)
        damaged[k] ^= 0xFF
        path.write_bytes(damaged)
        try:
            with fmcache.open_cache(path) as cache:
                got = [cache.read("layer/1", i) for i in range(11)]
            assert np.array_equal(np.stack(got), truth), f"byte {k}: other values"
            outcomes.add("same")
        except fmcache.errors.FmcacheError as exc:
            outcomes.add(type(exc).__name__)
    path.write_bytes(blob)
    assert "CorruptionError" in outcomes, outcomes


def test_a_close_without_commit_leaves_only_whole_chunks_below_the_mark(tmp_path):
    """A close without commit writes no partly filled chunk (the resume would write it
    again in place, and a kill inside that rewrite lost committed samples: a helper's
    sweep): every dataset holds whole chunks, the resume starts at the mark, and the
    committed cache reads as one built in one go."""
    x = maps(45, shape=(6, 5, 4), seed=9)
    path = tmp_path / "c.h5"
    w = fmcache.create_cache(path)
    w.add_layer("layer/1", x.shape[1:], codec="int8", samples_per_chunk=8)
    w.append({"layer/1": x[:13]}, np.arange(13) % 3)
    w.append({"layer/1": x[13:27]}, np.arange(13, 27) % 3)
    w.close()
    with h5py.File(str(path) + ".partial", "r") as fh:
        shapes = []
        fh.visititems(lambda _n, o: shapes.append((o.name, o.shape[0], o.chunks[0]))
                      if isinstance(o, h5py.Dataset) else None)
    assert shapes and all(rows % chunk == 0 for _, rows, chunk in shapes), shapes
    w = fmcache.create_cache(path, resume=True)
    lo = w.samples
    assert lo <= 27 and lo % 8 == 0
    w.append({"layer/1": x[lo:]}, np.arange(lo, 45) % 3)
    w.commit()
    build(tmp_path / "clean.lmdb", x, "int8", batches=(45,), spc=8)
    with fmcache.open_cache(path) as got, fmcache.open_cache(tmp_path / "clean.lmdb") as want:
        np.testing.assert_array_equal(got.read_batch("layer/1", np.arange(45)), want.read_batch("layer/1", np.arange(45)))
        np.testing.assert_array_equal(got.labels, want.labels)


def test_chunk_checksums_recorded_without_their_attribute_are_damage(tmp_path):
    """The commit recorded the ``.chunk_crc32c`` dataset: a dataset whose ``fmcache_chunks``
    attribute is then gone (a flipped byte in its name) is damage, not a cache of before
    session 15 (h5py's reads of it would still be right, but its CRCs unchecked)."""
    x = maps(16)
    path = tmp_path / "c.h5"
    build(path, x, "bf16", batches=(16,))
    with h5py.File(path, "r+") as fh:
        del fh[dataset_path("layer/1", "all", "bits")].attrs[FORMAT_ATTR]
    with fmcache.open_cache(path) as cache, pytest.raises(CorruptionError, match="attribute is missing or damaged"):
        cache.read("layer/1", 3)


def test_damaged_root_attributes_are_corruption_errors(tmp_path):
    """Each bit of the root attributes' header messages around ``fmcache_manifest_crc32``
    flipped in turn: the cache opens and reads as committed, or fails with fmcache's
    typed error. One flip made h5py's attribute read raise a bare TypeError ("No NumPy
    equivalent for TypeTimeID exists": a helper's damage sweep of a grid cache)."""
    x = maps(8, shape=(3, 16))
    path = tmp_path / "c.h5"
    build(path, x, "grid:abs=0.02", batches=(8,), spc=4)
    with fmcache.open_cache(path) as cache:
        truth = cache.read_batch("layer/1", np.arange(8))
    blob = bytearray(path.read_bytes())
    at = blob.find(b"fmcache_manifest_crc32")
    assert at > 0
    outcomes = set()
    for k in range(at - 40, min(at + 64, len(blob))):
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[k] ^= 1 << bit
            path.write_bytes(damaged)
            try:
                with fmcache.open_cache(path) as cache:
                    got = cache.read_batch("layer/1", np.arange(8))
                assert np.array_equal(got, truth), f"byte {k} bit {bit}: other values"
                outcomes.add("same")
            except fmcache.errors.FmcacheError as exc:
                outcomes.add(type(exc).__name__)
    path.write_bytes(blob)
    assert "CorruptionError" in outcomes, outcomes
