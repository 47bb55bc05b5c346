"""Decode the committed golden caches of every format version, every test run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from contracts import assert_within_contract

import fmcache

GOLDEN = Path(__file__).parent / "golden"
CASES = [(v.name, name) for v in sorted(GOLDEN.glob("v*")) for name in ("cache.lmdb", "cache.h5")]


def test_the_current_format_version_has_golden_caches():
    assert (GOLDEN / f"v{fmcache.FORMAT_VERSION}" / "cache.lmdb" / "data.mdb").is_file()
    assert (GOLDEN / f"v{fmcache.FORMAT_VERSION}" / "cache.h5").is_file()


@pytest.mark.parametrize("version, name", CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_golden_cache_decodes_as_it_did_when_written(tmp_path, version, name):
    src = GOLDEN / version
    # Work on a copy: the repository's files must stay byte-identical.
    copy = tmp_path / name
    (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, copy)
    inputs = np.load(src / "inputs.npz")
    decoded = np.load(src / "decoded.npz")
    cache = fmcache.open_cache(copy)
    packed = int(version[1:]) >= 5  # from version 5 a third layer, packed
    assert len(cache) == 5 and list(cache.layers) == ["stage.1", "tokens", *(["packed"] if packed else [])]
    assert [layer.packed for layer in cache.layers.values()] == [False, False, *([True] if packed else [])]
    assert cache.manifest.fingerprints == {"weights": "golden-weights", "data": "golden-data"}
    np.testing.assert_array_equal(cache.labels, inputs["labels"])
    for layer in cache.layers:
        for part, values in cache.read_parts(layer, range(5)).items():
            np.testing.assert_array_equal(values, decoded[f"{name}|{layer}|{part}"], err_msg=f"{layer} {part}")
    truth = {"stage.1": inputs["conv"], "tokens": inputs["tokens"], **({"packed": inputs["conv"]} if packed else {})}
    for layer, x in truth.items():
        plan = cache.layers[layer].plan
        for i in range(5):
            got = cache.read(layer, i)
            for tier in plan.tiers:
                assert_within_contract(tier.codec, plan.select(x[i], tier.name, batched=False),
                                       plan.select(got, tier.name, batched=False), f"{layer}[{i}]")
    flip = cache.read_parts("stage.1", range(5), ["sensitive@flip"])["sensitive@flip"]
    sensitive = cache.layers["stage.1"].plan.tier("sensitive").codec  # fp16 up to v2, bf16 from v3
    for i in range(5):
        assert_within_contract(sensitive, inputs["conv_flip"][i, [1, 4]], flip[i], f"flip[{i}]")
    if packed:  # one stored base part, every channel; the variant's sensitive channels apart
        assert sorted(cache.read_parts("packed", [0])) == ["_whole", "sensitive@flip"]
        np.testing.assert_array_equal(cache.read_parts("packed", range(5), ["sensitive@flip"])["sensitive@flip"],
                                      cache.read_parts("stage.1", range(5), ["sensitive@flip"])["sensitive@flip"])
