"""EpochLoader: one DataLoader for all epochs, persistent workers, the same batches as a
fresh loader per epoch; SampleKey epochs reach the data set in the workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import fmcache
from fmcache import FeatureMapDataset
from fmcache.augment import AugFamily, apply_feature
from fmcache.loader import EpochKeyed, EpochLoader
from fmcache.sampler import EpochSampler, SampleKey
from fmcache.train import epoch_loader


def _cache(tmp_path, n=40):
    rng = np.random.default_rng(0)
    x = (rng.random((n, 3, 8, 8)) * (rng.random((n, 3, 8, 8)) > 0.4)).astype(np.float32)
    path = tmp_path / "c.lmdb"
    with fmcache.create_cache(path, build={"input_shape": [1, 16, 16]}) as w:
        w.add_layer("l", (3, 8, 8), codec="raw", samples_per_chunk=4)
        w.append({"l": x}, np.arange(n) % 5)
        w.commit()
    return path, x


def _epochs(loader_of, epochs):
    return [[(m.clone(), y.clone()) for m, y in loader_of(e)] for e in epochs]


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for (ma, ya), (mb, yb) in zip(ea, eb):
            assert torch.equal(ma, mb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_loader_gives_a_fresh_loaders_batches_every_epoch(tmp_path, workers):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    fresh = _epochs(lambda e: epoch_loader(ds, 8, e), [0, 1, 2])
    loader = EpochLoader(FeatureMapDataset(path, augment="feature", seed=3), 8, num_workers=workers)
    kept = _epochs(loader, [0, 1, 2])
    if workers:
        pids = {w.pid for w in loader.loader._iterator._workers}
        kept += _epochs(loader, [3])
        assert {w.pid for w in loader.loader._iterator._workers} == pids  # the same processes
        loader.close()
        kept = kept[:3]
    _same(fresh, kept)
    # the epochs differ: a persistent worker did not stay on epoch 0's draws
    assert not torch.equal(torch.cat([m for m, _ in kept[0]]), torch.cat([m for m, _ in kept[1]]))


def test_sample_keys_draw_for_their_own_epoch(tmp_path):
    path, x = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=7)
    ds.set_epoch(5)  # ignored for keyed samples
    keys = [SampleKey(1, 3), SampleKey(1, 0), SampleKey(2, 3), SampleKey(1, -1)]
    items = ds.__getitems__(keys)
    for (fmap, label), key in zip(items, keys):
        index = key.sample % len(x)
        draw = AugFamily().draws(7, key.epoch, [index]).draw(0)
        np.testing.assert_array_equal(fmap.numpy(), apply_feature(x[index], draw, 2))
        assert label == index % 5
    assert not torch.equal(items[0][0], items[2][0])  # sample 3 in epochs 1 and 2
    np.testing.assert_array_equal(ds[SampleKey(2, 3)][0].numpy(), items[2][0].numpy())


class _EpochTagged(Dataset):
    """Item i of epoch e is (e * 1000 + i, pid): shows which epoch the worker's copy saw."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(self.epoch * 1000 + i), os.getpid()


@pytest.mark.parametrize("workers", [0, 2])
def test_any_dataset_with_set_epoch_sees_each_epoch_in_persistent_workers(workers):
    loader = EpochLoader(_EpochTagged(20), 4, seed=1, num_workers=workers)
    assert isinstance(loader.loader.dataset, EpochKeyed) and isinstance(loader.sampler, EpochSampler)
    pids = set()
    for epoch in range(3):
        values = torch.cat([v for v, _ in loader(epoch)])
        pids |= {int(p) for _, pid in loader(epoch) for p in pid}
        # every item comes from this epoch, in the order of a fresh shuffled loader
        order = torch.randperm(20, generator=torch.Generator().manual_seed(1 * 100_003 + epoch))
        assert values.tolist() == (epoch * 1000 + order).tolist()
    assert len(pids) == max(workers, 1) and (workers == 0 or os.getpid() not in pids)
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader(3)


def test_a_dataset_without_set_epoch_gets_plain_indices():
    data = torch.utils.data.TensorDataset(torch.arange(12))
    loader = EpochLoader(data, 3, seed=2)
    batches = [i for b in loader(1) for i in b[0].tolist()]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(2 * 100_003 + 1)).tolist()
    assert batches == order


def test_hand_wired_batch_loader_gives_the_epoch_loaders_batches(tmp_path):
    """What docs/dataset.md shows for wiring the batch path by hand -- BatchServed, an
    EpochSampler over the data set's sampler, as_batch -- yields EpochLoader's batches,
    and those are collate() of the items."""
    from torch.utils.data import DataLoader

    from fmcache.dataset import collate
    from fmcache.loader import BatchServed, as_batch

    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    sampler = EpochSampler(ds.sampler())
    by_hand = DataLoader(BatchServed(ds), sampler=sampler, batch_size=8, drop_last=True, collate_fn=as_batch)
    loader = EpochLoader(FeatureMapDataset(path, augment="feature", seed=3), 8)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        hand = [(m.clone(), y.clone()) for m, y in by_hand]
        _same([hand], _epochs(loader, [epoch]))
        keys = list(sampler)[:8]
        maps, labels = collate(ds.__getitems__(keys))
        assert torch.equal(hand[0][0], maps) and torch.equal(hand[0][1], labels)



@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("wrap", ["subset", "random_split", "concat"])
def test_a_wrapped_feature_map_dataset_draws_each_epochs_augmentations(tmp_path, wrap, workers):
    """EpochLoader over torch's Subset / random_split / ConcatDataset of an augmenting
    FeatureMapDataset served epoch 0's draws every epoch (the wrappers have no set_epoch)."""
    from torch.utils.data import ConcatDataset, Subset, random_split

    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    if wrap == "subset":
        data, inner = Subset(ds, range(5, 37)), list(range(5, 37))
    elif wrap == "random_split":
        data = random_split(ds, [32, 8], generator=torch.Generator().manual_seed(0))[0]
        inner = list(data.indices)
    else:
        data, inner = ConcatDataset([ds, ds]), list(range(40)) * 2
    loader = EpochLoader(data, 8, seed=5, num_workers=workers)
    for epoch in (0, 2):
        got = torch.cat([m for m, _ in loader(epoch)])
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(5 * 100_003 + epoch)).tolist()
        rows = [inner[i] for i in order[:len(got)]]
        want = ds.get_batch([SampleKey(epoch, r) for r in rows])[0]
        assert torch.equal(got, want), epoch
        assert not torch.equal(got, ds.get_batch([SampleKey(1 - epoch // 2, r) for r in rows])[0])
    loader.close()


def test_epoch_loader_refuses_a_seed_the_data_set_would_ignore_and_empty_epochs(tmp_path):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    with pytest.raises(fmcache.errors.SamplerConfigError, match="seed=4.*own seed"):
        EpochLoader(ds, 8, seed=4)
    assert len(list(EpochLoader(ds, 8, seed=3)(0))) == 5  # the data set's own seed is taken
    for batch in (41, 0):  # every epoch would be empty (drop_last) / no batch at all
        with pytest.raises(fmcache.errors.SamplerConfigError, match="batch_size"):
            EpochLoader(ds, batch)
    with pytest.raises(fmcache.errors.SamplerConfigError, match="at most 12"):
        EpochLoader(torch.utils.data.TensorDataset(torch.arange(12)), 13)


def test_epoch_loader_starts_workers_with_the_context_asked_for(tmp_path):
    path, _ = _cache(tmp_path)
    ds = FeatureMapDataset(path, augment="feature", seed=3)
    spawned = EpochLoader(ds, 8, num_workers=1, multiprocessing_context="spawn")
    assert spawned.loader.multiprocessing_context.get_start_method() == "spawn"
    _same(_epochs(spawned, [1]), _epochs(EpochLoader(FeatureMapDataset(path, augment="feature", seed=3), 8), [1]))
    spawned.close()


_RANKS_SCRIPT = """
import os, sys, json, torch, torch.distributed as dist
from torch.utils.data import ConcatDataset, Subset
from fmcache import FeatureMapDataset
from fmcache.loader import EpochLoader

def run(rank, world, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds = FeatureMapDataset(path, augment="feature", seed=1)
    seen = {}
    for name, data in (("subset", Subset(ds, range(3, 33))), ("concat", ConcatDataset([ds, ds]))):
        loader = EpochLoader(data, 5, seed=4)
        seen[name] = [int(y) for _, labels in loader(0) for y in labels]
        loader.close()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(seen, fh)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_wrapped_data_sets_are_split_between_distributed_ranks(tmp_path):
    """Under torch.distributed, EpochLoader over a Subset or ConcatDataset of a cache gave
    every rank the whole data set (both ranks trained on the same batches)."""
    import json
    import socket
    import subprocess
    import sys

    path = tmp_path / "c.lmdb"
    with fmcache.create_cache(path, build={"input_shape": [1, 16, 16]}) as w:
        w.add_layer("l", (3, 8, 8), codec="raw", samples_per_chunk=4)
        w.append({"l": np.zeros((40, 3, 8, 8), np.float32)}, np.arange(40))
        w.commit()
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "seen"), str(port)], check=True, timeout=300)
    seen = [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in (0, 1)]
    a, b = seen[0]["subset"], seen[1]["subset"]
    assert len(a) == len(b) == 15 and sorted(a + b) == list(range(3, 33))  # disjoint halves, all covered
    a, b = seen[0]["concat"], sorted(seen[1]["concat"])
    assert len(a) == len(b) == 40 and sorted(a + b) == sorted(list(range(40)) * 2)
