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

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import FeatureMapDataset
from .sampler import EpochSampler, SampleKey


class PermutationSampler(Sampler[int]):
    """``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))``'s
    order for each epoch, as a sampler with ``set_epoch``."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochKeyed(Dataset):
    """A data set with ``set_epoch`` served by :class:`~fmcache.sampler.SampleKey`: each
    fetch first selects the key's epoch in this process's copy (a worker's included)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _select(self, key: Any) -> Any:
        if isinstance(key, SampleKey):
            if getattr(self.dataset, "epoch", None) != key.epoch:
                self.dataset.set_epoch(key.epoch)  # type: ignore[attr-defined]
            return key.sample
        return key

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[self._select(key)]

    def __getitems__(self, keys: Sequence[Any]) -> list[Any]:
        return [self[key] for key in keys]


class BatchServed(Dataset):
    """A :class:`~fmcache.dataset.FeatureMapDataset` served a batch at a time: its
    ``__getitems__`` is the data set's :meth:`~fmcache.dataset.FeatureMapDataset.get_batch`
    (``[maps, labels]``, what ``collate`` would make of the items), so the loader's
    ``collate_fn`` has nothing left to do (:func:`as_batch`)."""

    def __init__(self, dataset: FeatureMapDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        return self.dataset[key]

    def __getitems__(self, keys: Sequence[Any]) -> list[Any]:
        return self.dataset.get_batch(keys)


def as_batch(batch: list[Any]) -> list[Any]:
    """The ``collate_fn`` of a :class:`BatchServed` loader: the batch is already made."""
    return batch


class EpochLoader:
    """One shuffled, ``drop_last`` DataLoader reused for every epoch.

    ``loader(epoch)`` selects the epoch and returns the DataLoader to iterate. A
    :class:`~fmcache.dataset.FeatureMapDataset` gets its chunk-aware sampler and is served
    a batch at a time (:class:`BatchServed`: the batch tensor and the labels ``collate``
    would make, without an item per sample); any other data set a seeded permutation per
    epoch.
    With ``num_workers > 0`` the workers persist across epochs (``close()`` or dropping the
    loader stops them).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0,
                 persistent: bool = True) -> None:
        self.dataset = dataset
        base: Sampler[int]
        served: Dataset = dataset
        collate_fn = None
        if isinstance(dataset, FeatureMapDataset):  # reads SampleKeys itself, makes whole batches
            base, collate_fn, served = dataset.sampler(drop_last=False), as_batch, BatchServed(dataset)
        else:
            base = PermutationSampler(len(dataset), seed)  # type: ignore[arg-type]
            if hasattr(dataset, "set_epoch"):
                served = EpochKeyed(dataset)
        keyed = served is not dataset
        self.sampler = EpochSampler(base) if keyed else base
        self.loader: DataLoader | None = DataLoader(
            served, sampler=self.sampler, batch_size=batch_size, drop_last=True, num_workers=num_workers,
            collate_fn=collate_fn, persistent_workers=persistent and num_workers > 0)

    def __call__(self, epoch: int) -> DataLoader:
        if self.loader is None:
            raise RuntimeError("this EpochLoader is closed")
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        if hasattr(self.dataset, "set_epoch"):  # the main process's copy, for whoever reads it
            self.dataset.set_epoch(epoch)
        return self.loader

    def close(self) -> None:
        """Stop persistent workers now (also happens when the loader is garbage collected)."""
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


__all__ = ["BatchServed", "EpochKeyed", "EpochLoader", "PermutationSampler", "as_batch"]
