"""Storage backends behind one interface: LMDB and HDF5."""

from __future__ import annotations

from pathlib import Path

from ..errors import CacheError
from .base import Backend, PartSpec
from .hdf5_backend import Hdf5Backend
from .lmdb_backend import LmdbBackend

BACKENDS: dict[str, type[Backend]] = {"hdf5": Hdf5Backend, "lmdb": LmdbBackend}
HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_class(backend_id: str) -> type[Backend]:
    try:
        return BACKENDS[backend_id]
    except KeyError:
        raise CacheError(f"unknown backend {backend_id!r}", hint="use 'lmdb' or 'hdf5'") from None


def backend_for_suffix(path: str | Path) -> str:
    """The default backend for a path: ``.h5``/``.hdf5`` -> hdf5, anything else -> lmdb."""
    return "hdf5" if Path(path).suffix.lower() in HDF5_SUFFIXES else "lmdb"


def detect_backend(path: Path) -> str | None:
    """Backend id of the storage at ``path``, or None."""
    for backend_id, cls in BACKENDS.items():
        if cls.detect(path):
            return backend_id
    return None


__all__ = ["BACKENDS", "Backend", "Hdf5Backend", "LmdbBackend", "PartSpec", "backend_class", "backend_for_suffix", "detect_backend"]
