"""Packed layers: tiers that share one channel-wise codec stored as one part.

A packed layer must read, through every path (``read``, ``read_batch``, ``read_parts``,
``read_batch_picked``, Dataset items of each augment mode, shards, DataLoader workers),
bit for bit what the same layer stored tier by tier reads; the manifest must say which it
is and refuse a damaged claim; ``h5dump`` must print the packed part's values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import hdf5plugin
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import realistic_post_relu

import fmcache
from fmcache import FeatureMapDataset, TierPlan
from fmcache.augment import AugFamily, default_variants, variant_name
from fmcache.codecs import codec_from_spec
from fmcache.compact import compact_cache
from fmcache.errors import CacheError, CorruptionError
from fmcache.manifest import WHOLE_PART, LayerInfo
from fmcache.report import inspect_cache, render_table
from fmcache.shards import ShardedCache, merge_shards

BACKENDS = ("lmdb", "hdf5")
CHANNELWISE = ("raw", "blosc2", "fp16", "bf16", "bf16:cname=zstd,clevel=1,shuffle=bit", "int8", "int4")
STRIDE = 4
NAMES = sorted(variant_name(d) for d in default_variants(4, STRIDE))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _write(path, backend, maps, variants, plan, packed, *, spc=4, labels=None):
    build = {"input_shape": [1, STRIDE * maps.shape[-2], STRIDE * maps.shape[-1]],
             "augment_family": AugFamily().get_config()}
    with fmcache.create_cache(path, backend=backend, build=build) as writer:
        writer.add_layer("l", maps.shape[1:], plan=plan, variants=list(variants), samples_per_chunk=spc,
                         packed=packed)
        n = len(maps)
        for start in range(0, n, 5):
            sl = slice(start, start + 5)
            writer.append({"l": maps[sl]}, np.arange(start, min(start + 5, n)) if labels is None else labels[sl],
                          variants={"l": {v: x[sl] for v, x in variants.items()}} if variants else None)
        writer.commit()
    return path


def _pair(tmp_path, backend, maps, variants, plan, **kw):
    suffix = ".h5" if backend == "hdf5" else ".lmdb"
    tiers = _write(tmp_path / f"tiers{suffix}", backend, maps, variants, plan, False, **kw)
    packed = _write(tmp_path / f"packed{suffix}", backend, maps, variants, plan, None, **kw)
    return tiers, packed


def _data(seed, n, shape, sensitive, codec="bf16"):
    rng = np.random.default_rng(seed)
    maps = np.stack([realistic_post_relu(rng, shape) for _ in range(n)]).astype(np.float32)
    variants = {v: np.roll(maps, k + 1, axis=-1) for k, v in enumerate(NAMES)}
    channels = shape[0] if len(shape) >= 3 else shape[-1]
    return maps, variants, TierPlan.two_tier(channels, sensitive, codec, codec)


# ---- the codec property packing rests on ---------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(CHANNELWISE), seed=st.integers(0, 2**31), c=st.integers(2, 9),
       hw=st.sampled_from([(1, 1), (3, 5), (8, 8)]), data=st.data())
def test_a_channelwise_codec_decodes_a_channel_alike_whatever_shares_its_map(spec, seed, c, hw, data):
    codec = codec_from_spec(spec)
    assert codec.channelwise
    x = realistic_post_relu(np.random.default_rng(seed), (c, *hw))
    subset = sorted(data.draw(st.sets(st.integers(0, c - 1), min_size=1, max_size=c)))
    whole = codec.decode(codec.encode(x))
    alone = codec.decode(codec.encode(np.ascontiguousarray(x[subset])))
    assert same_bits(np.ascontiguousarray(whole[subset]), alone)


@pytest.mark.parametrize("spec", ["sz3:rel=0.05", "zfp:accuracy=0.01", "grid:rel=0.05"])
def test_error_bounded_codecs_are_not_channelwise_and_their_tiers_stay_apart(tmp_path, spec):
    assert not codec_from_spec(spec).channelwise
    plan = TierPlan.two_tier(4, [1], spec, spec)
    assert plan.shared_codec() is None
    maps = realistic_post_relu(np.random.default_rng(1), (6, 4, 5, 5))
    path = _write(tmp_path / "c.lmdb", "lmdb", maps, {}, plan, None)
    with fmcache.open_cache(path) as cache:
        assert not cache.layers["l"].packed
        assert sorted(cache.read_parts("l", [0])) == ["bulk", "sensitive"]
    with pytest.raises(CacheError, match="packed=True needs tiers that share one channel-wise codec"):
        _write(tmp_path / "d.lmdb", "lmdb", maps, {}, plan, True)


def test_tiers_with_different_codecs_are_not_packed_and_packed_true_is_refused(tmp_path):
    plan = TierPlan.two_tier(4, [1], "int8", "int4")
    maps = realistic_post_relu(np.random.default_rng(1), (6, 4, 5, 5))
    with fmcache.open_cache(_write(tmp_path / "c.h5", "hdf5", maps, {}, plan, None)) as cache:
        assert not cache.layers["l"].packed
    with pytest.raises(CacheError, match="packed=True"):
        _write(tmp_path / "d.h5", "hdf5", maps, {}, plan, True)


# ---- every read path, packed vs tier by tier -------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), codec=st.sampled_from(["bf16", "fp16", "int8", "raw"]),
       sensitive=st.sets(st.integers(0, 7), min_size=1, max_size=7), spc=st.sampled_from([1, 4, 32]))
def test_every_read_path_of_a_packed_layer_equals_the_tier_by_tier_layout(tmp_path_factory, backend, seed, codec,
                                                                           sensitive, spc):
    tmp = tmp_path_factory.mktemp("packed")
    maps, variants, plan = _data(seed, 13, (8, 6, 6), sorted(sensitive), codec)
    a, b = _pair(tmp, backend, maps, variants, plan, spc=spc)
    rng = np.random.default_rng(seed)
    with fmcache.open_cache(a) as tiers, fmcache.open_cache(b) as packed:
        assert not tiers.layers["l"].packed and packed.layers["l"].packed
        assert sorted(packed.read_parts("l", [0])) == sorted([WHOLE_PART, *(f"sensitive@{v}" for v in NAMES)])
        order = rng.permutation(13).tolist() + [3, 3, -1]
        assert same_bits(packed.read_batch("l", order), tiers.read_batch("l", order))
        for i in (0, 7, -2):
            assert same_bits(packed.read("l", i), tiers.read("l", i))
        out = np.empty((8, 6, 6, 3), dtype=np.float32)[..., 0]  # not contiguous
        assert same_bits(packed.read("l", 5, out=out).copy(), tiers.read("l", 5))
        wanted = ["bulk", f"sensitive@{NAMES[0]}", "sensitive"]
        got, want = packed.read_parts("l", order, wanted), tiers.read_parts("l", order, wanted)
        assert list(got) == wanted and all(same_bits(got[k], want[k]) for k in wanted)
        picks = [None if k % 3 == 0 else f"sensitive@{NAMES[k % len(NAMES)]}" for k in range(len(order))]
        for merged in (True, False):
            for replace in (None, "sensitive"):
                got_base, got_picked = packed.read_batch_picked("l", order, picks, merged=merged, replace=replace)
                want_base, want_picked = tiers.read_batch_picked("l", order, picks, merged=merged, replace=replace)
                if merged:
                    assert same_bits(got_base, want_base)
                else:
                    assert sorted(got_base) == sorted(want_base)
                    assert all(same_bits(np.ascontiguousarray(got_base[k]), want_base[k]) for k in want_base)
                rows = [r for r, p in enumerate(picks) if p is not None]
                if replace is None:
                    assert same_bits(got_picked[rows], want_picked[rows])
                else:
                    assert got_picked.shape == want_picked.shape == (len(order), 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["none", "feature", "saca"])
def test_dataset_items_of_a_packed_layer_are_bit_identical(tmp_path, backend, augment):
    maps, variants, plan = _data(11, 37, (8, 8, 8), [0, 3, 4])
    a, b = _pair(tmp_path, backend, maps, variants, plan)
    tiers, packed = (FeatureMapDataset(p, augment=augment, seed=5) for p in (a, b))
    for epoch in (0, 1, 2):
        for d in (tiers, packed):
            d.set_epoch(epoch)
        order = np.random.default_rng(epoch).permutation(37).tolist()
        got, want = packed.get_batch(order), tiers.get_batch(order)
        assert same_bits(got[0].numpy(), want[0].numpy()) and torch.equal(got[1], want[1])
        items = packed.__getitems__(order[:5])
        assert all(same_bits(x.numpy(), want[0][k].numpy()) for k, (x, _) in enumerate(items))
    if augment == "saca":  # the draws reached cached variants and the base's own channels
        chosen = fmcache.augment.batch.nearest_batch(AugFamily().draws(5, 2, np.arange(37)), NAMES)[0]
        assert "identity" in chosen and len(set(chosen)) >= 3


def test_token_maps_pack_too(tmp_path):
    rng = np.random.default_rng(2)
    maps = np.stack([realistic_post_relu(rng, (7, 6)) for _ in range(9)])
    plan = TierPlan.two_tier(6, [2, 5], "bf16", "bf16")
    a, b = _pair(tmp_path, "lmdb", maps, {"flip": maps[:, ::-1].copy()}, plan)
    with fmcache.open_cache(a) as tiers, fmcache.open_cache(b) as packed:
        assert packed.layers["l"].packed
        picks = ["sensitive@flip", None] * 4 + [None]
        for merged in (True, False):
            got, _ = packed.read_batch_picked("l", range(9), picks, merged=merged, replace="sensitive")
            want, _ = tiers.read_batch_picked("l", range(9), picks, merged=merged, replace="sensitive")
            if merged:
                assert same_bits(got, want)
            else:
                assert all(same_bits(np.ascontiguousarray(got[k]), want[k]) for k in want)


def test_workers_read_a_packed_saca_layer_like_the_main_process(tmp_path):
    maps, variants, plan = _data(4, 40, (8, 8, 8), [1, 6])
    path = _write(tmp_path / "c.lmdb", "lmdb", maps, variants, plan, None)
    dataset = FeatureMapDataset(path, augment="saca", seed=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, shuffle=False)
    got = torch.cat([x for x, _ in loader])
    want = dataset.get_batch(list(range(40)))[0]
    assert same_bits(got.numpy(), want.numpy())


def test_shards_of_a_packed_layer_read_as_one_cache(tmp_path):
    maps, variants, plan = _data(8, 20, (8, 4, 4), [2, 3])
    shards = []
    for k, (lo, hi) in enumerate([(0, 8), (8, 20)]):
        path = tmp_path / f"s{k}.lmdb"
        with fmcache.create_cache(path, build={"shard": {"start": lo, "stop": hi}, "samples_total": 20}) as w:
            w.add_layer("l", (8, 4, 4), plan=plan, variants=NAMES)
            w.append({"l": maps[lo:hi]}, np.arange(lo, hi),
                     variants={"l": {v: x[lo:hi] for v, x in variants.items()}})
            w.commit()
        shards.append(path)
    whole = _write(tmp_path / "one.lmdb", "lmdb", maps, variants, plan, False)
    merged = ShardedCache(merge_shards(shards, tmp_path / "merged"))
    with fmcache.open_cache(whole) as one:
        assert merged.layers["l"].packed
        order = [19, 0, 8, 7, 12]
        picks = [f"sensitive@{NAMES[0]}", None, f"sensitive@{NAMES[1]}", None, None]
        for merged_flag in (True, False):
            got, _ = merged.read_batch_picked("l", order, picks, merged=merged_flag, replace="sensitive")
            want, _ = one.read_batch_picked("l", order, picks, merged=merged_flag, replace="sensitive")
            if merged_flag:
                assert same_bits(got, want)
            else:
                assert all(same_bits(np.ascontiguousarray(got[k]), want[k]) for k in want)
    merged.close()


def test_shards_packed_one_way_and_tier_by_tier_the_other_are_not_merged(tmp_path):
    maps, _, plan = _data(8, 6, (8, 4, 4), [2, 3])
    paths = []
    for k, (packed, lo, hi) in enumerate([(None, 0, 3), (False, 3, 6)]):
        path = tmp_path / f"s{k}.lmdb"
        with fmcache.create_cache(path, build={"shard": {"start": lo, "stop": hi}, "samples_total": 6}) as w:
            w.add_layer("l", (8, 4, 4), plan=plan, packed=packed)
            w.append({"l": maps[lo:hi]}, np.arange(lo, hi))
            w.commit()
        paths.append(path)
    with pytest.raises(CacheError, match="packing differ"):
        merge_shards(paths, tmp_path / "merged")


# ---- manifest, resume, compact, inspect, h5dump ----------------------------------------------
def test_the_manifest_records_packing_and_refuses_a_damaged_claim():
    plan = TierPlan.two_tier(4, [1], "bf16", "bf16")
    info = LayerInfo(name="l", shape=(4, 2, 2), plan=plan, samples_per_chunk=8, packed=True)
    entry = info.to_dict()
    assert entry["packed"] is True and LayerInfo.from_dict(entry).packed
    older = {k: v for k, v in entry.items() if k != "packed"}  # format 1-4: no key, tier by tier
    assert not LayerInfo.from_dict(older).packed
    assert "packed" not in LayerInfo.from_dict(older).to_dict()
    manifest = fmcache.Manifest(backend="lmdb", layers={"l": info}, samples=1)
    for bad, message in ((dict(entry, packed="yes"), "'packed' must be true or false"),
                         (dict(entry, plan=TierPlan.two_tier(4, [1], "bf16", "int8").to_dict()),
                          "marked packed, but its tiers do not share")):
        doc = dict(manifest.to_dict(), layers=[bad])
        with pytest.raises(CorruptionError, match=message):
            fmcache.Manifest.from_json(json.dumps(doc))


def test_resume_keeps_the_layout_the_build_began_with(tmp_path):
    maps, _, plan = _data(3, 10, (8, 4, 4), [1])
    path = tmp_path / "c.lmdb"
    writer = fmcache.create_cache(path)
    writer.add_layer("l", (8, 4, 4), plan=plan, packed=False)
    writer.append({"l": maps[:5]}, np.arange(5))
    writer.close()  # interrupted: no commit
    with fmcache.create_cache(path, resume=True) as again:
        info = again.add_layer("l", (8, 4, 4), plan=plan)  # packed=None: what the build began with
        assert not info.packed
        again.append({"l": maps[5:]}, np.arange(5, 10))
        again.commit()
    with fmcache.open_cache(path) as cache:
        assert not cache.layers["l"].packed
        bf16 = codec_from_spec("bf16")  # element-wise: the batch as one map decodes alike
        assert same_bits(cache.read_batch("l", range(10)), bf16.decode(bf16.encode(maps)))
        assert sorted(cache.read_parts("l", [0])) == ["bulk", "sensitive"]


def test_compact_keeps_a_packed_layer_packed_and_packs_an_old_one(tmp_path):
    maps, variants, plan = _data(6, 12, (8, 4, 4), [0, 5])
    src = _write(tmp_path / "src.lmdb", "lmdb", maps, variants, plan, None)
    same = compact_cache(src, tmp_path / "same.h5", backend="hdf5")
    assert same.layers["l"].packed
    looser = compact_cache(src, tmp_path / "int8.lmdb", codec="int8")
    assert looser.layers["l"].packed  # one codec for every tier: still one part
    with fmcache.open_cache(src) as a, fmcache.open_cache(tmp_path / "same.h5") as b:
        assert same_bits(a.read_batch("l", range(12)), b.read_batch("l", range(12)))
        wanted = [f"sensitive@{v}" for v in NAMES]
        got, want = b.read_parts("l", range(12), wanted), a.read_parts("l", range(12), wanted)
        assert all(same_bits(got[k], want[k]) for k in wanted)
    unpacked = _write(tmp_path / "tiers.lmdb", "lmdb", maps, variants, plan, False)
    again = compact_cache(unpacked, tmp_path / "again.lmdb")
    assert again.layers["l"].packed  # compact writes the current layout


def test_inspect_shows_one_stored_part_for_the_tiers(tmp_path):
    maps, variants, plan = _data(6, 12, (8, 4, 4), [0, 5])
    path = _write(tmp_path / "c.lmdb", "lmdb", maps, variants, plan, None)
    summary = inspect_cache(path)
    layer = summary["layers"]["l"]
    assert layer["packed"] is True
    assert [sorted(t) for t in layer["tiers"]] == [["channels", "codec", "name"]] * 2  # no per-tier bytes
    assert layer["raw_bytes"] == 12 * 8 * 4 * 4 * 4 and 0 < layer["stored_bytes"] < layer["raw_bytes"]
    table = render_table(summary)
    row = next(line for line in table.splitlines() if "(packed)" in line)
    assert row.split()[1] == "8" and "bf16" in row and "6.0 KiB" in row


H5DUMP = shutil.which("h5dump")


@pytest.mark.skipif(H5DUMP is None, reason="h5dump missing: `make setup` installs hdf5-tools")
def test_h5dump_prints_the_packed_part_as_the_whole_map(tmp_path):
    maps, _, plan = _data(9, 3, (4, 3, 5), [1, 2], codec="raw")
    path = _write(tmp_path / "c.h5", "hdf5", maps, {}, plan, None)
    env = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}
    proc = subprocess.run([H5DUMP, "-m", "%.9g", "-y", "-w", "0", "-d", f"/layers/l/{WHOLE_PART}/values", str(path)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout[proc.stdout.index("DATA {") + len("DATA {"):]
    values = np.array([float(v) for v in body[:body.index("}")].replace(",", " ").split()], dtype=np.float32)
    assert same_bits(values, maps.reshape(-1))


# ---- HDF5: picked variants gathered from whole chunks in one pass ---------------------------
@pytest.mark.parametrize("packed", [None, False])
def test_hdf5_picked_rows_from_cached_chunks_equal_lmdbs(tmp_path, packed):
    """Chunks of 32 samples (the picked rows come from the row LRU, every name in one pass
    and one decode) read what LMDB reads, bit for bit, for any mix of picks and repeats."""
    maps, variants, plan = _data(12, 100, (8, 4, 4), [1, 6])
    h5 = _write(tmp_path / "c.h5", "hdf5", maps, variants, plan, packed, spc=32)
    ref = _write(tmp_path / "c.lmdb", "lmdb", maps, variants, plan, packed, spc=32)
    rng = np.random.default_rng(0)
    with fmcache.open_cache(h5) as a, fmcache.open_cache(ref) as b:
        assert a.backend._rows_fit("l")
        for trial in range(6):
            order = rng.integers(0, 100, 40).tolist()
            picks = [None if rng.random() < 0.2 else f"sensitive@{NAMES[int(rng.integers(len(NAMES)))]}"
                     for _ in order]
            if trial == 0:
                picks = [f"sensitive@{NAMES[0]}"] * len(order)  # every row: decoded into place
            for replace in (None, "sensitive"):
                got, got_picked = a.read_batch_picked("l", order, picks, replace=replace)
                want, want_picked = b.read_batch_picked("l", order, picks, replace=replace)
                assert same_bits(got, want)
                rows = [r for r, p in enumerate(picks) if p is not None]
                assert same_bits(got_picked[rows], want_picked[rows])


def test_hdf5_picked_rows_of_a_variant_cut_short_name_the_missing_sample(tmp_path):
    import h5py

    from fmcache.backends.hdf5_backend import dataset_path
    maps, variants, plan = _data(12, 70, (8, 4, 4), [1, 6])
    path = _write(tmp_path / "c.h5", "hdf5", maps, variants, plan, None, spc=32)
    with h5py.File(path, "r+") as fh:
        fh[dataset_path("l", f"sensitive@{NAMES[2]}", "bits")].resize(50, axis=0)
    with fmcache.open_cache(path) as cache:
        ok, _ = cache.read_batch_picked("l", [3, 60], [f"sensitive@{NAMES[1]}", None])
        assert ok.shape == (2, 8, 4, 4)
        with pytest.raises(CorruptionError, match=r"sample 61: the dataset stops at sample 50"):
            cache.read_batch_picked("l", [3, 61, 10], [f"sensitive@{NAMES[1]}", f"sensitive@{NAMES[2]}", None])
