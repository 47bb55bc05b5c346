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
handle. Reads take micro- to milliseconds; the wait ends after :data:`WAIT_S` whatever.
Opening a handle and ``close()``'s taking of it hold :func:`handles_lock`.

LMDB marks its reads in :data:`.lmdb_envs.READING`, which also gates ``fork()``;
the HDF5 backend's read methods carry :func:`in_flight`, which marks them in
:data:`READS`. Setting and popping a thread's own key is atomic under the GIL: no lock on
the hot path.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from threading import get_ident
from typing import Any, TypeVar

#: The longest ``close()`` waits for reads in flight in other threads.
WAIT_S = 10.0

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
        READS[me] = self
        try:
            return method(self, *args, **kwargs)
        finally:
            if outer is None:
                READS.pop(me, None)
            else:
                READS[me] = outer
    return marked  # type: ignore[return-value]


def wait_for_reads(owner: object, marks: dict[int, object] | None = None) -> None:
    """Until no thread but this one is inside a read marked with ``owner`` in ``marks``
    (default :data:`READS`), at most :data:`WAIT_S`."""
    marks = READS if marks is None else marks
    me = get_ident()
    deadline = time.monotonic() + WAIT_S
    while any(thread != me and marked is owner for thread, marked in list(marks.items())) \
            and time.monotonic() < deadline:
        time.sleep(0.0002)


def _clear_in_child() -> None:  # the threads that marked these, or held the lock, do not exist in a child
    global _handles_lock
    READS.clear()
    _handles_lock = threading.RLock()


os.register_at_fork(after_in_child=_clear_in_child)
