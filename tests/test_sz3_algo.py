"""SZ3's predictor as a codec parameter (``sz3:...,algo=nopred``): the config, the stream,
real LMDB caches, and HDF5's refusal (hdf5plugin's filter takes the bound alone).

The error contract of every ``algo`` is checked with the other codecs' contracts
(``tests/test_codecs.py``, BOUNDED_SPECS holds nopred and interp specs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pysz
import pytest
import torch
from strategies import realistic_post_relu

import fmcache
from fmcache.codecs import codec_from_config, codec_from_spec
from fmcache.codecs.bounded import MODE_STREAM
from fmcache.errors import CodecSpecError


def stream_of(payload: bytes, ndim: int) -> np.ndarray:
    """The pysz stream inside an sz3 record (header, mode, flags, CRC skipped)."""
    body = payload[1 + 4 * ndim:]
    assert body[0] == MODE_STREAM
    return np.frombuffer(body[2 + 4:], dtype=np.uint8)


def test_the_default_algo_stays_out_of_the_config_so_older_configs_are_unchanged() -> None:
    assert codec_from_spec("sz3:abs=0.02").get_config() == {"id": "sz3", "abs": 0.02}
    assert codec_from_spec("sz3:abs=0.02,algo=interp-lorenzo").get_config() == {"id": "sz3", "abs": 0.02}
    nopred = codec_from_spec("sz3:rel=0.01,algo=nopred")
    assert nopred.get_config() == {"id": "sz3", "rel": 0.01, "algo": "nopred"}
    assert codec_from_config(nopred.get_config()) == nopred and nopred.spec == "sz3:rel=0.01,algo=nopred"
    assert nopred != codec_from_spec("sz3:rel=0.01")


@pytest.mark.parametrize("spec", ["sz3:abs=0.02,algo=lorenzo", "sz3:abs=0.02,algo=5", "sz3:abs=0.02,algo=NOPRED",
                                  {"id": "sz3", "abs": 0.02, "algo": ["nopred"]},
                                  {"id": "sz3", "abs": 0.02, "algo": {"nopred": 1}}], ids=str)
def test_an_unknown_algo_is_a_spec_error_that_lists_the_known_ones(spec: str | dict) -> None:
    with pytest.raises(CodecSpecError, match="interp-lorenzo, interp, lorenzo-reg, nopred"):
        codec_from_spec(spec) if isinstance(spec, str) else codec_from_config(spec)


@pytest.mark.parametrize("algo", ["interp-lorenzo", "interp", "lorenzo-reg", "nopred"])
def test_each_algo_writes_its_own_stream_within_the_bound(algo: str) -> None:
    x = realistic_post_relu(np.random.default_rng(7), (32, 16, 16))
    codec = codec_from_spec(f"sz3:abs=0.02,algo={algo}")
    payload = codec.encode(x)
    y = codec.decode(payload)
    assert float(np.abs(y.astype(np.float64) - x).max()) <= 0.02 and y.min() >= 0
    # pysz reads the predictor from the stream: what a default-configured decoder gets
    # is the same as the codec's own decode
    raw, _ = pysz.sz.decompress(stream_of(payload, 3), np.float32, (32 * 16, 16))
    assert np.array_equal(np.maximum(np.asarray(raw).reshape(x.shape), 0), y)
    if algo != "interp-lorenzo":
        assert payload != codec_from_spec("sz3:abs=0.02").encode(x), f"{algo} wrote the default predictor's stream"


def test_nopred_stores_post_relu_maps_smaller_than_the_default() -> None:
    # zeros and sharp edges: prediction across them costs more than it saves
    rng = np.random.default_rng(11)
    maps = [realistic_post_relu(rng, (64, 8, 8)) for _ in range(8)]
    size = {algo: sum(len(codec_from_spec(f"sz3:abs=0.02,algo={algo}").encode(x)) for x in maps)
            for algo in ("interp-lorenzo", "nopred")}
    assert size["nopred"] < size["interp-lorenzo"], size


def nopred_cache(path: Path, shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """An LMDB cache at ``path`` of ``n`` post-ReLU maps in layer "feat" with
    ``sz3:abs=0.01,algo=nopred``; returns the maps."""
    rng = np.random.default_rng(seed)
    maps = np.stack([realistic_post_relu(rng, shape) for _ in range(n)])
    with fmcache.create_cache(path) as w:
        w.add_layer("feat", shape, codec="sz3:abs=0.01,algo=nopred")
        w.append({"feat": maps}, np.arange(n))
        w.commit()
    return maps


def test_an_lmdb_cache_keeps_and_reads_back_a_nopred_layer(tmp_path: Path) -> None:
    maps = nopred_cache(tmp_path / "c.lmdb", (16, 8, 8), 12, seed=3)
    with fmcache.open_cache(tmp_path / "c.lmdb") as cache:
        assert cache.manifest.layers["feat"].plan.tiers[0].codec.spec == "sz3:abs=0.01,algo=nopred"
        got = cache.read_batch("feat", list(range(12)))
    assert float(np.abs(got.astype(np.float64) - maps).max()) <= 0.01


def test_hdf5_refuses_a_nopred_layer_before_writing_any_sample(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with fmcache.create_cache(path) as w:
        w.add_layer("ok", (4, 4, 4), codec="sz3:abs=0.01")
        with pytest.raises(CodecSpecError, match="hdf5plugin's SZ3 filter takes only the error bound") as info:
            w.add_layer("feat", (4, 4, 4), codec="sz3:abs=0.01,algo=nopred")
        assert "LMDB" in (info.value.hint or "") and "compact --codec" in (info.value.hint or "")
        # the path asked for, not the .partial the backend writes to
        assert info.value.message.startswith(f"{path}: layer 'feat', part 'all': ")
        w.append({"ok": np.ones((2, 4, 4, 4), dtype=np.float32)}, [0, 1])
        w.commit()
    with fmcache.open_cache(path) as cache:
        assert list(cache.manifest.layers) == ["ok"]
        assert np.abs(cache.read("ok", 1) - 1).max() <= 0.01


def test_compacting_a_nopred_cache_to_hdf5_says_what_to_do_and_commits_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fmcache.cli import main

    maps = nopred_cache(tmp_path / "c.lmdb", (8, 4, 4), 6, seed=5)
    refused = CliRunner().invoke(main, ["compact", str(tmp_path / "c.lmdb"), str(tmp_path / "c.h5")])
    assert refused.exit_code == 1, refused.output
    assert "layer 'feat'" in refused.output and "LMDB" in refused.output
    assert not (tmp_path / "c.h5").exists()
    done = CliRunner().invoke(main, ["compact", str(tmp_path / "c.lmdb"), str(tmp_path / "c.h5"),
                                     "--codec", "sz3:abs=0.01"])
    assert done.exit_code == 0, done.output
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        got = cache.read_batch("feat", list(range(6)))
    assert float(np.abs(got.astype(np.float64) - maps).max()) <= 0.02  # two bounds of 0.01 in turn


class _Counted(torch.utils.data.Dataset):
    """Images 1x8x8 that count the items read (the calibration reads them)."""

    def __init__(self, n: int) -> None:
        self.x, self.read = torch.rand(n, 1, 8, 8), 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.read += 1
        return self.x[i], 0


@pytest.mark.parametrize("tier", ["bulk", "sensitive"])
def test_a_saca_build_to_hdf5_with_a_nopred_policy_is_refused_before_calibrating(tmp_path: Path, tier: str) -> None:
    from fmcache.builder import SacaConfig, build_saca_cache
    from fmcache.policy import CompressionPolicy

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()).eval()
    codecs = {"bulk": "int8", "sensitive": "int8", tier: "sz3:rel=0.05,algo=nopred"}
    policy = CompressionPolicy.constant(codecs["bulk"], codecs["sensitive"])
    data = _Counted(16)
    with pytest.raises(CodecSpecError, match=r"s\.h5: layer '1': .*SZ3 filter takes only the error bound"):
        build_saca_cache(model, data, "1", tmp_path / "s.h5", saca=SacaConfig(n_samples=8), policy=policy,
                         progress=False)
    assert data.read == 0 and not any(tmp_path.iterdir())
    build_saca_cache(model, data, "1", tmp_path / "s.lmdb", saca=SacaConfig(n_samples=8), policy=policy,
                     progress=False)  # LMDB takes it
    assert data.read > 0
