"""Per-sample reads of HDF5 chunks fmcache wrote (fmcache/backends/hdf5_rows.py): blocks
that cut no row apart, one sample decoded from the mapped file, checked against the
chunk's CRC-32C first, the same numbers as LMDB's and h5py's, from threads and workers."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hdf5_frames import frame_fields

import fmcache
from fmcache.backends import hdf5_backend, hdf5_frames
from fmcache.backends.hdf5_backend import dataset_path
from fmcache.backends.hdf5_rows import (
    ALONE_ROW_BYTES,
    MAX_ROW_BLOCK,
    MIN_ROW_BLOCK,
    RowDecoder,
    row_blocksize,
)
from fmcache.codecs.lossless import CHUNK_SIZES
from fmcache.errors import CorruptionError

# row bytes of each shape in bf16/fp16: 16 KiB (one block a row), 320 KiB (two blocks a
# row), 8 KiB (one block a row, under ALONE_ROW_BYTES), 240 B (several rows a block; in
# these small caches the part fits in the row LRU)
SHAPES = {"16k": (32, 16, 16), "320k": (160, 32, 32), "8k": (16, 16, 16), "tiny": (6, 5, 4)}
CODECS = ["bf16", "fp16", "blosc2", "bf16:cname=zstd,clevel=1,shuffle=byte", "int8"]


def maps(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(size=(n, *shape)) * (rng.random((n, *shape)) > 0.4)).astype(np.float32)


def build(path: Path, x: np.ndarray, codec: str, spc: int = 4) -> None:
    with fmcache.create_cache(path) as w:
        w.add_layer("L", x.shape[1:], codec=codec, samples_per_chunk=spc)
        w.append({"L": x}, np.arange(len(x)) % 3)
        w.commit()


def chunk_blocksizes(path: Path, name: str) -> list[int]:
    with h5py.File(path, "r") as fh:
        ds = fh[name]
        sizes = []
        for chunk in range(-(-ds.shape[0] // ds.chunks[0])):
            stored = ds.id.read_direct_chunk((chunk * ds.chunks[0], *(0,) * (ds.ndim - 1)))[1]
            at = struct.unpack_from(">i", stored, 11)[0]
            sizes.append(CHUNK_SIZES.unpack_from(stored, at + 4)[1])
        return sizes


def decoders(cache: fmcache.Cache) -> dict:
    return {key: dec for key, dec in cache.backend._h_rowdec.items()}


DEFAULT_ROW_CACHE_BYTES = hdf5_backend.ROW_CACHE_BYTES


@pytest.fixture
def whole_chunks(monkeypatch) -> list:
    """The chunks decoded whole (``decode_chunk``'s ``where``), observed, not replaced."""
    seen: list = []
    decode_chunk = hdf5_frames.decode_chunk
    monkeypatch.setattr(hdf5_frames, "decode_chunk", lambda *a: seen.append(a[3]) or decode_chunk(*a))
    return seen


@pytest.fixture(autouse=True)
def small_row_lru(monkeypatch):
    """A row LRU of 64 KiB, so that these small caches are larger than it: per-sample
    decoding applies to parts that do not fit in the LRU."""
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", 64 << 10)


def valid_blocks(row_bytes: int, typesize: int) -> list[int]:
    """Every part of a row that divides it, holds whole values and lies in the block range."""
    parts = range(-(-row_bytes // MAX_ROW_BLOCK), row_bytes // MIN_ROW_BLOCK + 1)
    return [row_bytes // p for p in parts if p and row_bytes % p == 0 and (row_bytes // p) % typesize == 0]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(1, 8 << 20), st.integers(1, 4096).map(lambda k: k * 4096)), st.sampled_from([1, 2, 4]))
def test_row_blocksize_cuts_no_row_apart(row_bytes, typesize):
    row_bytes -= row_bytes % typesize or 0  # rows hold whole values
    block = row_blocksize(row_bytes, typesize)
    if 0 < row_bytes < MIN_ROW_BLOCK:  # the fewest whole rows that reach the smallest block
        assert block % row_bytes == 0 and MIN_ROW_BLOCK <= block < MIN_ROW_BLOCK + row_bytes
        return
    valid = valid_blocks(row_bytes, typesize) if row_bytes else []
    assert block == (max(valid) if valid else 0)
    if block:
        assert row_bytes % block == 0 and block % typesize == 0 and MIN_ROW_BLOCK <= block <= MAX_ROW_BLOCK
        assert row_bytes > MAX_ROW_BLOCK or block == row_bytes


@pytest.mark.parametrize("shape", ["16k", "320k", "tiny"])
def test_written_chunks_use_blocks_of_whole_rows(tmp_path, shape):
    x = maps(10, SHAPES[shape])
    build(tmp_path / "c.h5", x, "bf16")
    (name,) = frame_fields(tmp_path / "c.h5")
    row_bytes = 2 * int(np.prod(SHAPES[shape]))
    for block in chunk_blocksizes(tmp_path / "c.h5", name):
        if shape == "tiny":  # whole rows a block (as many as reach 8 KiB, or the chunk's 4)
            assert block % row_bytes == 0 and block > row_bytes
        else:
            assert row_bytes % block == 0 and block == min(row_bytes, row_bytes // -(-row_bytes // MAX_ROW_BLOCK))


#: 15 samples, 4 a chunk: no read in the chunk of the read before it or in the next one
OUT_OF_ORDER = [12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 11, 7, 3]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", ["16k", "320k", "8k", "tiny"])
def test_per_sample_reads_match_lmdb_and_h5py(tmp_path, codec, shape):
    """Every sample reads the same from HDF5 as from LMDB and as h5py decodes the stored
    rows (the last chunk partly filled). Out of order, a one-field part with blocks of
    whole rows is decoded a sample at a time (nothing enters the row LRU); in order, the
    LRU serves the chunks as before, except for rows of 16 KiB or more, still decoded a
    sample at a time; anything else goes through the LRU."""
    if shape in ("320k", "8k") and codec == "int8":
        pytest.skip("int8's two fields take the row LRU's way whatever the shape (covered by '16k')")
    x = maps(15, SHAPES[shape], seed=len(codec))
    build(tmp_path / "c.h5", x, codec)
    build(tmp_path / "c.lmdb", x, codec)
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        expected = [lm.read("L", i) for i in range(15)]
        for i in OUT_OF_ORDER:
            np.testing.assert_array_equal(h5.read("L", i), expected[i])
        out = np.empty(x.shape[1:], np.float32)
        assert h5.read("L", 10, out=out) is out  # after sample 3: out of order
        np.testing.assert_array_equal(out, expected[10])
        direct = codec != "int8" and shape != "tiny"
        (decoder,) = decoders(h5).values()
        assert (decoder is not None) == direct  # "tiny": the part fits in the row LRU
        lru = h5.backend.__dict__.get("_h_rows") or {}
        assert (len(lru) == 0) == direct
        if decoder is not None:
            assert all(s > 0 for s in decoder._starts) == direct
        for i in range(15):  # in order: the row LRU's way, except rows decoded alone in any order
            np.testing.assert_array_equal(h5.read("L", i), expected[i])
        alone = direct and decoder.row_bytes >= ALONE_ROW_BYTES
        assert alone == (direct and (shape != "8k" or codec == "blosc2"))  # 8k fp32 rows: 16 KiB
        assert (len(h5.backend.__dict__.get("_h_rows") or {}) == 0) == alone
        assert decoder is None or decoder.last_chunk == (-2 if alone else 3)
    if codec.startswith("bf16"):
        with h5py.File(tmp_path / "c.h5", "r") as fh:  # hdf5plugin's filter reads the same chunks
            bits = fh[dataset_path("L", "all", "bits")][...]
        widened = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
        with fmcache.open_cache(tmp_path / "c.h5") as h5:
            for i in OUT_OF_ORDER:
                np.testing.assert_array_equal(h5.read("L", i), widened[i])


@pytest.mark.parametrize("codec", ["bf16", "blosc2"])
def test_a_pass_in_order_over_rows_of_16_kib_or_more_decodes_no_whole_chunk(tmp_path, codec, whole_chunks):
    """Rows of at least ALONE_ROW_BYTES (16 KiB: bf16 of 8,192 values, float32 of 4,096)
    are decoded a sample at a time in order too; 8 KiB rows in order fill the LRU a chunk
    at a time."""
    assert ALONE_ROW_BYTES == 16 << 10
    shape = SHAPES["16k" if codec == "bf16" else "8k"]
    x = maps(32, shape, seed=3)
    build(tmp_path / "c.h5", x, codec)
    build(tmp_path / "c.lmdb", x, codec)
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        for _ in range(2):
            for i in range(32):
                np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert whole_chunks == []
        (decoder,) = decoders(h5).values()
        assert decoder.alone and all(s > 0 for s in decoder._starts)
    build(tmp_path / "b.h5", maps(32, SHAPES["8k"]), "bf16")
    with fmcache.open_cache(tmp_path / "b.h5") as h5:
        for i in range(32):
            h5.read("L", i)
        (decoder,) = decoders(h5).values()
        assert not decoder.alone and len(whole_chunks) == 8


def test_a_lone_step_to_the_next_chunk_does_not_decode_a_whole_chunk(tmp_path):
    """In a shuffled order a read often lands in the chunk after the previous one's; only
    two such steps in a row (a pass in order) send reads to the row LRU."""
    x = maps(15, SHAPES["8k"])
    build(tmp_path / "c.h5", x, "bf16")
    build(tmp_path / "c.lmdb", x, "bf16")
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        for i in (4, 8, 0, 13, 5, 9, 1, 14):  # chunks 1, 2, 0, 3, 1, 2, 0, 3
            np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert len(h5.backend.__dict__.get("_h_rows") or {}) == 0
        for i in (10, 11, 12, 13):  # 11 after 10: a pass starting (chunk 2 to the LRU, used once: 12 alone), 13 after 12
            np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert list(h5.backend._h_rows) == [("L", "all", 2), ("L", "all", 3)]  # 64 KiB: both chunks


def test_a_stride_of_one_chunks_samples_never_decodes_a_whole_chunk(tmp_path, whole_chunks):
    """Each read in the chunk after the previous read's, never the same one (a sampler
    striding by samples_per_chunk): every read decodes its own sample, as in a shuffled
    order; a pass in order after it fills the LRU chunk by chunk."""
    x = maps(32, SHAPES["8k"])
    build(tmp_path / "c.h5", x, "bf16")
    build(tmp_path / "c.lmdb", x, "bf16")
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        strided = [k + 4 * c for k in range(4) for c in range(8)]  # 0, 4, 8, ..., 28, 1, 5, ...
        for i in strided:
            np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert whole_chunks == []
        for i in range(32):
            np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert len(whole_chunks) == 8  # each chunk once, after one sample of the first decoded alone


@pytest.mark.parametrize("codec", ["bf16", "blosc2"])
def test_small_rows_share_blocks_and_are_read_out_of_order_a_block_at_a_time(tmp_path, codec, whole_chunks):
    """Rows of 1-2 KiB (a pooled 512-channel map): blocks of 8 whole rows, so a read out of
    order decodes one block, not its chunk of 64 (a chunk per read was 25-40x LMDB's time
    on such layers in one-off measurements)."""
    x = maps(300, (512,))
    build(tmp_path / "c.h5", x, codec, spc=64)
    build(tmp_path / "c.lmdb", x, codec, spc=64)
    (name,) = frame_fields(tmp_path / "c.h5")
    row_bytes = 512 * (2 if codec == "bf16" else 4)
    assert set(chunk_blocksizes(tmp_path / "c.h5", name)) == {8192}
    order = np.random.default_rng(4).permutation(300)
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        for i in order[:150]:
            np.testing.assert_array_equal(h5.read("L", int(i)), lm.read("L", int(i)))
        far = order[150:214]
        np.testing.assert_array_equal(h5.read_batch("L", far), lm.read_batch("L", far))
        assert whole_chunks == []
        (decoder,) = decoders(h5).values()
        assert decoder.row_bytes == row_bytes and all(s > 0 for s in decoder._starts)


@pytest.mark.parametrize("stride", [2, 3])
def test_a_stride_within_a_chunk_never_decodes_a_whole_chunk(tmp_path, whole_chunks, stride):
    """Every 2nd or 3rd sample (4 a chunk): a chunk decoded whole would serve one or two of
    them before the LRU drops it (a sweep measured up to 11x LMDB's time), so each read
    decodes its own sample."""
    x = maps(32, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "bf16")
    build(tmp_path / "c.lmdb", x, "bf16")
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        for start in range(stride):
            for i in range(start, 32, stride):
                np.testing.assert_array_equal(h5.read("L", i), lm.read("L", i))
        assert whole_chunks == []


def test_parts_that_fit_in_the_row_lru_alone_but_not_together_are_read_out_of_order_alone(tmp_path, monkeypatch, whole_chunks):
    """The LRU serves every layer of a cache: three layers of 240 KB each with a 300 KiB
    LRU thrashed it (each decoded a whole chunk per sample read out of order, a sweep
    measured 6-12x LMDB's time); they fit alone, not together, so each decodes alone."""
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", 300 << 10)
    x = maps(15, SHAPES["16k"])
    for suffix in ("h5", "lmdb"):
        with fmcache.create_cache(tmp_path / f"c.{suffix}") as w:
            for name in ("a", "b", "c"):
                w.add_layer(name, x.shape[1:], codec="bf16", samples_per_chunk=4)
            w.append({name: x * (k + 1) for k, name in enumerate("abc")}, np.zeros(15, np.int64))
            w.commit()
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        for i in OUT_OF_ORDER:
            for name in "abc":
                np.testing.assert_array_equal(h5.read(name, i), lm.read(name, i))
        far = np.array([13, 1, 9, 5])
        for name in "abc":
            np.testing.assert_array_equal(h5.read_batch(name, far), lm.read_batch(name, far))
        assert whole_chunks == [] and all(d is not None for d in decoders(h5).values())
    x = maps(6, SHAPES["16k"])  # 3 x 96 KB: the whole cache fits, the LRU's way
    with fmcache.create_cache(tmp_path / "small.h5") as w:
        for name in "abc":
            w.add_layer(name, x.shape[1:], codec="bf16", samples_per_chunk=4)
        w.append({name: x for name in "abc"}, np.zeros(6, np.int64))
        w.commit()
    with fmcache.open_cache(tmp_path / "small.h5") as h5:
        for i in (5, 0, 4, 1):
            h5.read("a", i)
        assert list(decoders(h5).values()) == [None]


@pytest.mark.parametrize("codec", ["bf16", "fp16", "blosc2"])
def test_batches_of_rows_far_apart_are_read_a_sample_at_a_time(tmp_path, codec, whole_chunks):
    """A shuffling sampler's batch over a part larger than the row LRU (its rows in
    different chunks) reads each row alone, into ``out`` where given, and gives LMDB's
    values, as a batch of neighbours (read as a whole chunk) does."""
    x = maps(40, SHAPES["16k"])
    build(tmp_path / "c.h5", x, codec, spc=8)
    build(tmp_path / "c.lmdb", x, codec, spc=8)
    with fmcache.open_cache(tmp_path / "c.h5") as h5, fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        far = np.array([33, 2, 17, 9, 26, 2])  # five chunks of 8 for six rows, one twice
        np.testing.assert_array_equal(h5.read_batch("L", far), lm.read_batch("L", far))
        assert whole_chunks == [] and len(h5.backend.__dict__.get("_h_rows") or {}) == 0
        out = np.full((len(far), *x.shape[1:]), np.nan, np.float32)
        assert h5.read_batch("L", far, out=out) is out
        np.testing.assert_array_equal(out, lm.read_batch("L", far))
        strided = np.full((len(far), *x.shape[1:], 2), np.nan, np.float32)[..., 0]
        h5.read_batch("L", far, out=strided)
        np.testing.assert_array_equal(strided, lm.read_batch("L", far))
        near = np.array([8, 10, 11, 12, 14, 15])  # one chunk: read whole
        np.testing.assert_array_equal(h5.read_batch("L", near), lm.read_batch("L", near))
        assert len(whole_chunks) == 1


def test_a_damaged_chunk_in_a_batch_of_rows_far_apart_is_an_error(tmp_path):
    x = maps(40, SHAPES["16k"])
    path = tmp_path / "c.h5"
    build(path, x, "bf16", spc=8)
    (name,) = frame_fields(path)
    with h5py.File(path, "r") as fh:
        info = fh[name].id.get_chunk_info_by_coord((16, 0, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([byte ^ 0x01]))
    with fmcache.open_cache(path) as cache:
        with pytest.raises(CorruptionError, match=r"sample 16 \(the chunk of samples 16-23\).*CRC-32C"):
            cache.read_batch("L", np.array([33, 2, 17, 9]))
        np.testing.assert_array_equal(cache.read_batch("L", np.array([33, 2, 9])),
                                      np.stack([cache.read("L", i) for i in (33, 2, 9)]))


@pytest.mark.parametrize("shape", ["16k", "320k"])  # 320 KiB rows: decoded alone in order too
@pytest.mark.parametrize("where", ["compressed data", "frame header", "fletcher32"])
def test_a_damaged_chunk_is_never_decoded_by_a_per_sample_read(tmp_path, where, shape):
    x = maps(12, SHAPES[shape])
    path = tmp_path / "c.h5"
    build(path, x, "bf16")
    (name,) = frame_fields(path)
    with fmcache.open_cache(path) as cache:
        first = [cache.read("L", i) for i in range(12)]
    with h5py.File(path, "r") as fh:
        info = fh[name].id.get_chunk_info_by_coord((4, 0, 0, 0))
    at = info.byte_offset + {"compressed data": info.size // 2, "frame header": 20, "fletcher32": info.size - 2}[where]
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))
    with fmcache.open_cache(path) as cache:
        for i in range(4):
            np.testing.assert_array_equal(cache.read("L", i), first[i])
        for i in (5, 4, 7, 5):  # every sample of the chunk, each time, out of order and in order
            for before in (8, 3):  # chunk 2 then 1: out of order; chunk 0 then 1: in order
                cache.read("L", before)
                with pytest.raises(CorruptionError, match=r"sample 4 \(the chunk of samples 4-7\).*CRC-32C"):
                    cache.read("L", i)
        (decoder,) = decoders(cache).values()
        assert decoder._starts[1] == 0  # never taken for decodable
        np.testing.assert_array_equal(cache.read("L", 8), first[8])  # the chunk after it still reads


def test_chunks_written_with_other_blocks_read_through_the_row_lru(tmp_path):
    """A cache whose chunks' blocks cut rows apart (blosc2's own 128 KiB blocks over rows of
    24 KiB, as written before session 16) reads the same, through the row LRU; one whose
    blocks hold whole rows (blosc2's block is the whole 96 KiB chunk) is read a block at a
    time out of order."""
    x = maps(24, (48, 16, 16))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fmcache.backends.hdf5_frames.row_blocksize", lambda row_bytes, typesize: 0)
        build(tmp_path / "old.h5", x, "bf16", spc=8)
        build(tmp_path / "old4.h5", x, "bf16", spc=4)
    build(tmp_path / "new.h5", x, "bf16", spc=8)
    (name,) = frame_fields(tmp_path / "old.h5")
    assert all(block % 24576 and 24576 % block for block in chunk_blocksizes(tmp_path / "old.h5", name))
    assert all(block == 4 * 24576 for block in chunk_blocksizes(tmp_path / "old4.h5", name))
    out_of_order = (16, 8, 0, 17, 9, 1, 18, 10, 2, 23, 15, 7)  # no two in a row in order
    with fmcache.open_cache(tmp_path / "old.h5") as old, fmcache.open_cache(tmp_path / "new.h5") as new, \
            fmcache.open_cache(tmp_path / "old4.h5") as old4:
        for i in out_of_order:
            np.testing.assert_array_equal(old.read("L", i), new.read("L", i))
            np.testing.assert_array_equal(old4.read("L", i), new.read("L", i))
        (decoder,) = decoders(old).values()
        assert decoder is not None and all(s == -1 for s in decoder._starts)
        assert len(old.backend._h_rows) >= 1
        (decoder4,) = decoders(old4).values()
        assert all(decoder4._starts[i // 4] > 0 for i in out_of_order)


def test_a_part_that_fits_in_the_row_lru_is_read_through_it_in_any_order(tmp_path, monkeypatch):
    """Out of order too, each chunk is decoded once and kept: no per-sample decoding."""
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", DEFAULT_ROW_CACHE_BYTES)
    x = maps(15, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "bf16")
    with fmcache.open_cache(tmp_path / "c.h5") as h5:
        for i in OUT_OF_ORDER:
            h5.read("L", i)
        assert list(decoders(h5).values()) == [None] and len(h5.backend._h_rows) == 4
        np.testing.assert_array_equal(np.stack([h5.read("L", i) for i in range(15)]),
                                      h5.read_batch("L", np.arange(15)))


def test_without_a_map_or_libblosc2s_getitem_reads_fall_back(tmp_path):
    x = maps(9, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "fp16")
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        expected = [cache.read("L", i) for i in range(9)]
    for patch in (("fmcache.backends.hdf5_rows._GETITEM", [None]),
                  ("fmcache.backends.hdf5_rows.FileMap.of", classmethod(lambda cls, fh: None))):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(*patch)
            with fmcache.open_cache(tmp_path / "c.h5") as cache:
                for i in range(9):
                    np.testing.assert_array_equal(cache.read("L", i), expected[i])
                np.testing.assert_array_equal(cache.read_batch("L", np.arange(9)), np.stack(expected))
                assert list(decoders(cache).values()) == [None]


@pytest.mark.parametrize("shape", ["16k", "320k"])
def test_threads_read_samples_at_once(tmp_path, shape):
    """Four threads, two in a random order and two in order (320 KiB rows: each decoded
    alone in either order, into each thread's own row buffer)."""
    x = maps(40, SHAPES[shape])
    build(tmp_path / "c.h5", x, "bf16", spc=8)
    build(tmp_path / "c.lmdb", x, "bf16", spc=8)
    with fmcache.open_cache(tmp_path / "c.lmdb") as lm:
        expected = [lm.read("L", i) for i in range(40)]
    failures: list[str] = []
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        barrier = threading.Barrier(4)

        def reader(seed: int) -> None:
            barrier.wait()
            order = np.random.default_rng(seed).integers(0, 40, size=300) if seed % 2 else np.arange(300) % 40
            for i in order:
                if not np.array_equal(cache.read("L", int(i)), expected[i]):
                    failures.append(f"thread {seed} sample {i}")

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


class PerSample(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        self.cache = fmcache.open_cache(path)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.cache.read("L", i)), i


def test_dataloader_workers_decode_from_their_own_map(tmp_path):
    """Workers forked after the parent read (its map and decoders made) open their own."""
    x = maps(24, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "bf16")
    data = PerSample(tmp_path / "c.h5")
    parent = [data[i][0].numpy().copy() for i in range(24)]
    parent_map = data.cache.backend._h_map
    assert parent_map is not None
    loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0),
                                         multiprocessing_context="fork")
    seen = 0
    for batch, index in loader:
        for row, i in zip(batch.numpy(), index.tolist()):
            np.testing.assert_array_equal(row, parent[i])
            seen += 1
    assert seen == 24
    assert data.cache.backend._h_map is parent_map  # the parent's handle is left alone
    data.cache.close()


def test_a_closed_cache_drops_its_map_and_reopens(tmp_path):
    x = maps(8, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "bf16")
    cache = fmcache.open_cache(tmp_path / "c.h5")
    before = cache.read("L", 5)
    cache.backend.close()
    assert cache.backend.__dict__.get("_h_map") is None and cache.backend._h_rowdec == {}
    np.testing.assert_array_equal(cache.read("L", 5), before)  # a read opens the file again
    assert cache.backend._h_map is not None
    cache.close()


def test_decoder_needs_a_map(tmp_path):
    x = maps(4, SHAPES["16k"])
    build(tmp_path / "c.h5", x, "bf16")
    with fmcache.create_cache(tmp_path / "w.h5") as w:  # a writable handle: no map
        w.add_layer("L", x.shape[1:], codec="bf16", samples_per_chunk=4)
        w.append({"L": x}, np.zeros(4, np.int64))
        assert w.backend.__dict__.get("_h_map") is None
        w.commit()
    assert RowDecoder.of(None, None, "bits", "x") is None


def test_saca_batches_far_apart_decode_each_picked_row_alone(tmp_path, monkeypatch, whole_chunks):
    """A SACA batch (base tiers plus one stored variant a row) whose rows lie far apart, in
    a cache larger than the row LRU where the LRU would otherwise gather the picked rows
    from whole chunks: every row decoded alone, LMDB's values (``read_batch_picked``, with
    and without ``replace``)."""
    from fmcache.tiers import TierPlan

    monkeypatch.setattr(hdf5_backend, "PICKED_CHUNK_ROWS", 4)
    rng = np.random.default_rng(9)
    n, shape = 200, (64, 8, 8)
    plan = TierPlan.two_tier(64, list(range(16)), "bf16", "bf16")
    x = maps(n, shape)
    variants = {v: maps(n, shape, seed=k + 1) for k, v in enumerate(("flip", "dx+4", "dy-4"))}
    row_bytes = 2 * (48 + 16 + 3 * 16) * 64
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", 100 * row_bytes)  # 12 open chunks fit, 200 samples not
    for suffix in ("h5", "lmdb"):
        with fmcache.create_cache(tmp_path / f"s.{suffix}") as w:
            w.add_layer("l", shape, plan=plan, variants=list(variants), samples_per_chunk=4)
            w.append({"l": x}, np.zeros(n, np.int64), variants={"l": variants})
            w.commit()
    names = [None, *(f"sensitive@{v}" for v in variants)]
    with fmcache.open_cache(tmp_path / "s.h5") as h5, fmcache.open_cache(tmp_path / "s.lmdb") as lm:
        assert h5.backend._rows_fit("l")
        for _ in range(4):
            order = [int(i) for i in rng.permutation(n)[:32]]
            picks = [names[int(k)] for k in rng.integers(0, len(names), size=32)]
            for kwargs in ({}, {"replace": "sensitive"}):
                got, got_picked = h5.read_batch_picked("l", order, picks, **kwargs)
                want, want_picked = lm.read_batch_picked("l", order, picks, **kwargs)
                np.testing.assert_array_equal(got, want)
                if not kwargs:
                    rows = [r for r, p in enumerate(picks) if p is not None]
                    np.testing.assert_array_equal(got_picked[rows], want_picked[rows])
        assert whole_chunks == []
