"""Reads in flight through a backend, so that its ``close()`` waits for them.

A ``Cache`` may be shared by threads (a prefetching thread beside the training loop, a
thread pool), and one of them may close it while another is inside a read. Closing gives
the file handle back: LMDB unmaps the file when its last reference goes, and a read
decoding a record's bytes from the map then touches unmapped memory and kills the
process (SIGSEGV); an HDF5 read lost its datasets half-way and reported the file as
damaged. So a backend's reads mark themselves, per thread, with the backend they read
through, and ``close()`` first drops the backend's handle (a read starting then opens one
of its own, as any read after ``close()`` does) and then waits until no other thread is
inside a read marked with that backend (:func:`wait_for_reads`) before it closes the old
handle. Reads take micro- to milliseconds; where other threads keep reading through the
backend (a read starting after the drop opens the handle again, and is waited for too),
the wait ends after :data:`WAIT_S` and ``close()`` leaves the old handle to go once
nothing uses it (LMDB: its finaliser, when the backend is dropped; HDF5: with the last
dataset read from it) rather than closing it under those reads.
Opening a handle and ``close()``'s taking of it hold :func:`handles_lock`.

LMDB marks its reads in :data:`.lmdb_envs.READING`, which also gates ``fork()``;
the HDF5 backend's read methods carry :func:`in_flight`, which marks them in
:data:`READS`. Setting and popping a thread's own key is atomic under the GIL: no lock on
the hot path.

The same marks end reads cleanly at interpreter exit. Daemon threads still reading then
(a prefetching thread made a daemon) are frozen mid-read once finalisation begins: one
holding h5py's global lock hung the exit for good (finalisation needs that lock), and
LMDB environments closed at exit under a thread decoding from their map crashed it
(SIGSEGV, every time in a one-off run). At exit (:func:`_drain_at_exit`, an ``atexit``
handler, which runs once the non-daemon threads are done) a read that starts in a thread
other than the main one waits for good (:func:`park`), and the reads in flight finish
first (at most :data:`EXIT_WAIT_S`); LMDB environments are left to the process's end.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
from collections.abc import Callable
from threading import get_ident
from typing import Any, TypeVar

#: The longest ``close()`` waits for reads in flight in other threads.
WAIT_S = 1.0
#: The longest the interpreter's exit waits for them.
EXIT_WAIT_S = 2.0
#: True once the interpreter exits (:func:`_drain_at_exit`).
EXITING = [False]

#: Thread id -> the backend that thread is reading through (methods with :func:`in_flight`).
READS: dict[int, object] = {}

F = TypeVar("F", bound=Callable[..., Any])

#: held while a backend opens its handle or ``close()`` takes it: two threads reopening
#: a closed handle at once made two (HDF5: the one dropped closed the datasets the other
#: thread was reading; LMDB: a reference the registry counted without its own release
#: closed the environment under another handle's reads later)
_handles_lock = threading.RLock()


def handles_lock() -> threading.RLock:
    """:data:`_handles_lock` (a new one in a forked child)."""
    return _handles_lock


def in_flight(method: F) -> F:
    """A backend read method whose calls are marked in :data:`READS` (a nested call, one
    read method calling another, keeps the outer mark)."""
    @functools.wraps(method)
    def marked(self: Any, *args: Any, **kwargs: Any) -> Any:
        me = get_ident()
        outer = READS.get(me)
        if EXITING[0] and outer is None:  # a nested call finishes its outer read, which the exit waits for
            park()
        READS[me] = self
        try:
            return method(self, *args, **kwargs)
        finally:
            if outer is None:
                READS.pop(me, None)
            else:
                READS[me] = outer
    return marked  # type: ignore[return-value]


def park() -> None:
    """At interpreter exit, a read in a thread other than the main one (a daemon thread:
    the others are done by then) waits here for good; the main thread reads on."""
    if threading.current_thread() is not threading.main_thread():
        threading.Event().wait()


def wait_while(marks: dict[int, object], busy: Callable[[object], bool], limit_s: float) -> bool:
    """Until no thread but this one has a mark in ``marks`` that is ``busy``, at most
    ``limit_s``; whether that moment came (the waits of ``close()``, a fork and the exit)."""
    me = get_ident()
    deadline = time.monotonic() + limit_s
    while any(thread != me and busy(marked) for thread, marked in list(marks.items())):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def wait_for_reads(owner: object, marks: dict[int, object] | None = None) -> bool:
    """Until no thread but this one is inside a read marked with ``owner`` in ``marks``
    (default :data:`READS`), at most :data:`WAIT_S`; whether that moment came."""
    return wait_while(READS if marks is None else marks, lambda marked: marked is owner, WAIT_S)


def _drain_at_exit() -> None:
    EXITING[0] = True
    wait_while(READS, lambda _: True, EXIT_WAIT_S)


atexit.register(_drain_at_exit)


def _clear_in_child() -> None:  # the threads that marked these, or held the lock, do not exist in a child
    global _handles_lock
    READS.clear()
    _handles_lock = threading.RLock()


os.register_at_fork(after_in_child=_clear_in_child)
