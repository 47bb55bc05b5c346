"""Where a cache lives on disk while it is written and once it is committed.

A cache is written at ``PATH.partial`` (a directory for LMDB, a file for HDF5) and moved
to ``PATH`` by its commit, so ``PATH`` only ever holds a committed cache; an interrupted
build leaves the partial for ``--resume``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
    """Move a committed partial cache to its final path, replacing an old one last."""
    if partial.is_file() and final.is_file():  # one file (HDF5): an atomic swap
        os.replace(partial, final)
        return
    old = final.with_name(final.name + ".old")
    if final.exists():
        remove_path(old)
        os.replace(final, old)
    os.replace(partial, final)
    remove_path(old)
