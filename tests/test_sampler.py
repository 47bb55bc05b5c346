"""Tests of fmcache.sampler: ChunkShuffleSampler and chunk_runs."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from fmcache.errors import FmcacheError, SampleIndexError
from fmcache.sampler import (
    SHUFFLE_MODES,
    ChunkShuffleSampler,
    SamplerConfigError,
    chunk_runs,
)

modes = st.sampled_from(SHUFFLE_MODES)
seeds = st.integers(0, 2**32)
epochs = st.integers(0, 1000)


def shares(num_samples: int, chunk_size: int, world_size: int, **kwargs: object) -> list[list[int]]:
    """Every rank's order for the current epoch, computed as each rank would."""
    return [
        list(ChunkShuffleSampler(num_samples, chunk_size, rank=rank, world_size=world_size, **kwargs))
        for rank in range(world_size)
    ]


# -- one epoch is a permutation, or the documented padded / dropped multiset ----------------


@given(
    num_samples=st.integers(0, 3000),
    chunk_size=st.integers(1, 100),
    buffer_chunks=st.integers(1, 16),
    shuffle=modes,
    seed=seeds,
    epoch=epochs,
)
def test_single_process_epoch_is_a_permutation(num_samples, chunk_size, buffer_chunks, shuffle, seed, epoch):
    sampler = ChunkShuffleSampler(
        num_samples, chunk_size, buffer_chunks=buffer_chunks, seed=seed, shuffle=shuffle
    )
    sampler.set_epoch(epoch)
    assert sorted(sampler) == list(range(num_samples))


@given(
    world_size=st.integers(1, 6),
    per_rank=st.integers(0, 400),
    chunk_size=st.integers(1, 64),
    buffer_chunks=st.integers(1, 8),
    shuffle=modes,
    drop_last=st.booleans(),
    seed=seeds,
)
def test_ranks_are_disjoint_and_cover_every_sample_when_world_size_divides(
    world_size, per_rank, chunk_size, buffer_chunks, shuffle, drop_last, seed
):
    num_samples = world_size * per_rank
    orders = shares(
        num_samples,
        chunk_size,
        world_size,
        buffer_chunks=buffer_chunks,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
    )
    assert [len(order) for order in orders] == [per_rank] * world_size
    assert sorted(i for order in orders for i in order) == list(range(num_samples))


@given(
    world_size=st.integers(2, 7),
    num_samples=st.integers(1, 2000),
    chunk_size=st.integers(1, 64),
    shuffle=modes,
    seed=seeds,
)
def test_padding_repeats_fewer_than_world_size_samples(world_size, num_samples, chunk_size, shuffle, seed):
    orders = shares(num_samples, chunk_size, world_size, shuffle=shuffle, seed=seed)
    per_rank = math.ceil(num_samples / world_size)
    assert [len(order) for order in orders] == [per_rank] * world_size
    counts = Counter(i for order in orders for i in order)
    assert set(counts) == set(range(num_samples))
    repeats = sum(counts.values()) - num_samples
    assert repeats == per_rank * world_size - num_samples < world_size
    # Padding repeats distinct samples unless there are fewer samples than ranks.
    assert max(counts.values()) <= 1 + math.ceil(repeats / num_samples)


@given(
    world_size=st.integers(2, 7),
    num_samples=st.integers(0, 2000),
    chunk_size=st.integers(1, 64),
    shuffle=modes,
    seed=seeds,
)
def test_drop_last_leaves_out_fewer_than_world_size_samples(
    world_size, num_samples, chunk_size, shuffle, seed
):
    orders = shares(num_samples, chunk_size, world_size, shuffle=shuffle, seed=seed, drop_last=True)
    per_rank = num_samples // world_size
    assert [len(order) for order in orders] == [per_rank] * world_size
    union = [i for order in orders for i in order]
    assert len(set(union)) == len(union)
    assert set(union) <= set(range(num_samples))
    assert num_samples - len(union) == num_samples % world_size


@given(
    num_samples=st.integers(0, 1000),
    world_size=st.integers(1, 5),
    drop_last=st.booleans(),
    shuffle=modes,
)
def test_len_is_the_number_of_indices_yielded(num_samples, world_size, drop_last, shuffle):
    for rank in range(world_size):
        sampler = ChunkShuffleSampler(
            num_samples, 16, rank=rank, world_size=world_size, drop_last=drop_last, shuffle=shuffle
        )
        assert len(sampler) == len(list(sampler))


# -- determinism ------------------------------------------------------------------------------


@given(shuffle=modes, seed=seeds, epoch=epochs, world_size=st.integers(1, 4), data=st.data())
def test_same_parameters_give_the_same_order(shuffle, seed, epoch, world_size, data):
    rank = data.draw(st.integers(0, world_size - 1))
    kwargs = {"buffer_chunks": 4, "seed": seed, "shuffle": shuffle, "rank": rank, "world_size": world_size}
    first, second = ChunkShuffleSampler(777, 10, **kwargs), ChunkShuffleSampler(777, 10, **kwargs)
    first.set_epoch(epoch)
    second.set_epoch(epoch)
    np.random.seed(epoch)  # the global RNG state must not matter
    order = list(first)
    np.random.seed(epoch + 1)
    assert order == list(second) == list(first)


@pytest.mark.parametrize("shuffle", SHUFFLE_MODES)
def test_pickle_round_trip_keeps_the_order_and_the_epoch(shuffle):
    sampler = ChunkShuffleSampler(1000, 32, seed=7, shuffle=shuffle, rank=1, world_size=3)
    sampler.set_epoch(5)
    restored = pickle.loads(pickle.dumps(sampler))
    assert restored.epoch == 5
    assert list(restored) == list(sampler)


@pytest.mark.parametrize("shuffle", ["chunks", "exact"])
def test_different_epochs_give_different_orders(shuffle):
    sampler = ChunkShuffleSampler(2000, 32, shuffle=shuffle)
    orders = {tuple(sampler.epoch_indices(epoch)) for epoch in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("shuffle", ["chunks", "exact"])
def test_different_seeds_give_different_orders(shuffle):
    orders = {tuple(ChunkShuffleSampler(2000, 32, seed=seed, shuffle=shuffle)) for seed in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("world_size", [1, 3])
def test_none_mode_is_sequential_in_contiguous_rank_slices(world_size):
    orders = shares(100, 8, world_size, shuffle="none")
    assert [i for order in orders for i in order][:100] == list(range(100))
    assert all(order == sorted(order) for order in orders[:-1])


def test_set_epoch_selects_the_order_that_iteration_yields():
    sampler = ChunkShuffleSampler(500, 16, seed=3)
    sampler.set_epoch(4)
    assert list(sampler) == sampler.epoch_indices(4).tolist()
    assert list(sampler) != sampler.epoch_indices(3).tolist()


# -- locality of "chunks" mode ------------------------------------------------------------------
#
# The bounds below are what docs/dataset.md promises, with slack for the short segments a
# rank share can hold (a cut chunk at each end, the data's short last chunk, padding) and
# for random spacing of keys. A plain window shuffle breaks the span bound (2*B at window
# edges); a standard shuffle buffer breaks all three; a ring-shaped buffer breaks the
# lifetime bound.


def chunk_lifetimes(order: np.ndarray, chunk_size: int) -> dict[int, tuple[int, int]]:
    """chunk -> (first position, last position) in ``order``."""
    lifetimes: dict[int, tuple[int, int]] = {}
    for position, chunk in enumerate((order // chunk_size).tolist()):
        first, _ = lifetimes.get(chunk, (position, position))
        lifetimes[chunk] = (first, position)
    return lifetimes


def max_distinct_chunks_in_any_span(order: np.ndarray, chunk_size: int, span: int) -> int:
    chunks = (order // chunk_size).tolist()
    window: Counter[int] = Counter()
    worst = 0
    for position, chunk in enumerate(chunks):
        window[chunk] += 1
        if position >= span:
            leaving = chunks[position - span]
            window[leaving] -= 1
            if not window[leaving]:
                del window[leaving]
        worst = max(worst, len(window))
    return worst


locality_cases = st.fixed_dictionaries(
    {
        "chunk_size": st.integers(2, 64),
        "buffer_chunks": st.integers(2, 16),
        "world_size": st.integers(1, 3),
        "drop_last": st.booleans(),
        "seed": seeds,
        "epoch": epochs,
    }
)


def locality_sampler(case: dict, data: st.DataObject) -> ChunkShuffleSampler:
    # Epochs of 4..12 buffers per rank: long enough for a bad order to show.
    buffers = data.draw(st.integers(4, 12), label="buffers per rank")
    num_samples = buffers * case["buffer_chunks"] * case["chunk_size"] * case["world_size"]
    num_samples -= data.draw(st.integers(0, case["chunk_size"] - 1), label="short last chunk")
    rank = data.draw(st.integers(0, case["world_size"] - 1), label="rank")
    sampler = ChunkShuffleSampler(
        num_samples,
        case["chunk_size"],
        buffer_chunks=case["buffer_chunks"],
        seed=case["seed"],
        rank=rank,
        world_size=case["world_size"],
        drop_last=case["drop_last"],
    )
    sampler.set_epoch(case["epoch"])
    return sampler


@settings(deadline=None, max_examples=60)
@given(case=locality_cases, data=st.data())
def test_any_span_of_positions_touches_about_buffer_chunks_chunks(case, data):
    sampler = locality_sampler(case, data)
    order = sampler.epoch_indices()
    for span in (sampler.chunk_size, 32):
        bound = sampler.buffer_chunks + 2 * math.ceil(span / sampler.chunk_size) + 3
        assert max_distinct_chunks_in_any_span(order, sampler.chunk_size, span) <= bound


@settings(deadline=None, max_examples=60)
@given(case=locality_cases, data=st.data())
def test_at_most_buffer_chunks_plus_3_chunks_are_open_at_once(case, data):
    # A chunk is open from its first to its last sample of the epoch: a reader that keeps
    # exactly the open chunks decodes each chunk once and holds this many at most.
    sampler = locality_sampler(case, data)
    order = sampler.epoch_indices()
    opened = np.zeros(len(order) + 1, dtype=np.int64)
    for first, last in chunk_lifetimes(order, sampler.chunk_size).values():
        opened[first] += 1
        opened[last + 1] -= 1
    assert np.cumsum(opened).max() <= sampler.buffer_chunks + 3


@settings(deadline=None, max_examples=60)
@given(case=locality_cases, data=st.data())
def test_every_chunk_is_entered_once_per_epoch(case, data):
    # Entered once: all of a chunk's samples in this rank's epoch lie in one stretch of
    # positions about one buffer long (the stretched ends reach up to about two).
    sampler = locality_sampler(case, data)
    order = sampler.epoch_indices()
    longest = 3 * (sampler.buffer_chunks + 1) * sampler.chunk_size
    lifetimes = chunk_lifetimes(order, sampler.chunk_size)
    assert max(last - first + 1 for first, last in lifetimes.values()) <= longest


def test_chunks_mode_mixes_buffer_chunks_chunks_at_a_time():
    # Not a disguised sequential order: spans of one chunk's length mix many chunks.
    sampler = ChunkShuffleSampler(64 * 32, 32, buffer_chunks=8, seed=1)
    chunks = (sampler.epoch_indices() // 32).reshape(-1, 32)
    mean_distinct = np.mean([len(set(row)) for row in chunks.tolist()])
    assert mean_distinct >= 6


@pytest.mark.parametrize("seed", range(5))
def test_buffer_is_full_from_the_first_to_the_last_sample(seed):
    # The stretched ends: without them the epoch would open with one chunk and ramp up.
    chunks = (ChunkShuffleSampler(64 * 32, 32, buffer_chunks=8, seed=seed).epoch_indices() // 32).tolist()
    assert len(set(chunks[:32])) >= 6
    assert len(set(chunks[-32:])) >= 6


def test_chunk_order_is_shuffled_not_sequential():
    sampler = ChunkShuffleSampler(64 * 32, 32, buffer_chunks=2, seed=1)
    first_positions = chunk_lifetimes(sampler.epoch_indices(), 32)
    by_first_position = sorted(first_positions, key=lambda chunk: first_positions[chunk][0])
    assert by_first_position != sorted(by_first_position)


# -- distributed defaults and a real process group ---------------------------------------------


def test_rank_and_world_size_default_to_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    sampler = ChunkShuffleSampler(100, 8)
    assert (sampler.rank, sampler.world_size) == (2, 4)


def test_rank_and_world_size_default_to_0_and_1_without_a_process_group():
    sampler = ChunkShuffleSampler(100, 8)
    assert (sampler.rank, sampler.world_size) == (0, 1)


def _rank_order_in_process_group(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = ChunkShuffleSampler(1001, 16, buffer_chunks=4, seed=11)
        sampler.set_epoch(3)
        np.save(f"{out_dir}/rank{rank}.npy", np.asarray(list(sampler)))
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_real_process_group_agree_with_the_computed_shares(tmp_path):
    world_size = 2
    # fork: the children need no fresh interpreter, and the test stays fast.
    mp.start_processes(
        _rank_order_in_process_group,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
        start_method="fork",
    )
    loaded = [np.load(tmp_path / f"rank{rank}.npy").tolist() for rank in range(world_size)]
    for rank in range(world_size):
        here = ChunkShuffleSampler(1001, 16, buffer_chunks=4, seed=11, rank=rank, world_size=world_size)
        here.set_epoch(3)
        assert loaded[rank] == list(here)
    assert [len(order) for order in loaded] == [501, 501]
    assert set(loaded[0]) | set(loaded[1]) == set(range(1001))


# -- with a DataLoader ---------------------------------------------------------------------------


def test_dataloader_with_two_workers_loads_in_sampler_order():
    samples = TensorDataset(torch.arange(1000))
    sampler = ChunkShuffleSampler(1000, 32, buffer_chunks=4, seed=5)
    loader = DataLoader(samples, batch_size=50, sampler=sampler, num_workers=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        loaded = torch.cat([batch for (batch,) in loader]).tolist()
        assert loaded == sampler.epoch_indices(epoch).tolist()


# -- validation ------------------------------------------------------------------------------------

bad_configs = [
    pytest.param({"num_samples": -1, "chunk_size": 4}, "num_samples must be >= 0", id="negative-num-samples"),
    pytest.param(
        {"num_samples": 10.0, "chunk_size": 4}, "num_samples must be an int", id="float-num-samples"
    ),
    pytest.param({"num_samples": 10, "chunk_size": 0}, "chunk_size must be >= 1", id="zero-chunk-size"),
    pytest.param({"num_samples": 10, "chunk_size": True}, "chunk_size must be an int", id="bool-chunk-size"),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "buffer_chunks": 0},
        "buffer_chunks must be >= 1",
        id="zero-buffer",
    ),
    pytest.param({"num_samples": 10, "chunk_size": 4, "seed": -1}, "seed must be >= 0", id="negative-seed"),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "shuffle": "full"}, "unknown shuffle mode 'full'", id="bad-mode"
    ),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "world_size": 0}, "world_size must be >= 1", id="zero-world"
    ),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "rank": -1, "world_size": 2},
        "rank must be >= 0",
        id="negative-rank",
    ),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "rank": 2, "world_size": 2},
        "rank 2 is out of range",
        id="rank-equals-world",
    ),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "rank": 1},
        "rank 1 is out of range for world_size 1",
        id="rank-alone",
    ),
    pytest.param(
        {"num_samples": 10, "chunk_size": 4, "drop_last": "yes"},
        "drop_last must be a bool",
        id="str-drop-last",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), bad_configs)
def test_bad_parameters_raise_a_typed_error_with_a_hint(kwargs, message):
    with pytest.raises(SamplerConfigError, match=message) as caught:
        ChunkShuffleSampler(**kwargs)
    assert isinstance(caught.value, (FmcacheError, ValueError))
    assert caught.value.hint


@pytest.mark.parametrize("epoch", [-1, 1.5, None], ids=["negative", "float", "none"])
def test_set_epoch_rejects_a_bad_epoch(epoch):
    with pytest.raises(SamplerConfigError, match="epoch must be"):
        ChunkShuffleSampler(10, 4).set_epoch(epoch)


def test_numpy_integers_are_accepted():
    sampler = ChunkShuffleSampler(np.int64(100), np.int32(8), buffer_chunks=np.uint8(2), seed=np.int64(1))
    assert sorted(sampler) == list(range(100))


# -- chunk_runs --------------------------------------------------------------------------------------


@given(
    chunk_size=st.integers(1, 50),
    batch=st.lists(st.integers(0, 999), max_size=200),
)
def test_chunk_runs_rebuild_the_batch_with_one_fetch_per_chunk(chunk_size, batch):
    runs = chunk_runs(batch, chunk_size, num_samples=1000)
    chunks = [run.chunk for run in runs]
    assert chunks == sorted(set(chunks)) == sorted({i // chunk_size for i in batch})
    rebuilt = np.full(len(batch), -1)
    for run in runs:
        assert ((run.offsets >= 0) & (run.offsets < chunk_size)).all()
        assert (np.diff(run.positions) > 0).all()
        rebuilt[run.positions] = run.chunk * chunk_size + run.offsets
    assert rebuilt.tolist() == batch


def test_chunk_runs_example():
    runs = chunk_runs([5, 40, 3, 17, 40], 16)
    assert [(run.chunk, run.offsets.tolist(), run.positions.tolist()) for run in runs] == [
        (0, [5, 3], [0, 2]),
        (1, [1], [3]),
        (2, [8, 8], [1, 4]),
    ]


bad_batches = [
    pytest.param([3, -1], {}, SampleIndexError, "sample index -1 is negative", id="negative"),
    pytest.param(
        [3, 10], {"num_samples": 10}, SampleIndexError, "sample index 10 is out of range", id="past-end"
    ),
    pytest.param([[1, 2]], {}, SamplerConfigError, "1-D sequence of ints", id="2-d"),
    pytest.param([1.0, 2.0], {}, SamplerConfigError, "1-D sequence of ints", id="floats"),
]


@pytest.mark.parametrize(("batch", "kwargs", "error", "message"), bad_batches)
def test_chunk_runs_rejects_bad_batches(batch, kwargs, error, message):
    with pytest.raises(error, match=message):
        chunk_runs(batch, 4, **kwargs)


def test_chunk_runs_rejects_a_bad_chunk_size():
    with pytest.raises(SamplerConfigError, match="chunk_size must be >= 1"):
        chunk_runs([1, 2], 0)
