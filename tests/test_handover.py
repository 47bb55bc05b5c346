"""The shared ring that hands worker batches to the training process (fmcache.handover):
the batches of a ring loader are those of torch's own hand-over, bit for bit, with real
forked and spawned DataLoader workers; a slot overwritten before it is read raises."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from strategies import realistic_post_relu

import fmcache
from fmcache import FeatureMapDataset, TierPlan
from fmcache.augment import AugFamily, default_variants, variant_name
from fmcache.errors import HandoverError
from fmcache.handover import BatchKeys, OrdinalBatches, SharedRing, Ticket, ring_slots
from fmcache.loader import PREFETCH_FACTOR, BatchServed, EpochLoader, RingLoader, as_batch
from fmcache.sampler import EpochSampler, SampleKey


def _saca_cache(tmp_path, n=48, labels=None, backend="lmdb"):
    rng = np.random.default_rng(1)
    maps = np.stack([realistic_post_relu(rng, (8, 8, 8)) for _ in range(n)])
    names = sorted(variant_name(d) for d in default_variants(4, 4))
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    build = {"input_shape": [1, 32, 32], "augment_family": AugFamily().get_config()}
    with fmcache.create_cache(path, backend=backend, build=build) as w:
        w.add_layer("l", (8, 8, 8), plan=TierPlan.two_tier(8, [1, 5], "bf16", "bf16"), variants=names,
                    samples_per_chunk=8)
        w.append({"l": maps}, np.arange(n) % 7 if labels is None else labels,
                 variants={"l": {v: np.roll(maps, k + 1, axis=-1) for k, v in enumerate(names)}})
        w.commit()
    return path


def _epochs(loader, epochs, stop_after=None):
    out = []
    for e in epochs:
        batches = []
        for k, (maps, labels) in enumerate(loader(e)):
            batches.append((maps.clone(), labels.clone()))
            if stop_after is not None and k + 1 == stop_after:
                break
        out.append(batches)
    return out


def _same(a, b):
    assert [len(e) for e in a] == [len(e) for e in b]
    for ea, eb in zip(a, b):
        for (ma, ya), (mb, yb) in zip(ea, eb):
            assert ma.dtype == mb.dtype and ma.shape == mb.shape
            assert ma.view(torch.int16 if ma.dtype == torch.bfloat16 else torch.int32).equal(
                mb.view(torch.int16 if mb.dtype == torch.bfloat16 else torch.int32))
            assert ya.dtype == yb.dtype and torch.equal(ya, yb)


@pytest.mark.parametrize("workers, dtype, backend", [(1, "float32", "lmdb"), (2, "float32", "hdf5"),
                                                     (2, "bf16", "lmdb"), (1, "bf16", "hdf5")])
def test_ring_batches_are_torchs_batches_bit_for_bit(tmp_path, workers, dtype, backend):
    path = _saca_cache(tmp_path, backend=backend)
    ring = EpochLoader(FeatureMapDataset(path, augment="saca", seed=4, dtype=dtype), 8, num_workers=workers)
    plain = EpochLoader(FeatureMapDataset(path, augment="saca", seed=4, dtype=dtype), 8, num_workers=workers,
                        handover="torch")
    assert isinstance(ring.loader, RingLoader) and not isinstance(plain.loader, RingLoader)
    assert ring.loader.ring.slots == ring_slots(workers, PREFETCH_FACTOR) == 2 * workers + 2
    got, want = _epochs(ring, range(4)), _epochs(plain, range(4))
    _same(got, want)
    inline = EpochLoader(FeatureMapDataset(path, augment="saca", seed=4, dtype=dtype), 8)  # no workers
    _same(got, _epochs(inline, range(4)))
    ring.close()
    plain.close()


def test_an_epoch_left_half_way_does_not_disturb_the_next(tmp_path):
    path = _saca_cache(tmp_path)
    ring = EpochLoader(FeatureMapDataset(path, augment="saca", seed=2), 8, num_workers=2)
    plain = EpochLoader(FeatureMapDataset(path, augment="saca", seed=2), 8)
    for stop in (1, 3, None, 2):
        for epoch in (0, 1):
            _same(_epochs(ring, [epoch], stop), _epochs(plain, [epoch], stop))
    ring.close()


@pytest.mark.parametrize("labels", [np.linspace(0, 1, 48, dtype=np.float32), np.arange(48) % 2 == 0,
                                    np.arange(96).reshape(48, 2)])
def test_labels_of_every_kind_come_through_as_collate_makes_them(tmp_path, labels):
    path = _saca_cache(tmp_path, labels=labels)
    ring = EpochLoader(FeatureMapDataset(path, augment="none"), 8, num_workers=1)
    plain = EpochLoader(FeatureMapDataset(path, augment="none"), 8)
    _same(_epochs(ring, range(2)), _epochs(plain, range(2)))
    ring.close()


def test_spawned_workers_write_into_the_same_ring(tmp_path):
    path = _saca_cache(tmp_path, n=32)
    dataset = FeatureMapDataset(path, augment="saca", seed=9)
    ring = SharedRing(ring_slots(2, 2), 8, dataset.shape, dataset.dtype)
    sampler = EpochSampler(dataset.sampler())
    loader = RingLoader(BatchServed(dataset, ring), batch_sampler=OrdinalBatches(sampler, 8), collate_fn=as_batch,
                        num_workers=2, prefetch_factor=2, multiprocessing_context="spawn", ring=ring)
    sampler.set_epoch(1)
    got = [(m.clone(), y.clone()) for m, y in loader]
    _same([got], _epochs(EpochLoader(FeatureMapDataset(path, augment="saca", seed=9), 8), [1]))


def test_batch_keys_keep_their_ordinal_through_pickle_and_ordinals_run_on_across_epochs():
    keys = BatchKeys([SampleKey(0, 3), SampleKey(0, 1)], ordinal=17)
    again = pickle.loads(pickle.dumps(keys))
    assert again == keys and again.ordinal == 17 and isinstance(again, BatchKeys)

    class Counting(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(range(10 * self.epoch, 10 * self.epoch + 10))

        def __len__(self):
            return 10

    batches = OrdinalBatches(Counting(), 4)
    assert len(batches) == 2
    first = list(batches)
    batches.set_epoch(1)
    second = list(batches)
    assert [b.ordinal for b in first + second] == [0, 1, 2, 3]
    assert [list(b) for b in second] == [[10, 11, 12, 13], [14, 15, 16, 17]]  # drop_last


def test_a_slot_overwritten_before_it_is_read_raises_instead_of_handing_on_other_numbers():
    ring = SharedRing(2, 4, (3,), torch.float32)
    first = ring.put(0, torch.zeros(4, 3), torch.arange(4))
    assert isinstance(first, Ticket) and isinstance(first.labels, np.ndarray)  # no second storage
    maps, labels = ring.take(first)
    assert torch.equal(maps, torch.zeros(4, 3)) and labels.dtype == torch.int64
    stale = ring.put(1, torch.ones(4, 3), torch.arange(4))
    ring.put(3, torch.full((4, 3), 3.0), torch.arange(4))  # the same slot as ordinal 1
    with pytest.raises(HandoverError, match="batch 1: its ring slot 1 holds batch 3"):
        ring.take(stale)
    maps, _ = ring.take(Ticket(3, 4, None))
    assert torch.equal(maps, torch.full((4, 3), 3.0))
    taken = ring.data[0].clone()
    maps[:] = 7  # what was handed on is a copy: the ring's slot is not touched
    assert torch.equal(ring.data[0], taken)


def test_a_batch_that_does_not_fit_the_ring_is_refused():
    ring = SharedRing(2, 4, (3,), torch.float32)
    for bad in (torch.zeros(5, 3), torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.float64)):
        with pytest.raises(HandoverError, match="does not fit"):
            ring.put(0, bad, None)


def test_handover_must_be_ring_or_torch(tmp_path):
    path = _saca_cache(tmp_path, n=16)
    with pytest.raises(ValueError, match="handover='fast'"):
        EpochLoader(FeatureMapDataset(path), 8, num_workers=1, handover="fast")


def test_no_room_in_shared_memory_for_the_ring_is_a_clear_error(monkeypatch, tmp_path):
    path = _saca_cache(tmp_path, n=16)

    def full(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)  # what a full /dev/shm makes torch raise
    with pytest.raises(HandoverError, match=r"no shared memory for a ring of 4 batches of \(8, 8, 8, 8\)") as info:
        EpochLoader(FeatureMapDataset(path), 8, num_workers=1)
    assert "handover='torch'" in info.value.hint and "--shm-size" in info.value.hint
    EpochLoader(FeatureMapDataset(path), 8, num_workers=1, handover="torch").close()  # needs no ring


def test_workers_that_do_not_persist_fill_the_same_ring_each_epoch(tmp_path):
    path = _saca_cache(tmp_path, n=32)
    ring = EpochLoader(FeatureMapDataset(path, augment="saca", seed=6), 8, num_workers=1, persistent=False)
    assert isinstance(ring.loader, RingLoader)
    plain = EpochLoader(FeatureMapDataset(path, augment="saca", seed=6), 8)
    _same(_epochs(ring, range(3)) + _epochs(ring, [0], stop_after=2), _epochs(plain, range(3)) + _epochs(plain, [0], 2))
