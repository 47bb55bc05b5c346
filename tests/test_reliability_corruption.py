"""Corruption: flipped bytes in records, chunks and the manifest, and truncated files.

Every case must be detected on read (a typed CorruptionError naming the layer and the
sample) and by ``fmcache verify`` (exit 1, naming them too); never decoded into wrong
numbers and never a crash of the process (checked in forked children where a C library
could take the process down).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from reliability_support import (
    find_all,
    flip_byte,
    flip_everywhere,
    hdf5_chunk_offset,
    lmdb_record_copies,
    synthetic,
    write,
)

import fmcache
from fmcache.backends.hdf5_backend import dataset_path
from fmcache.cli import main
from fmcache.errors import CorruptionError

HDF5_CODECS = ["raw", "zfp:accuracy=0.01", "sz3:abs=0.001", "blosc2", "int8", "bf16", "grid:abs=0.02"]
FLETCHER32 = 3  # H5Z_FILTER_FLETCHER32


def verify_cli(path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["verify", str(path), "--no-progress"])
    return result.exit_code, result.output


def assert_detected(path, layer: str, sample: int) -> None:
    """Reading the damaged sample raises, naming layer and sample; its neighbours outside
    the damaged chunk still read exactly; verify exits 1 naming both."""
    with fmcache.open_cache(path) as cache:
        with pytest.raises(CorruptionError, match=rf"layer '{layer}'.*sample {sample}\b"):
            cache.read(layer, sample)
        with pytest.raises(CorruptionError, match=rf"sample {sample}\b"):
            cache.read_batch(layer, np.arange(len(cache)))  # a batch read names it too
    code, output = verify_cli(path)
    assert code == 1, output
    assert f"layer '{layer}'" in output and f"sample {sample}" in output, output


# ---- LMDB ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["payload", "record-header"])
def test_lmdb_flipped_byte_in_a_record(tmp_path, where):
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="raw")
    copies, length = lmdb_record_copies(path, 0, 13)
    # the payload's last bytes, or the part index right after the CRC (magic 4 + crc 4)
    flip_everywhere(path / "data.mdb", copies, length - 5 if where == "payload" else 9)
    assert_detected(path, "conv", 13)
    maps, _ = synthetic()
    with fmcache.open_cache(path) as cache:  # the rest is intact and exact
        np.testing.assert_array_equal(cache.read_batch("conv", range(13)), maps["conv"][:13])


def test_lmdb_every_byte_of_a_compressed_record_is_covered(tmp_path):
    """Flip each byte of a ZFP record in turn: always a CorruptionError, never numbers,
    never a crash (zfp's decoder is not hardened: the CRC must come first)."""
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="zfp:accuracy=0.01")
    copies, length = lmdb_record_copies(path, 0, 7)

    def sweep(conn):
        outcomes = set()
        for k in range(0, length, 3):
            flip_everywhere(path / "data.mdb", copies, k)
            try:
                with fmcache.open_cache(path) as cache:
                    cache.read("conv", 7)
                outcomes.add("decoded")
            except CorruptionError:
                outcomes.add("CorruptionError")
            finally:
                flip_everywhere(path / "data.mdb", copies, k)
        conn.send(sorted(outcomes))

    assert _in_child(sweep) == ["CorruptionError"]


@pytest.mark.parametrize("codec", ["bf16", "int8"])
@pytest.mark.parametrize("how", ["read", "read_batch"])
def test_lmdb_reads_check_every_byte_after_learning_the_layout(tmp_path, codec, how):
    """LMDB reads learn a layer's record layout from its first record and check later
    ones against it (record.PartPicker: one per layer and part for per-sample reads, one
    for all parts for batch reads); per-sample reads decode with a decoder made for the
    layer's shape (Codec.verified_decoder). Damage each byte of a record after an intact
    read taught them, through the same open cache: always a CorruptionError naming the
    sample, never numbers, never a crash; the intact neighbour still reads exactly."""
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec=codec)
    copies, length = lmdb_record_copies(path, 0, 7)

    def sweep(conn):
        outcomes = set()
        with fmcache.open_cache(path) as cache:
            def read(sample):
                return cache.read("conv", sample) if how == "read" else cache.read_batch("conv", [sample])[0]

            first = read(6)  # teaches the layout (and makes the decoder)
            for k in range(length):
                flip_everywhere(path / "data.mdb", copies, k)
                try:
                    read(7)
                    outcomes.add(f"decoded with byte {k} flipped")
                except CorruptionError as exc:
                    outcomes.add("CorruptionError" if "sample 7" in str(exc) else f"unnamed: {exc}")
                finally:
                    flip_everywhere(path / "data.mdb", copies, k)
            outcomes.add("neighbour exact" if np.array_equal(read(6), first) else "neighbour changed")
        conn.send(sorted(outcomes))

    assert _in_child(sweep) == ["CorruptionError", "neighbour exact"]


def test_lmdb_flipped_bit_in_a_btree_key_never_serves_another_sample(tmp_path):
    """LMDB has no page checksums. One bit flipped in the B-tree key of sample 56 makes it
    a second key 57, and a lookup of 57 could land on sample 56's record, which is intact
    and passes its CRC (it did, before records carried their own key: part '#key')."""
    from fmcache.backends.lmdb_backend import KEY_PART, record_key

    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="raw")
    blob = (path / "data.mdb").read_bytes()
    key = record_key(0, 56)
    # B-tree node keys only (node header ends with the key size, 11), not the '#key' parts
    in_index = [at for at in find_all(blob, key) if blob[at - 2:at] == bytes([len(key), 0])]
    assert in_index
    flip_everywhere(path / "data.mdb", in_index, len(key) - 1, 0x01)  # ...56 -> ...57
    truth = synthetic()[0]["conv"]
    with fmcache.open_cache(path) as cache:
        for sample in range(64):
            try:
                got = cache.read("conv", sample)
            except CorruptionError as exc:
                assert f"sample {sample}" in str(exc)
                continue
            np.testing.assert_array_equal(got, truth[sample], err_msg=f"sample {sample} served wrong data")
        with pytest.raises(CorruptionError, match="sample 56: no record"):
            cache.read("conv", 56)
    code, output = verify_cli(path)
    assert code == 1 and "sample 56" in output, output
    import lmdb

    from fmcache.record import unpack_record

    fresh = tmp_path / "fresh.lmdb"  # records carry their own key
    write(fresh, "lmdb", codec="raw")
    env = lmdb.open(str(fresh), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        assert bytes(unpack_record(txn.get(record_key(1, 9)), "test")[KEY_PART]) == record_key(1, 9)
    env.close()


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_labels_hidden_by_damage_are_corruption_not_missing_labels(tmp_path, backend):
    """A bit flipped in the LMDB key of the label block (sample 0 -> 2**56) hid the block:
    the cache read as one built without labels, the Dataset served label -1 for every
    sample and verify passed. The manifest records that labels were written; labels that
    are missing or of another dtype / shape are damage. HDF5: the labels dataset unlinked."""
    import struct

    from fmcache import FeatureMapDataset
    path = tmp_path / ("c.lmdb" if backend == "lmdb" else "c.h5")
    write(path, backend, codec="raw")
    if backend == "lmdb":
        key = struct.pack(">cQ", b"Y", 0)
        hits = find_all((path / "data.mdb").read_bytes(), key)
        assert hits
        flip_everywhere(path / "data.mdb", hits, 1, 0x01)
    else:
        with h5py.File(path, "a") as fh:
            del fh["labels"]
    with pytest.raises(CorruptionError, match="the labels are missing, the manifest records"):
        FeatureMapDataset(path, "conv")[0]
    code, output = verify_cli(path)
    assert code == 1 and "labels are missing" in output, output


@pytest.mark.parametrize("damage", ["child page number", "page type"])
def test_lmdb_damaged_btree_pages_are_corruption_errors_not_lmdb_exceptions(tmp_path, damage):
    """LMDB has no page checksums: a branch page pointing at a page that does not exist
    (MDB_PAGE_NOTFOUND) or a leaf page of the wrong type (MDB_CORRUPTED) made lmdb raise
    its own exceptions out of Cache.read and verify, naming nothing (found by a new-user
    sweep). Both are CorruptionErrors naming the file, layer and sample; verify exits 1."""
    import struct

    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="int8")
    data = path / "data.mdb"
    blob = data.read_bytes()
    flags = {page: struct.unpack_from("<H", blob, page * 4096 + 10)[0] for page in range(2, len(blob) // 4096)}
    if damage == "child page number":
        branch = next(page for page, f in flags.items() if f & 0x01)  # P_BRANCH
        node = branch * 4096 + struct.unpack_from("<H", blob, branch * 4096 + 16)[0]  # its first node
        flip_byte(data, node + 1, 0x40)  # the child's page number (mn_lo's high byte) + 0x4000: past the file
    else:
        leaf = next(page for page, f in flags.items() if f == 0x02)  # P_LEAF
        flip_byte(data, leaf * 4096 + 10, 0x01 | 0x02)  # P_LEAF -> P_BRANCH
    named = rf"{re.escape(str(path))}: (the manifest|labels|layer '\w+' sample \d+): LMDB cannot read it, the database"
    # the damaged page may hold the manifest: opening the cache is inside the check
    with pytest.raises(CorruptionError, match=named + " is damaged"), fmcache.open_cache(path) as cache:
        assert cache.labels is not None
        for name in cache.layers:
            cache.read_batch(name, np.arange(len(cache)))
            for sample in range(len(cache)):
                cache.read(name, sample)
    code, output = verify_cli(path)
    assert code == 1 and "LMDB cannot read it, the database is damaged" in output, output


def test_verify_reports_a_reader_that_crashes_on_a_damaged_lmdb_page(tmp_path):
    """A damaged leaf-page header (its lower bound) made LMDB die of SIGBUS while reading:
    no error to catch. ``fmcache verify`` reads in a child process: every such flip is
    exit 1 with a message naming the cache (a crash names the signal and the layer), and
    the verifying process itself survives."""
    import struct

    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="int8")
    data = path / "data.mdb"
    blob = data.read_bytes()
    leaves = [page for page in range(2, len(blob) // 4096) if struct.unpack_from("<H", blob, page * 4096 + 10)[0] == 2]
    outputs = []
    for page in leaves:
        flip_byte(data, page * 4096 + 13, 0x04)  # mp_lower + 1024: node offsets past the page
        code, output = verify_cli(path)
        flip_byte(data, page * 4096 + 13, 0x04)
        assert code in (0, 1) and (code == 0 or str(path) in output), output
        outputs.append(output)
        if len(outputs) >= 3 and any("crashed the verifying process" in o for o in outputs):
            break  # each verify spawns a child (about a second): enough pages seen
    crashed = [o for o in outputs if "crashed the verifying process (SIG" in o]
    assert crashed, outputs
    assert all(re.search(r"\) (in layer '\w+', after \d+ of its samples verified|before its first layer)", o)
               for o in crashed), crashed
    assert verify_cli(path)[0] == 0


def _sleep_silently(seconds: float, conn=None) -> None:  # holds ``conn`` open, sends nothing
    import time
    time.sleep(seconds)


def test_an_isolated_verify_stops_a_child_that_makes_no_progress():
    """A verifying child stuck in a storage library's loop (HDF5 on a zeroed global heap
    block) hung ``fmcache verify`` forever: the report loop now stops a child that sends
    nothing for the stall limit, and names it as damage."""
    import time

    from fmcache.verify import _collect
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_sleep_silently, args=(60, send), daemon=True)
    proc.start()
    send.close()
    t0 = time.monotonic()
    with pytest.raises(CorruptionError, match=r"made no progress for 0.5 s before its first layer.*stopped"):
        _collect("c.h5", receive, proc, None, 0.5)
    assert time.monotonic() - t0 < 30 and proc.exitcode == -9


def _parent_of_a_stuck_child(conn) -> None:
    from fmcache.verify import _die_with_parent
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        _sleep_silently(60)
        os._exit(0)
    conn.send(pid)
    _sleep_silently(60)


def test_a_verifying_child_dies_with_its_parent():
    """A killed ``verify`` left its fork server's child spinning at 100 % CPU; the child
    now asks the kernel for SIGKILL when its parent exits."""
    import time
    parent_end, child_end = mp.get_context("fork").Pipe()
    parent = mp.get_context("fork").Process(target=_parent_of_a_stuck_child, args=(child_end,))
    parent.start()
    grandchild = parent_end.recv()
    time.sleep(0.5)  # past the prctl call
    parent.kill()
    parent.join()
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init, or a zombie of this test's process tree
            if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(grandchild, 9)
    raise AssertionError("the child outlived its parent")


def _read_all(path):
    """Every layer (batch reads, and a per-sample read of the last sample) and the labels."""
    with fmcache.open_cache(path) as cache:
        got = {name: cache.read_batch(name, np.arange(len(cache))) for name in cache.layers}
        last = {name: cache.read(name, len(cache) - 1) for name in cache.layers}
        return got, last, cache.labels


def _flip_sweep(path, offsets, mask, truth, labels, conn):
    """Each offset's byte flipped in turn (``mask``), the cache read whole, the byte
    restored. Sends (outcomes: "identical" or the FmcacheError types seen, offsets that
    read as other values, offsets that raised anything else)."""
    outcomes, wrong, untyped = set(), [], []
    for offset in offsets:
        flip_byte(path, offset, mask)
        try:
            got, last, got_labels = _read_all(path)
            same = set(got) == set(truth) and all(np.array_equal(got[k], truth[k]) for k in truth) \
                and all(np.array_equal(last[k], truth[k][-1]) for k in truth)
            if same and np.array_equal(got_labels, labels):
                outcomes.add("identical")
            else:
                wrong.append(offset)
        except fmcache.errors.FmcacheError as exc:
            outcomes.add(type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - what the sweeps are for
            untyped.append((offset, f"{type(exc).__name__}: {exc}"[:120]))
        finally:
            flip_byte(path, offset, mask)
    conn.send((sorted(outcomes), wrong, untyped))


def _in_child(fn):
    """Run ``fn(conn)`` in a forked child; its answer, or the signal that killed it."""
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=fn, args=(child,))
    proc.start()
    answer = parent.recv() if parent.poll(120) else None
    proc.join(30)
    return answer if proc.exitcode == 0 else f"child died with exit code {proc.exitcode}"


# ---- HDF5 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", HDF5_CODECS)
def test_hdf5_flipped_byte_in_a_chunk(tmp_path, codec):
    path = tmp_path / "c.h5"
    write(path, "hdf5", codec=codec)
    field = fmcache.codec_from_spec(codec).hdf5_fields((6, 8, 8))[0]
    ds_path = dataset_path("conv", "all", field.name)
    chunk = 9 if field.per_sample_chunks else 2  # samples 9, or 8..11 (4 per chunk)
    offset, size = hdf5_chunk_offset(path, ds_path, chunk)
    flip_byte(path, offset + size // 2)
    assert_detected(path, "conv", 9 if field.per_sample_chunks else 8)


@pytest.mark.parametrize("codec", HDF5_CODECS)
def test_hdf5_checksum_runs_before_the_decompressing_filter(tmp_path, codec):
    """fletcher32 is the last filter of every dataset's pipeline: HDF5 applies filters
    in reverse on read, so the checksum of the stored bytes is checked before ZFP, SZ3 or
    Blosc2 ever sees them."""
    path = tmp_path / "c.h5"
    write(path, "hdf5", codec=codec)
    with h5py.File(path, "r") as fh:
        names = []
        fh.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            plist = fh[name].id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            assert filters[-1] == FLETCHER32, (name, filters)


def test_hdf5_every_byte_of_a_zfp_chunk_is_covered(tmp_path):
    path = tmp_path / "c.h5"
    write(path, "hdf5", codec="zfp:accuracy=0.01")
    offset, size = hdf5_chunk_offset(path, dataset_path("conv", "all", "values"), 5)

    def sweep(conn):
        outcomes = set()
        for k in range(0, size, 2):
            flip_byte(path, offset + k)
            try:
                with fmcache.open_cache(path) as cache:
                    cache.read("conv", 5)
                outcomes.add("decoded")
            except CorruptionError:
                outcomes.add("CorruptionError")
            finally:
                flip_byte(path, offset + k)
        conn.send(sorted(outcomes))

    assert _in_child(sweep) == ["CorruptionError"]


@pytest.mark.parametrize("codec", ["raw", "bf16", "zfp:accuracy=0.01"])
def test_hdf5_damaged_chunk_index_never_serves_wrong_values(tmp_path, codec):
    """HDF5's chunk index (v1 B-tree nodes, "TREE", no checksum in fmcache's file format)
    is not covered by fletcher32: a damaged key made HDF5 take written chunks for unwritten
    ones and return zeros, silently (found by a new-user sweep). Every byte of the first
    120 of each node, flipped in turn: reading every layer and the labels either gives the
    undamaged values or raises a typed error; ``verify`` agrees."""
    path = tmp_path / "c.h5"
    write(path, "hdf5", codec=codec)
    with fmcache.open_cache(path) as cache:
        truth, labels = {name: cache.read_batch(name, np.arange(len(cache))) for name in cache.layers}, cache.labels
    blob = path.read_bytes()
    nodes = find_all(blob, b"TREE")
    assert len(nodes) >= 3, "expected B-tree nodes for the groups and the chunked datasets"

    offsets = [at for node in nodes for at in range(node, min(node + 120, len(blob)))]
    outcomes, wrong, untyped = _in_child(lambda conn: _flip_sweep(path, offsets, 0x04, truth, labels, conn))
    assert wrong == [], f"damaged index bytes served wrong values: offsets {wrong[:10]}"
    assert untyped == [], f"untyped errors: {untyped[:5]}"
    assert "CorruptionError" in outcomes and "identical" in outcomes, outcomes
    key = nodes[-1] + 24 + 8 + 1  # node header, then the first key: size, filter mask, first-axis offset
    flip_byte(path, key, 0x04)  # that chunk's offset + 1024: HDF5 finds no chunk at its rows
    code, output = verify_cli(path)
    assert code == 1 and "chunk index" in output and "damaged" in output, output


def test_hdf5_chunk_index_values_past_2_to_the_63_are_corruption_errors(tmp_path):
    """A damaged B-tree key whose offset reads as 2**63 or more: h5py hands it over as a
    Python int, which numpy's int64 refused with a bare OverflowError (a sweep of session
    16 found it). Each chunk key's first-axis offset, its top byte set in turn."""
    x = np.abs(np.random.default_rng(3).standard_normal((21, 64, 64))).astype(np.float32)
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path) as w:
        w.add_layer("L", x.shape[1:], codec="bf16", samples_per_chunk=4)
        w.append({"L": x}, np.zeros(21, np.int64))
        w.commit()
    name = dataset_path("L", "all", "bits")
    blob = path.read_bytes()
    keys = []
    with h5py.File(path, "r") as fh:
        for lo in range(0, 21, 4):
            info = fh[name].id.get_chunk_info_by_coord((lo, 0, 0))
            key = struct.pack("<II", info.size, 0) + struct.pack("<QQQ", lo, 0, 0)
            keys += [at for at in range(len(blob)) if blob.startswith(key, at)]
    assert len(keys) == 6
    for at in keys:
        damaged = tmp_path / f"d{at}.h5"
        damaged.write_bytes(blob[:at + 15] + b"\xff" + blob[at + 16:])  # the offset's most significant byte
        with fmcache.open_cache(damaged) as cache, pytest.raises(CorruptionError, match="chunk index"):
            for i in (12, 8, 4, 0, 20, 16):
                cache.read("L", i)


@pytest.mark.parametrize("codec", ["raw", "bf16", "zfp:accuracy=0.01"])
def test_hdf5_damaged_object_headers_never_serve_wrong_values(tmp_path, codec):
    """Object headers in HDF5's earliest format have no checksums: one bit of a float
    datatype's mantissa size (23 -> 7) made HDF5 convert every value of a layer into other
    numbers, with no error, and a damaged dataspace asked numpy for 2 TiB (a new-user
    sweep). Every byte of the first 200 of each dataset's object header, flipped in turn:
    reading every layer and the labels gives the undamaged values or raises a typed error."""
    path = tmp_path / "c.h5"
    write(path, "hdf5", codec=codec)
    with fmcache.open_cache(path) as cache:
        truth, labels = {name: cache.read_batch(name, np.arange(len(cache))) for name in cache.layers}, cache.labels
    headers = []
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda _name, obj: headers.append(h5py.h5o.get_info(obj.id).addr)
                      if isinstance(obj, h5py.Dataset) else None)
    assert len(headers) >= 3

    offsets = [at for header in headers for at in range(header, header + 200)]
    outcomes, wrong, untyped = _in_child(lambda conn: _flip_sweep(path, offsets, 0x10, truth, labels, conn))
    assert wrong == [], f"damaged object header bytes served wrong values: offsets {wrong[:10]}"
    assert untyped == [], f"untyped errors: {untyped[:5]}"
    assert "CorruptionError" in outcomes and "identical" in outcomes, outcomes


def test_hdf5_zeroed_chunk_of_an_unfiltered_dataset_is_damage_but_written_zeros_are_not(tmp_path):
    """fletcher32 of zeros is 0: a block zeroed over a small unfiltered chunk and its
    checksum (an ``int8`` layer's per-sample scales) read as zeros, and the maps decoded
    from them as all zero, with no error (tools/sweep_damage.py --codec int8 --zero
    512). Chunks that held only zeros at commit are recorded and still read."""
    rng = np.random.default_rng(3)
    maps = rng.random((48, 6, 4, 4)).astype(np.float32)
    maps[8:16] = 0  # a chunk of the raw layer that is all zeros when written
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path, backend="hdf5") as w:
        w.add_layer("q", (6, 4, 4), codec="int8", samples_per_chunk=8)
        w.add_layer("r", (6, 4, 4), codec="raw", samples_per_chunk=8)
        w.append({"q": maps, "r": maps}, np.arange(48))
        w.commit()
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read_batch("r", range(48)), maps)
        assert not cache.read("q", 9).any() and not cache.read("r", 12).any()
        truth = cache.read_batch("q", range(48))
    with h5py.File(path, "r") as fh:
        scale = fh[dataset_path("q", "all", "scale")]
        info = next(scale.id.get_chunk_info(i) for i in range(scale.id.get_num_chunks())
                    if scale.id.get_chunk_info(i).chunk_offset[0] == 24)
    with open(path, "r+b") as fh:  # the chunk of samples 24-31 and its fletcher32
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    with fmcache.open_cache(path) as cache:
        with pytest.raises(CorruptionError, match=r"sample 24: the chunk of samples 24-31 .* all zeros"):
            cache.read("q", 27)
        with pytest.raises(CorruptionError, match="all zeros"):
            cache.read_batch("q", range(48))
        np.testing.assert_array_equal(cache.read_batch("q", range(24)), truth[:24])
    code, output = verify_cli(path)
    assert code == 1 and "all zeros" in output, output


# ---- manifest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_flipped_byte_in_the_manifest(tmp_path, backend):
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    write(path, backend)
    data_file = path if backend == "hdf5" else path / "data.mdb"
    # only the committed manifest says so (the draft says false); LMDB may hold stale copies
    copies = find_all(data_file.read_bytes(), b'"complete": true')
    assert copies
    flip_everywhere(data_file, copies, 3, 0x01)  # '"complete"' -> '"cnmplete"': still valid UTF-8
    with pytest.raises(CorruptionError, match="manifest"):
        fmcache.open_cache(path)
    code, output = verify_cli(path)
    assert code == 1 and "manifest" in output, output


# ---- truncation ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 100])
def test_an_lmdb_file_shorter_than_its_header_is_named_truncated(tmp_path, size):
    """LMDB's own error for a data.mdb of a few bytes said "Bad file descriptor"."""
    path = tmp_path / "c.lmdb"
    write(path, "lmdb")
    os.truncate(path / "data.mdb", size)
    with pytest.raises(CorruptionError, match=rf"data.mdb is truncated \({size} bytes, shorter than LMDB's header\)"):
        fmcache.open_cache(path)
    code, output = verify_cli(path)
    assert code == 1 and "truncated" in output, output


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_is_a_corruption_error_not_a_crash(tmp_path, backend, keep):
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    write(path, backend)
    data_file = path if backend == "hdf5" else path / "data.mdb"
    os.truncate(data_file, int(data_file.stat().st_size * keep))

    def read_everything(conn):
        try:
            with fmcache.open_cache(path) as cache:
                for name in cache.layers:
                    cache.read_batch(name, np.arange(len(cache)))
            conn.send("read")
        except CorruptionError as exc:
            conn.send(f"CorruptionError: {exc}")

    answer = _in_child(read_everything)  # LMDB would die of SIGBUS on pages past the end
    assert answer.startswith("CorruptionError"), answer
    assert "truncated" in answer or "eof" in answer.lower()
    code, output = verify_cli(path)
    assert code == 1 and "error:" in output, output


@pytest.mark.parametrize("order", [[0, 17, 5], [12, 13, 14, 15, 16, 17], [17], [19, 2, 3]],
                         ids=["scattered", "consecutive", "one", "last-chunk"])
def test_hdf5_dataset_shorter_than_the_manifest_names_the_missing_sample(tmp_path, order):
    """A part's dataset cut short after commit (an edited or damaged file): every read
    path (per sample, batches of consecutive or scattered samples, which gather from
    cached chunks) raises CorruptionError naming the first missing sample, never an
    IndexError or numbers of another sample."""
    maps = np.random.default_rng(3).random((20, 3, 4, 4), dtype=np.float32)
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path, backend="hdf5") as writer:
        writer.add_layer("l", maps.shape[1:], codec="bf16", samples_per_chunk=4)
        writer.append({"l": maps}, np.arange(20))
        writer.commit()
    with h5py.File(path, "r+") as fh:
        fh[dataset_path("l", "all", "bits")].resize(14, axis=0)
    missing = next(i for i in order if i >= 14)
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read_batch("l", [0, 9, 5]),
                                      fmcache.codecs.codec_from_spec("bf16").decode(
                                          fmcache.codecs.codec_from_spec("bf16").encode(maps[[0, 9, 5]])))
        with pytest.raises(CorruptionError, match=rf"layer 'l'.* sample {missing}\b"):
            cache.read_batch("l", order)
        with pytest.raises(CorruptionError, match=rf"layer 'l'.* sample {missing}\b"):
            cache.read("l", missing)


def test_an_undamaged_cache_verifies(tmp_path):
    for backend in ("lmdb", "hdf5"):
        path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
        write(path, backend)
        code, output = verify_cli(path)
        assert code == 0 and "ok:" in output, output
        shutil.rmtree(path) if path.is_dir() else path.unlink()
