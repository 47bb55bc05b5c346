"""The demo (`make demo` = `fmcache demo`) end to end at a small size: real Fashion-MNIST,
the zoo's pre-trained ResNet, a real cache, both training arms."""

from __future__ import annotations

import json
import math

import fmcache
from fmcache.demo import run_demo


def test_demo_runs_both_arms_and_reports_what_it_measured(tmp_path):
    lines: list[str] = []
    results = run_demo(tmp_path, samples=256, epochs=1, echo=lines.append)
    assert set(results) == {"recompute_prefix", "fmcache"}
    for arm in results.values():
        assert 0.0 <= arm["acc"] <= 1.0 and arm["train_s"] > 0
    cache = fmcache.open_cache(tmp_path / "fmnist-layer2.lmdb")
    raw = len(cache) * 4 * math.prod(cache.layer("layer2").shape)
    assert len(cache) == 256 and results["fmcache"]["bytes"] < raw  # bf16 + LZ4 stores less than float32
    assert json.loads((tmp_path / "demo.json").read_text()) == json.loads(json.dumps(results))
    assert any("results" in line for line in lines) and any("fmcache" in line for line in lines)
