"""The conformance suite every backend passes: subclass BackendTests, set ``backend_cls``
and ``suffix``. A new backend needs only such a subclass (see test_backend_*.py)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fmcache.backends import Backend, PartSpec
from fmcache.codecs import codec_from_spec
from fmcache.errors import ReadOnlyError

PARTS = [PartSpec("a", (3, 4, 5), codec_from_spec("raw")), PartSpec("b", (2, 4, 5), codec_from_spec("blosc2"))]
TOKENS = [PartSpec("all", (7, 3), codec_from_spec("raw"))]


def _batch(rng: np.random.Generator, n: int) -> dict[str, dict[str, np.ndarray]]:
    return {
        "conv": {"a": rng.normal(size=(n, 3, 4, 5)).astype(np.float32),
                 "b": rng.normal(size=(n, 2, 4, 5)).astype(np.float32)},
        "tok/x": {"all": rng.normal(size=(n, 7, 3)).astype(np.float32)},
    }


class BackendTests:
    backend_cls: type[Backend]
    suffix: str
    #: rows wait for their chunk to fill before they are written (HDF5): the progress
    #: mark may lag the samples written until ``finish``
    holds_rows_back = False

    def make(self, tmp_path: Path) -> Backend:
        backend = self.backend_cls.create(tmp_path / f"cache{self.suffix}")
        self.declare(backend)
        return backend

    @staticmethod
    def declare(backend: Backend) -> None:
        backend.declare_layer(0, "conv", PARTS, samples_per_chunk=3)
        backend.declare_layer(1, "tok/x", TOKENS, samples_per_chunk=4)

    def reopen(self, backend: Backend, writable: bool = False) -> Backend:
        backend.close()
        again = self.backend_cls(backend.path, writable=writable)
        self.declare(again)
        return again

    def fill(self, backend: Backend, sizes: tuple[int, ...] = (5, 4),
             finish: bool = True) -> dict[str, dict[str, np.ndarray]]:
        rng = np.random.default_rng(1)
        batches = [_batch(rng, n) for n in sizes]
        start = 0
        for batch, n in zip(batches, sizes):
            backend.write_batch(start, batch, np.arange(start, start + n), json.dumps({"samples": start + n}).encode())
            start += n
        if finish:
            backend.finish()
        return {layer: {part: np.concatenate([b[layer][part] for b in batches]) for part in batches[0][layer]}
                for layer in batches[0]}

    def test_detect(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        assert self.backend_cls.detect(backend.path)
        assert not self.backend_cls.detect(tmp_path / "nothing")

    def test_round_trip_after_reopen(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        truth = self.fill(backend)
        backend = self.reopen(backend)
        got = backend.read("conv", np.arange(9))
        np.testing.assert_array_equal(got["a"], truth["conv"]["a"])
        np.testing.assert_array_equal(got["b"], truth["conv"]["b"])
        np.testing.assert_array_equal(backend.read("tok/x", np.arange(9))["all"], truth["tok/x"]["all"])
        np.testing.assert_array_equal(backend.read_labels(9), np.arange(9))
        backend.close()

    def test_read_any_order_with_duplicates_and_part_subset(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        truth = self.fill(backend)
        backend = self.reopen(backend)
        order = np.array([8, 0, 4, 4, 3])
        got = backend.read("conv", order, parts=["b"])
        assert list(got) == ["b"]
        np.testing.assert_array_equal(got["b"], truth["conv"]["b"][order])
        backend.close()

    def test_meta_round_trip(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        backend.put_meta("draft", b'{"x": 1}')
        assert backend.get_meta("draft") == b'{"x": 1}'
        assert backend.get_meta("manifest") is None
        backend = self.reopen(backend)
        assert backend.get_meta("draft") == b'{"x": 1}'
        backend.close()

    def test_progress_written_with_batch(self, tmp_path: Path) -> None:
        """The progress mark counts only samples on disk (whole, readable after a crash
        that skips ``finish``): all of them, unless the backend holds rows back."""
        backend = self.make(tmp_path)
        truth = self.fill(backend, (3, 2, 6, 5), finish=False)
        committed = json.loads(backend.get_meta("progress"))["samples"]
        assert committed == 16 or (self.holds_rows_back and 0 <= committed < 16)
        backend = self.reopen(backend)  # no finish(): what a killed build leaves
        got = backend.read("conv", np.arange(committed))
        np.testing.assert_array_equal(got["a"], truth["conv"]["a"][:committed])
        np.testing.assert_array_equal(backend.read("tok/x", np.arange(committed))["all"],
                                      truth["tok/x"]["all"][:committed])
        np.testing.assert_array_equal(backend.read_labels(committed), np.arange(committed))
        backend.close()

    def test_truncate_forgets_tail(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        truth = self.fill(backend, (4, 4))
        backend.truncate(4)
        rng = np.random.default_rng(7)
        new = _batch(rng, 2)
        backend.write_batch(4, new, np.array([40, 41]), b'{"samples": 6}')
        backend.finish()
        backend = self.reopen(backend)
        got = backend.read("conv", np.arange(6))["a"]
        np.testing.assert_array_equal(got[:4], truth["conv"]["a"][:4])
        np.testing.assert_array_equal(got[4:], new["conv"]["a"])
        np.testing.assert_array_equal(backend.read_labels(6), [0, 1, 2, 3, 40, 41])
        backend.close()

    def test_read_only_is_enforced(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        self.fill(backend)
        backend = self.reopen(backend, writable=False)
        with pytest.raises(ReadOnlyError):
            backend.put_meta("draft", b"{}")
        with pytest.raises(ReadOnlyError):
            backend.write_batch(9, _batch(np.random.default_rng(0), 1), np.array([0]), b"{}")
        with pytest.raises(ReadOnlyError):
            backend.truncate(0)
        backend.close()

    def test_pickles_without_handles(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        truth = self.fill(backend)
        backend = self.reopen(backend)
        backend.read("conv", np.arange(2))  # open handles in this process
        clone = pickle.loads(pickle.dumps(backend))
        np.testing.assert_array_equal(clone.read("conv", np.array([3]))["a"][0], truth["conv"]["a"][3])
        backend.close()

    def test_stored_bytes_counts_every_part(self, tmp_path: Path) -> None:
        backend = self.make(tmp_path)
        self.fill(backend)
        sizes = backend.stored_bytes("conv")
        assert set(sizes) == {"a", "b"}
        assert sizes["a"] >= 9 * 3 * 4 * 5 * 4  # raw float32 cannot be smaller
        assert 0 < sizes["b"]
        backend.close()

    def test_layer_names_with_nul_slash_and_percent_stay_apart(self, tmp_path: Path) -> None:
        """HDF5 ends a link name at NUL: layers "x\\x00y" and "x" shared one group (an
        AttributeError on read, or h5py's ValueError)."""
        from fmcache import create_cache, open_cache

        names = ["x\x00y", "x", "x%00y", "x/y", "x%2Fy", ".", "..", "%2E"]
        maps = {name: np.full((3, 2, 2, 2), k, dtype=np.float32) for k, name in enumerate(names)}
        path = tmp_path / f"names{self.suffix}"
        with create_cache(path, backend=self.backend_cls.backend_id) as writer:
            for name in names:
                writer.add_layer(name, (2, 2, 2), codec="raw")
            writer.append(maps, np.arange(3))
            writer.commit()
        cache = open_cache(path)
        assert list(cache.layers) == names
        for name in names:
            np.testing.assert_array_equal(cache.read_batch(name, range(3)), maps[name])
        if self.suffix == ".h5":  # "." was stored at /layers/all, ".." at /layers/../all
            import h5py

            with h5py.File(path, "r") as fh:
                assert {"%2E", "%2E%2E", "%252E"} <= set(fh["layers"])
