from backend_conformance import BackendTests

from fmcache.backends import Hdf5Backend


class TestHdf5Backend(BackendTests):
    backend_cls = Hdf5Backend
    suffix = ".h5"
    holds_rows_back = True
