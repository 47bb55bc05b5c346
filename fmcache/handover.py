"""Handing batches from DataLoader workers to the training process through a shared ring.

A tensor a worker returns crosses to the training process as a shared-memory storage
whose file descriptor is passed over a socket, a connection to the worker and back per
storage, and a batch of maps and labels is two storages: 2.6-3.2 ms of waiting a batch
here, against 1.3-1.7 ms through the ring (tools/bench_handover.py,
docs/benchmarks.md). :class:`SharedRing` instead holds ``slots`` batch-sized
buffers in shared memory, made once by the training process before the workers start
(forked or spawned workers map the same memory). A worker writes the maps of the batch
with ordinal ``k`` into slot ``k % slots`` and returns a small :class:`Ticket`; the
training process copies the slot out (a memcpy of the batch) and hands on a tensor of
its own, so a slot is free once its batch has been returned.

Which slot is free rests on how the DataLoader dispatches: it sends a new batch to a
worker only when it hands one to the caller, so at most ``prefetch_factor x
num_workers`` batches after the one being read can be in flight, and the ring has more
slots than that (:func:`ring_slots`). The ordinals come from :class:`OrdinalBatches`,
the loader's batch sampler, in dispatch order. Each slot also carries the ordinal of
what it holds, written by the worker after the maps (and set to -1 before): the
training process checks it before and after copying, so a slot overwritten under it
(a DataLoader that dispatched differently) raises :class:`~fmcache.errors.HandoverError`
instead of handing on another batch's numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import HandoverError


class BatchKeys(list):  # type: ignore[type-arg]
    """The keys of one batch and its ordinal (its place in the loader's dispatch order)."""

    def __init__(self, keys: Any = (), ordinal: int = -1) -> None:
        super().__init__(keys)
        self.ordinal = ordinal

    def __reduce__(self) -> tuple[Any, ...]:
        return (BatchKeys, (list(self), self.ordinal))


class OrdinalBatches(Sampler[BatchKeys]):
    """``BatchSampler(sampler, batch_size, drop_last=True)`` whose batches carry
    consecutive ordinals, counted on across epochs."""

    def __init__(self, sampler: Sampler[Any], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.issued = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[BatchKeys]:
        batch = BatchKeys()
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.batch_size:
                batch.ordinal, self.issued = self.issued, self.issued + 1
                yield batch
                batch = BatchKeys()

    def __len__(self) -> int:
        assert isinstance(self.sampler, Sized)
        return len(self.sampler) // self.batch_size


def ring_slots(num_workers: int, prefetch_factor: int) -> int:
    """Slots a ring needs: more than the batches that can be in flight behind the one
    being read (``prefetch_factor x num_workers``), and one spare."""
    return int(prefetch_factor) * int(num_workers) + 2


@dataclass(frozen=True)
class Ticket:
    """What a worker returns for a batch it left in the ring: its ordinal, its row count
    and its labels (a numpy array becomes a tensor in the training process)."""

    ordinal: int
    rows: int
    labels: Any


class SharedRing:
    """``slots`` buffers of ``(batch_size, *shape)`` in shared memory, with the ordinal of
    what each holds."""

    def __init__(self, slots: int, batch_size: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.slots = int(slots)
        data = torch.empty((self.slots, int(batch_size), *shape), dtype=dtype)
        try:
            self.data = data.share_memory_()
            self.ordinals = torch.full((self.slots,), -1, dtype=torch.int64).share_memory_()
        except RuntimeError as exc:  # e.g. a small /dev/shm (docker's default is 64 MB)
            need = data.numel() * data.element_size() / 2**20
            raise HandoverError(f"no shared memory for a ring of {self.slots} batches of {tuple(data.shape[1:])} "
                                f"({need:.0f} MiB): {exc}",
                                hint="enlarge /dev/shm (docker run --shm-size), use fewer workers or a smaller "
                                     "batch, or pass handover='torch'") from exc

    def put(self, ordinal: int, maps: torch.Tensor, labels: Any) -> Ticket:
        """In a worker: the maps of batch ``ordinal`` into its slot; the ticket to return."""
        slot = ordinal % self.slots
        rows = len(maps)
        if rows > self.data.shape[1] or maps.shape[1:] != self.data.shape[2:] or maps.dtype != self.data.dtype:
            raise HandoverError(f"a batch of {tuple(maps.shape)} {maps.dtype} does not fit the ring's slots of "
                                f"{tuple(self.data.shape[1:])} {self.data.dtype}")
        ordinals = self.ordinals.numpy()
        ordinals[slot] = -1  # being written
        self.data[slot, :rows].copy_(maps)
        ordinals[slot] = ordinal
        if isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.dim() == 1:
            labels = labels.numpy()  # pickled with the ticket: no second shared storage
        return Ticket(ordinal, rows, labels)

    def take(self, ticket: Ticket) -> list[Any]:
        """In the training process: ``[maps, labels]`` of the ticket's batch, the maps
        copied out of the ring."""
        slot = ticket.ordinal % self.slots
        ordinals = self.ordinals.numpy()
        if ordinals[slot] != ticket.ordinal:
            raise HandoverError(f"batch {ticket.ordinal}: its ring slot {slot} holds batch {ordinals[slot]}")
        maps = self.data[slot, :ticket.rows].clone()
        if ordinals[slot] != ticket.ordinal:  # overwritten while being copied
            raise HandoverError(f"batch {ticket.ordinal}: its ring slot {slot} was overwritten while being read")
        labels = ticket.labels
        return [maps, torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels]


__all__ = ["BatchKeys", "OrdinalBatches", "SharedRing", "Ticket", "ring_slots"]
