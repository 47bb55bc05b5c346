"""SZ3 compression in a process of its own while a build runs.

pysz keeps the GIL for the whole of each compression (two threads encode 1.06x as fast as
one; a loop of small convolutions ran 11x slower beside a thread compressing with it), and
the builder encodes on a thread beside the prefix's forward pass, which needs the GIL
between its operators. A shorter switch interval (:mod:`fmcache.gil`) only bounds each
wait by one map's compression; this process takes the compression off the interpreter:
the builder's thread sends each batch's maps down a pipe and frames the streams that come
back, the forward pass keeps the GIL to itself.

:func:`encoding_process` starts one for a block (the builder's loop, when a layer stored
through the bytes face, LMDB's, has an ``sz3`` tier) and ends it after; while it runs,
:meth:`fmcache.codecs.sz3.Sz3.encode_batch` on a thread it is bound to (the builder's
encoding thread) sends its batches there. The streams are
pysz's, built with the same configuration, so the stored bytes are the ones the codec
writes on its own (tests/test_sz3_process.py). The process imports numpy and pysz only
(:mod:`fmcache.codecs.sz3_child`, ~0.1 s to start). If it cannot start, or ends (killed,
out of memory), a RuntimeWarning says so and the codec encodes on the calling thread
again: the build goes on, with the same bytes. ``FMCACHE_SZ3_PROCESS=0`` (``false``,
``no``, ``off``) keeps every compression on the calling thread.

No handle crosses: the process gets float32 maps and gives back bytes; a DataLoader worker
forked while it runs inherits only the pipe's ends, and the process is told to end by a
message, not by the end of its input, which such a worker would hold open.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows, where no process is started (enabled())
    fcntl = None  # type: ignore[assignment]

from .sz3_child import ANSWER, HELLO, U32

#: seconds the process may take no input or give no output before it is given up (SZ3
#: compresses a 64 KiB map in under a millisecond here; a batch of large maps in well
#: under this)
SILENCE_S = 120.0
#: the pipes' buffer (Linux's default is 64 KiB; unprivileged processes may ask up to
#: /proc/sys/fs/pipe-max-size, 1 MiB by default)
PIPE_BYTES = 1 << 20

ENV = "FMCACHE_SZ3_PROCESS"
_OFF = {"0", "false", "no", "off"}
_CHILD = Path(__file__).with_name("sz3_child.py")
# `python -c`: sys.path[0] is the working folder (anything could shadow numpy there); it
# is dropped before the child runs, and runpy does not add the script's own folder.
_LAUNCH = "import sys, runpy; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"


class ProcessGone(Exception):
    """The encoding process ended or its pipe broke (the caller encodes on its thread)."""


class Sz3Process:
    """One child process compressing maps with pysz (module docstring); one request at a
    time (a lock), from any thread of this process."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        """``command``: what to run instead of :mod:`fmcache.codecs.sz3_child` (tests)."""
        argv = list(command) if command is not None else [sys.executable, "-c", _LAUNCH, str(_CHILD)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdin.fileno(), False)  # writes wait in select, with a time limit
        for pipe in (self.proc.stdin, self.proc.stdout):  # a batch in a few writes, not 64 KiB ones
            with contextlib.suppress(OSError, AttributeError):  # Linux only; capped by pipe-max-size
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[attr-defined]
        self._lock = threading.Lock()
        self.gone: str | None = None
        self._greeted = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def compress(self, maps: np.ndarray, mode: str, bound: float, algo: str) -> list[bytes | str]:
        """The pysz stream of each map of ``maps`` (``(count, rows, cols)`` float32,
        C-contiguous), or the error text pysz raised for it. ProcessGone if the process
        is gone."""
        request = json.dumps({"shape": list(maps.shape[1:]), "count": len(maps), "mode": mode, "bound": bound,
                              "algo": algo}).encode()
        with self._lock:
            if self.gone is not None:
                raise ProcessGone(self.gone)
            stdin, stdout = self._pipes()
            try:
                if not self._greeted:  # something else than the child (a wrong sys.executable) fails here
                    hello = _read(stdout, len(HELLO))
                    if hello != HELLO:
                        raise ValueError(f"it began with {hello[:40]!r}, not the child's greeting")
                    self._greeted = True
                _write(stdin, U32.pack(len(request)) + request)
                _write(stdin, np.ascontiguousarray(maps, dtype="<f4").data.cast("B"))
                answers: list[bytes | str] = []
                # an SZ3 stream of a map is never much larger than its values (SZ3 stores
                # what it cannot predict losslessly), an error text at most 4 KiB: a length
                # beyond that is a pipe out of step, not a stream to wait for
                longest = 2 * maps[0].nbytes + 65536 if len(maps) else 0
                for _ in range(len(maps)):
                    k, crc = ANSWER.unpack(_read(stdout, ANSWER.size))
                    if abs(k) > longest:
                        raise ValueError(f"an answer claims {abs(k)} bytes for a map of {maps[0].nbytes} "
                                         "(the pipe lost its framing)")
                    data = _read(stdout, abs(k))
                    if zlib.crc32(data) != crc:
                        raise ValueError("an answer fails its CRC-32 (the pipe lost its framing)")
                    answers.append(data if k >= 0 else data.decode("utf-8", "replace"))
                return answers
            except (OSError, ValueError, EOFError) as exc:
                self.gone = f"the SZ3 encoding process (pid {self.pid}) ended: {type(exc).__name__}: {exc}"
                self._stop(kill=True)
                raise ProcessGone(self.gone) from None

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def close(self) -> None:
        """Ask the process to end (a request of length 0), then wait; killed after 5 s."""
        with self._lock:
            if self.gone is None:  # else it was stopped when it went
                self.gone = "closed"
                self._stop(kill=False)

    def _stop(self, kill: bool) -> None:
        stdin, stdout = self._pipes()
        if not kill:
            try:
                _write(stdin, U32.pack(0))
            except (OSError, ValueError):  # broken, or closed
                pass
        for pipe in (stdin, stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            if kill:
                self.proc.kill()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _write(stream: IO[bytes], data: bytes | memoryview) -> None:
    """All of ``data`` into the non-blocking pipe; TimeoutError after :data:`SILENCE_S`
    seconds in which the process took nothing (stopped, or hung between requests)."""
    view = memoryview(data).cast("B")
    while view:
        _, ready, _ = select.select([], [stream], [], SILENCE_S)
        if not ready:
            raise TimeoutError(f"the process took no input for {SILENCE_S:.0f} s")
        written = stream.write(view)
        if written:  # None: it would block after all; select again
            view = view[written:]


def _read(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes; EOFError at the end of the output, TimeoutError after
    :data:`SILENCE_S` seconds without a byte (a process that hangs is given up)."""
    parts = []
    while n:
        ready, _, _ = select.select([stream], [], [], SILENCE_S)
        if not ready:
            raise TimeoutError(f"no answer for {SILENCE_S:.0f} s")
        chunk = stream.read(n)
        if not chunk:
            raise EOFError("the process's output ended")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


_bound = threading.local()


def active_process() -> Sz3Process | None:
    """The encoding process bound to this thread (:func:`bound`, :func:`encoding_process`),
    if it has not ended."""
    process: Sz3Process | None = getattr(_bound, "process", None)
    return process if process is not None and process.gone is None else None


@contextmanager
def bound(process: Sz3Process | None) -> Iterator[None]:
    """``process`` serves this thread's SZ3 encoding for the block (the builder binds its
    process to its encoding thread): each thread sees its own build's process, so two
    builds at once never send to each other's."""
    before = getattr(_bound, "process", None)
    _bound.process = process
    try:
        yield
    finally:
        _bound.process = before


def enabled() -> bool:
    """Not turned off by ``FMCACHE_SZ3_PROCESS``, and on a POSIX system (the pipes are
    waited on with ``select``, which Windows offers for sockets only)."""
    return os.name == "posix" and os.environ.get(ENV, "1").strip().lower() not in _OFF


@contextmanager
def encoding_process(codecs: Sequence[Any]) -> Iterator[Sz3Process | None]:
    """A running :class:`Sz3Process` for the block if any of ``codecs`` is an ``sz3``
    codec (and ``FMCACHE_SZ3_PROCESS`` does not say no), else None; bound to the calling
    thread (other threads: :func:`bound`) and ended after the block."""
    if not enabled() or not any(getattr(c, "codec_id", None) == "sz3" for c in codecs):
        yield None
        return
    try:
        process = Sz3Process()
    except OSError as exc:
        warnings.warn(f"fmcache could not start its SZ3 encoding process ({exc}); SZ3 encodes on the "
                      "build's thread", RuntimeWarning, stacklevel=3)
        yield None
        return
    try:
        with bound(process):
            yield process
    finally:
        process.close()
