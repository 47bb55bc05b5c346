import struct
import zlib

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache.errors import CorruptionError
from fmcache.record import MAGIC, MAGIC_V1, pack_blob, pack_record, unpack_blob, unpack_record

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


def test_records_carry_crc32c_and_format_1_records_still_read():
    rec = pack_record({"a": b"payload", "#key": b"k"})
    assert rec[:4] == MAGIC == b"FMR2"
    assert struct.unpack_from("<I", rec, 4)[0] == crc32c(rec[8:])
    v1 = MAGIC_V1 + struct.pack("<I", zlib.crc32(rec[8:])) + rec[8:]  # how version 1 framed it
    assert {k: bytes(v) for k, v in unpack_record(v1, "r").items()} == {"a": b"payload", "#key": b"k"}
    for bad in (MAGIC_V1 + rec[4:], MAGIC + v1[4:]):  # a checksum of the other kind
        with pytest.raises(CorruptionError, match="checksum"):
            unpack_record(bad, "r")
