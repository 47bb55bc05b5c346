"""Codecs: registry and configs, each codec's error contract (bytes and HDF5 faces),
NaN/Inf handling, bad specs, damaged payloads.

The contract checks restate docs/codecs.md independently of the codecs' code.
"""

from __future__ import annotations

import json
import os
import tempfile

import h5py
import hdf5plugin
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import batches, feature_maps, post_relu_maps, realistic_post_relu

from fmcache.codecs import Codec, channel_axis, codec_from_config, codec_from_spec, registered_codecs
from fmcache.codecs.base import MAX_NDIM, parse_header
from fmcache.errors import CodecSpecError, CorruptionError, EncodeError, FmcacheError, UnknownCodecError

hdf5plugin.register(force=True)

EXPECTED_IDS = {"raw", "blosc2", "fp16", "bf16", "int8", "int4", "grid", "zfp", "sz3"}

LOSSLESS_SPECS = ["raw", "blosc2", "blosc2:cname=lz4,clevel=5,shuffle=bit", "blosc2:cname=zstd,clevel=9,shuffle=none",
                  "blosc2:cname=lz4hc,clevel=5,shuffle=byte"]
CAST_SPECS = ["fp16", "fp16:cname=none", "fp16:cname=zstd,clevel=1,shuffle=bit",
              "bf16", "bf16:cname=none", "bf16:cname=zstd,clevel=3,shuffle=bit", "bf16:cname=lz4hc,clevel=1"]
QUANT_SPECS = ["int8", "int8:cname=none", "int8:cname=zstd,clevel=1,shuffle=byte",
               "int4", "int4:cname=none", "int4:cname=lz4,clevel=9,shuffle=none"]
BOUNDED_SPECS = ["zfp", "zfp:accuracy=1e-4", "zfp:rate=8", "zfp:rate=16", "zfp:precision=10",
                 "zfp:precision=16", "sz3:abs=1e-3", "sz3:abs=0.05", "sz3:rel=1e-3", "sz3:rel=0.02",
                 "sz3:abs=0.05,algo=nopred", "sz3:rel=0.02,algo=interp", "sz3:abs=1e-3,algo=lorenzo-reg"]
GRID_SPECS = ["grid:abs=0.02", "grid:abs=1e-3", "grid:rel=0.02", "grid:rel=1e-3", "grid:abs=0.05,cname=none",
              "grid:rel=0.05,cname=lz4,clevel=5,shuffle=bit"]
ALL_SPECS = LOSSLESS_SPECS + CAST_SPECS + QUANT_SPECS + GRID_SPECS + BOUNDED_SPECS
#: what an HDF5 layer can hold: hdf5plugin's SZ3 filter takes no predictor (tests/test_sz3_algo.py)
HDF5_SPECS = [s for s in ALL_SPECS if "algo=" not in s]
HDF5_BOUNDED_SPECS = [s for s in BOUNDED_SPECS if "algo=" not in s]
NONFINITE_STORED = {"raw", "blosc2", "fp16", "bf16"}

CONTRACT_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HDF5_SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the contracts, restated from docs/codecs.md --------------------------------------
def _per_channel(x64: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Channel minima, maxima, and the shape that broadcasts them against the sample."""
    axis = channel_axis(x64.ndim)
    moved = np.moveaxis(x64, axis, 0).reshape(x64.shape[axis], -1)
    shape = [1] * x64.ndim
    shape[axis] = -1
    return moved.min(axis=1), moved.max(axis=1), tuple(shape)


def error_bound(codec: Codec, x: np.ndarray) -> np.ndarray:
    """Per-element bound on |x - x'| for a finite sample, as docs/codecs.md states it."""
    config = codec.get_config()
    x64 = x.astype(np.float64)
    ax = np.abs(x64)
    max_abs = float(ax.max())
    if codec.lossless:
        return np.zeros_like(ax)
    if config["id"] == "fp16":
        return np.where(ax >= 2.0**-14, ax * 2.0**-11, 2.0**-25)
    if config["id"] == "bf16":
        return np.where(ax >= 2.0**-126, ax * 2.0**-8, 2.0**-126)
    if config["id"] in ("int8", "int4"):
        levels = 255 if config["id"] == "int8" else 15
        lo, hi, shape = _per_channel(x64)
        bound = (hi - lo) / (2 * levels) + 2.0**-20 * np.maximum(np.abs(lo), np.abs(hi)) + 2.0**-118
        return np.broadcast_to(bound.reshape(shape), x.shape)
    if config["id"] == "zfp":
        if "accuracy" in config:
            return np.full_like(ax, config["accuracy"])
        # rate / precision: no promise; the loose regression bound docs/codecs.md names.
        exponent = 8 - config["precision"] if "precision" in config else 6 - config["rate"]
        return np.full_like(ax, 2.0**exponent * max_abs + 2.0**-90)
    if config["id"] == "sz3":
        if "abs" in config:
            return np.full_like(ax, config["abs"])
        # SZ3 takes the range in float32: up to half an ulp (2**-24 relative) above the exact one.
        return np.full_like(ax, config["rel"] * (float(x64.max()) - float(x64.min())) * (1 + 2.0**-23))
    if config["id"] == "grid":
        if "abs" in config:
            return np.full_like(ax, config["abs"])
        return np.full_like(ax, config["rel"] * (float(x64.max()) - float(x64.min())))
    raise AssertionError(f"test has no contract for {codec.spec}")


def assert_contract(codec: Codec, x: np.ndarray, y: np.ndarray) -> None:
    """The decoded ``y`` honours ``codec``'s contract for input ``x``."""
    assert y.shape == x.shape and y.dtype == np.float32, (y.shape, y.dtype)
    if codec.lossless:
        assert y.tobytes() == x.tobytes(), f"{codec.spec}: not bit-exact"
        return
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    bound = error_bound(codec, x)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{codec.spec}: {int(bad.sum())} values beyond the contract; worst "
                           f"error {err[bad].max():.6g} where the bound is {bound[bad][np.argmax(err[bad])]:.6g}")
    zeros = x == 0
    if codec.codec_id in ("int8", "int4"):
        lo, _, shape = _per_channel(x.astype(np.float64))
        zeros &= np.broadcast_to((lo >= 0).reshape(shape), x.shape)  # kept where the channel min is 0
    if codec.keeps_zeros:
        assert np.all(y[zeros] == 0), f"{codec.spec}: {int(np.sum(y[zeros] != 0))} exact zeros not kept"
    if codec.codec_id in ("zfp", "sz3", "grid") and x.min() >= 0:
        assert y.min() >= 0, f"{codec.spec}: non-negative input decoded to {y.min()}"


def _codec(spec: str) -> Codec:
    return codec_from_spec(spec)


# ---- registry and configs -------------------------------------------------------------
def test_registered_ids_are_exactly_the_documented_ones() -> None:
    assert set(registered_codecs()) == EXPECTED_IDS


def test_every_registered_codec_appears_in_the_contract_table() -> None:
    assert {_codec(spec).codec_id for spec in ALL_SPECS} == EXPECTED_IDS


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_config_round_trips_through_json(spec: str) -> None:
    codec = _codec(spec)
    config = json.loads(json.dumps(codec.get_config()))
    assert codec_from_config(config) == codec
    assert codec_from_config(json.dumps(config)) == codec


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_spec_round_trips(spec: str) -> None:
    codec = _codec(spec)
    assert codec_from_spec(codec.spec) == codec
    assert codec_from_spec(codec.spec).spec == codec.spec


@pytest.mark.parametrize("codec_id", sorted(EXPECTED_IDS - {"sz3", "grid"}))
def test_bare_id_builds_with_defaults_listed_in_params(codec_id: str) -> None:
    codec = codec_from_spec(codec_id)
    assert codec_from_config({"id": codec_id, **codec.params()}) == codec


@pytest.mark.parametrize(("spec", "params"), [
    ("fp16", {"cname": "lz4", "clevel": 5, "shuffle": "byte"}),
    ("bf16", {"cname": "lz4", "clevel": 5, "shuffle": "byte"}),
    ("int8", {"cname": "lz4", "clevel": 5, "shuffle": "bit"}),
    ("int4", {"cname": "lz4", "clevel": 5, "shuffle": "bit"}),
    ("zfp", {"accuracy": 0.01}),
    ("zfp:rate=8", {"rate": 8.0}),
    ("zfp:precision=12", {"precision": 12}),
    ("sz3:abs=0.001", {"abs": 0.001}),
    ("sz3:rel=0.01", {"rel": 0.01}),
    ("grid:abs=0.02", {"abs": 0.02, "cname": "zstd", "clevel": 1, "shuffle": "byte"}),
    ("grid:rel=0.05", {"rel": 0.05, "cname": "zstd", "clevel": 1, "shuffle": "byte"}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_documented_defaults(spec: str, params: dict) -> None:
    assert _codec(spec).params() == params


@pytest.mark.parametrize(("spec", "error"), [
    ("nope", UnknownCodecError),
    ("", CodecSpecError),
    (":x=1", CodecSpecError),
    ("int8:bits", CodecSpecError),
    ("int8:bits=8", CodecSpecError),
    ("sz3", CodecSpecError),
    ("sz3:abs=1e-3,rel=1e-3", CodecSpecError),
    ("sz3:abs=0", CodecSpecError),
    ("sz3:abs=-1", CodecSpecError),
    ("sz3:rel=1", CodecSpecError),
    ("sz3:rel=nan", CodecSpecError),
    ("sz3:abs=inf", CodecSpecError),
    ("sz3:abs=tight", CodecSpecError),
    ("grid", CodecSpecError),
    ("grid:abs=1e-3,rel=1e-3", CodecSpecError),
    ("grid:abs=0", CodecSpecError),
    ("grid:rel=1", CodecSpecError),
    ("grid:rel=nan", CodecSpecError),
    ("grid:abs=inf", CodecSpecError),
    ("grid:abs=0.1,cname=gzip", CodecSpecError),
    ("grid:abs=0.1,algo=nopred", CodecSpecError),
    ("zfp:accuracy=-1", CodecSpecError),
    ("zfp:accuracy=0", CodecSpecError),
    ("zfp:accuracy=0.1,rate=8", CodecSpecError),
    ("zfp:rate=0", CodecSpecError),
    ("zfp:rate=0.5", CodecSpecError),  # zfpy overran its buffer below ~0.6 bits a value
    ("zfp:rate=0.99", CodecSpecError),
    ("zfp:rate=33", CodecSpecError),
    ("zfp:precision=0", CodecSpecError),
    ("zfp:precision=2.5", CodecSpecError),
    ("zfp:precision=40", CodecSpecError),
    ("zfp:tolerance=0.1", CodecSpecError),
    ("blosc2:cname=gzip", CodecSpecError),
    ("blosc2:cname=none", CodecSpecError),
    ("fp16:cname=gzip", CodecSpecError),
    ("fp16:clevel=10", CodecSpecError),
    ("fp16:clevel=true", CodecSpecError),  # True == 1 in Python
    ("zfp:rate=true", CodecSpecError),
    ("bf16:shuffle=nibble", CodecSpecError),
    ("int4:clevel=-1", CodecSpecError),
    ("int8:cname=lz4,cname=zstd", CodecSpecError),
    ("raw:x=1", CodecSpecError),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_bad_spec_raises_typed_error(spec: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec_from_spec(spec)


@pytest.mark.parametrize("config", [
    {"id": "zfp", "accuracy": None, "rate": None, "precision": 8, "extra": 1},
    {"id": "fp16", "cname": 5},
    {"cname": "lz4"},
    '{"id": "int8", "clevel": "high"}',
    "not json",
], ids=["unknown-key", "cname-number", "no-id", "clevel-string", "not-json"])
def test_bad_config_raises_codec_spec_error(config: object) -> None:
    with pytest.raises(CodecSpecError):
        codec_from_config(config)  # type: ignore[arg-type]


# ---- the contract, bytes face -----------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS)
@CONTRACT_SETTINGS
@given(x=feature_maps())
def test_contract_on_feature_maps(spec: str, x: np.ndarray) -> None:
    codec = _codec(spec)
    assert_contract(codec, x, codec.decode(codec.encode(x)))


@pytest.mark.parametrize("spec", ALL_SPECS)
@CONTRACT_SETTINGS
@given(x=post_relu_maps())
def test_contract_on_post_relu_maps(spec: str, x: np.ndarray) -> None:
    codec = _codec(spec)
    y = codec.decode(codec.encode(x))
    assert_contract(codec, x, y)


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=10, deadline=None)
@given(x=feature_maps())
def test_decode_into_out_fills_it(spec: str, x: np.ndarray) -> None:
    codec = _codec(spec)
    encoded = codec.encode(x)
    out = np.full(x.shape, np.nan, dtype=np.float32)
    result = codec.decode(encoded, out=out)
    assert result is out
    assert out.tobytes() == codec.decode(encoded).tobytes()


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 6).flatmap(lambda n: feature_maps().map(lambda x: np.stack([x * (k + 1) for k in range(n)]))))
def test_decode_batch_equals_decode_per_sample(spec: str, batch: np.ndarray) -> None:
    codec = _codec(spec)
    encoded = [codec.encode(x) for x in batch]
    out = np.full(batch.shape, np.nan, dtype=np.float32)
    assert codec.decode_batch([memoryview(e) for e in encoded], out) is out
    for row, e in enumerate(encoded):
        assert out[row].tobytes() == codec.decode(e).tobytes()


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=10, deadline=None)
@given(batch=batches())
def test_encode_batch_writes_encodes_bytes(spec: str, batch: np.ndarray) -> None:
    """The backends encode a batch at once (fp16/bf16 cast it in one call): what is
    stored must be exactly what encode writes map by map."""
    codec = _codec(spec)
    assert codec.encode_batch(batch) == [codec.encode(x) for x in batch]


@pytest.mark.parametrize("spec", CAST_SPECS)
@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=24), n=st.integers(1, 3),
       layout=st.sampled_from(["float32", "float64", "strided", "int32"]))
def test_cast_encode_batch_on_any_float32_bit_pattern(spec: str, bits: list[int], n: int, layout: str) -> None:
    """Any value (NaN payloads, -0, subnormals, Inf, rounding ties, values beyond the
    range), any input layout: the batch cast writes encode's bytes, or refuses exactly
    when encode refuses some map of the batch."""
    codec = _codec(spec)
    values = np.array(bits, dtype=np.uint32).view(np.float32)
    batch: np.ndarray = np.stack([np.roll(values, k) for k in range(n)]).reshape(n, 1, len(bits))
    if layout == "float64":
        batch = batch.astype(np.float64)
    elif layout == "strided":
        batch = np.repeat(batch, 2, axis=2)[:, :, ::2]
        assert batch.size == 1 or not batch.flags.c_contiguous
    elif layout == "int32":
        batch = (np.array(bits, dtype=np.int64) - 2**31).astype(np.int32)[None, None].repeat(n, axis=0)
    per_map: list[bytes] | None = []
    for x in batch:
        try:
            per_map.append(codec.encode(x))
        except EncodeError:
            per_map = None
            break
    if per_map is None:
        with pytest.raises(EncodeError):
            codec.encode_batch(batch)
    else:
        assert codec.encode_batch(batch) == per_map


@pytest.mark.parametrize("spec", CAST_SPECS)
def test_cast_encode_batch_checks_each_map_like_encode(spec: str) -> None:
    codec = _codec(spec)
    assert codec.encode_batch(np.zeros((0, 3, 4), np.float32)) == []
    with pytest.raises(EncodeError, match="numeric"):
        codec.encode_batch(np.zeros((2, 3), dtype=complex))
    with pytest.raises(EncodeError, match="empty map"):
        codec.encode_batch(np.zeros((2, 0, 3), np.float32))
    with pytest.raises(EncodeError, match=f"1..{MAX_NDIM}-D maps"):
        codec.encode_batch(np.zeros((2,) + (1,) * (MAX_NDIM + 1), np.float32))


@pytest.mark.parametrize("spec", CAST_SPECS + QUANT_SPECS)
def test_decode_batch_refuses_a_record_of_another_shape(spec: str) -> None:
    codec = _codec(spec)
    x = np.ones((2, 3, 4), dtype=np.float32)
    payloads = [codec.encode(x[0]), codec.encode(x[:, :2])]
    with pytest.raises(CorruptionError):
        codec.decode_batch(payloads, np.empty((2, 3, 4), dtype=np.float32))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_into_a_strided_out(spec: str) -> None:
    codec = _codec(spec)
    x = realistic_post_relu(np.random.default_rng(5), (6, 5, 4))
    holder = np.zeros((6, 5, 8), dtype=np.float32)
    out = holder[:, :, ::2]  # every other column: not C-contiguous
    codec.decode(codec.encode(x), out=out)
    assert out.tobytes() == codec.decode(codec.encode(x)).tobytes()
    assert np.all(holder[:, :, 1::2] == 0)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_rejects_out_of_the_wrong_shape(spec: str) -> None:
    codec = _codec(spec)
    encoded = codec.encode(np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        codec.decode(encoded, out=np.empty((2, 3, 5), dtype=np.float32))


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 1, 1), (3, 1, 1), (1, 1, 7), (2, 3, 4, 5), (64, 8, 8)],
                         ids=str)
def test_shapes_are_restored(spec: str, shape: tuple[int, ...]) -> None:
    codec = _codec(spec)
    x = realistic_post_relu(np.random.default_rng(len(shape)), shape)
    y = codec.decode(codec.encode(x))
    assert_contract(codec, x, y)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("value", [0.0, -0.0, 3.25, -7.5], ids=str)
def test_constant_maps(spec: str, value: float) -> None:
    codec = _codec(spec)
    x = np.full((5, 6, 7), value, dtype=np.float32)
    y = codec.decode(codec.encode(x))
    assert_contract(codec, x, y)
    if codec.codec_id in ("int8", "int4") or spec.startswith("sz3:rel"):  # documented: exact
        assert np.array_equal(y, x)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_integer_and_float64_inputs_are_accepted(spec: str) -> None:
    codec = _codec(spec)
    for x in (np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.linspace(0, 1, 24).reshape(4, 6)):
        y = codec.decode(codec.encode(x))
        assert_contract(codec, x.astype(np.float32), y)


def test_lossy_codecs_compress_post_relu_maps() -> None:
    """Not a benchmark: a sanity floor, so a codec that silently stores raw fails."""
    x = realistic_post_relu(np.random.default_rng(0), (64, 16, 16))
    floors = {"fp16": 1.9, "bf16": 1.9, "int8": 3.5, "int4": 6.0, "zfp": 2.0, "sz3:abs=1e-2": 4.0}
    for spec, floor in floors.items():
        ratio = x.nbytes / len(_codec(spec).encode(x))
        assert ratio >= floor, f"{spec}: ratio {ratio:.2f} < {floor}"


# ---- edge cases of single codecs -----------------------------------------------------
@pytest.mark.parametrize("value", [65504.5, 70000.0, -1e6, 3e38], ids=str)
def test_fp16_refuses_values_beyond_its_range(value: float) -> None:
    x = np.array([[1.0, value]], dtype=np.float32)
    with pytest.raises(EncodeError, match="bf16"):
        _codec("fp16").encode(x)


def test_fp16_keeps_its_largest_finite_value() -> None:
    x = np.array([65504.0, -65504.0, 2.0**-24, -(2.0**-14)], dtype=np.float32)
    assert np.array_equal(_codec("fp16").decode(_codec("fp16").encode(x)), x)


def test_bf16_refuses_values_that_round_to_inf() -> None:
    x = np.array([np.finfo(np.float32).max], dtype=np.float32)
    with pytest.raises(EncodeError):
        _codec("bf16").encode(x)


def test_bf16_rounds_to_nearest_even() -> None:
    # 1 + 2**-8 lies halfway between bf16 1.0 and 1 + 2**-7: ties go to the even 1.0;
    # 1 + 3 * 2**-8 lies halfway between 1 + 2**-7 and 1 + 2**-6: ties go to 1 + 2**-6.
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20], dtype=np.float32)
    y = _codec("bf16").decode(_codec("bf16").encode(x))
    assert y.tolist() == [1.0, 1 + 2.0**-6, 1 + 2.0**-7]


def _bf16_stage1(x: np.ndarray, spec: str = "bf16") -> bytes:
    """A format-version-2 bf16 payload, built by hand: header | 1 | blosc2 frame of the u16 bits."""
    import blosc2
    import torch
    codec = _codec(spec)
    bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    header = codec.encode(x)[:1 + 4 * x.ndim]
    frame = blosc2.compress2(bits, codec=blosc2.Codec.LZ4, clevel=5, filters=[blosc2.Filter.SHUFFLE],
                             filters_meta=[0], typesize=2)
    return header + b"\x01" + frame


@pytest.mark.parametrize("spec", ["bf16", "bf16:cname=zstd,clevel=3,shuffle=bit", "bf16:cname=lz4hc,clevel=1"])
def test_bf16_writes_the_widened_words_and_still_reads_version_2_payloads(spec: str) -> None:
    rng = np.random.default_rng(3)
    x = (rng.lognormal(-1, 1, (16, 8, 8)) * (rng.random((16, 8, 8)) > 0.4)).astype(np.float32)
    codec = _codec(spec)
    new = codec.encode(x)
    header = 1 + 4 * x.ndim
    assert new[header] == 2  # stage 2: the float32 words
    old = _bf16_stage1(x)
    assert old[header] == 1
    expected = torch_bf16(x)
    np.testing.assert_array_equal(codec.decode(new), expected)
    # a stage-1 frame has no CRC of its own: only the cache's reader, behind its record
    # CRC, decodes it (format version 6); a bare decode refuses it
    np.testing.assert_array_equal(codec.decode_verified(old), expected)
    with pytest.raises(CorruptionError, match="format version 1-5"):
        codec.decode(old)
    # the zero low halves cost next to nothing: within 5 % of the 16-bit frame
    assert len(new) <= 1.05 * len(old) + 64
    # a batch of stage-2 rows, of stage-1 rows, and a mix (a cache resumed across versions)
    for payloads in ([new, new], [old, old], [old, new, old]):
        out = np.full((len(payloads), *x.shape), np.nan, dtype=np.float32)
        codec.decode_batch_verified(payloads, out)
        for row in out:
            np.testing.assert_array_equal(row, expected)
        if payloads != [new, new]:
            with pytest.raises(CorruptionError, match="format version 1-5"):
                codec.decode_batch(payloads, np.empty_like(out))
    assert _codec("bf16:cname=none").encode(x)[header] == 0  # plain: the 16-bit values


def test_bf16_stage2_damaged_frames_are_corruption_errors() -> None:
    x = np.linspace(0, 3, 256, dtype=np.float32).reshape(4, 8, 8)
    codec = _codec("bf16")
    good = bytearray(codec.encode(x))
    header = 1 + 4 * x.ndim
    truncated = bytes(good[:-7])
    bad_sizes = bytearray(good)
    bad_sizes[header + 1 + 4] ^= 0x40  # the frame's uncompressed size
    for payload in (truncated, bytes(bad_sizes)):
        with pytest.raises(CorruptionError):
            codec.decode(payload)
        with pytest.raises((CorruptionError, ValueError)):
            codec.decode_batch([payload], np.empty((1, *x.shape), np.float32))


def test_decode_verified_skips_only_the_frame_crc() -> None:
    """bf16 stage 2 and blosc2 carry a CRC of their frame; decode_verified (the LMDB record's
    CRC covered the bytes) skips it and gives the same numbers; decode refuses a bad CRC."""
    x = np.linspace(0, 3, 256, dtype=np.float32).reshape(4, 8, 8)
    header = 1 + 4 * x.ndim
    for spec in ("bf16", "blosc2", "blosc2:cname=lz4,clevel=5,shuffle=bit"):
        codec = _codec(spec)
        good = codec.encode(x)
        assert good[header] in (0x02, 0xFC)  # bf16 stage 2 / checked blosc2 frame
        expected = codec.decode(good)
        np.testing.assert_array_equal(codec.decode_verified(good), expected)
        out = np.empty((2, *x.shape), np.float32)
        np.testing.assert_array_equal(codec.decode_batch_verified([good, good], out)[1], expected)
        bad_crc = bytearray(good)
        bad_crc[header + 1] ^= 0x01  # the CRC field, not the frame
        with pytest.raises(CorruptionError, match="CRC"):
            codec.decode(bytes(bad_crc))
        np.testing.assert_array_equal(codec.decode_verified(bytes(bad_crc)), expected)


def test_blosc2_payloads_of_format_versions_1_to_3_decode_only_verified() -> None:
    """v1-3 stored the bare blosc2 frame: read through the LMDB record's CRC (decode_verified),
    refused by decode (a bare frame could be damaged, and damaged frames can crash blosc2)."""
    import blosc2
    x = np.arange(96, dtype=np.float32).reshape(6, 4, 4) / 7
    codec = _codec("blosc2")
    header = codec.encode(x)[:1 + 4 * x.ndim]
    bare = header + blosc2.compress2(x, codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE],
                                     filters_meta=[0], typesize=4, nthreads=1)
    np.testing.assert_array_equal(codec.decode_verified(bare), x)
    with pytest.raises(CorruptionError, match="without its CRC"):
        codec.decode(bare)


def torch_bf16(x: np.ndarray) -> np.ndarray:
    import torch
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantisation_uses_the_channel_axis(spec: str) -> None:
    # Channel 1 spans 1000x the range of channel 0: a per-sample range would swamp channel 0.
    chw = np.stack([np.linspace(0, 1, 16), np.linspace(0, 1000, 16)]).reshape(2, 4, 4).astype(np.float32)
    td = np.ascontiguousarray(chw.reshape(2, 16).T)  # (T, D): channels on the last axis
    codec = _codec(spec)
    step = 1 / (255 if spec == "int8" else 15)
    for x, small in ((chw, chw[0]), (td, td[:, 0])):
        y = codec.decode(codec.encode(x))
        y_small = y[0] if x is chw else y[:, 0]
        assert np.max(np.abs(y_small - small)) <= step / 2 + 1e-6


def test_int4_packs_two_codes_per_byte() -> None:
    x = realistic_post_relu(np.random.default_rng(1), (8, 16, 16))
    q8 = len(_codec("int8:cname=none").encode(x))
    q4 = len(_codec("int4:cname=none").encode(x))
    params = 1 + 4 * 3 + 8 * 8 + 1  # shape header, offsets + scales, stage byte
    assert q4 - params == (q8 - params) // 2


@pytest.mark.parametrize("spec", ["int8", "int4", "int8:cname=none"])
@pytest.mark.parametrize("values", [[-3e38, 3e38, 0.0, 1.0], [-2e38, 1.5e38], [3.4e38, -1e37, 1.0]])
def test_quantisers_refuse_a_channel_whose_range_overflows_float32(spec: str, values: list[float]) -> None:
    """codecs.md promised an EncodeError; the range divided by the levels stayed finite, so
    [-3e38, 3e38] encoded with RuntimeWarnings and decoded to inf and 1.2e36."""
    x = np.array(values, dtype=np.float32).reshape(1, 1, -1)
    with pytest.raises(EncodeError, match="overflows float32"):
        _codec(spec).encode(x)
    near = np.array([-1.6e38, 1.6e38, 0.0], dtype=np.float32).reshape(1, 1, -1)  # a range float32 holds
    assert np.isfinite(_codec(spec).decode(_codec(spec).encode(near))).all()


@pytest.mark.parametrize("spec", ["zfp", "zfp:rate=8", "zfp:precision=16"])
def test_zfp_refuses_huge_values(spec: str) -> None:
    x = np.full((4, 4), 2.0**110, dtype=np.float32)
    with pytest.raises(EncodeError):
        _codec(spec).encode(x)


def test_zfp_accuracy_too_tight_for_the_magnitudes_stores_raw() -> None:
    x = (np.random.default_rng(2).standard_normal((32, 32)) * 1e6).astype(np.float32)
    codec = _codec("zfp:accuracy=1e-3")
    encoded = codec.encode(x)
    assert len(encoded) >= x.nbytes  # the raw fallback
    assert_contract(codec, x, codec.decode(encoded))


@pytest.mark.parametrize("spec", ["zfp", "sz3:abs=1e-2"])
def test_tiny_maps_are_stored_raw_not_inflated(spec: str) -> None:
    x = np.array([[1.5, -2.25]], dtype=np.float32)
    encoded = _codec(spec).encode(x)
    assert len(encoded) == 1 + 4 * 2 + 2 + x.nbytes
    assert np.array_equal(_codec(spec).decode(encoded), x)


# ---- NaN / Inf -----------------------------------------------------------------------
NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", NONFINITE, ids=str)
def test_nonfinite_values(spec: str, bad: float) -> None:
    codec = _codec(spec)
    x = realistic_post_relu(np.random.default_rng(3), (3, 4, 4))
    x[1, 2, 3] = bad
    if codec.codec_id not in NONFINITE_STORED:
        assert not codec.stores_nonfinite
        with pytest.raises(EncodeError):
            codec.encode(x)
        with pytest.raises(EncodeError):
            codec.to_hdf5(x[None])
        return
    assert codec.stores_nonfinite
    y = codec.decode(codec.encode(x))
    finite = np.isfinite(x)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    assert np.array_equal(y[np.isinf(x)], x[np.isinf(x)])
    assert_contract(codec, np.where(finite, x, 0).astype(np.float32), np.where(finite, y, 0).astype(np.float32))


# ---- the HDF5 face ---------------------------------------------------------------------
def hdf5_round_trip(codec: Codec, batch: np.ndarray, samples_per_chunk: int) -> np.ndarray:
    """Write ``to_hdf5`` fields into a real file, reopen it, read, ``from_hdf5``."""
    sample_shape = batch.shape[1:]
    arrays = codec.to_hdf5(batch)
    fields = codec.hdf5_fields(sample_shape)
    assert {f.name for f in fields} == set(arrays)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "codec.h5")
        with h5py.File(path, "w") as f:
            for field in fields:
                data = arrays[field.name]
                assert data.shape == (len(batch), *field.shape), field.name
                per_chunk = 1 if field.per_sample_chunks else samples_per_chunk
                dtype = field.dtype if field.dtype is not None else h5py.vlen_dtype(np.uint8)
                chunks = (min(per_chunk, len(batch)), *field.shape)
                dataset = f.create_dataset(field.name, shape=data.shape, dtype=dtype, chunks=chunks,
                                           fletcher32=True, **field.filter)
                dataset[...] = data
                dataset.attrs.update(dict(field.attrs))
        # Reopened: h5py would otherwise hand back the just-written, unfiltered chunks.
        with h5py.File(path, "r") as f:
            stored = {name: f[name][...] for name in arrays}
    return codec.from_hdf5(stored, sample_shape)


def _zfp_hdf5_refuses(codec: Codec, batch: np.ndarray) -> bool:
    config = codec.get_config()
    return "accuracy" in config and config["accuracy"] < max(float(np.abs(batch).max()) * 2.0**-20, 2.0**-80)


@pytest.mark.parametrize("spec", HDF5_SPECS)
@HDF5_SETTINGS
@given(batch=batches(feature_maps()), samples_per_chunk=st.sampled_from([1, 3]))
def test_hdf5_contract_on_feature_maps(spec: str, batch: np.ndarray, samples_per_chunk: int) -> None:
    codec = _codec(spec)
    if codec.codec_id == "zfp" and _zfp_hdf5_refuses(codec, batch):
        with pytest.raises(EncodeError, match="too tight"):
            codec.to_hdf5(batch)
        return
    decoded = hdf5_round_trip(codec, batch, samples_per_chunk)
    assert decoded.shape == batch.shape
    for x, y in zip(batch, decoded):
        assert_contract(codec, x, y)


@pytest.mark.parametrize("spec", HDF5_SPECS)
@HDF5_SETTINGS
@given(batch=batches(post_relu_maps()), samples_per_chunk=st.sampled_from([1, 2]))
def test_hdf5_contract_on_post_relu_maps(spec: str, batch: np.ndarray, samples_per_chunk: int) -> None:
    codec = _codec(spec)
    if codec.codec_id == "zfp" and _zfp_hdf5_refuses(codec, batch):
        with pytest.raises(EncodeError, match="too tight"):
            codec.to_hdf5(batch)
        return
    decoded = hdf5_round_trip(codec, batch, samples_per_chunk)
    for x, y in zip(batch, decoded):
        assert_contract(codec, x, y)


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(post_relu_maps()))
def test_from_hdf5_into_fills_out_with_from_hdf5s_numbers(spec: str, batch: np.ndarray) -> None:
    """The HDF5 reader decodes into the caller's rows (from_hdf5_into): the same bits as
    from_hdf5, into a C-contiguous or a strided ``out``; stored rows of another shape are
    a ValueError (the reader's CorruptionError), never a partly filled ``out``."""
    codec = _codec(spec)
    if codec.codec_id == "zfp" and _zfp_hdf5_refuses(codec, batch):
        return  # refused by design (test_hdf5_contract_on_post_relu_maps checks the error)
    fields = codec.to_hdf5(batch)
    expected = codec.from_hdf5(fields, batch.shape[1:])
    out = np.full(batch.shape, np.nan, dtype=np.float32)
    assert codec.from_hdf5_into(fields, out) is out
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    wide = np.full((*batch.shape[:-1], 2 * batch.shape[-1]), np.nan, dtype=np.float32)
    strided = wide[..., ::2]
    codec.from_hdf5_into(fields, strided)
    np.testing.assert_array_equal(strided.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError):
        codec.from_hdf5_into(fields, np.empty((len(batch) + 1, *batch.shape[1:]), dtype=np.float32))


@pytest.mark.parametrize(("spec", "names"), [
    ("fp16", {"values": "float16"}),
    ("bf16", {"bits": "uint16"}),
    ("int8", {"q": "uint8", "offset": "float32", "scale": "float32"}),
    ("int4", {"q": "uint8", "offset": "float32", "scale": "float32"}),
    ("zfp", {"values": "float32", "nonneg": "uint8"}),
    ("sz3:abs=1e-3", {"values": "float32", "nonneg": "uint8"}),
])
def test_hdf5_fields_are_the_documented_ones(spec: str, names: dict) -> None:
    fields = _codec(spec).hdf5_fields((5, 4, 3))
    assert {f.name: str(f.dtype) for f in fields} == names
    by_name = {f.name: f for f in fields}
    if spec == "int4":
        assert by_name["q"].shape == (30,)
    if spec.startswith(("zfp", "sz3")):
        assert by_name["values"].shape == (20, 3) and by_name["values"].per_sample_chunks
        assert by_name["values"].attrs["sample_shape"] == [5, 4, 3]
    if spec == "bf16":
        assert by_name["bits"].attrs["encoding"] == "bfloat16-bits"


@pytest.mark.parametrize(("spec", "filter_id"), [
    ("fp16", 32026), ("bf16", 32026), ("int8", 32026), ("zfp", 32013), ("sz3:rel=1e-3", 32024),
])
def test_hdf5_native_filters(spec: str, filter_id: int) -> None:
    fields = _codec(spec).hdf5_fields((4, 4))
    assert fields[0].filter["compression"] == filter_id


@pytest.mark.parametrize("spec", ["fp16:cname=none", "bf16:cname=none", "int8:cname=none"])
def test_hdf5_without_a_blosc2_stage_has_no_filter(spec: str) -> None:
    assert _codec(spec).hdf5_fields((4, 4))[0].filter == {}


def test_fp16_hdf5_values_are_plain_half_floats() -> None:
    x = np.array([[[0.5, -2.0], [65504.0, 0.0]]], dtype=np.float32)
    assert np.array_equal(_codec("fp16").to_hdf5(x)["values"], x.astype(np.float16))


def test_bf16_hdf5_bits_are_the_top_half_of_float32() -> None:
    x = np.array([[1.0, -2.5, 0.0]], dtype=np.float32)  # exact in bf16
    bits = _codec("bf16").to_hdf5(x)["bits"]
    assert np.array_equal(bits, (x.view(np.uint32) >> 16).astype(np.uint16))


# ---- damaged payloads -------------------------------------------------------------------
@st.composite
def damaged_records(draw: st.DrawFn) -> tuple[Codec, bytes]:
    codec = _codec(draw(st.sampled_from(ALL_SPECS)))
    x = draw(post_relu_maps()) if draw(st.booleans()) else np.clip(draw(feature_maps()), -1e3, 1e3)
    good = bytearray(codec.encode(x))
    how = draw(st.sampled_from(["truncate", "flip", "flip-payload", "random", "append"]))
    header = 1 + 4 * x.ndim
    if how == "truncate":
        return codec, bytes(good[:draw(st.integers(0, len(good) - 1))])
    if how in ("flip", "flip-payload"):
        low = header if how == "flip-payload" and len(good) > header else 0
        for _ in range(draw(st.integers(1, 4))):
            good[draw(st.integers(low, len(good) - 1))] ^= draw(st.integers(1, 255))
        return codec, bytes(good)
    if how == "append":
        return codec, bytes(good) + draw(st.binary(min_size=1, max_size=16))
    tail = draw(st.binary(max_size=300))
    return codec, bytes(good[:header]) + tail if draw(st.booleans()) else tail


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=damaged_records())
def test_damaged_records_raise_typed_errors_or_decode_to_the_header_shape(record: tuple[Codec, bytes]) -> None:
    codec, data = record
    try:
        y = codec.decode(data)
    except FmcacheError:
        return
    shape, _ = parse_header(memoryview(data), codec.codec_id)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == shape


@pytest.mark.parametrize("spec", ["zfp", "zfp:rate=8", "sz3:abs=1e-3", "sz3:rel=1e-2"])
def test_error_bounded_codecs_detect_any_damaged_stream_byte(spec: str) -> None:
    codec = _codec(spec)
    x = realistic_post_relu(np.random.default_rng(4), (8, 16, 16))
    good = bytearray(codec.encode(x))
    header = 1 + 4 * 3
    assert good[header] == 1, "expected a compressed stream, not the raw fallback"
    for position in range(header + 1, len(good), max(1, len(good) // 97)):  # flags, CRC, stream
        bad = bytearray(good)
        bad[position] ^= 0x5A
        with pytest.raises(FmcacheError, match="CRC"):
            codec.decode(bytes(bad))


@pytest.mark.parametrize("spec", HDF5_BOUNDED_SPECS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 6), strided=st.booleans())
def test_bounded_hdf5_decode_clamps_exactly_the_flagged_samples(spec: str, data: st.DataObject, n: int,
                                                                 strided: bool) -> None:
    """The HDF5 face of ZFP / SZ3: the filter's values reshaped to the map, and only the
    samples flagged ``nonneg`` clamped at 0 (a sample with negative values and no flag
    keeps them), into a fresh batch or the caller's ``out``, strided or not."""
    codec = _codec(spec)
    sample_shape = (2, 3, 4)
    values = data.draw(st.lists(st.floats(-8, 8, width=32), min_size=n * 24, max_size=n * 24))
    values = np.array(values, dtype=np.float32).reshape(n, 6, 4)
    flags = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.uint8)
    expected = values.reshape(n, *sample_shape).copy()
    for i in np.flatnonzero(flags):
        expected[i] = np.where(expected[i] < 0, np.float32(0), expected[i])
    fields = {"values": values, "nonneg": flags}
    np.testing.assert_array_equal(codec.from_hdf5(fields, sample_shape), expected)
    wide = np.full((n, 2, 3, 8), np.nan, dtype=np.float32)
    out = wide[..., ::2] if strided else np.full((n, *sample_shape), np.nan, dtype=np.float32)
    assert codec.from_hdf5_into(fields, out) is out
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError):
        codec.from_hdf5_into({"values": values, "nonneg": flags[:-1]}, np.empty((n, *sample_shape), np.float32))


@pytest.mark.parametrize("spec", ["fp16", "int8", "int4", "int8:cname=zstd,clevel=1,shuffle=byte",
                                  "fp16:cname=zstd,clevel=1,shuffle=bit", "int4:cname=lz4,clevel=9,shuffle=none"])
def test_blosc2_stage_frames_carry_a_crc_and_any_damaged_byte_is_caught(spec: str) -> None:
    """Format version 6: the blosc2 stage after a cast or a quantiser is ``3 | u32
    crc32c(frame) | frame``, so a damaged frame never reaches blosc2 (a damaged bare frame
    crashed it: the damaged-records test found one for ``int8``). Every byte of stage,
    CRC and frame, flipped, is a CorruptionError; the bare stage-1 frame of format
    versions 1-5 decodes only behind a storage CRC (``decode_verified``)."""
    codec = _codec(spec)
    x = realistic_post_relu(np.random.default_rng(5), (8, 16, 16))
    good = codec.encode(x)
    expected = codec.decode(good)
    stage_at = 1 + 4 * 3 + (8 * x.shape[0] if codec.codec_id.startswith("int") else 0)  # header, int: 8 B a channel
    assert good[stage_at] == 3
    for position in range(stage_at, len(good), max(1, (len(good) - stage_at) // 97)):
        bad = bytearray(good)
        bad[position] ^= 0x5A
        with pytest.raises(CorruptionError):
            codec.decode(bytes(bad))
    bare = bytearray(good[:stage_at]) + b"\x01" + good[stage_at + 5:]  # the v1-5 layout of the same frame
    np.testing.assert_array_equal(codec.decode_verified(bytes(bare)), expected)
    with pytest.raises(CorruptionError, match="format version 1-5"):
        codec.decode(bytes(bare))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=4).map(tuple),
       rate=st.sampled_from([1.0, 1.5, 2.0, 3.0]), seed=st.integers(0, 2**16))
def test_zfp_lowest_rates_round_trip_in_their_fixed_size(shape, rate, seed) -> None:
    """The smallest accepted rates (>= 1 bit per value; 0.5 corrupted the heap) encode and
    decode any map shape, to finite values of the same shape."""
    codec = codec_from_spec(f"zfp:rate={rate}")
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    for _ in range(3):
        y = codec.decode(codec.encode(x))
        assert y.shape == x.shape and np.isfinite(y).all()
