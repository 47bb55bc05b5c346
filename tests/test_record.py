import struct
import zlib

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache.errors import CorruptionError
from fmcache.record import (
    MAGIC,
    MAGIC_V1,
    MAGIC_V2,
    PartPicker,
    pack_blob,
    pack_record,
    record_parts,
    record_sizes,
    unpack_blob,
    unpack_record,
)

parts_st = st.dictionaries(st.text(min_size=0, max_size=12), st.binary(max_size=200), max_size=5)


@settings(max_examples=100, deadline=None)
@given(parts=parts_st)
def test_round_trip(parts):
    out = unpack_record(pack_record(parts), "r")
    assert {k: bytes(v) for k, v in out.items()} == parts


@settings(max_examples=200, deadline=None)
@given(parts=parts_st, data=st.data())
def test_any_flipped_bit_is_detected(parts, data):
    rec = bytearray(pack_record(parts))
    pos = data.draw(st.integers(0, len(rec) - 1))
    rec[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(CorruptionError, match="layer x sample 3"):
        unpack_record(bytes(rec), "layer x sample 3")


@settings(max_examples=100, deadline=None)
@given(parts=parts_st, data=st.data())
def test_truncation_is_detected(parts, data):
    rec = pack_record(parts)
    cut = data.draw(st.integers(0, len(rec) - 1))
    with pytest.raises(CorruptionError):
        unpack_record(rec[:cut], "r")


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=64))
def test_random_bytes_give_only_typed_errors(junk):
    try:
        unpack_record(junk, "r")
    except CorruptionError:
        pass


def test_blob_round_trip():
    assert bytes(unpack_blob(pack_blob(b"hello"), "m")) == b"hello"
    with pytest.raises(CorruptionError, match="single-part"):
        unpack_blob(pack_record({"a": b"x", "b": b"y"}), "m")


def _legacy(parts: dict, magic: bytes) -> bytes:
    """How format versions 1 and 2 framed a record (restated from docs/format.md)."""
    body = struct.pack("<H", len(parts))
    for name, payload in parts.items():
        raw = name.encode()
        body += struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(payload))
    body += b"".join(parts.values())
    crc = crc32c(body) if magic == MAGIC_V2 else zlib.crc32(body)
    return magic + struct.pack("<I", crc) + body


def test_records_carry_crc32c_and_older_records_still_read():
    parts = {"a": b"payload", "#key": b"k"}
    rec = pack_record(parts)
    assert rec[:4] == MAGIC == b"FMR3"
    assert struct.unpack_from("<I", rec, 4)[0] == crc32c(rec[:4] + rec[8:])  # the magic is covered
    # FMR3: u16 n | u16 names_len | names | n x u32 lengths | payloads
    assert rec[8:12] == struct.pack("<HH", 2, 2 + 1 + 2 + 4)
    assert rec[12:21] == b"\x01\x00a\x04\x00#key"
    assert rec[21:29] == struct.pack("<II", 7, 1) and rec[29:] == b"payloadk"
    for magic in (MAGIC_V1, MAGIC_V2):
        old = _legacy(parts, magic)
        assert {k: bytes(v) for k, v in unpack_record(old, "r").items()} == parts
        assert [bytes(v) for v in record_parts(old, ["#key", "a"], "r")] == [b"k", b"payload"]
    v1, v2 = _legacy(parts, MAGIC_V1), _legacy(parts, MAGIC_V2)
    # a checksum or layout of another kind; FMR3 -> FMR2 is a one-bit flip of the magic
    for bad in (MAGIC_V1 + v2[4:], MAGIC_V2 + v1[4:], MAGIC + v2[4:], MAGIC_V2 + rec[4:]):
        with pytest.raises(CorruptionError):
            unpack_record(bad, "r")
        with pytest.raises(CorruptionError):
            record_parts(bad, ["a"], "r")


@settings(max_examples=100, deadline=None)
@given(parts=parts_st, data=st.data())
def test_record_parts_are_the_unpacked_parts(parts, data):
    rec = pack_record(parts)
    names = list(parts) + ["absent-part"]
    wanted = data.draw(st.lists(st.sampled_from(names), max_size=4))
    full = unpack_record(rec, "r")
    got = record_parts(rec, wanted, "r")
    assert [None if g is None else bytes(g) for g in got] == [bytes(full[w]) if w in full else None for w in wanted]


@settings(max_examples=200, deadline=None)
@given(parts=parts_st, data=st.data())
def test_record_parts_detect_any_flipped_bit_and_truncation(parts, data):
    rec = bytearray(pack_record(parts))
    pos = data.draw(st.integers(0, len(rec) - 1))
    flipped = bytearray(rec)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    for bad in (bytes(flipped), bytes(rec[:pos])):
        with pytest.raises(CorruptionError, match="sample 3"):
            record_parts(bad, list(parts)[:1], "sample 3")


def test_records_sharing_names_share_one_parsed_layout():
    from fmcache import record
    a = pack_record({"bulk": b"1", "sensitive": b"22", "#key": b"k1"})
    b = pack_record({"bulk": b"333", "sensitive": b"", "#key": b"k2"})
    record._LAYOUTS.clear()
    assert bytes(unpack_record(a, "r")["sensitive"]) == b"22"
    assert bytes(record_parts(b, ["bulk"], "r")[0]) == b"333"
    assert len(record._LAYOUTS) == 1


@settings(max_examples=100, deadline=None)
@given(parts=parts_st)
def test_record_sizes_are_the_payload_lengths(parts):
    sizes = {k: len(v) for k, v in parts.items()}
    assert record_sizes(pack_record(parts), "r") == sizes
    for magic in (MAGIC_V1, MAGIC_V2):  # older records go through the full, checked unpack
        assert record_sizes(_legacy(parts, magic), "r") == sizes


@settings(max_examples=100, deadline=None)
@given(parts=parts_st, data=st.data())
def test_record_sizes_refuse_an_index_that_does_not_add_up(parts, data):
    """record_sizes skips the CRC pass (accounting), but a truncated record, one byte more, or a
    damaged length never gives sizes: the lengths must add up to the record."""
    rec = pack_record(parts)
    cut = data.draw(st.integers(0, len(rec) - 1))
    for bad in (rec[:cut], rec + b"x"):
        with pytest.raises(CorruptionError, match="layer x"):
            record_sizes(bad, "layer x")
    if parts:
        head = 12 + sum(2 + len(k.encode()) for k in parts)  # magic, crc, count, names_len, names
        k = data.draw(st.integers(0, len(parts) - 1))
        bad = bytearray(rec)
        struct.pack_into("<I", bad, head + 4 * k, struct.unpack_from("<I", bad, head + 4 * k)[0] + 1)
        with pytest.raises(CorruptionError):
            record_sizes(bytes(bad), "r")


# ---- PartPicker: record_parts for a stream of records of one layout ---------------------------
layout_st = st.lists(st.text(min_size=0, max_size=8), unique=True, max_size=4)


@settings(max_examples=100, deadline=None)
@given(names=layout_st, data=st.data())
def test_part_picker_reads_what_record_parts_reads(names, data):
    """Records of one layout (the first teaches it), then records of another: the picker's
    answer is record_parts' for every one of them."""
    other = data.draw(layout_st)
    wanted = data.draw(st.lists(st.sampled_from([*names, *other, "absent"]), max_size=3))
    pick = PartPicker(wanted)
    for layout in (names, names, names, other, names):
        rec = pack_record({n: data.draw(st.binary(max_size=40)) for n in layout})
        expected = [None if p is None else bytes(p) for p in record_parts(rec, wanted, "r")]
        for buf in (rec, memoryview(rec)):
            assert [None if p is None else bytes(p) for p in pick(buf, "r")] == expected


@settings(max_examples=200, deadline=None)
@given(names=layout_st.filter(bool), data=st.data())
def test_part_picker_detects_any_flipped_bit_and_truncation_after_learning(names, data):
    pick = PartPicker(names[:1])
    pick(pack_record({n: b"taught" for n in names}), "r")  # the layout is known from here on
    rec = pack_record({n: data.draw(st.binary(max_size=40)) for n in names})
    pos = data.draw(st.integers(0, len(rec) - 1))
    flipped = bytearray(rec)
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    for bad in (bytes(flipped), rec[:pos], rec + data.draw(st.binary(min_size=1, max_size=4))):
        with pytest.raises(CorruptionError, match="sample 3"):
            pick(bad, "sample 3")
    assert bytes(pick(rec, "r")[0]) == bytes(record_parts(rec, names[:1], "r")[0])  # still reads intact ones


@settings(max_examples=150, deadline=None)
@given(names=layout_st, data=st.data())
def test_part_picker_pair_is_the_call_as_a_tuple(names, data):
    """pair(): the per-sample read's two parts, written out flat for the known layout;
    for every layout, absent parts, damage and older records it answers what the general
    call answers, or raises the same CorruptionError."""
    other = data.draw(layout_st)
    pool = [*names, *other, "absent"]
    wanted = [data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))]
    pick, general = PartPicker(wanted), PartPicker(wanted)
    for layout in (names, names, other, names, names):
        rec = pack_record({n: data.draw(st.binary(max_size=40)) for n in layout})
        expected = [None if p is None else bytes(p) for p in general(rec, "r")]
        for buf in (rec, memoryview(rec)):
            assert [None if p is None else bytes(p) for p in pick.pair(buf, "r")] == expected
        pos = data.draw(st.integers(0, len(rec) - 1))
        flipped = bytearray(rec)
        flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
        for bad in (bytes(flipped), rec[:pos], rec + b"\0"):
            with pytest.raises(CorruptionError, match="sample 7"):
                pick.pair(bad, "sample 7")


def test_part_picker_reads_older_records_through_record_parts():
    pick = PartPicker(["a", "#key"])
    pick(pack_record({"a": b"new", "#key": b"k0"}), "r")
    for magic in (MAGIC_V1, MAGIC_V2):
        assert [bytes(p) for p in pick(_legacy({"#key": b"k", "a": b"payload"}, magic), "r")] == [b"payload", b"k"]
        assert [bytes(p) for p in pick.pair(_legacy({"#key": b"k", "a": b"payload"}, magic), "r")] == [b"payload", b"k"]
    with pytest.raises(CorruptionError, match="bad record magic"):
        pick(b"FMR9" + bytes(20), "r")
    assert [bytes(p) for p in pick(pack_record({"a": b"again", "#key": b"k1"}), "r")] == [b"again", b"k1"]
