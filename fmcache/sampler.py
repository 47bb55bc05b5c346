"""A chunk-aware, deterministic, distributed shuffling sampler.

A cache stores samples in *chunks* of ``chunk_size`` consecutive samples (the last one may
be short); reading one sample means reading, and usually decoding, its whole chunk. A full
random permutation therefore decodes about one chunk per sample. :class:`ChunkShuffleSampler`
keeps reads local instead, in three steps per epoch:

1. **Chunk order.** Shuffle the order of the chunks (``shuffle="chunks"``); the epoch's
   *stream* is the samples of the chunks in that order.
2. **Rank share.** Rank ``r`` of ``world_size`` takes the ``r``-th contiguous slice of the
   stream, so it reads whole chunks except at most one partial chunk at each end of its
   slice. Equal lengths come from padding by repeating the stream's start
   (``drop_last=False``) or from dropping its tail (``drop_last=True``).
3. **Sliding buffer.** Within its slice each rank emits samples in a random order in which
   about ``buffer_chunks`` chunks are open at any time: a chunk's samples are spread
   uniformly over ``buffer_chunks * chunk_size`` consecutive positions that start where the
   chunk would start in sequential order, stretched at both ends of the slice so that the
   buffer is full from the first sample to the last (:func:`sliding_window_shuffle`).

Everything is a function of ``(seed, epoch, rank, world_size)``: numpy Generators seeded from
``(seed, epoch)`` (and, for step 3, a child seed keyed by ``(world_size, rank)``), never a
global random state, so every process computes the same order. The choices, and measured
shuffle quality against a full permutation, are in ``docs/dataset.md``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import SampleIndexError, SamplerConfigError

ShuffleMode = Literal["chunks", "exact", "none"]
SHUFFLE_MODES: tuple[str, ...] = get_args(ShuffleMode)


def _check_int(name: str, value: object, *, minimum: int, hint: str | None = None) -> int:
    # bool is an int subclass, but `chunk_size=True` is always a mistake.
    if isinstance(value, bool):
        raise SamplerConfigError(f"{name} must be an int, got bool {value!r}", hint=hint)
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SamplerConfigError(
            f"{name} must be an int, got {type(value).__name__} {value!r}", hint=hint
        ) from None
    if number < minimum:
        raise SamplerConfigError(f"{name} must be >= {minimum}, got {number}", hint=hint)
    return number


# -- pure functions: one epoch's order ---------------------------------------------------


def epoch_stream(num_samples: int, chunk_size: int, shuffle: str, rng: np.random.Generator) -> np.ndarray:
    """All samples of one epoch, before the rank split and the buffer.

    Parameters
    ----------
    num_samples, chunk_size
        Data set length and samples per stored chunk.
    shuffle
        ``"chunks"``: the chunks in a random order, each chunk's samples in order;
        ``"exact"``: a uniform random permutation; ``"none"``: ``0 .. num_samples-1``.
    rng
        Drawn from only for ``"chunks"`` and ``"exact"``.

    Returns
    -------
    numpy.ndarray
        int64 array, a permutation of ``range(num_samples)``.
    """
    if shuffle == "none":
        return np.arange(num_samples, dtype=np.int64)
    if shuffle == "exact":
        return rng.permutation(num_samples).astype(np.int64, copy=False)
    num_chunks = -(-num_samples // chunk_size)
    chunk_order = rng.permutation(num_chunks).astype(np.int64, copy=False)
    lengths = np.full(num_chunks, chunk_size, dtype=np.int64)
    if num_chunks:
        lengths[-1] = num_samples - (num_chunks - 1) * chunk_size
    ordered_lengths = lengths[chunk_order]
    stream_starts = np.cumsum(ordered_lengths) - ordered_lengths
    within_chunk = np.arange(num_samples, dtype=np.int64) - np.repeat(stream_starts, ordered_lengths)
    return np.repeat(chunk_order * chunk_size, ordered_lengths) + within_chunk


def samples_per_rank(num_samples: int, world_size: int, drop_last: bool) -> int:
    """Length of every rank's share: ``ceil`` (padding) or ``floor`` (dropping) of N / world."""
    if drop_last:
        return num_samples // world_size
    return -(-num_samples // world_size)


def rank_share(stream: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of ``stream``, equal in length on every rank.

    ``drop_last=False`` pads the stream to ``world_size * ceil(N / world_size)`` by repeating
    it from its start (fewer than ``world_size`` extra samples, as torch's
    ``DistributedSampler`` does); ``drop_last=True`` drops its last ``N mod world_size``.
    Contiguous slices of a chunk-ordered stream keep each chunk on one rank except where a
    slice boundary cuts it (at most ``world_size - 1`` chunks, plus the padding).
    """
    per_rank = samples_per_rank(stream.size, world_size, drop_last)
    total = per_rank * world_size
    if total > stream.size:
        stream = np.resize(stream, total)  # repeats the stream cyclically
    return stream[rank * per_rank : (rank + 1) * per_rank]


def sliding_window_shuffle(
    indices: np.ndarray, chunk_size: int, buffer_chunks: int, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle a chunk-ordered sequence so that about ``buffer_chunks`` chunks are open at once.

    ``indices`` is read as *segments*, runs of consecutive entries in the same chunk
    (``index // chunk_size``). A segment starting at position ``o`` draws a uniform random
    key in ``[o, o + span)`` for each of its samples, ``span = buffer_chunks * chunk_size``,
    and the output is ``indices`` sorted by key. At every key, the segments whose interval
    covers it contribute at the same rate, so each stretch of output mixes about
    ``buffer_chunks`` chunks evenly, and a chunk is opened once: its samples lie within one
    stretch of about ``span`` positions.

    The first and last ``buffer_chunks`` segments have their intervals stretched to the
    start (``[0, o + span)``) or the end (``[o, o_last + span)``) so that the buffer is full
    from the first sample to the last, as after a shuffle buffer's initial fill, instead of
    ramping up from one chunk. A sequence no longer than ``span`` is permuted uniformly.

    Parameters
    ----------
    indices
        1-D int array of sample indices, chunk-ordered (e.g. a :func:`rank_share`).
    chunk_size, buffer_chunks
        Samples per chunk; chunks mixed at a time.
    rng
        Source of the keys.

    Returns
    -------
    numpy.ndarray
        A permutation of ``indices``.
    """
    count = indices.size
    span = buffer_chunks * chunk_size
    if count <= span:
        return indices[rng.permutation(count)]
    chunk_ids = indices // chunk_size
    starts = np.flatnonzero(np.r_[True, chunk_ids[1:] != chunk_ids[:-1]])
    lengths = np.diff(np.r_[starts, count])
    offsets = starts.astype(np.float64)
    last_offset = offsets[-1]
    lows = np.where(offsets >= span, offsets, 0.0)
    highs = np.where(last_offset - offsets >= span, offsets + span, last_offset + span)
    low = np.repeat(lows, lengths)
    keys = low + rng.random(count) * (np.repeat(highs, lengths) - low)
    return indices[np.argsort(keys, kind="stable")]


# -- grouping a batch by chunk -------------------------------------------------------------


class ChunkRun(NamedTuple):
    """The samples of one batch that live in one chunk.

    A reader fills a batch with ``out[run.positions] = decoded_chunk[run.offsets]``.
    """

    chunk: int
    """Chunk number: samples ``chunk * chunk_size`` up to ``(chunk + 1) * chunk_size - 1``."""
    offsets: np.ndarray
    """int64 offsets of the samples inside the chunk, in batch order (may repeat)."""
    positions: np.ndarray
    """int64 positions in the batch, ascending, that receive those samples."""


def chunk_runs(
    indices: Sequence[int] | np.ndarray, chunk_size: int, *, num_samples: int | None = None
) -> list[ChunkRun]:
    """Group a batch of sample indices by chunk, so each chunk is fetched once per batch.

    Parameters
    ----------
    indices
        1-D sequence of non-negative sample indices; duplicates are allowed (padding).
    chunk_size
        Samples per stored chunk.
    num_samples
        When given, indices must be below it.

    Returns
    -------
    list of ChunkRun
        One run per distinct chunk, by ascending chunk number, so reads move forward
        through storage.

    Raises
    ------
    SamplerConfigError
        ``chunk_size < 1``, or ``indices`` not a 1-D sequence of integers.
    SampleIndexError
        An index below 0 or, with ``num_samples``, at or above it.
    """
    chunk_size = _check_int("chunk_size", chunk_size, minimum=1)
    batch = np.asarray(indices)
    if batch.ndim != 1 or not (batch.size == 0 or np.issubdtype(batch.dtype, np.integer)):
        raise SamplerConfigError(
            f"indices must be a 1-D sequence of ints, got shape {batch.shape} dtype {batch.dtype}",
            hint="pass the list of sample indices of one batch",
        )
    batch = batch.astype(np.int64, copy=False)
    if batch.size and batch.min() < 0:
        bad = int(batch[np.argmax(batch < 0)])
        raise SampleIndexError(f"sample index {bad} is negative", hint="indices run from 0 to N-1")
    if num_samples is not None and batch.size and batch.max() >= num_samples:
        bad = int(batch[np.argmax(batch >= num_samples)])
        raise SampleIndexError(
            f"sample index {bad} is out of range for {num_samples} samples",
            hint="indices run from 0 to N-1",
        )
    chunks = batch // chunk_size
    # A stable sort keeps each run's positions ascending, i.e. in batch order.
    by_chunk = np.argsort(chunks, kind="stable").astype(np.int64, copy=False)
    cuts = np.flatnonzero(np.diff(chunks[by_chunk])) + 1
    runs = []
    for positions in np.split(by_chunk, cuts):
        if positions.size:  # np.split of an empty batch yields one empty group
            chunk = int(chunks[positions[0]])
            runs.append(ChunkRun(chunk, batch[positions] - chunk * chunk_size, positions))
    return runs


# -- the sampler ---------------------------------------------------------------------------


class SampleKey(NamedTuple):
    """A sample index with the epoch it is drawn for (what :class:`EpochSampler` yields)."""

    epoch: int
    sample: int


class EpochSampler(Sampler[SampleKey]):
    """Wraps a sampler with ``set_epoch``: yields its indices as ``SampleKey(epoch, sample)``.

    With persistent DataLoader workers, the data set a worker holds never sees the main
    process's ``set_epoch``; the key brings the epoch to it with every sample
    (:class:`fmcache.loader.EpochLoader`)."""

    def __init__(self, sampler: Sampler[int]) -> None:
        super().__init__()
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, minimum=0)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        return (SampleKey(epoch, sample) for sample in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def _default_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ChunkShuffleSampler(Sampler[int]):
    """Shuffles chunks, then samples within a sliding buffer of chunks; rank- and epoch-aware.

    Parameters
    ----------
    num_samples
        Data set length N (>= 0).
    chunk_size
        Samples per stored chunk (>= 1): chunk ``c`` holds samples
        ``c * chunk_size .. min((c + 1) * chunk_size, N) - 1``.
    buffer_chunks
        ``"chunks"`` mode: about this many chunks are mixed at any point of the order. A
        reader that drops a chunk after its last sample holds at most ``buffer_chunks + 3``
        decoded chunks and opens each once per epoch (docs/dataset.md, 'Locality').
    seed
        Base seed (>= 0), the same on every rank.
    shuffle
        ``"chunks"`` (chunk order shuffled, samples shuffled within the sliding buffer),
        ``"exact"`` (a uniform permutation; no locality) or ``"none"`` (sequential).
    rank, world_size
        This process's share of each epoch. Default: torch.distributed's when it is
        initialised, else 0 and 1.
    drop_last
        Equal shares by dropping the last ``N mod world_size`` samples of the epoch stream
        instead of padding by repeating its first ones.

    Notes
    -----
    The order is a function of ``(seed, epoch, rank, world_size)`` and the parameters only;
    call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``). Over all
    ranks an epoch covers every sample exactly once when ``world_size`` divides N; otherwise
    fewer than ``world_size`` samples are repeated (padding) or left out (``drop_last``).

    Raises
    ------
    SamplerConfigError
        A parameter of the wrong type or out of range, an unknown ``shuffle`` mode, or a
        rank outside ``0 .. world_size-1``.
    """

    def __init__(
        self,
        num_samples: int,
        chunk_size: int,
        *,
        buffer_chunks: int = 8,
        seed: int = 0,
        shuffle: ShuffleMode = "chunks",
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.num_samples = _check_int("num_samples", num_samples, minimum=0)
        self.chunk_size = _check_int(
            "chunk_size", chunk_size, minimum=1, hint="use the cache's samples per stored chunk"
        )
        self.buffer_chunks = _check_int("buffer_chunks", buffer_chunks, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0, hint="numpy seeds are non-negative ints")
        if shuffle not in SHUFFLE_MODES:
            raise SamplerConfigError(
                f"unknown shuffle mode {shuffle!r}", hint=f"use one of {', '.join(map(repr, SHUFFLE_MODES))}"
            )
        self.shuffle: ShuffleMode = shuffle
        if not isinstance(drop_last, (bool, np.bool_)):
            raise SamplerConfigError(
                f"drop_last must be a bool, got {type(drop_last).__name__} {drop_last!r}"
            )
        self.drop_last = bool(drop_last)
        default_rank, default_world = _default_rank_and_world()
        self.world_size = _check_int(
            "world_size", default_world if world_size is None else world_size, minimum=1
        )
        self.rank = _check_int("rank", default_rank if rank is None else rank, minimum=0)
        if self.rank >= self.world_size:
            raise SamplerConfigError(
                f"rank {self.rank} is out of range for world_size {self.world_size}",
                hint="ranks run from 0 to world_size-1; pass both rank and world_size, "
                "or initialise torch.distributed first",
            )
        self.epoch = 0

    @property
    def num_chunks(self) -> int:
        """Chunks in the data set, the last one possibly short."""
        return -(-self.num_samples // self.chunk_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (>= 0)."""
        self.epoch = _check_int("epoch", epoch, minimum=0)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's order for ``epoch`` (default: the current one) as an int64 array."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, minimum=0)
        rng = np.random.default_rng((self.seed, epoch))
        stream = epoch_stream(self.num_samples, self.chunk_size, self.shuffle, rng)
        share = rank_share(stream, self.rank, self.world_size, self.drop_last)
        if self.shuffle != "chunks":
            return share
        # A child seed per (world_size, rank): the ranks' buffers draw independent keys.
        buffer_seed = np.random.SeedSequence((self.seed, epoch), spawn_key=(self.world_size, self.rank))
        return sliding_window_shuffle(
            share, self.chunk_size, self.buffer_chunks, np.random.default_rng(buffer_seed)
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return samples_per_rank(self.num_samples, self.world_size, self.drop_last)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, chunk_size={self.chunk_size}, "
            f"buffer_chunks={self.buffer_chunks}, seed={self.seed}, shuffle={self.shuffle!r}, "
            f"rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last})"
        )


__all__ = [
    "SHUFFLE_MODES",
    "ChunkRun",
    "ChunkShuffleSampler",
    "EpochSampler",
    "SampleKey",
    "SamplerConfigError",
    "ShuffleMode",
    "chunk_runs",
    "epoch_stream",
    "rank_share",
    "samples_per_rank",
    "sliding_window_shuffle",
]
