"""The real h5dump reads what fmcache writes: ZFP/SZ3 values within bound, the manifest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import hdf5plugin
import numpy as np
import pytest

import fmcache

H5DUMP = shutil.which("h5dump")
pytestmark = pytest.mark.skipif(H5DUMP is None, reason="h5dump missing: `make setup` installs hdf5-tools")


def h5dump(*args: str) -> str:
    env = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}
    proc = subprocess.run([H5DUMP, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def printed_values(text: str) -> np.ndarray:
    body = text[text.index("DATA {") + len("DATA {"):]
    body = body[:body.index("}")]
    return np.array([float(v) for v in re.split(r"[,\s]+", body.strip()) if v])


def _three_maps_cache(tmp_path, codec: str, seed: int):
    """Three post-ReLU-like maps (3, 5, 4, 6) in an HDF5 cache's layer ``layer2``."""
    rng = np.random.default_rng(seed)
    x = (rng.lognormal(size=(3, 5, 4, 6)) * (rng.random((3, 5, 4, 6)) > 0.45)).astype(np.float32)
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path) as w:
        w.add_layer("layer2", x.shape[1:], codec=codec)
        w.append({"layer2": x}, [0, 1, 2])
        w.commit()
    return x, path


@pytest.mark.parametrize("codec, bound", [("zfp:accuracy=0.01", 0.01), ("sz3:abs=0.001", 0.001),
                                          ("sz3:rel=0.001", None), ("blosc2:cname=zstd,clevel=3", 0.0),
                                          ("blosc2:cname=lz4hc,clevel=1", 0.0), ("fp16", None)])
def test_h5dump_prints_decoded_values_within_the_bound(tmp_path, codec, bound):
    x, path = _three_maps_cache(tmp_path, codec, seed=0)
    printed = h5dump("-m", "%.9g", "-y", "-w", "0", "-d", "/layers/layer2/all/values", str(path))
    values = printed_values(printed).astype(np.float32).astype(np.float64)  # %.9g round-trips float32
    assert values.size == x.size
    if bound is None:  # relative bounds: fp16 2^-11 |x|, sz3 rel * per-sample range
        bound_arr = (2.0**-11 * np.abs(x) + 2.0**-24 if codec == "fp16"
                     else 0.001 * (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))
                     * np.ones_like(x) * (1 + 1e-5))
        assert np.all(np.abs(values - x.reshape(-1)) <= bound_arr.reshape(-1))
    else:
        assert np.max(np.abs(values - x.reshape(-1))) <= bound * (1 + 1e-6)
    if bound:  # lossy error-bounded codecs must not be printed as the exact input
        assert not np.array_equal(values, x.reshape(-1))


@pytest.mark.parametrize("codec, bound", [("grid:abs=0.02", 0.02), ("grid:rel=0.01", None)])
def test_h5dump_prints_grid_codes_and_steps_whose_product_is_within_the_bound(tmp_path, codec, bound):
    """``grid`` stores integer codes and a step per sample (docs/codecs.md): h5dump prints
    both, and ``q * step`` is the map within its bound."""
    x, path = _three_maps_cache(tmp_path, codec, seed=1)
    q = printed_values(h5dump("-y", "-w", "0", "-d", "/layers/layer2/all/q", str(path))).reshape(x.shape)
    step = printed_values(h5dump("-m", "%.9g", "-y", "-w", "0", "-d", "/layers/layer2/all/step", str(path)))
    assert q.size == x.size and step.shape == (3,) and np.all(q == np.rint(q))
    values = (q.astype(np.float32) * step.astype(np.float32)[:, None, None, None]).astype(np.float64)
    span = x.max(axis=(1, 2, 3), keepdims=True).astype(np.float64) - x.min(axis=(1, 2, 3), keepdims=True)
    bound_arr = np.full(x.shape, bound) if bound is not None else 0.01 * span * np.ones(x.shape)
    assert np.all(np.abs(values - x) <= bound_arr)
    assert not np.array_equal(values, x)


def test_h5dump_shows_the_manifest(tmp_path):
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path) as w:
        w.add_layer("l", (2, 2, 2), codec="raw")
        w.append({"l": np.ones((1, 2, 2, 2), np.float32)}, [4])
        w.commit()
    text = h5dump("-A", "-a", "/fmcache_manifest", str(path))
    manifest = json.loads(text[text.index('"{') + 1:text.rindex('}"') + 1])
    assert manifest["format_version"] == fmcache.FORMAT_VERSION and manifest["samples"] == 1
    labels = printed_values(h5dump("-y", "-d", "/labels", str(path)))
    assert labels.tolist() == [4.0]


def test_a_cache_h5repack_rewrote_is_refused_with_what_to_use_instead(tmp_path):
    """h5repack moves every chunk: fmcache's recorded chunk index no longer matches, and the
    refusal said only "HDF5's B-tree is damaged ... rebuild"."""
    repack = shutil.which("h5repack")
    if repack is None:
        pytest.skip("h5repack missing: `make setup` installs hdf5-tools")
    path, copy = tmp_path / "c.h5", tmp_path / "repacked.h5"
    with fmcache.create_cache(path) as w:
        w.add_layer("l", (2, 4, 4), codec="bf16")
        w.append({"l": np.ones((40, 2, 4, 4), np.float32)}, np.arange(40))
        w.commit()
    subprocess.run([repack, str(path), str(copy)], check=True, timeout=120,
                   env={**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH})
    with pytest.raises(fmcache.errors.CorruptionError, match="h5repack") as info:
        fmcache.open_cache(copy).read_batch("l", range(40))
    assert "fmcache compact" in info.value.hint
