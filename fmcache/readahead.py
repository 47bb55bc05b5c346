"""Batches made ahead by a thread of this process: reading that overlaps training without workers.

Without DataLoader workers every batch is read and decoded between two training steps,
so the epoch pays for reading one for one. Worker processes overlap it, at the price of
forking (or spawning) processes and handing each batch over between them. A thread is
the cheap middle: torch's kernels release the GIL, so a thread reading the next batches
runs on another core while the training step computes (``torch.set_num_threads`` below
the core count leaves it one). It hides what of the reading runs while the step is
inside a kernel; the reading's own Python holds the GIL, and a step that wants it back
meanwhile waits (docs/benchmarks.md, "Without workers, a thread reading ahead": a layer3
epoch from 0.93 to 0.96-0.97x in-memory maps on two vCPUs).

:class:`ReadAhead` iterates any iterable of batches in a background thread, ``depth``
batches ahead, and yields them in order: the same batches, the same order, the same
draws. An exception in the thread is raised where the batch it concerns would have been
yielded; leaving the loop early (``break``, an exception of the training step) stops the
thread after the batch it is reading. :class:`~fmcache.loader.EpochLoader` uses it for
``num_workers=0, read_ahead=depth``.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from .errors import SamplerConfigError

T = TypeVar("T")

#: how often (seconds) a thread waiting for room in a full queue looks whether it was stopped
_POLL_S = 0.05
#: the longest the interpreter's exit waits for reading threads to finish their batch
EXIT_JOIN_S = 10.0

_ITEM, _END, _ERROR = 0, 1, 2

#: the reading threads running now, with the event that stops each (stopped and joined at exit)
_LIVE: dict[threading.Thread, threading.Event] = {}
_LIVE_LOCK = threading.Lock()


class ReadAhead(Generic[T]):
    """``batches`` iterated by a background thread, at most ``depth`` batches ahead of the
    loop that consumes them. Each ``iter()`` starts a new pass: ``iter(batches)`` at once,
    in the calling thread (a DataLoader draws its base seed from torch's global generator
    then, as it does without read-ahead), and its thread at the first ``next()``;
    ``len()`` is ``len(batches)``. The thread holds up to ``depth`` batches besides the one
    it reads: memory grows with ``depth``."""

    def __init__(self, batches: Iterable[T], depth: int = 2) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise SamplerConfigError(f"depth={depth!r}: the batches read ahead must be an int >= 1",
                                     hint="2 (a batch in hand, the next one being read) is what DataLoader "
                                          "workers keep each by default")
        self.batches = batches
        self.depth = depth

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        return self._pass(iter(self.batches))

    def _pass(self, source: Iterator[T]) -> Iterator[T]:
        slots: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def offer(entry: tuple[int, object]) -> bool:
            while not stop.is_set():
                try:
                    slots.put(entry, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                try:
                    for item in source:
                        if not offer((_ITEM, item)):
                            return
                except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, raised there
                    offer((_ERROR, exc))
                    return
                offer((_END, None))
            finally:
                with _LIVE_LOCK:
                    _LIVE.pop(threading.current_thread(), None)

        thread = threading.Thread(target=work, name="fmcache-read-ahead", daemon=True)
        with _LIVE_LOCK:
            _LIVE[thread] = stop
        thread.start()
        try:
            while True:
                kind, item = slots.get()
                if kind == _ITEM:
                    yield item  # type: ignore[misc]
                elif kind == _END:
                    return
                else:
                    raise item  # type: ignore[misc]
        finally:
            stop.set()
            # the garbage collector may close an abandoned pass in its own reading thread
            if thread is not threading.current_thread():
                thread.join()


def _stop_at_exit() -> None:
    """At interpreter exit, stop every reading thread after its batch and wait for it (at
    most :data:`EXIT_JOIN_S`): a pass still referenced when the program ends (an iterator
    kept on an object) left a daemon thread inside a torch kernel while the interpreter
    finalised, which aborted the process ("terminate called without an active exception").
    Registered after the backends' exit handler, so it runs first, while reads still may."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for _, stop in live:
        stop.set()
    deadline = time.monotonic() + EXIT_JOIN_S
    for thread, _ in live:
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_at_exit)


def _forget_in_child() -> None:  # a forked child has none of its parent's threads
    global _LIVE_LOCK
    _LIVE.clear()
    _LIVE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def check_read_ahead(read_ahead: int, num_workers: int) -> int:
    """``read_ahead`` if a loader with ``num_workers`` can use it, else :class:`SamplerConfigError`."""
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0:
        raise SamplerConfigError(f"read_ahead={read_ahead!r}: the batches a thread reads ahead must be an int >= 0",
                                 hint="0 reads each batch when the loop asks for it; 2 is a good start")
    if read_ahead and num_workers > 0:
        raise SamplerConfigError(f"read_ahead={read_ahead} with num_workers={num_workers}: the workers already read "
                                 "ahead of the loop",
                                 hint="use read_ahead without workers (num_workers=0), or workers without it")
    return read_ahead


__all__ = ["ReadAhead", "check_read_ahead"]
