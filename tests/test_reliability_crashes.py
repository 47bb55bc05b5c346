"""Crashes: SIGKILL at several points of a build and of a compaction, both backends.

Each case forks a child that writes a real cache and kills itself (SIGKILL) at one
point. Afterwards the cache must never open as complete, ``resume`` must finish it
identical to an uninterrupted build, and an interrupted compaction must leave its
source intact and its destination unopenable as complete.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (
    BACKENDS,
    N_SAMPLES,
    SHAPES,
    assert_same_cache,
    die,
    flip_byte,
    hdf5_chunk_offset,
    run_killed,
    suffix,
    write,
)
from reliability_support import synthetic as reliability_synthetic

import fmcache
import fmcache.cache as cache_mod
import fmcache.writer as writer_mod
from fmcache.backends import hdf5_backend, hdf5_writes
from fmcache.backends.lmdb_backend import LmdbBackend
from fmcache.codecs import codec_from_spec
from fmcache.compact import compact_cache
from fmcache.errors import IncompleteCacheError, ResumeError
from fmcache.verify import verify_cache

KILLED = -signal.SIGKILL


class _DieWhileIterating(list):
    """The puts of a write transaction; iterating past ``at`` items kills the process,
    i.e. inside ``with env.begin(write=True)``, half of the puts done."""

    def __init__(self, items: list, at: int) -> None:
        super().__init__(items)
        self.at = at

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            if i == self.at:
                die()
            yield item


def _kill_inside_batch(path, backend, batch):
    """Die half-way through writing batch number ``batch`` (0-based)."""
    if backend == "lmdb":
        original = LmdbBackend._write_txn
        seen = []

        def write_txn(self, puts, deletes=()):
            if any(key.startswith(b"\x00meta/progress") for key, _ in puts):
                seen.append(1)
                if len(seen) == batch + 1:
                    puts = _DieWhileIterating(puts, len(puts) // 2)
            return original(self, puts, deletes)

        LmdbBackend._write_txn = write_txn
    else:
        original_rows = hdf5_writes.write_rows
        calls = []

        def write_rows(ds, start, rows):
            if start == batch * 8:
                calls.append(1)
                if len(calls) == 3:  # some datasets grown and written, others not
                    ds.resize(start + len(rows), axis=0)
                    ds[start:start + len(rows) // 2] = rows[:len(rows) // 2]
                    die()
            return original_rows(ds, start, rows)

        hdf5_writes.write_rows = write_rows
    write(path, backend)


def _kill_between_batches(path, backend, batches):
    original = cache_mod.CacheWriter.append

    def append(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if result == batches * 8:
            die()
        return result

    cache_mod.CacheWriter.append = append
    write(path, backend)


def _kill_inside_manifest(path, backend):
    """Die while the final manifest is being stored (before the rename)."""
    if backend == "lmdb":
        original = LmdbBackend._write_txn

        def write_txn(self, puts, deletes=()):
            if any(key == b"\x00meta/manifest" for key, _ in puts):
                die()  # inside the transaction: the put is never committed
            return original(self, puts, deletes)

        LmdbBackend._write_txn = write_txn
    else:
        original_set = hdf5_backend.Hdf5Backend._set_attr_blob

        def set_attr_blob(fh, key, data):
            if key == "manifest":
                fh.attrs["fmcache_manifest"] = data.decode()  # the text, not yet its CRC
                fh.flush()
                die()
            return original_set(fh, key, data)

        hdf5_backend.Hdf5Backend._set_attr_blob = staticmethod(set_attr_blob)
    write(path, backend)


def _kill_before_rename(path, backend):
    """Die after the manifest is durable, before ``<path>.partial`` becomes ``path``."""
    writer_mod.install = lambda partial, final: die()  # the name writer.py calls (from fmcache.paths)
    write(path, backend)


CRASH_POINTS = {
    "inside-first-batch": lambda p, b: _kill_inside_batch(p, b, 0),
    "inside-a-later-batch": lambda p, b: _kill_inside_batch(p, b, 3),
    "between-batches": lambda p, b: _kill_between_batches(p, b, 5),
    "inside-manifest-write": _kill_inside_manifest,
    "after-manifest-before-rename": _kill_before_rename,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted build per backend, the reference."""
    root = tmp_path_factory.mktemp("clean")
    paths = {}
    for backend in BACKENDS:
        paths[backend] = root / f"clean{suffix(backend)}"
        write(paths[backend], backend)
    return paths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_sigkill_during_build_then_resume_equals_a_clean_build(tmp_path, clean, backend, point):
    path = tmp_path / f"c{suffix(backend)}"
    assert run_killed(CRASH_POINTS[point], path, backend) == KILLED
    with pytest.raises(IncompleteCacheError):
        fmcache.open_cache(path)  # never a cache that opens as complete
    write(path, backend, resume=True)
    assert_same_cache(path, clean[backend])
    assert not cache_mod.partial_path(path).exists()


def test_hdf5_partial_damaged_by_a_crash_refuses_resume_with_a_rebuild_hint(tmp_path, clean):
    """HDF5 has no transactions: if a crash left committed data unreadable, resume says
    so (typed, with the --overwrite hint) instead of building on top of it."""
    path = tmp_path / "c.h5"
    assert run_killed(CRASH_POINTS["between-batches"], path, "hdf5") == KILLED
    partial = cache_mod.partial_path(path)
    offset, size = hdf5_chunk_offset(partial, "/layers/conv/all/values", 2)
    flip_byte(partial, offset + size // 2)  # what a torn metadata/chunk write leaves
    with pytest.raises(ResumeError, match="sample 2") as info:
        write(path, "hdf5", resume=True)
    assert "--overwrite" in info.value.hint
    write(path, "hdf5", overwrite=True)  # the way out the hint names
    assert_same_cache(path, clean["hdf5"])


def _kill_between_renames(path):
    """Overwrite a committed LMDB cache where the kernel cannot swap two directories in
    one step, and die after the old one was moved aside, before the new one is moved in."""
    import os

    import fmcache.paths as paths_mod

    original = os.replace
    calls = []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            die()
        return original(src, dst)

    paths_mod._exchange = lambda a, b: False
    paths_mod.os.replace = replace
    write(path, "lmdb", overwrite=True)


def _kill_after_the_swap(path):
    """Overwrite a committed LMDB cache and die right after the atomic swap, before the
    old cache (now at the partial's name) is removed."""
    import fmcache.paths as paths_mod

    paths_mod.remove_path = lambda p: die()
    write(path, "lmdb", overwrite=True)


def test_sigkill_during_an_lmdb_overwrite_leaves_a_whole_cache_at_the_path(tmp_path, clean):
    """Directories are swapped in one step (renameat2): no moment without a cache at PATH,
    and no user's PATH.old touched (the two-rename install deleted it)."""
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", seed=1)  # an older cache of other data at the path
    users = path.with_name("c.lmdb.old")
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert run_killed(_kill_after_the_swap, path) == KILLED
    assert_same_cache(path, clean["lmdb"])  # the new cache, whole
    assert fmcache.open_cache(cache_mod.partial_path(path)).manifest.complete  # the old one, left over
    write(path, "lmdb", overwrite=True)  # the next overwrite takes the leftover away
    assert not cache_mod.partial_path(path).exists() and (users / "notes.txt").read_text() == "mine"


def test_sigkill_between_the_renames_of_an_lmdb_overwrite(tmp_path, clean):
    """Where the kernel cannot swap: the old cache is moved aside under this process's name,
    never a user's PATH.old, and an interrupted overwrite is finished by a resume."""
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", seed=1)
    assert run_killed(_kill_between_renames, path) == KILLED
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("c.lmdb.old-")]
    assert not path.exists() and len(aside) == 1 and aside[0][len("c.lmdb.old-"):].isdigit()
    with pytest.raises(IncompleteCacheError):
        fmcache.open_cache(path)
    write(path, "lmdb", resume=True, overwrite=True)
    assert_same_cache(path, clean["lmdb"])
    assert not cache_mod.partial_path(path).exists()


def _kill_compaction(src, dst, when):
    if when == "mid-copy":
        original = cache_mod.CacheWriter.append

        def append(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if result >= 16:
                die()
            return result

        cache_mod.CacheWriter.append = append
    else:
        writer_mod.install = lambda partial, final: die()  # the name writer.py calls (from fmcache.paths)
    compact_cache(src, dst, codec="fp16", batch_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("when", ["mid-copy", "before-rename"])
def test_sigkill_during_compaction_leaves_source_intact(tmp_path, clean, backend, when):
    src = tmp_path / f"src{suffix(backend)}"
    write(src, backend)
    before = src.stat().st_mtime_ns if src.is_file() else (src / "data.mdb").stat().st_mtime_ns
    other = "hdf5" if backend == "lmdb" else "lmdb"  # convert too: both writers get killed
    dst = tmp_path / f"dst{suffix(other)}"
    assert run_killed(_kill_compaction, src, dst, when) == KILLED
    with pytest.raises(IncompleteCacheError):
        fmcache.open_cache(dst)
    after = src.stat().st_mtime_ns if src.is_file() else (src / "data.mdb").stat().st_mtime_ns
    assert after == before
    assert verify_cache(src).samples == 64
    assert_same_cache(src, clean[backend])
    compact_cache(src, dst, codec="fp16", batch_size=8, overwrite=True)  # a retry just works
    with fmcache.open_cache(dst) as out, fmcache.open_cache(src) as ref:
        np.testing.assert_allclose(out.read_batch("conv", range(64)), ref.read_batch("conv", range(64)),
                                   rtol=1e-3, atol=1e-4)



def _chunks_below(ds, rows):
    """{chunk index: (file offset, stored bytes)} of the chunks of ``ds`` holding rows below ``rows``."""
    per = ds.chunks[0]
    found = {}
    for index in range(-(-rows // per)):
        coord = (index * per, *(0,) * (ds.ndim - 1))
        info = ds.id.get_chunk_info_by_coord(coord)
        found[index] = (info.byte_offset, bytes(ds.id.read_direct_chunk(coord)[1]))
    return found


@pytest.mark.parametrize("codec", ["raw", "bf16", "int8", "zfp:accuracy=0.01"])
@pytest.mark.parametrize("batch", [3, 6, 10])
def test_hdf5_build_never_rewrites_a_chunk_the_progress_mark_counts(tmp_path, codec, batch):
    """Batches that end inside a chunk: a chunk holding committed samples is written
    once, whole, and never again (a kill inside a rewrite would damage committed
    samples); the progress mark only counts rows every dataset has on disk."""
    import json

    maps, labels = reliability_synthetic()
    path = tmp_path / "c.h5"
    seen: dict[str, dict[int, tuple[int, bytes]]] = {}
    with fmcache.create_cache(path, backend="hdf5", fingerprints={"weights": "w", "data": "d"}) as w:
        for name, shape in SHAPES.items():
            w.add_layer(name, shape, codec=codec, samples_per_chunk=4)
        marks = []
        for start in range(0, N_SAMPLES, batch):
            w.append({k: v[start:start + batch] for k, v in maps.items()}, labels[start:start + batch])
            fh = w.backend._file()
            committed = json.loads(w.backend.get_meta("progress"))["samples"]
            assert committed <= w.samples
            marks.append(committed)
            datasets: list = []
            fh.visititems(lambda _n, obj, found=datasets: found.append(obj) if hasattr(obj, "chunks") else None)
            for ds in datasets:
                assert ds.shape[0] >= committed, ds.name
                now = _chunks_below(ds, committed)
                before = seen.setdefault(ds.name, {})
                for index, stored in before.items():
                    assert now[index] == stored, f"{ds.name} chunk {index} rewritten after it was committed"
                before.update(now)
        w.commit()
    assert marks[-1] > 0 and marks == sorted(marks)
    clean = tmp_path / "clean.h5"
    write(clean, "hdf5", codec=codec)
    assert_same_cache(path, clean)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(st.integers(1, 13), min_size=1, max_size=8),
       then=st.lists(st.integers(1, 13), min_size=1, max_size=4),
       chunks=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_hdf5_stopped_anywhere_resumes_to_the_clean_cache(tmp_path_factory, first, then, chunks):
    """Any batch sizes, any chunk lengths: a build closed without commit (Ctrl-C) after
    any batch resumes — with other batch sizes — to exactly the uninterrupted cache, and
    the resume starts at or before the samples appended (never skips one)."""
    root = tmp_path_factory.mktemp("stopped")
    maps, labels = reliability_synthetic()
    spc = dict(zip(SHAPES, chunks))

    def build(path, sizes, resume=False, commit=True):
        with fmcache.create_cache(path, backend="hdf5", resume=resume,
                                  fingerprints={"weights": "w", "data": "d"}) as w:
            for name, shape in SHAPES.items():
                w.add_layer(name, shape, codec="bf16", samples_per_chunk=spc[name])
            start = resumed_from = w.samples
            for size in list(sizes) + [N_SAMPLES] * (N_SAMPLES if commit else 0):
                if start >= N_SAMPLES:
                    break
                w.append({k: v[start:start + size] for k, v in maps.items()}, labels[start:start + size])
                start += size
            if commit:
                w.commit()
            return resumed_from, start

    _, appended = build(root / "c.h5", first, commit=False)
    resumed_from, _ = build(root / "c.h5", then, resume=True)
    assert resumed_from <= appended
    build(root / "clean.h5", [N_SAMPLES])
    assert_same_cache(root / "c.h5", root / "clean.h5")


def _shards(root):
    """Two shard caches of the synthetic data (built as the two halves of one build)."""
    maps, labels = reliability_synthetic()
    paths = []
    for i in range(2):
        path = root / f"s{i}.lmdb"
        lo, hi = i * N_SAMPLES // 2, (i + 1) * N_SAMPLES // 2
        build = {"shard": {"index": i, "count": 2, "start": lo, "stop": hi}, "samples_total": N_SAMPLES}
        with fmcache.create_cache(path, fingerprints={"weights": "w", "data": "d"}, build=build) as w:
            for name, shape in SHAPES.items():
                w.add_layer(name, shape, codec="raw")
            w.append({k: v[lo:hi] for k, v in maps.items()}, labels[lo:hi])
            w.commit()
        paths.append(path)
    return paths


def _merge_killed_after_one_move(shards, out):
    import fmcache.shards as shards_mod

    original, calls = shards_mod.os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:
            die()  # the first shard moved, the second not
        return original(src, dst)

    shards_mod.os.replace = replace
    shards_mod.merge_shards(shards, out)


def test_a_merge_killed_part_way_is_undone_by_the_next_and_never_overwritten(tmp_path):
    """A killed merge left a shard in OUT.partial, and the hints (build or compact
    --overwrite) deleted it with the folder."""
    from fmcache.errors import CacheExistsError
    from fmcache.shards import merge_shards

    shards, out = _shards(tmp_path), tmp_path / "m"
    assert run_killed(_merge_killed_after_one_move, shards, out) == KILLED
    assert not shards[0].exists() and shards[1].exists()
    with pytest.raises(IncompleteCacheError, match="shards of an interrupted merge") as info:
        fmcache.open_cache(out)
    assert "fmcache merge` again" in info.value.hint
    with pytest.raises(CacheExistsError, match="shards of an interrupted merge"):
        fmcache.create_cache(out, backend="lmdb", overwrite=True)  # never deletes them
    merged = merge_shards(shards, out)  # the same merge again: the shard goes back, then the merge
    with fmcache.open_cache(merged) as cache:
        assert len(cache) == N_SAMPLES
        np.testing.assert_array_equal(cache.read_batch("conv", range(N_SAMPLES)), reliability_synthetic()[0]["conv"])
    assert not cache_mod.partial_path(out).exists()


def test_a_merge_that_fails_part_way_moves_every_shard_back(tmp_path, monkeypatch):
    """A full disk after the moves left both shards inside OUT.partial, unsaid."""
    import fmcache.shards as shards_mod

    shards, out = _shards(tmp_path), tmp_path / "m"
    before = [sorted(p.rglob("*")) for p in shards]
    original = shards_mod.os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return original(src, dst)

    monkeypatch.setattr(shards_mod.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        shards_mod.merge_shards(shards, out)
    monkeypatch.undo()
    assert [sorted(p.rglob("*")) for p in shards] == before
    assert not cache_mod.partial_path(out).exists() and not out.exists()
    with fmcache.open_cache(shards[1]) as cache:
        assert len(cache) == N_SAMPLES // 2


def test_a_merge_killed_before_its_journal_leaves_nothing_in_the_way(tmp_path):
    from fmcache.shards import merge_shards

    shards, out = _shards(tmp_path), tmp_path / "m"
    cache_mod.partial_path(out).mkdir()  # made, then killed before the journal: nothing moved
    with fmcache.open_cache(merge_shards(shards, out)) as cache:
        assert len(cache) == N_SAMPLES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", ["raw", "bf16"])
def test_a_batch_buffer_the_caller_refills_is_stored_as_it_was(tmp_path, backend, codec):
    """HDF5 held rows (waiting for their chunk) as views of the caller's batch: a writer
    loop that refilled one buffer stored the next batch's maps and labels there."""
    maps, labels = reliability_synthetic()
    path = tmp_path / f"c{suffix(backend)}"
    buf = {name: np.empty((6, *shape), np.float32) for name, shape in SHAPES.items()}
    lbuf = np.empty(6, np.int64)
    with fmcache.create_cache(path, backend=backend) as w:
        for name, shape in SHAPES.items():
            w.add_layer(name, shape, codec=codec, samples_per_chunk=4)
        for start in range(0, N_SAMPLES, 6):
            n = min(6, N_SAMPLES - start)
            for name in SHAPES:
                buf[name][:n] = maps[name][start:start + n]
            lbuf[:n] = labels[start:start + n]
            w.append({name: b[:n] for name, b in buf.items()}, lbuf[:n])
        w.commit()
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.labels, labels)
        for name in SHAPES:
            want = maps[name] if codec == "raw" else codec_from_spec("bf16").decode_batch(
                [codec_from_spec("bf16").encode(m) for m in maps[name]],
                np.empty_like(maps[name]))
            np.testing.assert_array_equal(cache.read_batch(name, range(N_SAMPLES)), want, err_msg=name)


def test_hdf5_opaque_fields_of_a_plug_in_codec_commit_and_read(tmp_path, monkeypatch):
    """A codec without an HDF5 face is stored as variable-length bytes (+ .crc32): the
    commit's zero-chunk record took those for values (ValueError), and h5py broadcast
    equal-length payloads as a 2-D array (TypeError)."""
    from fmcache.codecs import registry
    from fmcache.codecs.base import Codec
    from fmcache.verify import verify_cache

    class Opaque(Codec):
        codec_id = "test-opaque"
        lossless = True
        stores_nonfinite = True
        keeps_zeros = True
        channelwise = True

        def params(self):
            return {}

        def _encode(self, x):
            return x.tobytes()

        def _decode(self, payload, shape, out):
            values = np.frombuffer(payload, np.float32).reshape(shape)
            if out is None:
                return values.copy()
            out[...] = values
            return out

    monkeypatch.setitem(registry._REGISTRY, "test-opaque", Opaque)
    maps, labels = reliability_synthetic()
    for spc, sizes in [(1, [N_SAMPLES]), (4, [3, 5, N_SAMPLES - 8])]:
        path = tmp_path / f"o{spc}.h5"
        with fmcache.create_cache(path) as w:
            w.add_layer("conv", SHAPES["conv"], codec="test-opaque", samples_per_chunk=spc)
            start = 0
            for n in sizes:
                w.append({"conv": maps["conv"][start:start + n]}, labels[start:start + n])
                start += n
            w.commit()
        with fmcache.open_cache(path) as cache:
            np.testing.assert_array_equal(cache.read_batch("conv", range(N_SAMPLES)), maps["conv"])
        assert verify_cache(path).layers == {"conv": N_SAMPLES}  # raises on damage


def test_a_resume_of_a_build_killed_while_declaring_its_layers_is_a_resume_error(tmp_path):
    """HDF5's metadata half written (a session-14 sweep's random kill, kept as a fixture):
    the resume's truncation raised h5py's RuntimeError ("Iteration operator failed")."""
    import shutil

    shutil.copy(Path(__file__).parent / "fixtures" / "killed_in_declare_partial.h5", tmp_path / "c.h5.partial")
    with pytest.raises(ResumeError, match="cannot list or cut its datasets") as info:
        fmcache.create_cache(tmp_path / "c.h5", backend="hdf5", resume=True,
                             fingerprints={"weights": "w", "data": "d"})
    assert "--overwrite" in info.value.hint


def test_merge_refuses_a_shard_given_as_a_symbolic_link(tmp_path):
    """A relative link was moved into OUT, where it pointed nowhere: a merge that never opened."""
    from fmcache.errors import CacheError
    from fmcache.shards import merge_shards

    shards = _shards(tmp_path)
    link = tmp_path / "link.lmdb"
    link.symlink_to(shards[0].name)
    with pytest.raises(CacheError, match="is a symbolic link") as info:
        merge_shards([link, shards[1]], tmp_path / "m")
    assert str(shards[0]) in info.value.hint and link.is_symlink() and shards[0].exists()


def test_shards_that_cannot_go_back_after_a_killed_merge_are_named(tmp_path):
    """The shards' folder moved after a killed merge: the undo's bare FileNotFoundError."""
    from fmcache.errors import CacheError
    from fmcache.shards import merge_shards

    (tmp_path / "a").mkdir()
    shards, out = _shards(tmp_path / "a"), tmp_path / "m"
    assert run_killed(_merge_killed_after_one_move, shards, out) == KILLED
    (tmp_path / "a").rename(tmp_path / "b")
    with pytest.raises(CacheError, match="cannot go back") as info:
        merge_shards(shards, out)
    assert "fmcache-merge.json" in info.value.hint
    assert any(p.name.startswith("shard-") for p in cache_mod.partial_path(out).iterdir())  # kept, not lost
