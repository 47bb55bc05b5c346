from backend_conformance import BackendTests

from fmcache.backends import LmdbBackend


class TestLmdbBackend(BackendTests):
    backend_cls = LmdbBackend
    suffix = ".lmdb"


def test_lmdb_failures_that_say_nothing_about_the_file_are_not_called_damage():
    """A build growing its map (MDB_MAP_RESIZED: a reader of the partial) and running out of
    descriptors were "the database is damaged … rebuild the cache"."""
    import lmdb

    from fmcache.backends.lmdb_backend import _damaged
    from fmcache.errors import CacheBusyError, CacheError, CorruptionError

    busy = _damaged("x.lmdb: sample 3", lmdb.MapResizedError("mdb_txn_begin: MDB_MAP_RESIZED"))
    assert isinstance(busy, CacheBusyError) and "writing" in busy.message
    files = _damaged("x.lmdb: sample 3", lmdb.Error("x.lmdb: Too many open files"))
    assert type(files) is CacheError and "ulimit" in files.hint
    assert isinstance(_damaged("x.lmdb: sample 3", lmdb.CorruptedError("MDB_CORRUPTED")), CorruptionError)
