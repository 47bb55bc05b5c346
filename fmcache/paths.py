"""Where a cache lives on disk while it is written and once it is committed.

A cache is written at ``PATH.partial`` (a directory for LMDB, a file for HDF5) and moved
to ``PATH`` by its commit, so ``PATH`` only ever holds a committed cache; an interrupted
build leaves the partial for ``--resume``. While a writer works on ``PATH`` it holds a
lock (:class:`BuildLock`), so a second build, resume or compact of the same path is
refused instead of deleting the first one's partial; ``--overwrite`` replaces caches
only (:func:`check_replaceable`). A shard merge moves the shards into ``OUT.partial``
with a journal of the moves, so an interrupted one can be undone (:func:`undo_merge`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CacheBusyError, CacheError, CacheExistsError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where the cache for ``path`` is written until it is committed."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def remove_path(path: Path) -> None:
    """Remove a cache (a directory or a file, or a link to one) if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def install(partial: Path, final: Path) -> None:
    """Move a committed partial cache to its final path, replacing an old one last.

    A file over a file (HDF5) is one atomic rename. A directory (LMDB) replacing a cache
    is swapped with it in one step where the kernel can (``renameat2(RENAME_EXCHANGE)``:
    ``PATH`` always holds a whole cache, the old one until the swap) and the old one,
    now at the partial's name, removed; elsewhere the old one is moved aside under a name
    of this process's (never a user's ``PATH.old``), the new one moved in, the old removed.
    """
    if partial.is_file() and final.is_file():  # one file (HDF5): an atomic swap
        os.replace(partial, final)
        return
    if not (final.exists() or final.is_symlink()):
        os.replace(partial, final)
        return
    if _exchange(partial, final):  # PATH: the new cache; the partial's name: the old one
        remove_path(partial)
        return
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(partial, final)
    remove_path(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2``); False where the C
    library or the file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_replaceable(path: Path, *, what: str = "--overwrite (overwrite=True)") -> None:
    """Refuse to replace ``path`` unless it is a cache or an empty directory: ``--out mydata --overwrite`` (a typo) deleted the user's folder, and
    ``--out .`` the current directory."""
    from .backends import detect_backend

    if path.is_symlink() or not path.exists():
        return  # nothing there, or a link (replaced by the cache, its target untouched)
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise CacheExistsError(f"{path} is the current directory or holds it: {what} would delete it",
                               hint="give the cache a path of its own (e.g. --out runs/mydata.lmdb)")
    if detect_backend(path) is None and not (path.is_dir() and not any(path.iterdir())):
        raise CacheExistsError(f"{path} exists and is not an fmcache cache: {what} replaces caches only",
                               hint="choose another path, or remove it yourself if it should go")


def lock_path(path: Path) -> Path:
    """The lock file of the writer of ``path`` (hidden, beside it; removed on release)."""
    return path.with_name(f".{path.name}.fmcache-lock")


class BuildLock:
    """An exclusive ``flock`` on ``PATH``'s lock file, held by the writer of ``PATH`` from
    its start to its commit or close. A second writer of the same path is refused with
    :class:`~fmcache.errors.CacheBusyError` (two builds of one path destroyed each other's
    partial: session 13's sweep). The kernel drops the lock with the process, a killed
    one included, so a stale lock file never blocks a resume."""

    def __init__(self, path: Path) -> None:
        self.file = lock_path(path)
        while True:
            fd = self._open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise CacheBusyError(f"{path} is being written by another process"
                                     + (f" (pid {holder})" if holder else "")) from None
            try:  # the file may have been released and removed between open and flock
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def _open(self, path: Path) -> int:
        from .backends.base import os_write_failure

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only or full file system: the typed errors of a write
            failure = os_write_failure(path, exc, "cannot start writing the cache")
            if type(failure) is CacheError:  # not a full or read-only disk: the path itself
                failure = CacheError(f"{path}: cannot write there ({exc})",
                                     hint="give a path whose parent is a folder you can write to")
            raise failure from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def writer_pid(path: Path) -> int | None:
    """The pid of the process writing ``path`` now (holding its :class:`BuildLock`), or None."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # a lock taken here goes with the descriptor
    return None


#: In ``OUT.partial`` while a shard merge moves shards there: ``{"moves": [[from, name], ...]}``.
MERGE_JOURNAL = "fmcache-merge.json"


def interrupted_merge(staging: Path) -> list[tuple[str, str]] | None:
    """The moves ``(original path, name in staging)`` of the interrupted merge whose
    staging folder ``staging`` is; None if it is none (no journal)."""
    journal = staging / MERGE_JOURNAL
    if staging.is_symlink() or not journal.is_file():
        return None
    try:
        return [(str(src), str(name)) for src, name in json.loads(journal.read_text())["moves"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a journal cut short by the kill: a merge's, with nothing it can tell


def undo_merge(staging: Path, moves: list[tuple[str, str]]) -> list[str]:
    """Move the shards an interrupted merge moved into ``staging`` back where they were;
    removes ``staging`` once nothing of the user's is left in it. Returns the paths restored."""
    restored = []
    for src, name in reversed(moves):
        moved = staging / name
        if (moved.exists() or moved.is_symlink()) and not os.path.lexists(src):
            os.replace(moved, src)
            restored.append(src)
    if not any(entry.name.startswith("shard-") for entry in staging.iterdir()):
        remove_path(staging)
    return restored[::-1]
