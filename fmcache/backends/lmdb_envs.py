"""LMDB environments in one process: one per file, shared, given back, and safe across fork().

py-lmdb refuses two environments for one file in one process, so fmcache shares one per
file and process (:func:`shared_env`), counted by reference and closed with the last
backend that uses it (a backend dropped without ``close()`` gives its reference back
through a finaliser). A forked child must close the environments it inherited before it
can open the same files again, and that close has a trap:

py-lmdb counts the operations it runs with the GIL released (``active_ops``) and makes
``Environment.close()`` wait until that count is zero. A child forked while another
thread of the parent was inside such an operation inherits a count that never drops, and
closing the inherited environment hangs for good: DataLoader workers forked while a
validation thread read a cache hung this way (session 14's sweep). So
every fmcache read transaction passes a gate (:class:`reading`), and a fork waits, in
``os.register_at_fork(before=...)``, until no read is in flight and holds the gate shut
through the fork (at most :data:`FORK_WAIT_S`; reads take micro- to milliseconds). The
child starts with the gate open, nothing in flight and the registry's lock new.

The same marks, with the backend a read goes through, let a backend's ``close()`` wait
for the reads in flight through it in other threads (:mod:`.inflight`): a read marks
itself before it takes the backend's environment.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path
from typing import Any

import lmdb

from ..errors import CacheBusyError, CacheError, CorruptionError, NotACacheError, ReadOnlyError
from .inflight import EXIT_WAIT_S, EXITING, park, wait_while

INITIAL_MAP_SIZE_BYTES = 64 << 20
_envs: dict[tuple[int, int, int], list[Any]] = {}  # (pid, dev, inode of data.mdb) -> [env, refcount, writable]
_envs_lock = threading.Lock()


def _new_lock_in_child() -> None:  # another thread may have held it at the fork
    global _envs_lock
    _envs_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path / "data.mdb")
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def shared_env(path: Path, writable: bool) -> lmdb.Environment:
    """One environment per LMDB file per process (py-lmdb refuses a second one for the same
    file, even under another path after a rename), shared by reference count."""
    with _envs_lock:
        _forget_inherited()
        _drain_pending()
        ident = _identity(path)
        entry = _envs.get((os.getpid(), *ident)) if ident else None
        if entry is not None:
            if entry[2] != writable:
                raise ReadOnlyError(f"{path} is open {'for writing' if entry[2] else 'read-only'} in this process",
                                    hint="close the other handle first")
            entry[1] += 1
            return entry[0]
        try:
            if writable:
                env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE_BYTES, subdir=True, max_dbs=0,
                                readahead=False, meminit=False)
            else:
                env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=0,
                                readahead=False, max_spare_txns=4)
        except lmdb.Error as exc:
            if not (path / "data.mdb").exists():
                if path.exists():  # replaced by a concurrent commit since detected
                    raise NotACacheError(f"{path} disappeared while it was being opened",
                                         hint="a build committed over it: open it again") from None
                raise NotACacheError(f"{path} does not exist: it was moved or deleted after it was opened",
                                     hint="point the reader at where the cache is now") from None
            if writable and is_read_only(path):
                raise ReadOnlyError(f"{path}: cannot open the LMDB environment for writing ({exc})") from None
            busy = busy_or_out_of_files(str(path), exc)
            if busy is not None:
                raise busy from None
            if "already open" in str(exc):  # py-lmdb refuses a second Environment of a path per process
                raise CacheError(f"{path}: its LMDB environment is already open in this process outside "
                                 f"fmcache ({exc})", hint="close your own lmdb.Environment on it first") from None
            size = _size_of(path / "data.mdb")
            if size is not None and size < _LMDB_HEADER_BYTES:  # LMDB's own error said "Bad file descriptor"
                raise CorruptionError(f"{path}: data.mdb is truncated ({size} bytes, shorter than LMDB's "
                                      f"header)") from None
            raise CorruptionError(f"{path}: LMDB cannot open it ({exc})") from None
        _check_not_truncated(path, env)
        ident = _identity(path)
        if ident is not None:
            _envs[(os.getpid(), *ident)] = [env, 1, writable]
        return env


#: LMDB's two meta pages at their smallest page size: a data.mdb shorter holds no environment
_LMDB_HEADER_BYTES = 2 * 4096


def _size_of(file: Path) -> int | None:
    try:
        return os.stat(file).st_size
    except OSError:
        return None


def _check_not_truncated(path: Path, env: lmdb.Environment) -> None:
    """CorruptionError if data.mdb ends before its last used page: LMDB maps the file and
    would touch the missing pages, and the process would die of SIGBUS instead."""
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = os.stat(path / "data.mdb").st_size
    except (lmdb.Error, OSError) as exc:
        env.close()
        raise CorruptionError(f"{path}: LMDB cannot read its header ({exc})") from None
    if size < needed:
        env.close()
        raise CorruptionError(f"{path}: data.mdb is truncated ({size} bytes, its pages need {needed})")


def is_read_only(path: Path) -> bool:
    return not os.access(path, os.W_OK) or bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _forget_inherited() -> None:
    """Drop environments inherited through fork(): LMDB handles must not be used in a
    child, and py-lmdb would refuse to open the same file again while they are open.
    Closing a read-only, lock-free environment only unmaps the child's copy."""
    pid = os.getpid()
    for key in [k for k in _envs if k[0] != pid]:
        env, _count, writable = _envs.pop(key)
        if not writable:
            env.close()


def release_env(env: lmdb.Environment) -> None:
    with _envs_lock:
        _release_locked(env)
        _drain_pending()


def _release_locked(env: lmdb.Environment) -> None:
    for key, entry in list(_envs.items()):
        if entry[0] is env and key[0] == os.getpid():
            entry[1] -= 1
            if entry[1] <= 0:
                del _envs[key]
                env.close()
            return


#: releases of backends the garbage collector finalised while ``_envs_lock`` was taken
_pending: list[lmdb.Environment] = []


def _drain_pending() -> None:
    while _pending:
        _release_locked(_pending.pop())


def release_dropped(env: lmdb.Environment) -> None:
    """The finaliser of a backend dropped without close(). The garbage collector can run
    it anywhere, inside a section of this thread that holds ``_envs_lock`` too (waiting for
    the lock there hung a test run): it releases now only if the lock is free, else queues
    the release for the next open or close."""
    if _envs_lock.acquire(blocking=False):
        try:
            _release_locked(env)
            _drain_pending()
        finally:
            _envs_lock.release()
    else:
        _pending.append(env)


def busy_or_out_of_files(where: str, exc: lmdb.Error) -> CacheError | None:
    """LMDB failures that say nothing about the file: a writer grew the map (a cache
    being built: MDB_MAP_RESIZED), or the process ran out of file descriptors."""
    if isinstance(exc, lmdb.MapResizedError) or "MDB_MAP_RESIZED" in str(exc):
        return CacheBusyError(f"{where}: a process is writing this LMDB environment (it grew its map: {exc})",
                              hint="read it once the build is committed")
    if "Too many open files" in str(exc):
        return CacheError(f"{where}: LMDB cannot open it, this process has too many open files ({exc})",
                          hint="close caches no longer read, or raise the limit (ulimit -n)")
    return None


#: The longest a fork waits for the reads in flight in other threads.
FORK_WAIT_S = 10.0

#: The threads inside a read transaction (thread id -> the backend read through).
#: Setting and popping a thread's own key is atomic under the GIL and idempotent, so an
#: interrupt (Ctrl-C lands between any two bytecodes) can at worst leave the interrupted
#: thread marked, and the forking thread never waits for itself (a count of entries
#: leaked on Ctrl-C and made every later fork wait its full time; no lock on the hot
#: path, where one doubled the cost of a small read).
READING: dict[int, object] = {}
#: True while a fork waits for the reads in flight: new reads wait for the fork.
FORKING = [False]
_gate = threading.Lock()  # held by the forking thread from before to after the fork


def wait_for_fork(me: int, owner: object) -> None:
    """For a read that found :data:`FORKING`: step out until the fork is done (``owner``:
    what the read marked itself with); at interpreter exit, for good outside the main
    thread (:func:`.inflight.park`)."""
    while FORKING[0]:
        READING.pop(me, None)
        if EXITING[0]:
            park()
            READING[me] = owner
            return
        with _gate:
            pass
        READING[me] = owner


def _drain_at_exit() -> None:
    """At interpreter exit: every LMDB read from now on takes :func:`wait_for_fork`'s way
    (daemon threads park there), and the reads in flight finish first."""
    EXITING[0] = FORKING[0] = True
    wait_while(READING, lambda _: True, EXIT_WAIT_S)


atexit.register(_drain_at_exit)


class reading:
    """``with reading(backend, buffers=True) as txn``: ``backend._env().begin(...)``,
    marked in flight (with ``backend``) before the environment is taken. The per-sample
    read paths write the same steps out inline (a class costs ~0.5 µs)."""

    __slots__ = ("me", "outer", "txn")

    def __init__(self, backend: Any, **kwargs: Any) -> None:
        self.me = me = threading.get_ident()
        # a read inside a read (the manifest check of a handle a read reopens) keeps the
        # outer read's mark: popping it let close() take the environment under that read
        self.outer = READING.get(me)
        READING[me] = backend
        try:
            if FORKING[0]:
                wait_for_fork(me, backend)
            self.txn = backend._env().begin(**kwargs)
        except BaseException:
            self._unmark()
            raise

    def __enter__(self) -> lmdb.Transaction:
        return self.txn

    def __exit__(self, *exc: object) -> None:
        try:
            self.txn.__exit__(*exc)
        finally:
            self._unmark()

    def _unmark(self) -> None:
        if self.outer is None:
            READING.pop(self.me, None)
        else:
            READING[self.me] = self.outer


def _before_fork() -> None:
    _gate.acquire()
    FORKING[0] = True
    wait_while(READING, lambda _: True, FORK_WAIT_S)  # the reads in flight finish; new ones wait at the gate
    # and no other thread is between opening an environment and registering it, or between
    # unregistering one and closing it: a child inheriting that environment unlisted could
    # not open the file again ("already open in this process")
    _envs_lock.acquire()


def _after_fork_in_parent() -> None:
    FORKING[0] = False
    _envs_lock.release()
    _gate.release()


def _after_fork_in_child() -> None:
    global _gate
    FORKING[0] = False
    READING.clear()
    _gate = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
