"""Round trips through the public cache API: every codec x backend x tier plan."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from contracts import assert_within_contract

import fmcache
from fmcache import TierPlan
from fmcache.errors import (
    CacheError,
    CacheExistsError,
    IncompleteCacheError,
    LayerNotFoundError,
    NonFiniteError,
    NotACacheError,
    SampleIndexError,
    ShapeMismatchError,
    StaleCacheError,
)

BACKENDS = ["lmdb", "hdf5"]
CODECS = ["raw", "blosc2:cname=lz4,clevel=5,shuffle=bit", "fp16", "bf16", "int8", "int4",
          "zfp:accuracy=0.01", "sz3:abs=0.001", "sz3:rel=0.001", "grid:abs=0.02", "grid:rel=0.001"]


def post_relu(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.lognormal(mean=-1.0, sigma=1.0, size=shape) * (rng.random(shape) > 0.42)
    return x.astype(np.float32)


def cache_path(tmp_path: Path, backend: str) -> Path:
    return tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")


def build(path: Path, layers: dict[str, tuple[np.ndarray, dict]], labels: np.ndarray, batch: int = 3,
          **kwargs) -> fmcache.Manifest:
    with fmcache.create_cache(path, **kwargs) as w:
        for name, (maps, opts) in layers.items():
            w.add_layer(name, maps.shape[1:], **opts)
        for s in range(0, len(labels), batch):
            w.append({name: maps[s:s + batch] for name, (maps, _) in layers.items()}, labels[s:s + batch])
        return w.commit()


def check_layer(cache: fmcache.Cache, name: str, truth: np.ndarray) -> None:
    plan = cache.layers[name].plan
    for i in range(len(truth)):
        got = cache.read(name, i)
        for tier in plan.tiers:
            assert_within_contract(tier.codec, plan.select(truth[i], tier.name, batched=False),
                                   plan.select(got, tier.name, batched=False), f"{name}[{i}] {tier.name}")
    batch = cache.read_batch(name, np.arange(len(truth))[::-1])
    np.testing.assert_array_equal(batch[::-1], np.stack([cache.read(name, i) for i in range(len(truth))]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_conv_and_token_maps(tmp_path, backend, codec):
    rng = np.random.default_rng(0)
    conv = post_relu(rng, (7, 13, 5, 6))  # 13 channels: no chunk or byte size divides it
    tokens = rng.normal(size=(7, 9, 11)).astype(np.float32)
    labels = rng.integers(0, 10, size=7)
    path = cache_path(tmp_path, backend)
    build(path, {"conv": (conv, {"codec": codec}), "tokens": (tokens, {"codec": codec})}, labels,
          backend=backend)
    with fmcache.open_cache(path) as cache:
        assert cache.backend_id == backend and len(cache) == 7
        np.testing.assert_array_equal(cache.labels, labels)
        check_layer(cache, "conv", conv)
        check_layer(cache, "tokens", tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", [
    [("sensitive", [0, 5, 12], "fp16"), ("bulk", [1, 2, 3, 4, 6, 7, 8, 9, 10, 11], "int8")],
    [("sensitive", list(range(4)), "raw"), ("bulk", list(range(4, 13)), "sz3:abs=0.01")],
    [("a", [12], "bf16"), ("b", [0, 1, 2], "zfp:accuracy=0.001"), ("c", list(range(3, 12)), "int4")],
], ids=["fp16+int8", "raw+sz3", "three-tiers"])
def test_tier_plans_round_trip_with_each_tiers_contract(tmp_path, backend, plan):
    rng = np.random.default_rng(1)
    conv = post_relu(rng, (5, 13, 4, 4))
    path = cache_path(tmp_path, backend)
    build(path, {"l": (conv, {"plan": TierPlan(13, plan)})}, np.arange(5), backend=backend)
    with fmcache.open_cache(path) as cache:
        check_layer(cache, "l", conv)
        stored = cache.manifest.layers["l"].stored_bytes
        assert set(stored) == {t[0] for t in plan} and all(v > 0 for v in stored.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sample_cache(tmp_path, backend):
    x = post_relu(np.random.default_rng(2), (1, 3, 2, 2))
    path = cache_path(tmp_path, backend)
    build(path, {"x": (x, {"codec": "raw"})}, np.array([7]), backend=backend)
    cache = fmcache.open_cache(path)
    np.testing.assert_array_equal(cache.read("x", 0), x[0])
    np.testing.assert_array_equal(cache.read("x", -1), x[0])
    assert cache.labels.tolist() == [7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_are_stored_for_the_variant_tier_only(tmp_path, backend):
    rng = np.random.default_rng(3)
    x = post_relu(rng, (4, 6, 3, 3))
    flipped = x[..., ::-1].copy()
    path = cache_path(tmp_path, backend)
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("l", (6, 3, 3), plan=TierPlan.two_tier(6, [2, 4], "raw", "fp16"), variants=["flip"])
        w.append({"l": x}, np.zeros(4, int), variants={"l": {"flip": flipped}})
        w.commit()
    cache = fmcache.open_cache(path)
    parts = cache.read_parts("l", [1, 3])
    assert set(parts) == {"sensitive", "bulk", "sensitive@flip"}
    np.testing.assert_array_equal(parts["sensitive@flip"], flipped[[1, 3]][:, [2, 4]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncommitted_cache_opens_as_incomplete_and_resumes(tmp_path, backend):
    rng = np.random.default_rng(4)
    x = post_relu(rng, (6, 2, 3, 3))
    path = cache_path(tmp_path, backend)
    w = fmcache.create_cache(path, backend=backend, fingerprints={"weights": "w1", "data": "d1"})
    w.add_layer("l", (2, 3, 3), codec="raw")
    w.append({"l": x[:4]}, np.arange(4))
    w.close()
    with pytest.raises(IncompleteCacheError, match="interrupted build"):
        fmcache.open_cache(path)
    with pytest.raises(CacheExistsError, match="interrupted build"):
        fmcache.create_cache(path, backend=backend)
    with pytest.raises(StaleCacheError, match="weights"):
        fmcache.create_cache(path, backend=backend, resume=True, fingerprints={"weights": "w2", "data": "d1"})
    w = fmcache.create_cache(path, backend=backend, resume=True, fingerprints={"weights": "w1", "data": "d1"})
    # LMDB keeps every appended batch; HDF5 what fills whole chunks (here none: the rows
    # held for a chunk still filling are recomputed, as after a crash; docs/format.md)
    assert w.samples == (4 if backend == "lmdb" else 0)
    w.add_layer("l", (2, 3, 3), codec="raw")  # same layout: a no-op
    w.append({"l": x[w.samples:]}, np.arange(w.samples, 6))
    w.commit()
    cache = fmcache.open_cache(path)
    np.testing.assert_array_equal(cache.read_batch("l", range(6)), x)
    with pytest.raises(StaleCacheError, match="frozen-prefix weights changed"):
        fmcache.open_cache(path, weights_fingerprint="w2")
    fmcache.open_cache(path, weights_fingerprint="w2", allow_stale=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_batches_are_refused_and_nothing_committed_is_lost(tmp_path, backend):
    rng = np.random.default_rng(5)
    x = post_relu(rng, (4, 2, 3, 3))
    path = cache_path(tmp_path, backend)
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("l", (2, 3, 3), codec="raw")
        w.append({"l": x[:2]}, [0, 1])
        with pytest.raises(ShapeMismatchError, match="layer 'l': batch of shape"):
            w.append({"l": x[2:, :1]}, [2, 3])
        bad = x[2:].copy()
        bad[1, 0, 1, 1] = np.nan
        with pytest.raises(NonFiniteError, match="sample 3"):
            w.append({"l": bad}, [2, 3])
        with pytest.raises(ShapeMismatchError, match="labels"):
            w.append({"l": x[2:]}, np.array([[2], [3]]))
        w.append({"l": x[2:]}, [2, 3])
        w.commit()
    np.testing.assert_array_equal(fmcache.open_cache(path).read_batch("l", range(4)), x)


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(NotACacheError, match="does not exist"):
        fmcache.open_cache(tmp_path / "missing.lmdb")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(NotACacheError, match="not an fmcache cache"):
        fmcache.open_cache(tmp_path / "file.txt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_validate_layer_and_sample(tmp_path, backend):
    path = cache_path(tmp_path, backend)
    build(path, {"l": (np.ones((3, 1, 2, 2), np.float32), {"codec": "raw"})}, np.arange(3), backend=backend)
    cache = fmcache.open_cache(path)
    with pytest.raises(LayerNotFoundError, match="no layer 'm'"):
        cache.read("m", 0)
    with pytest.raises(SampleIndexError, match="sample 3 is out of range"):
        cache.read("l", 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_replaces_only_at_commit(tmp_path, backend):
    path = cache_path(tmp_path, backend)
    build(path, {"l": (np.ones((2, 1, 2, 2), np.float32), {"codec": "raw"})}, np.arange(2), backend=backend)
    with pytest.raises(CacheExistsError):
        fmcache.create_cache(path, backend=backend)
    w = fmcache.create_cache(path, backend=backend, overwrite=True)
    w.add_layer("l", (1, 2, 2), codec="raw")
    w.append({"l": np.zeros((1, 1, 2, 2), np.float32)}, [0])
    assert len(fmcache.open_cache(path)) == 2  # the old cache is intact until commit
    w.commit()
    assert len(fmcache.open_cache(path)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_pickles_as_a_path(tmp_path, backend):
    path = cache_path(tmp_path, backend)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    build(path, {"l": (x, {"codec": "raw"})}, np.arange(2), backend=backend)
    cache = fmcache.open_cache(path)
    cache.read("l", 0)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.read("l", 1), x[1])


def test_single_sample_reads_match_batch_reads_and_name_a_damaged_sample(tmp_path):
    """Cache.read's per-sample path (Backend.read_one) returns read_batch's rows bit for bit,
    into a fresh array or `out=`, and a damaged record is named by its sample."""
    import lmdb

    from fmcache.backends.lmdb_backend import record_key

    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((6, 4, 5, 5)), 0).astype(np.float32)
    path = tmp_path / "one.lmdb"
    with fmcache.create_cache(path) as w:
        w.add_layer("l", (4, 5, 5), codec="bf16")
        w.append({"l": x}, np.arange(6))
        w.commit()
    with fmcache.open_cache(path) as cache:
        rows = cache.read_batch("l", range(6))
        out = np.empty((4, 5, 5), dtype=np.float32)
        for i in range(-6, 6):
            assert cache.read("l", i).tobytes() == rows[i].tobytes()
            assert cache.read("l", i, out=out) is out and out.tobytes() == rows[i].tobytes()
    env = lmdb.open(str(path), subdir=True, readonly=False, lock=False)
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(record_key(0, 3)))
        value[-20] ^= 0x10
        txn.put(record_key(0, 3), bytes(value))
    env.close()
    with fmcache.open_cache(path) as cache:
        assert cache.read("l", 2).tobytes() == rows[2].tobytes()
        with pytest.raises(fmcache.errors.CorruptionError, match=r"layer 'l' sample 3: checksum mismatch"):
            cache.read("l", 3)


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
@pytest.mark.parametrize("codec", ["int8", "int4", "bf16", "raw"])
def test_empty_batches_read_as_empty_arrays_and_indices_must_be_integers(tmp_path, backend, codec):
    """An empty batch was an IndexError on LMDB for int8 / int4 and an empty array on
    HDF5; a float index read the sample below it (1.5 -> 1) and True read sample 1 (a
    new-user sweep). Empty batches now give (0, *shape) everywhere; a non-integer index
    is a SampleIndexError naming it."""
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    maps = np.random.default_rng(0).random((6, 3, 4, 4), dtype=np.float32)
    with fmcache.create_cache(path) as writer:
        writer.add_layer("l", (3, 4, 4), codec=codec)
        writer.append({"l": maps}, np.arange(6))
        writer.commit()
    with fmcache.open_cache(path) as cache:
        for empty in ([], range(0), np.array([], dtype=np.int64)):
            assert cache.read_batch("l", empty).shape == (0, 3, 4, 4)
        assert cache.read_parts("l", [])["all"].shape == (0, 3, 4, 4)
        for bad in (1.5, True, np.float32(2.0)):
            with pytest.raises(SampleIndexError, match="sample indices must be integers"):
                cache.read("l", bad)
        with pytest.raises(SampleIndexError, match=r"got 1\.5"):
            cache.read_batch("l", [0, 1.5])
        assert np.array_equal(cache.read("l", np.int32(2)), cache.read_batch("l", [2])[0])


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_indices_of_every_kind_are_read_or_refused_by_name(tmp_path, suffix):
    """np.uint64(2**64 - 1) wrapped to -1 and read the last sample; a generator, a 2-D or an
    object index array failed with AttributeError / struct.error / TypeError."""
    from fmcache.errors import SampleIndexError

    path = tmp_path / f"i{suffix}"
    x = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    with fmcache.create_cache(path) as w:
        w.add_layer("l", (2,), codec="raw")
        w.append({"l": x}, np.arange(6))
        w.commit()
    cache = fmcache.open_cache(path)
    np.testing.assert_array_equal(cache.read_batch("l", (i for i in (4, 1, 4))), x[[4, 1, 4]])  # a generator
    np.testing.assert_array_equal(cache.read_batch("l", np.array([5, -6], dtype=object)), x[[5, 0]])
    np.testing.assert_array_equal(cache.read_batch("l", np.array([5, 0], dtype=np.uint64)), x[[5, 0]])
    for bad, message in ((np.array([np.uint64(2**64 - 1)]), "18446744073709551615 is out of range"),
                         (np.array([np.uint64(2**63)]), "9223372036854775808 is out of range"),
                         ([2**70], f"{2**70} is out of range"),
                         (np.zeros((2, 2), np.int64), r"one flat sequence, got shape \(2, 2\)"),
                         (np.array(["a"], dtype=object), "must be integers, got 'a'")):
        with pytest.raises(SampleIndexError, match=message):
            cache.read_batch("l", bad)
    with pytest.raises(SampleIndexError, match="18446744073709551615 is out of range"):
        cache.read("l", np.uint64(2**64 - 1))


def test_a_resume_with_other_tier_channels_says_how_many_each_tier_had(tmp_path):
    """Resuming a SACA build with another --rho: the tiers' codecs read the same, and the
    refusal printed the same text for "when it began" and "now" (a helper's sweep): it
    names each tier's channel count."""
    path = tmp_path / "c.lmdb"
    w = fmcache.create_cache(path)
    w.add_layer("l", (6, 2, 2), plan=TierPlan.two_tier(6, [0, 1], "int8", "grid:rel=0.05"))
    w.append({"l": np.ones((2, 6, 2, 2), np.float32)}, [0, 1])
    w.close()
    w = fmcache.create_cache(path, resume=True)
    with pytest.raises(CacheError, match=r"sensitive int8:\S+ \(2 channels\), bulk grid:rel=0.05,\S+ \(4 channels\) "
                                         r"when it began, now sensitive int8:\S+ \(3 channels\), bulk grid:\S+ "
                                         r"\(3 channels\)"):
        w.add_layer("l", (6, 2, 2), plan=TierPlan.two_tier(6, [0, 1, 2], "int8", "grid:rel=0.05"))
    w.close()
