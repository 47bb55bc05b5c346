"""Many readers: one cache opened twice in a process, 8 DataLoader workers beside another
process, more reader processes than LMDB's 126 reader slots, readers racing a writer,
and fork / spawn / forkserver workers."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time

import numpy as np
import pytest
import torch
from reliability_support import BACKENDS, N_SAMPLES, suffix, synthetic, write
from torch.utils.data import ConcatDataset, DataLoader

import fmcache
from fmcache import FeatureMapDataset
from fmcache.errors import CacheReplacedError, IncompleteCacheError, NotACacheError, SampleIndexError


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    paths = {}
    for backend in BACKENDS:
        paths[backend] = root / f"c{suffix(backend)}"
        write(paths[backend], backend, codec="raw")
    return paths


TRUTH = synthetic()[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_cache_open_twice_in_one_process(caches, backend):
    """A Dataset and an open_cache side by side (a notebook): both read, and closing one
    leaves the other working (LMDB environments are shared and reference-counted)."""
    ds = FeatureMapDataset(caches[backend], "conv")
    other = fmcache.open_cache(caches[backend])
    third = fmcache.open_cache(caches[backend])
    np.testing.assert_array_equal(ds[5][0].numpy(), TRUTH["conv"][5])
    np.testing.assert_array_equal(other.read("conv", 6), TRUTH["conv"][6])
    other.close()
    np.testing.assert_array_equal(ds[7][0].numpy(), TRUTH["conv"][7])
    np.testing.assert_array_equal(third.read("tokens", 8), TRUTH["tokens"][8])
    third.close()
    np.testing.assert_array_equal(ds[9][0].numpy(), TRUTH["conv"][9])


def _read_repeatedly(path, rounds, conn):
    with fmcache.open_cache(path) as cache:
        ok = all(np.array_equal(cache.read_batch("conv", np.arange(N_SAMPLES)), TRUTH["conv"]) for _ in range(rounds))
    conn.send(ok)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")
@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_workers_and_a_second_process(caches, backend):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    other = ctx.Process(target=_read_repeatedly, args=(caches[backend], 20, child))
    other.start()
    ds = FeatureMapDataset(caches[backend], "conv")
    ds[0]  # handles already open in the parent before the workers fork
    loader = DataLoader(ds, batch_size=4, num_workers=8, shuffle=False, multiprocessing_context=ctx)
    got = torch.cat([x for x, _ in loader]).numpy()
    np.testing.assert_array_equal(got, TRUTH["conv"])
    assert parent.recv() is True
    other.join(60)
    assert other.exitcode == 0


def _hold_open_and_read(path, barrier, results, index):
    cache = fmcache.open_cache(path)
    first = cache.read("conv", index % N_SAMPLES)
    barrier.wait(timeout=120)  # every reader has the cache open at once
    again = cache.read("conv", (index * 7) % N_SAMPLES)
    ok = np.array_equal(first, TRUTH["conv"][index % N_SAMPLES]) and \
        np.array_equal(again, TRUTH["conv"][(index * 7) % N_SAMPLES])
    results[index] = 1 if ok else 2
    cache.close()


def test_more_reader_processes_than_lmdb_reader_slots(caches):
    """Readers open without LMDB's lock file (lock=False), so its 126 reader slots are no
    limit: 130 processes hold the cache open at the same moment."""
    n = 130
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n)
    results = ctx.Array("b", n)
    procs = [ctx.Process(target=_hold_open_and_read, args=(caches["lmdb"], barrier, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * n
    assert list(results) == [1] * n


def _rewrite_slowly(path, backend, started):
    """Overwrite the committed cache at ``path`` with other data, batch by batch."""
    maps, labels = synthetic(seed=1)
    with fmcache.create_cache(path, backend=backend, overwrite=True) as w:
        for name, shape in {"conv": (6, 8, 8), "tokens": (5, 7)}.items():
            w.add_layer(name, shape, codec="raw", samples_per_chunk=4)
        for start in range(0, N_SAMPLES, 8):
            w.append({k: v[start:start + 8] for k, v in maps.items()}, labels[start:start + 8])
            started.set()
            time.sleep(0.02)
        w.commit()


@pytest.mark.parametrize("backend", BACKENDS)
def test_readers_racing_a_writer_see_one_whole_committed_cache(tmp_path, backend):
    """The writer works on <path>.partial and replaces ``path`` at commit. A reader opened
    before keeps reading the old cache; every open during the rewrite sees the old or the
    new cache whole (never a mix), or a typed 'not there / incomplete' error."""
    path = tmp_path / f"c{suffix(backend)}"
    write(path, backend, codec="raw")
    old, new = TRUTH["conv"], synthetic(seed=1)[0]["conv"]
    early = fmcache.open_cache(path)
    ctx = mp.get_context("fork")
    started = ctx.Event()
    writer = ctx.Process(target=_rewrite_slowly, args=(path, backend, started))
    writer.start()
    assert started.wait(60)
    seen = {"old": 0, "new": 0, "typed error": 0}
    while True:
        done = not writer.is_alive()
        try:
            with fmcache.open_cache(path) as cache:
                got = cache.read_batch("conv", np.arange(N_SAMPLES))
            which = "old" if np.array_equal(got, old) else "new" if np.array_equal(got, new) else "MIXED"
            assert which != "MIXED"
            seen[which] += 1
        except (IncompleteCacheError, NotACacheError):
            seen["typed error"] += 1
        np.testing.assert_array_equal(early.read_batch("conv", np.arange(N_SAMPLES)), old)
        if done:
            break
    writer.join()
    assert writer.exitcode == 0
    assert seen["old"] > 0 and seen["new"] > 0, seen
    np.testing.assert_array_equal(early.read("conv", 3), old[3])  # still the old one, still readable
    early.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_under_every_start_method(caches, method):
    """One loader over an LMDB and an HDF5 cache at once; the datasets were used in the
    parent first, so open handles exist there and must not travel."""
    datasets = [FeatureMapDataset(caches[b], "conv") for b in BACKENDS]
    for ds in datasets:
        ds[1]
    # fork: 2 workers; spawn/forkserver start a fresh interpreter each (torch import), so 1
    loader = DataLoader(ConcatDataset(datasets), batch_size=16, num_workers=2 if method == "fork" else 1,
                        multiprocessing_context=mp.get_context(method))
    got = torch.cat([x for x, _ in loader]).numpy()
    np.testing.assert_array_equal(got, np.concatenate([TRUTH["conv"], TRUTH["conv"]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rebuild", ["same layout", "other codec"])
def test_workers_of_a_dataset_whose_cache_was_replaced_refuse_it(tmp_path, backend, rebuild):
    """A cache rebuilt under the path of an open Dataset: its main process keeps reading
    the old cache, and its DataLoader workers, which open the path again, served the NEW
    maps silently (same layout) or failed to decode them as if damaged (another codec) —
    a new-user sweep. Workers (forked, or given a pickled Dataset) now refuse with
    CacheReplacedError; a Dataset created afresh reads the new cache."""
    path = tmp_path / f"c{suffix(backend)}"
    write(path, backend, codec="raw")
    ds = FeatureMapDataset(path, "conv")
    np.testing.assert_array_equal(ds[3][0].numpy(), TRUTH["conv"][3])
    write(path, backend, codec="raw" if rebuild == "same layout" else "int8", seed=1, overwrite=True)
    np.testing.assert_array_equal(ds[3][0].numpy(), TRUTH["conv"][3])  # the main process: the old cache
    loader = DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=mp.get_context("fork"))
    with pytest.raises(CacheReplacedError, match=r"was replaced since it was opened"):
        next(iter(loader))
    clone = pickle.loads(pickle.dumps(ds))  # what spawn / forkserver workers get
    with pytest.raises(CacheReplacedError, match=r"was replaced since this Dataset opened it"):
        clone[3]
    fresh = FeatureMapDataset(path, "conv")
    assert not np.array_equal(fresh[3][0].numpy(), TRUTH["conv"][3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_of_a_dataset_whose_cache_was_moved_say_so(tmp_path, backend):
    """Moved after the Dataset opened it: HDF5's workers reported 'HDF5 cannot open it'
    as corruption, LMDB's that a build had committed over it."""
    path = tmp_path / f"c{suffix(backend)}"
    write(path, backend, codec="raw")
    ds = FeatureMapDataset(path, "conv")
    ds[0]
    path.rename(tmp_path / f"moved{suffix(backend)}")
    loader = DataLoader(ds, batch_size=16, num_workers=1, multiprocessing_context=mp.get_context("fork"))
    with pytest.raises(NotACacheError, match=r"does not exist: it was moved or deleted after it was opened") as info:
        next(iter(loader))
    assert str(info.value).count("(hint: ") == 1  # torch's re-raise keeps one hint, not two


def test_dataset_indices_wrap_once_and_must_be_integers(caches):
    """ds[-257] of 256 items read item 255 (negative indices wrapped twice) and ds[1.5]
    read item 1 (a new-user sweep)."""
    ds = FeatureMapDataset(caches["lmdb"], "conv")
    n = len(ds)
    np.testing.assert_array_equal(ds[-1][0].numpy(), TRUTH["conv"][n - 1])
    np.testing.assert_array_equal(ds[-n][0].numpy(), TRUTH["conv"][0])
    for bad, message in ((-n - 1, rf"item {-n - 1} is out of range"), (n, rf"item {n} is out of range"),
                         (1.5, "item indices must be integers, got 1.5"), (True, "got True")):
        with pytest.raises(SampleIndexError, match=message):
            ds[bad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forks_while_another_thread_reads_do_not_hang(caches, backend):
    """A child forked while a parent thread was inside an LMDB read inherited py-lmdb's
    count of operations in flight, and closing the inherited environment waited for it
    forever (DataLoader workers hung; 16 of 20 forks in the sweep)."""
    import os
    import signal
    import threading

    path = caches[backend]
    cache = fmcache.open_cache(path)
    want = cache.read_batch("conv", range(N_SAMPLES))
    stop = threading.Event()

    def read_on() -> None:
        while not stop.is_set():
            cache.read_batch("conv", range(0, N_SAMPLES, 3))

    reader = threading.Thread(target=read_on)
    reader.start()
    outcomes = []
    try:
        for _ in range(12):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    with fmcache.open_cache(path) as again:
                        os._exit(0 if np.array_equal(again.read_batch("conv", range(N_SAMPLES)), want) else 3)
                finally:
                    os._exit(4)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    outcomes.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    outcomes.append("hung")
                    break
                time.sleep(0.01)
    finally:
        stop.set()
        reader.join()
        cache.close()
    assert outcomes == [0] * 12


def test_a_read_interrupted_in_the_forking_thread_does_not_stall_its_forks():
    """A Ctrl-C landing between a read's mark and its try left the count of reads in flight
    one high (or, with forks racing, one low: IndexError) and every later fork waited its
    full 10 s. Marks are per thread now, and a fork never waits for its own thread."""
    import os
    import threading

    from fmcache.backends import lmdb_envs

    lmdb_envs.READING[threading.get_ident()] = True  # what such an interrupt leaves behind
    try:
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if not lmdb_envs.READING else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert time.monotonic() - began < lmdb_envs.FORK_WAIT_S / 2
    finally:
        lmdb_envs.READING.pop(threading.get_ident(), None)
