"""Stale caches and bad input: each refused with a typed error that names what and where
and says what to do, with nothing already committed lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fmnist_small import N_SAMPLES as FMNIST_SAMPLES
from fmnist_small import tiny_model, train_subset
from reliability_support import (
    BACKENDS,
    BATCH,
    SHAPES,
    assert_same_cache,
    die,
    read_all,
    run_killed,
    suffix,
    synthetic,
    write,
)

import fmcache
import fmcache.cache as cache_mod
import fmcache.writer as writer_mod
from fmcache import FeatureMapDataset, TierPlan
from fmcache.backends import backend_class
from fmcache.builder import build_cache, prefix_fingerprint
from fmcache.cli import main
from fmcache.errors import (
    CacheError,
    CodecSpecError,
    CorruptionError,
    DiskFullError,
    FormatVersionError,
    IncompleteCacheError,
    LayerNotFoundError,
    NonFiniteError,
    NotACacheError,
    ReadOnlyError,
    ShapeMismatchError,
    StaleCacheError,
    TierPlanError,
    UnknownCodecError,
)

HERE = Path(__file__).parent


def other_data():
    """The CLI's --data factory for 'the data changed': Fashion-MNIST test images."""
    return fmcache.zoo.FashionMNIST("test", limit=FMNIST_SAMPLES)


# ---- stale caches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("stale") / "c.lmdb"
    model = tiny_model()
    manifest = build_cache(model, train_subset(), ["block2"], path, batch_size=32, progress=False)
    return path, manifest


def test_dataset_refuses_a_model_whose_prefix_changed(built):
    path, manifest = built
    model = tiny_model()
    example = torch.zeros(1, 1, 32, 32)
    same = prefix_fingerprint(model, ["block2"], example)
    assert same == manifest.fingerprints["weights"]
    FeatureMapDataset(path, weights_fingerprint=same)  # unchanged: fine
    with torch.no_grad():
        model.block1[0].weight.mul_(1.001)
    changed = prefix_fingerprint(model, ["block2"], example)
    with pytest.raises(StaleCacheError, match="frozen-prefix weights changed") as info:
        FeatureMapDataset(path, weights_fingerprint=changed)
    assert "allow_stale" in info.value.hint and str(path) in str(info.value)
    ds = FeatureMapDataset(path, weights_fingerprint=changed, allow_stale=True)  # the explicit override
    assert len(ds) == FMNIST_SAMPLES


KILL_BUILD = """
import os, signal, sys
sys.path.insert(0, {here!r})
import fmcache.cache as cache_mod
from fmnist_small import tiny_model, train_subset
from fmcache.builder import build_cache
original = cache_mod.CacheWriter.append
def append(self, *a, **k):
    result = original(self, *a, **k)
    if result >= 32:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
cache_mod.CacheWriter.append = append
build_cache(tiny_model(), train_subset(), ["block1"], {out!r}, batch_size=16, progress=False)
"""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The partial cache of a real build killed after 32 samples (a subprocess: torch's
    thread pools do not survive fork)."""
    out = tmp_path_factory.mktemp("killed") / "c.lmdb"
    proc = subprocess.run([sys.executable, "-c", KILL_BUILD.format(here=str(HERE), out=str(out))],
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode < 0, proc.stderr.decode()[-2000:]
    return cache_mod.partial_path(out)


def _copy_partial(partial, tmp_path):
    out = tmp_path / "c.lmdb"
    shutil.copytree(partial, cache_mod.partial_path(out))
    return out


def _cli_resume(out, data, *extra):
    return CliRunner().invoke(main, ["build", "--model", "fmnist_small:tiny_model", "--layer", "block1", "--out",
                                     str(out), "--batch-size", "16", "--resume", "--no-progress", "--data", data,
                                     *extra])


def test_cli_resume_with_other_data_is_refused(tmp_path, interrupted):
    out = _copy_partial(interrupted, tmp_path)
    refused = _cli_resume(out, "test_reliability_input:other_data")
    assert refused.exit_code == 1
    assert "input data changed" in refused.output and "--allow-stale" in refused.output, refused.output
    with pytest.raises(IncompleteCacheError):
        fmcache.open_cache(out)  # nothing was committed or lost: still resumable
    same = _cli_resume(out, "fmnist_small:train_subset")
    assert same.exit_code == 0, same.output
    assert len(fmcache.open_cache(out)) == FMNIST_SAMPLES


@pytest.mark.parametrize("layers", [["block2"], ["block1", "block2"]])
def test_cli_resume_with_other_layers_names_the_layers_not_the_weights(tmp_path, interrupted, layers):
    """Another layer set runs another prefix, so its weights fingerprint differs too: the
    resume said the weights changed (--allow-stale) before it said which layers."""
    out = _copy_partial(interrupted, tmp_path)
    refused = CliRunner().invoke(main, ["build", "--model", "fmnist_small:tiny_model", "--out", str(out),
                                        *[a for layer in layers for a in ("--layer", layer)], "--batch-size", "16",
                                        "--resume", "--no-progress", "--data", "fmnist_small:train_subset"])
    assert refused.exit_code == 1
    assert "started with layers ['block1']" in refused.output and "weights" not in refused.output, refused.output


def test_cli_resume_with_another_codec_names_the_cache_and_both_codecs(tmp_path, interrupted):
    out = _copy_partial(interrupted, tmp_path)
    refused = _cli_resume(out, "fmnist_small:train_subset", "--codec", "int8")
    assert refused.exit_code == 1
    assert f"{out}: layer 'block1' is already declared with another layout: tiers all bf16:" in refused.output
    assert "when it began, now all int8:" in refused.output, refused.output


def test_cli_allow_stale_overrides(tmp_path, interrupted):
    out = _copy_partial(interrupted, tmp_path)
    result = _cli_resume(out, "test_reliability_input:other_data", "--allow-stale")
    assert result.exit_code == 0, result.output
    assert len(fmcache.open_cache(out)) == FMNIST_SAMPLES


def test_cli_unknown_layer_names_it_and_suggests(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "fmnist_small:tiny_model", "--data",
                                       "fmnist_small:train_subset", "--layer", "blok2", "--out",
                                       str(tmp_path / "c.lmdb"), "--no-progress"])
    assert result.exit_code == 1
    assert "blok2" in result.output and "block2" in result.output, result.output
    assert not (tmp_path / "c.lmdb.partial").exists()


def test_unknown_layer_in_the_library_is_a_layer_not_found_error(tmp_path):
    with pytest.raises(LayerNotFoundError, match="blok2"):
        build_cache(tiny_model(), train_subset(), ["block1", "blok2"], tmp_path / "c.h5", progress=False)


# ---- bad batches ------------------------------------------------------------------------------
def _writer(path, backend):
    w = fmcache.create_cache(path, backend=backend, fingerprints={"weights": "w0", "data": "d0"})
    for name, shape in SHAPES.items():
        w.add_layer(name, shape, codec="raw", samples_per_chunk=4)
    return w


def _batch(maps, start):
    return {k: v[start:start + BATCH] for k, v in maps.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_activations_name_layer_and_sample(tmp_path, backend, bad_value):
    maps, labels = synthetic()
    path = tmp_path / f"c{suffix(backend)}"
    with _writer(path, backend) as w:
        w.append(_batch(maps, 0), labels[:BATCH])
        bad = _batch(maps, BATCH)
        bad["tokens"] = bad["tokens"].copy()
        bad["tokens"][3, 2, 1] = bad_value
        with pytest.raises(NonFiniteError, match=r"layer 'tokens'.*sample 11") as info:
            w.append(bad, labels[BATCH:2 * BATCH])
        assert "normalisation" in info.value.hint
        for start in range(BATCH, 64, BATCH):  # the writer goes on; batch 0 is intact
            w.append(_batch(maps, start), labels[start:start + BATCH])
        w.commit()
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read_batch("tokens", range(64)), maps["tokens"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_allowed_non_finite_maps_for_a_codec_that_cannot_hold_them_name_layer_sample_and_codec(tmp_path, backend):
    """--allow-nonfinite with an int8 tier: the codec's own EncodeError named neither the
    layer nor the sample; the writer now says which, and which codec."""
    path = tmp_path / f"c{suffix(backend)}"
    x = np.ones((8, 4, 2, 2), np.float32)
    with fmcache.create_cache(path, backend=backend, allow_nonfinite=True) as w:
        w.add_layer("conv", (4, 2, 2), plan=TierPlan.two_tier(4, [0], "bf16", "int8"))
        w.append({"conv": x[:4]}, np.zeros(4, np.int64))
        bad = x[4:].copy()
        bad[2, 3, 1, 1] = np.nan
        with pytest.raises(NonFiniteError, match=r"layer 'conv': NaN/Inf in the map of sample 6, in channels "
                                                 r"of tier 'bulk', whose codec 'int8' cannot store them") as info:
            w.append({"conv": bad}, np.zeros(4, np.int64))
        assert "raw, blosc2, fp16 or bf16" in info.value.hint
        bad = x[4:].copy()
        bad[2, 0, 1, 1] = np.nan  # in the bf16 tier: stored, not refused
        w.append({"conv": bad}, np.zeros(4, np.int64))
        w.commit()
    got = fmcache.open_cache(path).read_batch("conv", range(8))
    nan = np.isnan(got)
    assert nan[6, 0, 1, 1] and nan.sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_and_dtype_changes_mid_build(tmp_path, backend):
    maps, labels = synthetic()
    path = tmp_path / f"c{suffix(backend)}"
    with _writer(path, backend) as w:
        w.append(_batch(maps, 0), labels[:BATCH])
        smaller = _batch(maps, BATCH)
        smaller["conv"] = smaller["conv"][:, :5]
        with pytest.raises(ShapeMismatchError, match=r"layer 'conv'.*at sample 8"):
            w.append(smaller, labels[BATCH:2 * BATCH])
        wider = _batch(maps, BATCH)
        wider["conv"] = wider["conv"].astype(np.float64)
        with pytest.raises(ShapeMismatchError, match=r"layer 'conv': dtype changed from float32 to float64 at sample 8"):
            w.append(wider, labels[BATCH:2 * BATCH])
        with pytest.raises(ShapeMismatchError, match="labels at sample 8"):
            w.append(_batch(maps, BATCH), labels[BATCH:2 * BATCH].astype(np.float32))
        with pytest.raises(CacheError, match="needs maps for layers"):
            w.append({"conv": maps["conv"][BATCH:2 * BATCH]}, labels[BATCH:2 * BATCH])
        for start in range(BATCH, 64, BATCH):
            w.append(_batch(maps, start), labels[start:start + BATCH])
        w.commit()
    with fmcache.open_cache(path) as cache:
        np.testing.assert_array_equal(cache.read_batch("conv", range(64)), maps["conv"])


@pytest.mark.parametrize("spec,error,match", [
    ("zstd9", UnknownCodecError, "zstd9"),
    ("zfp:accuracy", CodecSpecError, "zfp"),
    ("zfp:accuracy=abc", CodecSpecError, "not a number"),
    ("zfp:accuracy=0.1,rate=8", CodecSpecError, "exactly one"),
    ("sz3", CodecSpecError, "exactly one of abs= and rel="),
    ("int8:bits=3", CodecSpecError, "int8"),
], ids=["unknown-id", "no-value", "not-a-number", "two-modes", "no-bound", "unknown-param"])
def test_bad_codec_specs_leave_a_committed_cache_untouched(tmp_path, spec, error, match):
    path = tmp_path / "c.lmdb"
    write(path, "lmdb", codec="raw")
    with fmcache.create_cache(path, overwrite=True) as w:
        with pytest.raises(error, match=match) as info:
            w.add_layer("conv", SHAPES["conv"], codec=spec)
        assert info.value.hint
    with fmcache.open_cache(path) as cache:  # the old cache is whole
        np.testing.assert_array_equal(cache.read_batch("conv", range(64)), synthetic()[0]["conv"])


@pytest.mark.parametrize("tiers,match", [
    ([("a", [0, 1, 2], "raw"), ("b", [2, 3, 4, 5], "fp16")], "channel 2 is in tier 'a' and in tier 'b'"),
    ([("a", [0, 1, 2], "raw"), ("b", [3, 4], "fp16")], "channels 5 belong to no tier"),
    ([("a", [0, 1, 2], "raw"), ("b", [3, 4, 5, 6], "fp16")], "names channel 6, outside 0..5"),
    ([("a", [0, 1, 2], "raw"), ("a", [3, 4, 5], "fp16")], "appears twice"),
    ([("bad name", list(range(6)), "raw")], "tier name"),
    ([], "at least one tier"),
], ids=["overlap", "missing", "out-of-range", "duplicate-name", "bad-name", "empty"])
def test_invalid_tier_plans(tiers, match):
    with pytest.raises(TierPlanError, match=match) as info:
        TierPlan(6, tiers)
    assert info.value.hint


def test_tier_plan_for_another_channel_count_names_the_layer(tmp_path):
    with fmcache.create_cache(tmp_path / "c.lmdb") as w, \
            pytest.raises(ShapeMismatchError, match=r"layer 'conv': the tier plan covers 4 channels"):
        w.add_layer("conv", SHAPES["conv"], plan=TierPlan.single(4, "raw"))


# ---- the file system ---------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only): a disk that can fill up, or be made read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_stops_before_the_batch_and_resume_finishes(tmp_path, tmpfs, backend):
    filler = tmpfs / "filler"
    free = shutil.disk_usage(tmpfs).free
    # leave room for the environment/file and a few batches beyond the 1 MiB margin
    filler.write_bytes(b"\0" * (free - writer_mod.FREE_SPACE_MARGIN_BYTES - 96 * 1024))
    path = tmpfs / f"c{suffix(backend)}"
    with pytest.raises(DiskFullError, match="nothing of it was written") as info:
        write(path, backend, codec="raw")
    assert "--resume" in info.value.hint
    with pytest.raises(IncompleteCacheError):
        fmcache.open_cache(path)
    filler.unlink()
    write(path, backend, codec="raw", resume=True)
    clean = tmp_path / f"clean{suffix(backend)}"
    write(clean, backend, codec="raw")
    assert_same_cache(path, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_during_compact_says_what_compact_can_do_and_frees_its_space(tmp_path, tmpfs, backend):
    """A full disk during `fmcache compact` said to run `fmcache build ... --resume`
    (compact cannot resume; there was no build). It now says to compact again, removes its
    unfinished DST (the space it held) and leaves the source as it was."""
    from fmcache.compact import compact_cache
    src = tmp_path / "src.lmdb"
    write(src, "lmdb", codec="raw")
    filler = tmpfs / "filler"
    free = shutil.disk_usage(tmpfs).free
    filler.write_bytes(b"\0" * (free - writer_mod.FREE_SPACE_MARGIN_BYTES - 96 * 1024))
    dst = tmpfs / f"dst{suffix(backend)}"
    with pytest.raises(DiskFullError) as info:
        compact_cache(src, dst, backend=backend, batch_size=8)
    assert "compact again" in info.value.hint and "--resume" not in info.value.hint
    assert not dst.exists() and not Path(f"{dst}.partial").exists()
    filler.unlink()
    compact_cache(src, dst, backend=backend, batch_size=8)
    with fmcache.open_cache(src) as a, fmcache.open_cache(dst) as b:
        np.testing.assert_array_equal(a.labels, b.labels)
        for name, values in read_all(a).items():
            np.testing.assert_array_equal(read_all(b)[name], values, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_location(tmp_path, tmpfs, backend):
    committed = tmpfs / f"c{suffix(backend)}"
    write(committed, backend)
    killed = tmpfs / f"k{suffix(backend)}"
    assert run_killed(_die_after_two_batches, killed, backend) < 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with fmcache.open_cache(committed) as cache:  # reading needs no write access
        assert len(cache) == 64 and cache.read_batch("conv", range(64)).shape == (64, *SHAPES["conv"])
    with pytest.raises(ReadOnlyError) as info:
        write(tmpfs / f"new{suffix(backend)}", backend)
    assert "location you can write to" in info.value.hint
    with pytest.raises(ReadOnlyError):
        write(killed, backend, resume=True)


def _die_after_two_batches(path, backend):
    original = cache_mod.CacheWriter.append

    def append(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if result >= 2 * BATCH:
            die()
        return result

    cache_mod.CacheWriter.append = append
    write(path, backend)


# ---- what is at the path --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_from_a_newer_format(tmp_path, backend):
    path = tmp_path / f"c{suffix(backend)}"
    write(path, backend)
    storage = backend_class(backend)(path, writable=True)
    manifest = json.loads(storage.get_meta("manifest"))
    manifest["format_version"] = fmcache.FORMAT_VERSION + 1
    manifest["fmcache_version"] = "9.0.0"
    storage.put_meta("manifest", json.dumps(manifest).encode())
    storage.close()
    with pytest.raises(FormatVersionError, match=rf"format version {fmcache.FORMAT_VERSION + 1} \(fmcache 9.0.0\)") as info:
        fmcache.open_cache(path)
    assert "upgrade fmcache" in info.value.hint


@pytest.mark.parametrize("make,error,match", [
    (lambda p: None, NotACacheError, "does not exist"),
    (lambda p: p.mkdir(), NotACacheError, "not an fmcache cache"),
    (lambda p: p.write_text("hello"), NotACacheError, "not an fmcache cache"),
    (lambda p: (p.mkdir(), (p / "data.mdb").write_bytes(os.urandom(8192))), CorruptionError, "LMDB cannot open"),
    (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(600)), CorruptionError, "HDF5 cannot open"),
], ids=["missing", "empty-dir", "text-file", "garbage-lmdb", "garbage-hdf5"])
def test_a_path_that_is_not_a_cache(tmp_path, make, error, match):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(error, match=match) as info:
        fmcache.open_cache(path)
    assert str(path) in str(info.value) and info.value.hint


PLUGIN_SCRIPT = """
import numpy as np, fmcache, h5py
rng = np.random.default_rng(0)
x = (rng.random((12, 4, 8, 8)) * (rng.random((12, 4, 8, 8)) > 0.4)).astype(np.float32)
bounds = {"zfp:accuracy=0.01": 0.01, "sz3:abs=0.001": 0.001, "blosc2:cname=lz4,shuffle=bit": 0.0}
with fmcache.create_cache(OUT) as w:
    for i, spec in enumerate(bounds):
        w.add_layer(f"l{i}", (4, 8, 8), codec=spec)
    for s in range(0, 12, 4):
        w.append({f"l{i}": x[s:s + 4] for i in range(len(bounds))}, np.arange(s, s + 4))
    w.commit()
with fmcache.open_cache(OUT) as c:
    for i, bound in enumerate(bounds.values()):
        err = float(np.abs(c.read_batch(f"l{i}", range(12)) - x).max())
        assert err <= bound, (i, err)
with h5py.File(OUT, "r") as fh:  # plain h5py reads through the filters too
    assert fh["/layers/l0/all/values"].shape == (12, 32, 8)
    fh["/layers/l0/all/values"][0]
print("ok")
"""


def test_builds_and_reads_with_hdf5_plugin_path_exported(tmp_path):
    import hdf5plugin

    out = tmp_path / "p.h5"
    env = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}
    proc = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + PLUGIN_SCRIPT], env=env,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(b"ok"), proc.stderr.decode()[-2000:]
    if shutil.which("h5dump"):  # and h5dump, as users run it, prints decoded values
        dump = subprocess.run(["h5dump", "-d", "/layers/l0/all/values", "-c", "1,1,2", str(out)], env=env,
                              capture_output=True, timeout=60, check=False)
        assert dump.returncode == 0 and b"DATA" in dump.stdout, dump.stderr.decode()[-1000:]


@pytest.mark.parametrize("progress", [False, True, None])
def test_verify_takes_progress_as_build_cache_does(tmp_path, progress, capsys):
    """verify_cache(path, progress=False) failed with "'bool' object is not callable"."""
    from fmcache.verify import verify_cache

    path = tmp_path / "v.lmdb"
    with fmcache.create_cache(path) as writer:
        writer.add_layer("l", (2, 3, 3), codec="raw")
        writer.append({"l": np.ones((5, 2, 3, 3), np.float32)}, np.arange(5))
        writer.commit()
    report = verify_cache(path, progress=progress)
    assert report.samples == 5 and report.layers == {"l": 5}
    assert ("verify v.lmdb" in capsys.readouterr().err) == bool(progress)


def test_overwrite_replaces_caches_only(tmp_path, monkeypatch):
    """`--out mydata --overwrite` (meant: mydata.lmdb) deleted the user's folder, and
    `--out . --overwrite` the current directory."""
    from fmcache.errors import CacheExistsError

    folder = tmp_path / "project" / "mydata"
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("keep")
    monkeypatch.chdir(tmp_path / "project")
    for out in (folder, Path("."), tmp_path, Path("mydata")):
        with pytest.raises(CacheExistsError, match="not an fmcache cache|current directory"):
            fmcache.create_cache(out, overwrite=True)
    assert (folder / "precious.txt").read_text() == "keep" and Path("mydata").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "c.lmdb", tmp_path / "c.lmdb"):  # an empty folder, nothing, a cache: replaced
        with fmcache.create_cache(out, overwrite=True) as writer:
            writer.add_layer("l", (2,), codec="raw")
            writer.append({"l": np.ones((3, 2), np.float32)}, np.arange(3))
            writer.commit()
        assert len(fmcache.open_cache(out)) == 3
    assert runner_out(["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset",
                       "--layer", "block1", "--out", str(folder), "--overwrite"]).count("not an fmcache cache") == 1


def runner_out(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    return result.output


def test_a_second_writer_of_a_path_is_refused_while_the_first_works(tmp_path):
    """A build, then a second one of the same path with --resume or --overwrite: the second
    deleted or took over the first's partial, and neither left a cache."""
    from fmcache.errors import CacheBusyError

    path = tmp_path / "c.lmdb"
    first = fmcache.create_cache(path)
    first.add_layer("l", (2,), codec="raw")
    first.append({"l": np.ones((3, 2), np.float32)}, np.arange(3))
    for kwargs in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(CacheBusyError, match=f"{path} is being written by another process \\(pid \\d+\\)"):
            fmcache.create_cache(path, **kwargs)
    assert fmcache.paths.partial_path(path).exists()
    first.commit()
    assert len(fmcache.open_cache(path)) == 3 and not fmcache.paths.lock_path(path).exists()
    with fmcache.create_cache(path, overwrite=True) as again:  # the lock went with the commit
        again.add_layer("l", (2,), codec="raw")
        again.append({"l": np.zeros((4, 2), np.float32)}, np.arange(4))
        again.commit()
    assert len(fmcache.open_cache(path)) == 4
    script = f"import fmcache; w = fmcache.create_cache({str(path)!r}, overwrite=True); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", script], check=True)  # a writer that died holding it
    with fmcache.create_cache(path, overwrite=True) as after:  # the kernel dropped its lock
        after.add_layer("l", (2,), codec="raw")
        after.append({"l": np.zeros((5, 2), np.float32)}, np.arange(5))
        after.commit()
    assert len(fmcache.open_cache(path)) == 5


class _LabelsChangeLength(torch.utils.data.Dataset):
    """Multi-label targets whose length changes part-way (item 10 on)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return torch.ones(1, 32, 32) * i / 24, ([1, 0] if i >= 10 else [1, 0, 1])


def test_labels_changing_shape_in_a_batch_are_a_data_error(tmp_path):
    """torch's collate said "stack expects each tensor to be equal size" (untyped)."""
    from fmcache.errors import DataError

    with pytest.raises(DataError, match=r"labels of different shapes \[\(2,\), \(3,\)\] in one batch"):
        build_cache(tiny_model(), _LabelsChangeLength(), ["block1"], tmp_path / "l.lmdb", batch_size=8,
                    progress=False)


def test_cli_weights_and_out_a_new_user_gets_wrong_are_named(tmp_path):
    """A file that is no state dict (torch's unpickling traceback), a state dict of another
    model ("Missing key(s)"), an --out under a regular file (NotADirectoryError)."""
    garbage = tmp_path / "g.pt"
    garbage.write_text("garbage")
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    (tmp_path / "file").write_text("x")
    common = ["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset",
              "--layer", "block1", "--no-progress"]
    for extra, message in (
            (["--weights", str(garbage), "--out", str(tmp_path / "a.lmdb")], "not a state dict torch.load can read"),
            (["--weights", str(other), "--out", str(tmp_path / "b.lmdb")], "do not fit the model"),
            (["--out", str(tmp_path / "file" / "sub.lmdb")], "cannot write there")):
        out = runner_out(common + extra)
        assert out.startswith("error: ") and message in out and "Traceback" not in out, out


def test_an_isolated_verify_from_an_unguarded_script_says_why_it_could_not_start(tmp_path):
    """Without `if __name__ == "__main__":` multiprocessing's new process imports the script
    again and fails; a healthy cache was reported as crashing its reader (damage)."""
    path = tmp_path / "c.lmdb"
    _ones_cache(path)
    script = tmp_path / "unguarded.py"
    script.write_text(f"from fmcache.verify import verify_cache\nprint(verify_cache({str(path)!r}, isolated=True))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "could not start" in done.stderr and "__main__" in done.stderr and "crashed" not in done.stderr


def test_a_cache_whose_lmdb_environment_the_user_opened_is_not_called_damaged(tmp_path):
    import lmdb

    path = tmp_path / "c.lmdb"
    _ones_cache(path)
    own = lmdb.open(str(path), readonly=True)
    try:
        with pytest.raises(fmcache.errors.CacheError, match="already open in this process") as info:
            fmcache.open_cache(path).read("l", 0)
        assert not isinstance(info.value, fmcache.errors.CorruptionError) and "close your own" in info.value.hint
    finally:
        own.close()
    assert fmcache.open_cache(path).read("l", 0).tolist() == [1.0, 1.0]


def test_an_hdf5_cache_another_process_writes_is_busy_not_damaged(tmp_path):
    """h5py 'r+' in another process: open_cache said "HDF5 cannot open it … rebuild"."""
    import time

    from fmcache.errors import CacheBusyError

    path = tmp_path / "c.h5"
    _ones_cache(path)
    hold = (f"import h5py, sys, time; f = h5py.File({str(path)!r}, 'r+'); "
            "print('open', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheBusyError, match="another process has it open for writing") as info:
            fmcache.open_cache(path).read("l", 0)
        assert "wait" in info.value.hint
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert fmcache.open_cache(path).read("l", 0).tolist() == [1.0, 1.0]


def _ones_cache(path):
    """A committed cache of three samples of ones, layer "l" of shape (2,)."""
    with fmcache.create_cache(path) as writer:
        writer.add_layer("l", (2,), codec="raw")
        writer.append({"l": np.ones((3, 2), np.float32)}, np.arange(3))
        writer.commit()
