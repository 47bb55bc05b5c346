"""The read fast paths give bit-identical results to the plain paths.

Fast paths under test: codecs decoding through a reused per-thread scratch buffer and
into ``out=``; ``bf16``'s one-call decode of a whole stage-2 record; ``Cache.read`` decoding a single in-order tier straight into the result;
HDF5 batch reads of scattered rows by covering slices; ``FeatureMapDataset`` decoding
only the SACA variant each sample uses.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import feature_maps, post_relu_maps

import fmcache
from fmcache import FeatureMapDataset, TierPlan
from fmcache.augment import AugFamily, augment_map, default_variants, nearest_variant, variant_name
from fmcache.codecs import Codec, codec_from_spec
from fmcache.codecs.cast import Bf16
from fmcache.errors import CacheError, CorruptionError, ShapeMismatchError
from fmcache.shards import merge_shards

CODECS = ["raw", "blosc2:cname=lz4,clevel=5,shuffle=bit", "fp16", "fp16:cname=none", "bf16", "bf16:cname=none",
          "bf16:cname=zstd,clevel=1,shuffle=byte", "int8", "int8:cname=none", "int4", "zfp:accuracy=0.01",
          "sz3:abs=0.001", "grid:abs=0.02", "grid:rel=0.01,cname=none"]
BACKENDS = ["lmdb", "hdf5"]


def post_relu(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.lognormal(mean=-1.0, sigma=1.0, size=shape) * (rng.random(shape) > 0.42)
    return x.astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("spec", CODECS)
def test_decode_into_out_matches_fresh_decode(spec: str) -> None:
    codec = codec_from_spec(spec)
    rng = np.random.default_rng(1)
    maps = [post_relu(rng, (6, 5, 7)) for _ in range(3)]
    encoded = [codec.encode(m) for m in maps]
    fresh = [codec.decode(e) for e in encoded]
    out = np.full((6, 5, 7), np.nan, dtype=np.float32)
    for e, f in zip(encoded * 2, fresh * 2):  # the scratch buffer is reused across samples
        assert same_bits(codec.decode(e, out=out), f)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(post_relu_maps(), feature_maps(max_abs=1e3)),
       spec=st.sampled_from(["bf16", "bf16:cname=zstd,clevel=1,shuffle=bit", "bf16:cname=lz4hc,clevel=1"]),
       wrap=st.sampled_from(["bytes", "memoryview", "bytearray"]), into_out=st.booleans())
def test_bf16_one_call_decode_equals_the_general_path(x: np.ndarray, spec: str, wrap: str, into_out: bool) -> None:
    codec = codec_from_spec(spec)
    record = codec.encode(x)
    data = {"bytes": record, "memoryview": memoryview(record), "bytearray": bytearray(record)}[wrap]
    expected = Codec.decode(codec, record)  # the general, layered path
    for decode in (codec.decode, codec.decode_verified):
        out = np.full(x.shape, np.nan, dtype=np.float32) if into_out else None
        got = decode(data, out=out)
        assert same_bits(got, expected)
        assert out is None or got is out


def test_bf16_one_call_decode_takes_only_whole_well_formed_stage2_records() -> None:
    """The flat path runs for stage-2 records (bytes or a byte memoryview, fresh or C-contiguous
    ``out``) and declines everything else, damage included: the general path then decodes or
    raises, so a fault never meets blosc2 without its CRC check."""
    codec = codec_from_spec("bf16")
    x = post_relu(np.random.default_rng(5), (16, 8, 8))
    good = codec.encode(x)
    assert Bf16._decode_wide(good, None, True) is not None
    assert Bf16._decode_wide(memoryview(good), np.empty(x.shape, np.float32), True) is not None
    declined = {
        "stage-1 record": codec_from_spec("bf16:cname=none").encode(x),
        "bytearray": bytearray(good),
        "truncated": good[:-1],
        "one byte more": good + b"\0",
    }
    for position in (0, 3, 13, 15, 20, 40, len(good) - 1):  # ndim, a dim, stage, CRC, frame header, body
        bad = bytearray(good)
        bad[position] ^= 0x5A
        declined[f"byte {position} flipped"] = bytes(bad)
    for what, data in declined.items():
        assert Bf16._decode_wide(data, None, True) is None, what
    for what in ("truncated", "one byte more", *[k for k in declined if "flipped" in k]):
        with pytest.raises(CorruptionError):
            codec.decode(declined[what])
    strided = np.empty((16, 8, 16), np.float32)[:, :, ::2]
    assert Bf16._decode_wide(good, strided, True) is None
    assert same_bits(codec.decode(good, out=strided).copy(), codec.decode(good))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(good, out=np.empty((16, 8, 9), np.float32))


@pytest.mark.parametrize("spec", ["bf16", "int8", "fp16"])
def test_scratch_buffer_survives_a_larger_then_smaller_sample(spec: str) -> None:
    codec = codec_from_spec(spec)
    rng = np.random.default_rng(2)
    small, big = post_relu(rng, (2, 3, 4)), post_relu(rng, (64, 32, 32))
    first = codec.decode(codec.encode(small))
    codec.decode(codec.encode(big))
    assert same_bits(codec.decode(codec.encode(small)), first)


def test_decoding_in_threads_gives_the_same_bits() -> None:
    codec = codec_from_spec("bf16")
    rng = np.random.default_rng(3)
    maps = [post_relu(rng, (16, 16, 16)) for _ in range(8)]
    encoded = [codec.encode(m) for m in maps]
    expected = [codec.decode(e) for e in encoded]
    failures: list[int] = []

    def work() -> None:
        for _ in range(50):
            for i, e in enumerate(encoded):
                if not same_bits(codec.decode(e), expected[i]):
                    failures.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _build(path: Path, backend: str, maps: np.ndarray, plan: TierPlan, batch: int = 5) -> None:
    with fmcache.create_cache(path, backend=backend) as writer:
        writer.add_layer("l", maps.shape[1:], plan=plan, samples_per_chunk=4)
        for start in range(0, len(maps), batch):
            writer.append({"l": maps[start:start + batch]}, np.arange(start, min(start + batch, len(maps))))
        writer.commit()


PLANS = {
    "single": lambda c: TierPlan.single(c, "bf16"),
    "single-permuted": lambda c: TierPlan(c, [("all", list(reversed(range(c))), "int8")]),
    "two-tier": lambda c: TierPlan.two_tier(c, [0, 3, 4], "fp16", "int8"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_cache_read_matches_plain_merge(tmp_path: Path, backend: str, plan_name: str) -> None:
    rng = np.random.default_rng(4)
    maps = post_relu(rng, (23, 6, 4, 5))
    plan = PLANS[plan_name](6)
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    _build(path, backend, maps, plan)
    with fmcache.open_cache(path) as cache:
        every = list(range(len(maps)))
        plain = plan.merge(cache.read_parts("l", every), batched=True)  # the reference: parts, then merge
        assert same_bits(cache.read_batch("l", every), plain)
        out = np.empty((6, 4, 5), dtype=np.float32)
        for i in [0, 7, 22, -1, np.int64(5)]:
            assert same_bits(cache.read("l", i), plain[i])
            assert cache.read("l", i, out=out) is not None
            assert same_bits(out, plain[i])
        order = [9, 2, 2, 17, 0, 22, 9]  # shuffled, repeated
        assert same_bits(cache.read_batch("l", order), plain[order])
        batch_out = np.empty((len(order), 6, 4, 5), dtype=np.float32)
        cache.read_batch("l", order, out=batch_out)
        assert same_bits(batch_out, plain[order])


@pytest.mark.parametrize("order", [[0, 22], [3, 1, 2, 0], [21, 5, 13, 5, 0], list(range(22, -1, -3))],
                         ids=["wide", "dense", "repeats", "strided"])
def test_hdf5_scattered_rows_match_single_reads(tmp_path: Path, order: list[int]) -> None:
    rng = np.random.default_rng(5)
    maps = post_relu(rng, (23, 3, 4, 4))
    path = tmp_path / "c.h5"
    _build(path, "hdf5", maps, TierPlan.single(3, "bf16"))
    with fmcache.open_cache(path) as cache:
        singles = np.stack([cache.read_batch("l", [i])[0] for i in order])
        assert same_bits(cache.read_batch("l", order), singles)
        assert np.array_equal(cache.labels, np.arange(23))


@pytest.fixture(scope="module")
def hdf5_of_97(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """97 samples in chunks of 4 (the last one partial), bf16 and an opaque int8 tier."""
    maps = post_relu(np.random.default_rng(8), (97, 4, 3, 3))
    path = tmp_path_factory.mktemp("scatter") / "c.h5"
    _build(path, "hdf5", maps, TierPlan.two_tier(4, [1], "bf16", "int8"), batch=13)
    return path, maps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, 96), min_size=1, max_size=40), budget=st.sampled_from([0, 300, 1 << 20]))
def test_hdf5_batch_reads_of_any_rows_match_single_reads(hdf5_of_97: tuple[Path, np.ndarray], monkeypatch,
                                                         order: list[int], budget: int) -> None:
    """Batch reads of scattered rows gather them from whole chunks kept in the row LRU
    (where 12 chunks of the layer fit in its budget; with a budget of about one chunk it
    evicts inside a batch) or read spans and runs (where they do not): any order and
    repeats give the rows that reading them one by one gives, parts and merged maps."""
    from fmcache.backends import hdf5_backend
    path, _ = hdf5_of_97
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", budget)
    monkeypatch.setattr(hdf5_backend, "ROWS_OPEN_CHUNKS", 12 if budget else 0)
    with fmcache.open_cache(path) as cache:
        singles = np.stack([cache.read_batch("l", [i])[0] for i in order])
        assert same_bits(cache.read_batch("l", order), singles)
        parts = cache.read_parts("l", order)
        for name, batch in parts.items():
            assert same_bits(batch, np.stack([cache.read_parts("l", [i])[name][0] for i in order]))


@pytest.mark.parametrize(("chunk_rows", "rows", "one_slice"), [
    (1, [0, 1, 2, 3], True),            # per-sample chunks, no gap
    (1, [0, 1, 2, 3, 4, 5, 6, 7, 9], True),  # one chunk more than the 9 wanted: within a quarter
    (1, [0, 2, 4, 6], False),           # a slice would decode 7 chunks for 4 rows
    (1, [4, 5, 6, 7, 20, 21, 22, 23], False),  # a sampler's blocks: 20 chunks for 8 rows
    (4, [0, 5, 9, 10], True),           # chunks 0, 1, 2: a slice decodes just those
    (4, [0, 13], False),                # chunks 0 and 3: a slice would decode 1 and 2 as well
    (None, [0, 9], True),               # contiguous: a slice decodes nothing, only copies
])
def test_hdf5_slice_reads_decode_little_beyond_the_chunks_they_need(tmp_path: Path, chunk_rows: int | None,
                                                                      rows: list[int], one_slice: bool) -> None:
    """A batch read of scattered rows reads one slice over them only where that decodes at
    most a quarter more chunks than the ones holding the rows; else one read per run. A
    codec with a chunk per sample (SZ3, ZFP) read a sampler's batch 4x slower through
    one slice (every row between its blocks decoded; docs/benchmarks.md)."""
    import h5py

    from fmcache.backends.hdf5_reads import _slice_decodes_little_more
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        chunks = None if chunk_rows is None else (chunk_rows, 3)
        ds = fh.create_dataset("d", data=np.zeros((32, 3), np.float32), chunks=chunks)
        assert _slice_decodes_little_more(ds, np.array(rows)) is one_slice


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, 39), min_size=1, max_size=30))
def test_hdf5_per_sample_chunk_batches_match_single_reads(tmp_path: Path, order: list[int]) -> None:
    """ZFP stores a chunk per sample: batches of any rows (spans, runs, repeats) read
    through slices or runs give the rows that single reads give."""
    path = tmp_path / "z.h5"
    if not path.exists():
        _build(path, "hdf5", post_relu(np.random.default_rng(11), (40, 3, 4, 4)),
               TierPlan.single(3, "zfp:accuracy=0.01"), batch=7)
    with fmcache.open_cache(path) as cache:
        singles = np.stack([cache.read("l", i) for i in order])
        assert same_bits(cache.read_batch("l", order), singles)
        dataset = FeatureMapDataset(path)
        assert same_bits(dataset.get_batch(order)[0].numpy(), singles)


def test_hdf5_row_cache_shared_by_threads_gives_every_thread_the_right_rows(hdf5_of_97, monkeypatch) -> None:
    """Threads sharing one open HDF5 cache read per sample and in scattered batches
    through one row LRU of about three chunks, so entries are evicted under other
    threads' feet: every read is still bit-identical to a lone reader's, and nothing
    raises. (The GIL and h5py's lock leave the eviction race a narrow window, so this
    checks the values under shared use; the guards themselves are defensive.)"""
    from fmcache.backends import hdf5_backend
    path, _ = hdf5_of_97
    with fmcache.open_cache(path) as lone:
        expected = lone.read_batch("l", list(range(97)))
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", 3 * 4 * (4 * 9 * 2 + 9 + 8))
    monkeypatch.setattr(hdf5_backend, "ROWS_OPEN_CHUNKS", 0)
    failures: list[str] = []
    with fmcache.open_cache(path) as cache:
        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(40):
                    order = [int(i) for i in rng.integers(0, 97, size=int(rng.integers(2, 20)))]
                    if not same_bits(cache.read_batch("l", order), expected[order]):
                        failures.append(f"batch {order}")
                    i = int(rng.integers(0, 97))
                    if not same_bits(cache.read("l", i), expected[i]):
                        failures.append(f"sample {i}")
            except Exception as exc:  # noqa: BLE001 -- any error in a thread is a failure
                failures.append(repr(exc))

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


@pytest.mark.parametrize("spec", ["bf16", "fp16", "int8", "int4:cname=none", "raw", "zfp:accuracy=0.01"])
def test_hdf5_per_sample_reads_through_the_row_cache_match_batch_reads(tmp_path: Path, monkeypatch, spec: str) -> None:
    """Cache.read of HDF5 keeps the stored rows of whole chunks (an LRU); with a budget of
    about two chunks, a shuffled pass with repeats evicts and re-reads, and every sample
    is still bit-identical to the batch path."""
    from fmcache.backends import hdf5_backend
    rng = np.random.default_rng(6)
    maps = post_relu(rng, (37, 3, 8, 8))
    path = tmp_path / "c.h5"
    _build(path, "hdf5", maps, TierPlan.single(3, spec))
    monkeypatch.setattr(hdf5_backend, "ROW_CACHE_BYTES", 2 * 4 * 3 * 8 * 8 * 4)
    with fmcache.open_cache(path) as cache:
        every = cache.read_batch("l", list(range(37)))
        order = list(rng.permutation(37)) + [36, 0, 36, 4, 5, 3]
        for i in order:
            assert same_bits(cache.read("l", int(i)), every[i]), i
        rows = cache.backend.__dict__.get("_h_rows")
        if spec.startswith("zfp"):  # per-sample chunks of a native filter: the plain path
            assert not rows
        else:
            assert rows and cache.backend._h_rows_bytes <= hdf5_backend.ROW_CACHE_BYTES
            # each kept chunk read per sample holds its codec's row reader, built once
            assert all(chunk.reader is not None and chunk.count == len(chunk[next(iter(chunk))])
                       for chunk in rows.values())


def test_hdf5_row_cache_starts_empty_in_a_child_process(tmp_path: Path) -> None:
    """The row cache belongs to the process that filled it: a forked child (a DataLoader
    worker) starts its own, and reads the same values."""
    import multiprocessing as mp
    rng = np.random.default_rng(7)
    maps = post_relu(rng, (12, 3, 4, 4))
    path = tmp_path / "c.h5"
    _build(path, "hdf5", maps, TierPlan.single(3, "bf16"))
    with fmcache.open_cache(path) as cache:
        expected = cache.read("l", 9)
        assert cache.backend._h_rows
        cache.read("l", 0)  # chunk 0 too: the parent holds chunks 0 and 2
        ctx = mp.get_context("fork")  # the child inherits the parent's memory as is
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(cache, 9, queue))
        child.start()
        got, chunks = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert chunks == [2] and same_bits(got, expected)


def _read_in_child(cache, sample, queue):
    value = cache.read("l", sample)
    queue.put((value, sorted(k[2] for k in cache.backend._h_rows)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_child_reads_through_handles_of_its_own(tmp_path: Path, backend: str) -> None:
    """The read paths tell a forked child from its parent by ``pids.PID`` (``os.getpid()``
    without its system call, kept current by a fork hook): the child sees its own id and
    opens handles of its own, and reads the parent's values."""
    import multiprocessing as mp
    import os

    from fmcache.backends.pids import PID
    maps = post_relu(np.random.default_rng(8), (12, 3, 4, 4))
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    _build(path, backend, maps, TierPlan.single(3, "bf16"))
    assert PID[0] == os.getpid()
    with fmcache.open_cache(path) as cache:
        expected = cache.read("l", 5)
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_pid_and_read_in_child, args=(cache, 5, queue))
        child.start()
        pid, seen, opened_by, got = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert seen == pid == opened_by == child.pid != os.getpid()
        assert same_bits(got, expected) and cache.backend._pid == os.getpid()
        assert same_bits(cache.read("l", 5), expected)  # the parent's handles still read


def _pid_and_read_in_child(cache, sample, queue):
    import os

    from fmcache.backends.pids import PID
    value = cache.read("l", sample)
    queue.put((os.getpid(), PID[0], cache.backend._pid, value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saca_items_decode_only_the_nearest_variant_and_match_the_plain_composition(tmp_path: Path,
                                                                                   backend: str) -> None:
    rng = np.random.default_rng(6)
    n, shape, stride = 19, (6, 8, 8), 4
    names = sorted(variant_name(d) for d in default_variants(4, stride))
    plan = TierPlan.two_tier(6, [1, 4], "fp16", "int8")
    maps = post_relu(rng, (n, *shape))
    variants = {v: post_relu(rng, (n, *shape)) for v in names}
    path = tmp_path / ("s.h5" if backend == "hdf5" else "s.lmdb")
    family = AugFamily()
    with fmcache.create_cache(path, backend=backend,
                              build={"input_shape": [1, 32, 32], "augment_family": family.get_config()}) as writer:
        writer.add_layer("l", shape, plan=plan, variants=names, samples_per_chunk=4)
        writer.append({"l": maps}, np.arange(n), variants={"l": variants})
        writer.commit()
    dataset = FeatureMapDataset(path, augment="saca", seed=3)
    with fmcache.open_cache(path) as cache:
        every = list(range(n))
        base = cache.read_batch("l", every)
        stored = cache.read_parts("l", every, [f"sensitive@{v}" for v in names])
    sensitive = np.asarray(plan.tier("sensitive").channels)
    used = set()
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        order = list(rng.permutation(n))
        items = dataset.__getitems__(order)
        for i, (features, label) in zip(order, items):
            draw = family.draws(3, epoch, [int(i)]).draw(0)
            everything = {v: stored[f"sensitive@{v}"][i] for v in names}  # the plain path: all variants
            expected = augment_map("saca", base[i], draw, stride, sensitive, everything)
            assert same_bits(features.numpy(), expected)
            assert label == i
            used.add(nearest_variant(draw, names)[0])
    assert len(used) >= 3  # the draws exercised several variants and the identity


def _saca_cache(path: Path, backend: str, maps: np.ndarray, variants: dict[str, np.ndarray], plan: TierPlan,
                build: dict | None = None) -> None:
    with fmcache.create_cache(path, backend=backend, build=build) as writer:
        writer.add_layer("l", maps.shape[1:], plan=plan, variants=list(variants), samples_per_chunk=4)
        for start in range(0, len(maps), 7):
            sl = slice(start, start + 7)
            writer.append({"l": maps[sl]}, np.arange(start, min(start + 7, len(maps))),
                          variants={"l": {v: x[sl] for v, x in variants.items()}})
        writer.commit()


@pytest.mark.parametrize("backend", [*BACKENDS, "hdf5-picked-through-the-row-lru"])
@pytest.mark.parametrize("codecs", [("bf16", "int8"), ("blosc2", "int4"), ("fp16", "zfp:accuracy=0.01")])
def test_read_batch_picked_matches_read_batch_and_read_parts(tmp_path: Path, backend: str,
                                                            codecs: tuple[str, str], monkeypatch) -> None:
    if backend.startswith("hdf5-"):  # chunks of 4 samples: picked parts gathered from whole chunks too
        from fmcache.backends import hdf5_backend
        monkeypatch.setattr(hdf5_backend, "PICKED_CHUNK_ROWS", 4)
        backend = "hdf5"
    rng = np.random.default_rng(8)
    n, shape = 17, (5, 4, 4)
    plan = TierPlan.two_tier(5, [0, 3], *codecs)
    maps = post_relu(rng, (n, *shape))
    variants = {v: post_relu(rng, (n, *shape)) for v in ("flip", "dx+4", "dy-4")}
    path = tmp_path / ("p.h5" if backend == "hdf5" else "p.lmdb")
    _saca_cache(path, backend, maps, variants, plan)
    names = [None, *(f"sensitive@{v}" for v in variants)]
    with fmcache.open_cache(path) as cache:
        every = list(range(n))
        parts = cache.read_parts("l", every, [name for name in names if name])
        base_all = cache.read_batch("l", every)
        for trial in range(6):
            order = [int(i) for i in rng.integers(-n, n, size=int(rng.integers(1, 12)))]
            picks = [names[int(k)] for k in rng.integers(0, len(names), size=len(order))]
            if trial == 0:
                picks = [None] * len(order)  # nothing picked: picked is (n, 0)
            base, picked = cache.read_batch_picked("l", order, picks)
            assert same_bits(base, base_all[order])
            assert picked.shape == ((len(order), 2, 4, 4) if any(picks) else (len(order), 0))
            for row, (i, pick) in enumerate(zip(order, picks)):
                if pick is not None:
                    assert same_bits(picked[row], parts[pick][i])
            # replace: each picking row's sensitive tier is its pick, the rest as stored
            tiers, none = cache.read_batch_picked("l", order, picks, merged=False, replace="sensitive")
            assert none.shape == (len(order), 0)
            own = cache.read_parts("l", order)
            assert same_bits(tiers["bulk"], own["bulk"])
            expected = np.stack([parts[p][i] if p else own["sensitive"][row]
                                 for row, (i, p) in enumerate(zip(order, picks))])
            assert same_bits(tiers["sensitive"], expected)
            maps, _ = cache.read_batch_picked("l", order, picks, replace="sensitive")
            assert same_bits(maps, plan.merge({"bulk": own["bulk"], "sensitive": expected}, batched=True))
        with pytest.raises(CacheError, match="no tier 'nope' to replace"):
            cache.read_batch_picked("l", [0, 1], [None, "sensitive@flip"], replace="nope")
        with pytest.raises(ShapeMismatchError, match="tier 'bulk'"):
            cache.read_batch_picked("l", [0, 1], [None, "sensitive@flip"], replace="bulk")
        with pytest.raises(CacheError, match="no stored part 'sensitive@nope'"):
            cache.read_batch_picked("l", [0, 1], [None, "sensitive@nope"])
        with pytest.raises(ValueError, match="1 picks for 2 samples"):
            cache.read_batch_picked("l", [0, 1], [None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_batch_picked_across_shards(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(9)
    n, shape = 12, (4, 4, 4)
    plan = TierPlan.two_tier(4, [1], "fp16", "int8")
    maps = post_relu(rng, (n, *shape))
    variants = {"flip": post_relu(rng, (n, *shape))}
    suffix = ".h5" if backend == "hdf5" else ".lmdb"
    shards = []
    for start, stop in ((0, 5), (5, 12)):
        shard = tmp_path / f"shard{start}{suffix}"
        _saca_cache(shard, backend, maps[start:stop], {v: x[start:stop] for v, x in variants.items()}, plan,
                    build={"shard": {"start": start, "stop": stop}, "samples_total": n})
        shards.append(shard)
    merged = fmcache.open_cache(merge_shards(shards, tmp_path / "merged"))
    order = [11, 0, 4, 5, 3, 9]
    picks = ["sensitive@flip", None, None, "sensitive@flip", None, "sensitive@flip"]
    base, picked = merged.read_batch_picked("l", order, picks)
    assert same_bits(base, merged.read_batch("l", order))
    flip = merged.read_parts("l", order, ["sensitive@flip"])["sensitive@flip"]
    for row in (0, 3, 5):
        assert same_bits(picked[row], flip[row])
    # sample 0's shard picks nothing, sample 7's shard picks: the (k, 0) piece is skipped
    base, picked = merged.read_batch_picked("l", [0, 7], [None, "sensitive@flip"])
    assert same_bits(picked[1], merged.read_parts("l", [7], ["sensitive@flip"])["sensitive@flip"][0])
    tiers, none = merged.read_batch_picked("l", order, picks, merged=False, replace="sensitive")
    own = merged.read_parts("l", order)
    assert none.shape == (len(order), 0) and same_bits(tiers["bulk"], own["bulk"])
    assert same_bits(tiers["sensitive"], np.stack([flip[r] if picks[r] else own["sensitive"][r]
                                                   for r in range(len(order))]))
    merged.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(post_relu_maps(), feature_maps(max_abs=1e3)), spec=st.sampled_from(CODECS))
def test_verified_decoder_equals_decode_verified(x: np.ndarray, spec: str) -> None:
    """Every codec's per-sample decoder (bf16's specialised one included) gives
    decode_verified's bits, into the caller's array."""
    codec = codec_from_spec(spec)
    record = codec.encode(x)
    expected = codec.decode_verified(record)
    out = np.full(x.shape, np.nan, dtype=np.float32)
    got = codec.verified_decoder(x.shape)(memoryview(record), out)
    assert got is out and same_bits(out, expected)


def test_bf16_verified_decoder_hands_anything_unusual_to_the_general_path() -> None:
    """A record of another shape or stage, a shortened or lengthened one, or a damaged
    shape header, stage byte or frame size: the same outcome as decode_verified (its
    numbers or its error), never a blosc2 call on sizes that do not add up. (Flips inside
    the frame body are the storage CRC's to catch: tests/test_reliability_corruption.py.)"""
    codec = codec_from_spec("bf16")
    x = post_relu(np.random.default_rng(6), (16, 8, 8))
    good = codec.encode(x)
    decode = codec.verified_decoder(x.shape)
    frame_at = 1 + 4 * 3 + 1 + 4
    cases = {
        "good": good,
        "stage-1 record": codec_from_spec("bf16:cname=none").encode(x),
        "another shape": codec.encode(x.reshape(16, 4, 16)),
        "fewer dims": codec.encode(x.reshape(16, 64)),
        "truncated": good[:-1],
        "one byte more": good + b"\0",
        "shorter than its header": good[:10],
    }
    for position in (0, 1, 5, 9, 13, frame_at + 4, frame_at + 7, frame_at + 12, frame_at + 15):
        bad = bytearray(good)  # ndim, dims, stage byte, the frame's nbytes and cbytes
        bad[position] ^= 0x5A
        cases[f"byte {position} flipped"] = bytes(bad)
    for what, data in cases.items():
        try:
            expected: np.ndarray | type[Exception] = codec.decode_verified(data, out=np.empty(x.shape, np.float32))
        except (CorruptionError, ValueError) as exc:
            expected = type(exc)
        out = np.full(x.shape, np.nan, dtype=np.float32)
        if isinstance(expected, np.ndarray):
            assert same_bits(decode(memoryview(data), out), expected), what
        else:
            with pytest.raises(expected):
                decode(memoryview(data), out)
    assert same_bits(decode(memoryview(good), np.empty(x.shape, np.float32)), codec.decode(good))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=post_relu_maps(), kinds=st.lists(st.sampled_from(["stage2", "stage1", "bytes", "other shape"]),
                                          min_size=1, max_size=5))
def test_bf16_verified_batch_decode_equals_row_by_row(x: np.ndarray, kinds: list[str]) -> None:
    """bf16's batch decode of verified payloads (one specialised call per row) gives each
    row decode_verified's bits, stage-1 records and bytes among them; a record of another
    shape fails the batch as it does row by row."""
    codec = codec_from_spec("bf16")
    stage1 = codec_from_spec("bf16:cname=none")
    payloads: list[bytes | memoryview] = []
    for k, kind in enumerate(kinds):
        m = x * (k + 1)
        if kind == "stage1":
            payloads.append(memoryview(stage1.encode(m)))
        elif kind == "bytes":
            payloads.append(codec.encode(m))
        elif kind == "other shape":
            payloads.append(memoryview(codec.encode(m.reshape(-1))))
        else:
            payloads.append(memoryview(codec.encode(m)))
    out = np.full((len(kinds), *x.shape), np.nan, dtype=np.float32)
    if "other shape" in kinds and x.ndim != 1:
        with pytest.raises((CorruptionError, ValueError)):
            codec.decode_batch_verified(payloads, out)
        return
    assert codec.decode_batch_verified(payloads, out) is out
    for row, payload in enumerate(payloads):
        assert same_bits(out[row], codec.decode_verified(payload))


@pytest.mark.parametrize("spec", ["zfp:accuracy=0.01", "sz3:abs=0.001", "zfp:rate=12"])
def test_hdf5_per_sample_reads_of_chunk_per_sample_parts_match_batch_reads(tmp_path: Path, spec: str) -> None:
    """ZFP / SZ3 parts (a chunk per sample) take their own per-sample path (one slice per
    field, no batch bookkeeping): the same bits as batch reads, in any order; a dataset
    cut short names the first missing sample."""
    import h5py

    from fmcache.backends.hdf5_backend import dataset_path
    rng = np.random.default_rng(13)
    maps = post_relu(rng, (23, 3, 8, 8))
    maps[5] -= 0.5  # a sample with negative values: not clamped
    path = tmp_path / "c.h5"
    _build(path, "hdf5", maps, TierPlan.single(3, spec))
    with fmcache.open_cache(path) as cache:
        assert cache.backend._entries("l", "all")[1] is not None
        every = cache.read_batch("l", list(range(23)))
        assert every[5].min() < 0
        for i in rng.permutation(23):
            assert same_bits(cache.read("l", int(i)), every[i]), i
        out = np.empty((3, 8, 8), np.float32)
        assert cache.read("l", 22, out=out) is out and same_bits(out, every[22])
    with h5py.File(path, "r+") as fh:
        fh[dataset_path("l", "all", "values")].resize(20, axis=0)
    with fmcache.open_cache(path) as cache:
        assert same_bits(cache.read("l", 19), every[19])
        with pytest.raises(CorruptionError, match=r"layer 'l' part 'all' sample 21: the dataset stops at sample 20"):
            cache.read("l", 21)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(post_relu_maps(), feature_maps(max_abs=6e4)), spec=st.sampled_from(
    ["bf16", "fp16", "bf16:cname=none", "int8", "raw", "grid:abs=0.02", "grid:rel=0.01"]), layout=st.sampled_from(["plain", "readonly", "strided"]))
def test_hdf5_row_reader_equals_from_hdf5_into(x: np.ndarray, spec: str, layout: str) -> None:
    """A codec's per-chunk row reader (the HDF5 backend's per-sample path) decodes each
    row to the same bits as ``from_hdf5_into`` of that row alone, NaN / Inf included;
    stored rows it cannot view (read-only, strided) take the general reader; for the
    casts' and grid's own readers an ``out`` of another shape is a ValueError, not a
    broadcast (grid: the zero map of a ``rel`` codec and the 6e4 maps of ``abs=0.02`` are
    stored exactly, NaN step)."""
    codec = codec_from_spec(spec)
    x = x.copy()
    if codec.stores_nonfinite:
        x.flat[0], x.flat[-1] = np.nan, -np.inf
    batch = np.stack([x, x[::-1].copy(), np.zeros_like(x)])
    rows = codec.to_hdf5(batch)
    if layout == "readonly":
        for r in rows.values():
            r.flags.writeable = False
    elif layout == "strided":
        rows = {name: np.repeat(r, 2, axis=0)[::2] for name, r in rows.items()}
    read = codec.hdf5_row_reader(rows)
    for k in range(len(batch)):
        expected = codec.from_hdf5_into({name: r[k:k + 1] for name, r in rows.items()},
                                        np.empty((1, *x.shape), np.float32))[0]
        out = np.full(x.shape, 7.0, np.float32)
        assert read(k, out) is out and same_bits(out, expected), k
    if spec.startswith(("bf16", "fp16", "grid")) and layout == "plain":  # their own readers check the shape
        with pytest.raises(ValueError):
            read(0, np.empty((1, *x.shape), np.float32))


@pytest.mark.parametrize("shape, plan", [
    ((1,), TierPlan.single(1, "zfp:accuracy=0.01")),
    ((1, 1, 1), TierPlan.single(1, "zfp:rate=8")),
    ((8, 1, 1), TierPlan.two_tier(8, [7], "zfp:accuracy=0.01", "int8")),  # a one-channel ZFP tier
], ids=["1", "1x1x1", "8x1x1-two-tier"])
def test_hdf5_zfp_chunks_hdf5_stored_unfiltered_read_back(tmp_path: Path, shape, plan) -> None:
    """HDF5 skips its optional ZFP filter on a chunk the filter cannot shrink (one value a
    sample) and marks the chunk's filter mask; the chunk-index check took every such mask
    for damage, so the committed cache could never be read (a new-user sweep). With the
    index digest recorded at commit, masks as committed are accepted."""
    rng = np.random.default_rng(11)
    maps = rng.random((10, *shape)).astype(np.float32)
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path, backend="hdf5") as writer:
        writer.add_layer("l", shape, plan=plan, samples_per_chunk=4)
        writer.append({"l": maps}, np.arange(10))
        writer.commit()
    with fmcache.open_cache(path) as cache:
        got = cache.read_batch("l", range(10))
        assert np.abs(got - maps).max() <= 0.01  # zfp:accuracy=0.01 (a one-value chunk is stored as is)
        assert np.array_equal(cache.read("l", 9), got[9])
    from fmcache.verify import verify_cache
    assert verify_cache(path).samples == 10
