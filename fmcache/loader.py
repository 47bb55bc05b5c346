"""One DataLoader for every epoch: workers that persist, batches that carry their epoch.

A fresh ``DataLoader`` per epoch forks its workers again every epoch (a torch process:
~0.1-0.2 s here, 5-15 % of a short epoch). ``persistent_workers=True`` keeps them, but
then each worker holds its own copy of the data set, made once: a ``set_epoch`` in the
main process never reaches it, and every epoch would repeat epoch 0's augmentations.

:class:`EpochLoader` keeps one loader and puts the epoch into the keys instead: its
sampler yields :class:`~fmcache.sampler.SampleKey` ``(epoch, sample)``;
:class:`~fmcache.dataset.FeatureMapDataset` draws from the key's epoch, and any other
data set with a ``set_epoch`` is wrapped in :class:`EpochKeyed`, which calls it in the
worker before fetching. The order and the draws are those of a fresh loader per epoch,
bit for bit (``tests/test_loader.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset, get_worker_info

from .dataset import FeatureMapDataset
from .errors import SamplerConfigError
from .handover import BatchKeys, OrdinalBatches, SharedRing, Ticket, ring_slots
from .readahead import ReadAhead, check_read_ahead
from .sampler import EpochSampler, SampleKey, _default_rank_and_world, rank_share, samples_per_rank

#: batches each worker works ahead (the DataLoader's default), which sizes the ring
PREFETCH_FACTOR = 2


class PermutationSampler(Sampler[int]):
    """``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))``'s
    order for each epoch, as a sampler with ``set_epoch``; under ``torch.distributed`` (or
    with ``rank`` / ``world_size``) this rank's contiguous share of it, padded as
    ``DistributedSampler`` pads (:func:`~fmcache.sampler.rank_share`): every rank read the
    whole data set when a ``Subset`` or ``ConcatDataset`` of a cache went through here."""

    def __init__(self, num_samples: int, seed: int = 0, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0
        default_rank, default_world = _default_rank_and_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise SamplerConfigError(f"rank {self.rank} is out of range for world_size {self.world_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen).numpy()
        return iter(rank_share(order, self.rank, self.world_size, drop_last=False).tolist())

    def __len__(self) -> int:
        return samples_per_rank(self.num_samples, self.world_size, False)


def epoch_targets(dataset: Dataset) -> list[Any]:
    """The data sets whose items depend on the epoch in ``dataset``: itself when it has a
    ``set_epoch``, else those inside torch's ``Subset`` (``random_split``'s parts) and
    ``ConcatDataset`` wrappers, which have none and so never passed the epoch on: a
    wrapped ``FeatureMapDataset`` served epoch 0's augmentations every epoch."""
    if hasattr(dataset, "set_epoch"):
        return [dataset]
    if isinstance(dataset, Subset):
        return epoch_targets(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return [target for inner in dataset.datasets for target in epoch_targets(inner)]
    return []


#: held while a data set's epoch is selected and its item read (EpochKeyed), and while
#: EpochLoader tells the main process's copies the epoch: two loaders reading one data set
#: from threads (read_ahead) selected each other's epoch between the select and the read
_EPOCH_LOCK = threading.RLock()


def _new_epoch_lock_in_child() -> None:  # a thread of the parent may have held it at the fork
    global _EPOCH_LOCK
    _EPOCH_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_epoch_lock_in_child)


class EpochKeyed(Dataset):
    """A data set served by :class:`~fmcache.sampler.SampleKey`: each fetch first selects
    the key's epoch in this process's copy (a worker's included) of the data set, or of
    the data sets with a ``set_epoch`` inside it (``targets``, :func:`epoch_targets`).
    Selecting and reading hold one process-wide lock: loaders that share a data set and
    read it from threads (``EpochLoader(read_ahead=)``) each get their own epoch's items."""

    def __init__(self, dataset: Dataset, targets: Sequence[Any] | None = None) -> None:
        self.dataset = dataset
        self.targets: list[Any] = list(targets) if targets is not None else [dataset]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _select(self, key: Any) -> Any:
        if isinstance(key, SampleKey):
            for target in self.targets:
                if getattr(target, "epoch", None) != key.epoch:
                    target.set_epoch(key.epoch)  # type: ignore[union-attr]
            return key.sample
        return key

    def __getitem__(self, key: Any) -> Any:
        with _EPOCH_LOCK:
            return self.dataset[self._select(key)]

    def __getitems__(self, keys: Sequence[Any]) -> list[Any]:
        return [self[key] for key in keys]


class BatchServed(Dataset):
    """A :class:`~fmcache.dataset.FeatureMapDataset` served a batch at a time: its
    ``__getitems__`` is the data set's :meth:`~fmcache.dataset.FeatureMapDataset.get_batch`
    (``[maps, labels]``, what ``collate`` would make of the items), so the loader's
    ``collate_fn`` has nothing left to do (:func:`as_batch`).

    With a ``ring`` (:class:`~fmcache.handover.SharedRing`), a worker given a batch with an
    ordinal (:class:`~fmcache.handover.OrdinalBatches`) leaves its maps in the ring and
    returns a :class:`~fmcache.handover.Ticket` instead, which the loader's iterator
    (:class:`RingLoader`) turns back into ``[maps, labels]``."""

    def __init__(self, dataset: FeatureMapDataset, ring: SharedRing | None = None) -> None:
        self.dataset = dataset
        self.ring = ring

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]

    def __getitems__(self, keys: Sequence[Any]) -> Any:
        ring = self.ring
        if ring is not None and isinstance(keys, BatchKeys) and keys.ordinal >= 0 and get_worker_info() is not None:
            maps, idx = self.dataset._batch(keys)
            return ring.put(keys.ordinal, maps, self.dataset._collated_labels(idx))
        return self.dataset.get_batch(keys)


def as_batch(batch: Any) -> Any:
    """The ``collate_fn`` of a :class:`BatchServed` loader: the batch is already made."""
    return batch


class RingLoader(DataLoader):
    """A DataLoader over a :class:`BatchServed` with a ring: what its workers return as
    tickets comes out as ``[maps, labels]``, the maps copied out of the ring."""

    def __init__(self, *args: Any, ring: SharedRing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ring = ring

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        take = self.ring.take
        for batch in super().__iter__():
            yield take(batch) if isinstance(batch, Ticket) else batch


class EpochLoader:
    """One shuffled, ``drop_last`` DataLoader reused for every epoch.

    ``loader(epoch)`` selects the epoch and returns the DataLoader to iterate. A
    :class:`~fmcache.dataset.FeatureMapDataset` gets its chunk-aware sampler and is served
    a batch at a time (:class:`BatchServed`: the batch tensor and the labels ``collate``
    would make, without an item per sample); any other data set a seeded permutation per
    epoch; data sets with a ``set_epoch`` inside torch's ``Subset`` / ``ConcatDataset``
    (a ``FeatureMapDataset`` among them) are told each epoch, in the workers too.
    ``seed`` is that permutation's; a ``FeatureMapDataset``'s order comes from its own
    ``seed`` (another one here is refused).
    With ``num_workers > 0`` the workers persist across epochs (``close()`` or dropping the
    loader stops them).

    ``handover``: how a worker's batch of a ``FeatureMapDataset`` reaches this process.
    ``"ring"`` (the default): through a ring of batch buffers in shared memory, made once
    (:mod:`fmcache.handover`; ``2 x num_workers + 2`` batches of memory), each batch
    copied out of it: no shared storage and file descriptor per tensor and batch.
    ``"torch"``: as the DataLoader hands over any tensor. Without workers there is
    nothing to hand over. ``multiprocessing_context`` (``"spawn"``, ``"forkserver"``, a
    context) starts the workers another way than the platform's default, as in a DataLoader.

    ``read_ahead``: without workers, a thread of this process reads that many batches
    ahead of the training loop (:class:`~fmcache.readahead.ReadAhead`), so reading
    overlaps the steps on another core; ``loader(epoch)`` then returns a ``ReadAhead``
    over the DataLoader (the same batches in the same order). 0 (the default): each batch
    is read when the loop asks for it. Workers read ahead themselves (``prefetch_factor``).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int | None = None, num_workers: int = 0,
                 persistent: bool = True, handover: str = "ring", multiprocessing_context: Any = None,
                 read_ahead: int = 0) -> None:
        if handover not in ("ring", "torch"):
            raise ValueError(f"handover={handover!r}: use 'ring' or 'torch'")
        self.read_ahead = check_read_ahead(read_ahead, num_workers)
        self.dataset = dataset
        base: Sampler[int]
        served: Dataset = dataset
        collate_fn = None
        ring: SharedRing | None = None
        self.targets = epoch_targets(dataset)
        if isinstance(dataset, FeatureMapDataset):  # reads SampleKeys itself, makes whole batches
            if seed is not None and seed != dataset.seed:
                raise SamplerConfigError(f"seed={seed}, but the FeatureMapDataset's seed is {dataset.seed}: its "
                                         "order and draws come from its own seed",
                                         hint="set the seed on the data set (FeatureMapDataset(..., seed=...)) and "
                                              "leave EpochLoader's out")
            if handover == "ring" and num_workers > 0:
                ring = SharedRing(ring_slots(num_workers, PREFETCH_FACTOR), batch_size, dataset.shape, dataset.dtype)
            base, collate_fn, served = dataset.sampler(drop_last=False), as_batch, BatchServed(dataset, ring)
        else:
            base = PermutationSampler(len(dataset), seed or 0)  # type: ignore[arg-type]
            if self.targets:
                served = EpochKeyed(dataset, self.targets)
        per_epoch = len(base)  # type: ignore[arg-type]
        if batch_size < 1 or per_epoch < batch_size:
            raise SamplerConfigError(f"batch_size={batch_size} for {per_epoch} samples an epoch: the loader drops the "
                                     "last partial batch, so every epoch would be empty" if batch_size >= 1 else
                                     f"batch_size={batch_size}: must be >= 1",
                                     hint=f"use a batch_size of at most {per_epoch}" if per_epoch else
                                     "the data set is empty")
        keyed = served is not dataset
        self.sampler = EpochSampler(base) if keyed else base
        workers: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": persistent and num_workers > 0,
                   **({"prefetch_factor": PREFETCH_FACTOR,
                       "multiprocessing_context": multiprocessing_context} if num_workers > 0 else {})}
        self.loader: DataLoader | None
        if ring is not None:  # batches with ordinals: the ring's slot of each
            self.loader = RingLoader(served, batch_sampler=OrdinalBatches(self.sampler, batch_size),
                                     collate_fn=collate_fn, ring=ring, **workers)
        else:
            self.loader = DataLoader(served, sampler=self.sampler, batch_size=batch_size, drop_last=True,
                                     collate_fn=collate_fn, **workers)

    def __call__(self, epoch: int) -> DataLoader | ReadAhead[Any]:
        if self.loader is None:
            raise RuntimeError("this EpochLoader is closed")
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        with _EPOCH_LOCK:
            for target in self.targets:  # the main process's copies, for whoever reads them
                target.set_epoch(epoch)
        return ReadAhead(self.loader, self.read_ahead) if self.read_ahead else self.loader

    def close(self) -> None:
        """Stop persistent workers now (also happens when the loader is garbage collected)."""
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


__all__ = ["BatchServed", "EpochKeyed", "EpochLoader", "PermutationSampler", "RingLoader", "as_batch", "epoch_targets"]
