"""Fuzzing: random and mutated bytes into record, codec-payload and manifest decoding.

Only typed errors (CorruptionError, or FormatVersionError for a manifest), no crash, no
hang, bounded memory. The C decoders (zfp, SZ3, Blosc2) run in a forked child under an
address-space limit, so a segfault or a runaway allocation fails the test instead of
taking pytest down; records must fail their CRC before any decoder sees them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmcache
from fmcache.errors import CorruptionError, FormatVersionError
from fmcache.manifest import Manifest
from fmcache.record import pack_record, unpack_record

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = ["raw", "blosc2", "fp16", "bf16", "int8", "int4", "zfp:accuracy=0.01", "sz3:abs=0.001", "grid:abs=0.02"]
MEMORY_LIMIT_BYTES = 3 << 30


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or overwritten (never equal)."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
    if bytes(data) == original:
        data.append(0)
    return bytes(data)


def _sample(codec: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.lognormal(-1, 1, size=(4, 6, 8)) * (rng.random((4, 6, 8)) > 0.4)
    return x.astype(np.float32)


# ---- records ------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_never_a_record(data):
    try:
        unpack_record(data, "fuzz")
    except CorruptionError:
        return
    # the odds of random bytes carrying a valid magic and CRC are nil; a well-formed one is fine
    assert data[:4] in (b"FMR1", b"FMR2", b"FMR3")


RECORD = pack_record({"all": fmcache.codec_from_spec("zfp:accuracy=0.01").encode(_sample("zfp")),
                      "sensitive@flip": b"\x01\x02\x03"})


@FUZZ
@given(mutated(RECORD))
def test_mutated_records_fail_their_checksum(data):
    with pytest.raises(CorruptionError):
        unpack_record(data, "layer 'l' sample 3")


# ---- codec payloads (C decoders: in a child) -------------------------------------------------------
def _fuzz_codec_in_child(spec: str, conn) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    codec = fmcache.codec_from_spec(spec)
    x = _sample(spec)
    encoded = codec.encode(x)
    outcomes: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.one_of(mutated(encoded), st.binary(max_size=200)), st.booleans())
    def run(data, with_out):
        out = np.empty(x.shape, np.float32) if with_out else None
        try:
            codec.decode(data, out=out)
            key = "decoded"
        except CorruptionError:
            key = "CorruptionError"
        except ValueError as exc:  # only the documented caller error: `out` of another shape
            key = "out-mismatch" if "out has shape" in str(exc) else f"ValueError: {exc}"
        except Exception as exc:  # noqa: BLE001 - what we are looking for
            key = f"{type(exc).__name__}: {exc}"
        outcomes[key] = outcomes.get(key, 0) + 1

    run()
    conn.send(outcomes)


@pytest.mark.parametrize("spec", CODECS)
def test_codec_decoders_on_damaged_payloads(spec):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_fuzz_codec_in_child, args=(spec, child))
    proc.start()
    outcomes = parent.recv() if parent.poll(240) else None
    proc.join(10)
    assert proc.exitcode == 0, f"the decoder took the process down (exit code {proc.exitcode})"
    unexpected = {k: v for k, v in outcomes.items() if k not in ("decoded", "CorruptionError", "out-mismatch")}
    assert not unexpected, unexpected
    if spec.startswith(("zfp", "sz3")):
        # a damaged stream never reaches the C decoder: the payload CRC is checked first, so a
        # mutation that decodes at all can only be one in the header (same shape) or mode-0 body
        assert outcomes.get("CorruptionError", 0) > 0


# ---- manifests ----------------------------------------------------------------------------------
def _manifest_json() -> bytes:
    from fmcache.manifest import LayerInfo
    from fmcache.tiers import TierPlan

    plan = TierPlan.two_tier(6, [0, 3], "fp16", "zfp:accuracy=0.01")
    layer = LayerInfo("layer2", (6, 4, 4), plan, 16, variants=("flip",), variant_tiers=("sensitive",))
    return Manifest(backend="lmdb", layers={"layer2": layer}, samples=10, complete=True).to_json()


MANIFEST = _manifest_json()
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(MANIFEST)))
def test_damaged_manifest_bytes(data):
    try:
        Manifest.from_json(data)
    except (CorruptionError, FormatVersionError):
        pass


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


MANIFEST_PATHS = [p for p in _paths(json.loads(MANIFEST)) if p]


@FUZZ
@given(st.sampled_from(MANIFEST_PATHS), json_values)
def test_manifest_with_a_field_replaced_by_any_json(path, value):
    """Well-formed JSON, wrong content: a typed error or a manifest, never anything else."""
    data = json.loads(MANIFEST)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        Manifest.from_dict(data)
    except (CorruptionError, FormatVersionError):
        pass


def _refused_within_2_gib_more(data):
    """Manifest.from_dict(data) raises its typed error with the address space held to what
    the process uses plus 2 GiB (the old code grew to the machine's 24 GiB: OOM-killed)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (2 << 30), hard))
    try:
        with pytest.raises((CorruptionError, FormatVersionError)):
            Manifest.from_dict(data)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("run", [[0, 2**31], [5, 2**40], [-2**40, 0]])
def test_a_damaged_channel_run_is_refused_before_it_is_listed(run):
    """A tier's run [start, stop] of billions of channels was listed one by one: a fuzz
    example of the field-replacing test (any JSON, e.g. [0, 2**40], in place of a run) grew
    the test process to 24 GiB (the OOM-killed clean-clone test run of session 19)."""
    data = json.loads(MANIFEST)
    data["layers"][0]["plan"]["tiers"][0]["channels"] = [run]
    _refused_within_2_gib_more(data)


def test_a_plan_of_more_channels_than_fmcache_lists_is_refused_when_built_too():
    from fmcache.errors import TierPlanError
    from fmcache.tiers import MAX_CHANNELS, TierPlan

    with pytest.raises(TierPlanError, match="at most 16,777,216") as info:
        TierPlan.single(MAX_CHANNELS + 1, "raw")
    assert "fewer channels" in info.value.hint
    assert TierPlan.single(4096, "raw").num_channels == 4096


@pytest.mark.parametrize("channels", [2**31, 10**12])
def test_a_damaged_channel_count_is_refused_without_listing_every_channel(channels):
    """A manifest whose plan claims 2**31 channels made a set of every channel: a fuzz run
    of a fresh hypothesis database ran the test process out of memory (24 GiB, OOM-killed)."""
    data = json.loads(MANIFEST)
    data["layers"][0]["plan"]["num_channels"] = channels
    _refused_within_2_gib_more(data)


@pytest.mark.parametrize("channels", [2**31, 10**12])
def test_a_damaged_channel_count_with_a_run_as_long_is_refused_too(channels):
    data = json.loads(MANIFEST)
    data["layers"][0]["plan"]["num_channels"] = channels
    data["layers"][0]["plan"]["tiers"][0]["channels"] = [[0, channels]]
    _refused_within_2_gib_more(data)
