"""FeatureMapDataset: dtypes, augmentation determinism, batch reads, token maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fmcache
from fmcache import FeatureMapDataset
from fmcache.augment import AugFamily, apply_feature
from fmcache.dataset import collate
from fmcache.errors import CacheError, FmcacheError


def _cache(tmp_path, shape=(4, 8, 8), n=12, build=None, name="c.lmdb"):
    rng = np.random.default_rng(0)
    x = (rng.random((n, *shape)) * (rng.random((n, *shape)) > 0.4)).astype(np.float32)
    path = tmp_path / name
    with fmcache.create_cache(path, build=build or {"input_shape": [1, 16, 16]}) as w:
        w.add_layer("l", shape, codec="raw", samples_per_chunk=4)
        w.append({"l": x}, np.arange(n) % 3)
        w.commit()
    return path, x


def test_items_are_the_stored_maps_and_labels(tmp_path):
    path, x = _cache(tmp_path)
    ds = FeatureMapDataset(path)
    assert len(ds) == 12 and ds.layer == "l"
    fmap, label = ds[5]
    assert fmap.dtype == torch.float32 and label == 5 % 3
    np.testing.assert_array_equal(fmap.numpy(), x[5])
    np.testing.assert_array_equal(ds[-1][0].numpy(), x[11])


def test_bf16_on_request(tmp_path):
    path, x = _cache(tmp_path)
    fmap, _ = FeatureMapDataset(path, dtype="bf16")[3]
    assert fmap.dtype == torch.bfloat16
    np.testing.assert_array_equal(fmap.float().numpy(), torch.from_numpy(x[3]).to(torch.bfloat16).float().numpy())


def test_batch_reads_equal_item_reads(tmp_path):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    ds.set_epoch(2)
    batch = ds.__getitems__([7, 0, 7, 11])
    for (a, la), i in zip(batch, [7, 0, 7, 11]):
        b, lb = ds[i]
        assert torch.equal(a, b) and la == lb


@pytest.mark.parametrize("make", [np.array, torch.tensor, lambda v: np.array(v, dtype=np.int32), tuple],
                         ids=["numpy", "torch", "int32", "tuple"])
def test_batches_take_index_arrays_as_cache_read_batch_does(tmp_path, make):
    """``get_batch(np.array([...]))`` raised numpy's "truth value of an array is ambiguous"
    (torch's likewise) where ``Cache.read_batch`` takes the same arrays."""
    path, x = _cache(tmp_path)
    ds = FeatureMapDataset(path)
    rows = [7, 0, 11, 7]
    maps, labels = ds.get_batch(make(rows))
    np.testing.assert_array_equal(maps.numpy(), x[rows])
    assert labels.tolist() == [r % 3 for r in rows]
    assert [int(y) for _, y in ds.__getitems__(make(rows))] == [r % 3 for r in rows]
    np.testing.assert_array_equal(ds[make([5])[0]][0].numpy(), x[5])  # a numpy / torch scalar index


def test_feature_augmentation_is_t_a_of_the_seeded_draw(tmp_path):
    path, x = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=7)
    assert ds.stride == 2  # 16x16 input, 8x8 maps
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in (0, 4, 9):
            draw = AugFamily().draws(7, epoch, [i]).draw(0)
            np.testing.assert_array_equal(ds[i][0].numpy(), apply_feature(x[i], draw, 2))
    ds.set_epoch(0)
    e0 = torch.stack([ds[i][0] for i in range(12)])
    ds.set_epoch(1)
    e1 = torch.stack([ds[i][0] for i in range(12)])
    assert not torch.equal(e0, e1)


def test_token_maps_are_served_unchanged_by_feature_augmentation(tmp_path):
    path, x = _cache(tmp_path, shape=(5, 6))
    ds = FeatureMapDataset(path, augment="feature")
    np.testing.assert_array_equal(ds[2][0].numpy(), x[2])


def test_sampler_matches_the_storage_chunks(tmp_path):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path)
    sampler = ds.sampler(buffer_chunks=1)
    assert sampler.chunk_size == 4
    order = list(sampler)
    assert sorted(order) == list(range(12))
    assert sorted(ds.sampler(shuffle="exact")) == list(range(12))


@pytest.mark.parametrize("kwargs, message", [({"augment": "mixup"}, "unknown augment mode"),
                                             ({"augment": "saca"}, "no 'sensitive' tier"),
                                             ({"dtype": "int8"}, "dtype"),
                                             # stride=0 was taken for stride 1: shifts by other amounts
                                             ({"augment": "feature", "stride": 0}, "stride=0"),
                                             ({"augment": "feature", "stride": 1.5}, "stride=1.5"),
                                             ({"seed": -1}, r"seed must be in \[0, 2\*\*64\)"),
                                             ({"seed": 2**64}, r"seed must be in"),
                                             ({"seed": 1.5}, "seed must be an int")])
def test_bad_arguments_are_typed_errors(tmp_path, kwargs, message):
    """Checked when the Dataset is made: seed=2**64 was a bare OverflowError at the first
    batch, in a worker."""
    path, _ = _cache(tmp_path)
    with pytest.raises((FmcacheError, KeyError), match=message):
        FeatureMapDataset(path, **kwargs)


def test_set_epoch_checks_the_epoch_when_set(tmp_path):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=2**64 - 1)
    for bad in (-1, 2**64, "3"):
        with pytest.raises(FmcacheError, match="epoch must be"):
            ds.set_epoch(bad)
    ds.set_epoch(2**64 - 1)
    assert ds[0][0].shape == (4, 8, 8)


def test_feature_mode_needs_a_stride(tmp_path):
    path, _ = _cache(tmp_path, build={"note": "no input shape"})
    with pytest.raises(CacheError, match="stride"):
        FeatureMapDataset(path, augment="feature")
    assert FeatureMapDataset(path, augment="feature", stride=2).stride == 2


@pytest.mark.parametrize("labels", [
    np.arange(12) % 3,                                   # int64 class labels
    (np.arange(12) % 3).astype(np.uint8),
    np.array([2**63 + k for k in range(12)], np.uint64),  # beyond int64: still exact Python ints
    np.arange(12) % 2 == 0,                              # bool
    np.linspace(0, 1, 12, dtype=np.float32),             # float targets
    np.arange(24, dtype=np.float32).reshape(12, 2),      # a vector per sample
], ids=["int64", "uint8", "uint64", "bool", "float32", "vector"])
def test_batch_items_carry_the_per_item_labels(tmp_path, labels):
    """__getitems__ looks labels up for the whole batch at once; each one is what the
    per-item lookup gives, type included (Python int for integer and bool labels, a
    tensor otherwise), and the maps are the batch's rows."""
    x = np.random.default_rng(0).random((12, 4, 8, 8)).astype(np.float32)
    path = tmp_path / "c.lmdb"
    with fmcache.create_cache(path, build={"input_shape": [1, 16, 16]}) as w:
        w.add_layer("l", (4, 8, 8), codec="raw")
        w.append({"l": x}, labels)
        w.commit()
    ds = FeatureMapDataset(path)
    order = [7, 0, 11, 3, 3]
    items = ds.__getitems__(order)
    for (fmap, label), i in zip(items, order):
        single = ds._label(i)
        assert type(label) is type(single)
        if isinstance(single, torch.Tensor):
            assert torch.equal(label, single)
        else:
            assert label == single == (int(labels[i]))
        np.testing.assert_array_equal(fmap.numpy(), x[i])
    # the loader's batch path: what collate makes of the items, dtypes included (and
    # the same error where torch cannot hold the labels: uint64 beyond int64)
    if labels.dtype == np.uint64:
        with pytest.raises(ValueError, match="Overflow"):
            collate(items)
        with pytest.raises(ValueError, match="Overflow"):
            ds.get_batch(order)
        return
    maps, batch_labels = ds.get_batch(order)
    want_maps, want_labels = collate(items)
    assert torch.equal(maps, want_maps) and maps.is_contiguous()
    assert batch_labels.dtype == want_labels.dtype and torch.equal(batch_labels, want_labels)


def test_spatial_augmentation_refuses_mask_labels_unless_told(tmp_path):
    """Masks (a label of shape (H, W) per sample) were served unflipped beside flipped
    maps; spatial augmentation now refuses them, and multi-label vectors still pass."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 4, 8, 8)).astype(np.float32)
    for name, labels, refused in (("mask.lmdb", rng.integers(0, 2, (8, 16, 16)), True),
                                  ("multi.lmdb", rng.integers(0, 2, (8, 5)), False)):
        path = tmp_path / name
        with fmcache.create_cache(path, build={"input_shape": [1, 16, 16]}) as w:
            w.add_layer("l", (4, 8, 8), codec="raw")
            w.append({"l": x}, labels)
            w.commit()
        if refused:
            with pytest.raises(CacheError, match=r"labels have shape \(16, 16\).*augment='feature'") as info:
                FeatureMapDataset(path, augment="feature")
            assert "labels_unaugmented=True" in info.value.hint
            ds = FeatureMapDataset(path, augment="feature", labels_unaugmented=True)
        else:
            ds = FeatureMapDataset(path, augment="feature")
        np.testing.assert_array_equal(ds[3][1], labels[3])
        np.testing.assert_array_equal(FeatureMapDataset(path)[3][1], labels[3])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_relative_path_survives_a_change_of_directory_before_workers_start(tmp_path, monkeypatch, context):
    """A Dataset made from a relative path, then ``os.chdir`` into a run directory (as
    hydra does): workers reopened "c.lmdb" in the new directory and called the cache
    moved or deleted. Paths are made absolute when a cache or Dataset is opened."""
    monkeypatch.chdir(tmp_path)
    path, x = _cache(tmp_path)
    ds = FeatureMapDataset("c.lmdb")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path / "outputs")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context=context)
    got = torch.cat([maps for maps, _ in loader]).numpy()
    np.testing.assert_array_equal(got, x)
    assert fmcache.open_cache("../c.lmdb").path == path


def test_two_layers_of_one_cache_are_visited_in_one_order(tmp_path):
    """Layers with other chunk sizes got other chunk-shuffled orders at one seed: zipped
    loaders (a U-Net's skip layers) paired different samples."""
    from fmcache.loader import EpochLoader

    path = tmp_path / "two.lmdb"
    rng = np.random.default_rng(0)
    with fmcache.create_cache(path) as w:
        w.add_layer("enc1", (4, 4, 4), codec="raw", samples_per_chunk=8)
        w.add_layer("enc2", (2, 2, 2), codec="raw", samples_per_chunk=32)
        enc1 = rng.random((96, 4, 4, 4)).astype(np.float32)
        w.append({"enc1": enc1, "enc2": enc1[:, :2, ::2, ::2].copy()}, np.arange(96))
        w.commit()
    a = FeatureMapDataset(path, "enc1", seed=5)
    b = FeatureMapDataset(path, "enc2", seed=5)
    for epoch in (0, 3):
        sa, sb = a.sampler(), b.sampler()
        sa.set_epoch(epoch)
        sb.set_epoch(epoch)
        assert list(sa) == list(sb)
    pairs = zip(EpochLoader(a, 16)(1), EpochLoader(b, 16)(1))
    for (m1, y1), (m2, y2) in pairs:
        assert torch.equal(y1, y2) and torch.equal(m1[:, :2, ::2, ::2], m2)


def _deleted_lmdb_files_held() -> list[str]:
    import os

    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "data.mdb" in target and target.endswith("(deleted)"):
            held.append(target)
    return held


def test_a_dropped_or_closed_dataset_lets_go_of_its_lmdb_cache(tmp_path):
    """An LMDB environment stayed open (descriptor, mapping, a deleted cache's disk space)
    for every Dataset or Cache dropped without close(): 20 rebuilds held 643 MiB."""
    import gc
    import shutil

    from fmcache.backends import lmdb_envs

    def ours() -> list[str]:
        return [entry[0].path() for entry in lmdb_envs._envs.values() if str(tmp_path) in entry[0].path()]

    for round_ in range(3):
        path = tmp_path / f"r{round_}.lmdb"
        with fmcache.create_cache(path) as w:
            w.add_layer("l", (2, 4, 4), codec="raw")
            w.append({"l": np.full((8, 2, 4, 4), round_, np.float32)}, np.arange(8))
            w.commit()
        ds = FeatureMapDataset(path, "l")
        assert float(ds[3][0][0, 0, 0]) == round_
        if round_ == 0:
            del ds
            gc.collect()
        elif round_ == 1:
            ds.close()
            assert float(ds[3][0][0, 0, 0]) == round_  # reopens on the next read
            ds.close()
        else:
            with ds:
                assert float(ds[5][0][0, 0, 0]) == round_
        shutil.rmtree(path)
        assert not ours() and not [f for f in _deleted_lmdb_files_held() if str(tmp_path) in f]


def test_a_cache_of_several_layers_needs_a_layer_and_the_error_shows_how(tmp_path):
    path = tmp_path / "two.lmdb"
    with fmcache.create_cache(path) as w:
        w.add_layer("a", (2, 4, 4), codec="raw")
        w.add_layer("b", (3, 2, 2), codec="raw")
        w.append({"a": np.zeros((2, 2, 4, 4), np.float32), "b": np.zeros((2, 3, 2, 2), np.float32)}, [0, 1])
        w.commit()
    with pytest.raises(CacheError, match=r"has layers \['a', 'b'\]: pass layer=") as info:
        FeatureMapDataset(path)
    assert f"FeatureMapDataset({str(path)!r}, 'a')" in info.value.hint
    assert len(FeatureMapDataset(path, "b")) == 2
