"""Closing a cache while other threads read it (fmcache/backends/inflight.py).

Before session 17, LMDB unmapped its file under a thread decoding a record's bytes and
killed the process (SIGSEGV), and HDF5 reported the file as damaged (CorruptionError
"rebuild the cache") or raised h5py's RuntimeError. The stress runs in a child process,
so that a crash fails the test rather than the test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fmcache
from fmcache.backends import inflight

STRESS = textwrap.dedent('''
    import sys, threading, time
    import numpy as np
    import fmcache
    from fmcache.backends import hdf5_backend

    path, backend = sys.argv[1], sys.argv[2]
    hdf5_backend.ROW_CACHE_BYTES = 1 << 16  # HDF5: larger than the LRU, rows decoded alone too
    x = np.load(sys.argv[3])
    failures = []

    def reader(cache, stop, seed):
        rng = np.random.default_rng(seed)
        out = np.empty(x.shape[1:], np.float32)
        while not stop.is_set():
            kind = int(rng.integers(3))
            try:
                if kind == 0:  # per sample, in order
                    for i in range(len(x)):
                        if not np.array_equal(cache.read("L", i), x[i]):
                            failures.append(f"read {i}")
                elif kind == 1:  # per sample into out=, shuffled
                    for i in rng.permutation(len(x))[:40].tolist():
                        if not np.array_equal(cache.read("L", i, out=out), x[i]):
                            failures.append(f"read out= {i}")
                else:  # batches of rows far apart
                    rows = np.sort(rng.choice(len(x), 24, replace=False))
                    if not np.array_equal(cache.read_batch("L", rows), x[rows]):
                        failures.append(f"read_batch {rows.tolist()}")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    for trial in range(120):  # a cache opened, read by three threads, closed under them, twice
        cache, stop = fmcache.open_cache(path), threading.Event()
        threads = [threading.Thread(target=reader, args=(cache, stop, 3 * trial + k)) for k in range(3)]
        for t in threads:
            t.start()
        for _ in range(2):
            time.sleep(0.002)
            cache.close()
        stop.set()
        for t in threads:
            t.join()
    print(len(failures), failures[:5])
    sys.exit(1 if failures else 0)
''')


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_closing_a_cache_while_threads_read_it_neither_crashes_nor_fails_a_read(tmp_path, backend):
    """Three threads read (in order, shuffled into ``out=``, batches of rows far apart)
    while the main thread closes the cache under them, twice, for 120 caches opened in
    turn: every read returns the stored values (a read after a close opens the cache
    again), none fails, the process lives."""
    rng = np.random.default_rng(0)
    x = (rng.random((96, 32, 16, 16)) * (rng.random((96, 32, 16, 16)) > 0.4))
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("L", x.shape[1:], codec="bf16", samples_per_chunk=8)
        w.append({"L": x}, np.zeros(len(x), np.int64))
        w.commit()
    with fmcache.open_cache(path) as cache:  # the values stored (bf16), which every read must return
        np.save(tmp_path / "x.npy", cache.read_batch("L", range(len(x))))
    done = subprocess.run([sys.executable, "-c", STRESS, str(path), backend, str(tmp_path / "x.npy")],
                          check=False, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert done.stdout.startswith("0 ")


def test_wait_for_reads_waits_for_other_threads_reading_through_the_owner_only():
    owner, other = object(), object()
    entered, release = threading.Event(), threading.Event()

    def read_through(what: object) -> None:
        @inflight.in_flight
        def read(self: object) -> None:
            entered.set()
            release.wait(5)
        read(what)

    slow = threading.Thread(target=read_through, args=(owner,))
    slow.start()
    entered.wait(5)
    inflight.READS[threading.get_ident()] = owner  # this thread's own mark is never waited for
    try:
        began = time.monotonic()
        inflight.wait_for_reads(other)  # a read through another backend: no wait
        assert time.monotonic() - began < 0.1
        threading.Timer(0.3, release.set).start()
        inflight.wait_for_reads(owner)  # until the read through owner returns
        assert release.is_set() and time.monotonic() - began >= 0.25
    finally:
        inflight.READS.pop(threading.get_ident(), None)
        release.set()
        slow.join()
    assert not inflight.READS


def test_nested_read_methods_keep_the_outer_mark():
    seen = []

    class Reader:
        @inflight.in_flight
        def outer(self) -> None:
            self.inner()
            seen.append(inflight.READS.get(threading.get_ident()))

        @inflight.in_flight
        def inner(self) -> None:
            seen.append(inflight.READS.get(threading.get_ident()))

    reader = Reader()
    reader.outer()
    assert seen == [reader, reader] and threading.get_ident() not in inflight.READS


AT_EXIT = textwrap.dedent('''
    import atexit, sys, threading, time
    state = {}
    # registered before fmcache's own exit handler, so it runs after it: the main thread still reads
    atexit.register(lambda: print("main thread read at exit:", state["cache"].read("L", 3).shape == state["shape"]))
    import fmcache
    from fmcache.backends import hdf5_backend

    hdf5_backend.ROW_CACHE_BYTES = 1 << 16  # HDF5: larger than the LRU (h5py reads on every miss)
    cache = state["cache"] = fmcache.open_cache(sys.argv[1])
    state["shape"] = cache.layer("L").shape

    def loop():
        while True:
            cache.read_batch("L", range(0, 64, 3))
            cache.read("L", 5)

    for _ in range(2):
        threading.Thread(target=loop, daemon=True).start()
    time.sleep(0.05)  # then exit with the daemon threads reading
''')


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_daemon_threads_reading_at_interpreter_exit_neither_crash_nor_hang_it(tmp_path, backend):
    """A prefetching thread made a daemon still reads when the script ends: LMDB crashed
    every such exit (SIGSEGV: environments closed at exit under the thread's decode) and
    HDF5 hung about every other one (a frozen daemon thread held h5py's global lock, which
    finalisation needs). At exit such reads now wait for good; the main thread reads on."""
    x = np.random.default_rng(1).random((64, 32, 16, 16), dtype=np.float32)
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("L", x.shape[1:], samples_per_chunk=8)
        w.append({"L": x}, np.zeros(len(x), np.int64))
        w.commit()
    for _ in range(6):
        try:
            done = subprocess.run([sys.executable, "-c", AT_EXIT, str(path)], check=False, capture_output=True,
                                  text=True, timeout=60, cwd=Path(__file__).parents[1])
        except subprocess.TimeoutExpired:
            pytest.fail("the script did not exit within 60 s (hung at exit)")
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.strip() == "main thread read at exit: True"


FORKS = textwrap.dedent('''
    import os, sys, threading, time, warnings
    import fmcache
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
    path, stop = sys.argv[1], threading.Event()

    def churn():  # opens and closes the cache, so the registry changes while the main thread forks
        while not stop.is_set():
            c = fmcache.open_cache(path)
            c.read("L", 0)
            c.close()

    t = threading.Thread(target=churn)
    t.start()
    failed = []
    for _ in range(60):
        time.sleep(0.002)
        pid = os.fork()
        if pid == 0:
            try:
                with fmcache.open_cache(path) as c:
                    c.read("L", 1)
                os._exit(0)
            except Exception as exc:
                print(f"{type(exc).__name__}: {exc}", flush=True)
                os._exit(1)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            failed.append(1)
    stop.set()
    t.join()
    print(len(failed), "failed")
''')


def test_a_child_forked_while_another_thread_opens_or_closes_an_lmdb_cache_can_open_it(tmp_path):
    """A fork between LMDB's opening an environment and the registry listing it (or between
    unlisting and closing one) left the child an environment it did not know of: opening
    the cache there failed ("already open in this process", 43-55 of 200 forks; DataLoader
    workers hit it while the main process reopened the Dataset's cache). The fork now waits
    for the registry's lock."""
    x = np.random.default_rng(2).random((16, 8, 4, 4), dtype=np.float32)
    path = tmp_path / "c.lmdb"
    with fmcache.create_cache(path, backend="lmdb") as w:
        w.add_layer("L", x.shape[1:])
        w.append({"L": x}, np.zeros(len(x), np.int64))
        w.commit()
    done = subprocess.run([sys.executable, "-c", FORKS, str(path)], check=False, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "0 failed", (done.stdout[-1500:], done.stderr[-1500:])


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_close_returns_within_its_wait_while_other_threads_read_on(tmp_path, backend):
    """Threads that keep reading through a cache keep a read in flight at every moment (each
    read after the drop opens the cache again): close() waited its whole 10 s each time.
    It now waits at most inflight.WAIT_S, then leaves the old handle to go once unused;
    every read still returns the stored values."""
    x = np.random.default_rng(3).random((400, 6, 5, 4), dtype=np.float32)
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("L", x.shape[1:], codec="zfp:accuracy=0.05" if backend == "hdf5" else "bf16")
        w.append({"L": x}, np.zeros(len(x), np.int64))
        w.commit()
    with fmcache.open_cache(path) as cache:
        x = cache.read_batch("L", range(len(x)))  # the stored values (lossy codecs)
    cache, stop, bad = fmcache.open_cache(path), threading.Event(), []

    def read_on() -> None:
        i = 0
        while not stop.is_set():
            try:
                if not np.array_equal(cache.read("L", i % len(x)), x[i % len(x)]):
                    bad.append(i)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                bad.append(repr(exc))
            i += 1

    threads = [threading.Thread(target=read_on) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for _ in range(3):
            began = time.monotonic()
            cache.close()
            assert time.monotonic() - began < 3.0  # its wait, 1 s, and some (it was 10 s each time)
    finally:
        stop.set()
        for t in threads:
            t.join()
        cache.close()
    assert bad == []


FIRST_IMPORTS = textwrap.dedent('''
    import sys
    import fmcache
    path = sys.argv[1]
    before = set(sys.modules)
    with fmcache.open_cache(path) as c:
        c.read("L", 1)
        c.read_batch("L", [0, 5, 2])
        _ = c.labels
    print(sorted(m for m in set(sys.modules) - before if m.startswith("fmcache")))
''')


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_opening_and_reading_a_cache_imports_no_fmcache_module_for_the_first_time(tmp_path, backend):
    """A fork while another thread imports a module for the first time leaves the child
    waiting forever on that module's import lock (held by a thread the child does not
    have): open_cache imported fmcache.shards on its first call, and a child forked during
    it hung in its own open_cache (the fork test above, once in session 18's full runs;
    gdb on the orphaned child: waiting in import_ensure_initialized). So every module that
    opening and reading need is imported with the package."""
    x = np.random.default_rng(3).random((8, 2, 4, 4), dtype=np.float32)
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.lmdb")
    with fmcache.create_cache(path, backend=backend) as w:
        w.add_layer("L", x.shape[1:], samples_per_chunk=4)
        w.append({"L": x}, np.arange(len(x)))
        w.commit()
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, str(path)], check=True, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.stdout.strip() == "[]", done.stdout
