from backend_conformance import BackendTests

from fmcache.backends import LmdbBackend


class TestLmdbBackend(BackendTests):
    backend_cls = LmdbBackend
    suffix = ".lmdb"
