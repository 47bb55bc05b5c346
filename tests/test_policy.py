"""Tests of fmcache.policy: the freeze-stage -> codecs map, its JSON form, tier plans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache.codecs import codec_from_spec
from fmcache.policy import CompressionPolicy, PolicyError, PolicyStage, frozen_fraction
from fmcache.zoo import cifar_resnet18

INT8 = codec_from_spec("int8:cname=zstd,clevel=1,shuffle=bit").spec
INT4 = codec_from_spec("int4:cname=zstd,clevel=1,shuffle=bit").spec
FP16 = codec_from_spec("fp16:cname=zstd,clevel=1,shuffle=byte").spec
GRID = codec_from_spec("grid:rel=0.05").spec


@pytest.mark.parametrize(("fraction", "bulk", "sensitive"), [
    (0.0, INT8, FP16), (1 / 6, INT8, FP16), (2 / 6, INT8, FP16), (0.35, INT8, FP16),
    (0.5, INT4, INT8), (0.55, INT4, INT8), (4 / 6, GRID, INT4), (1.0, GRID, INT4),
], ids=["none", "stem", "layer1", "edge1", "layer2", "edge2", "layer3", "all"])
def test_default_policy_loosens_with_depth(fraction, bulk, sensitive):
    assert CompressionPolicy.default().codecs_for(fraction) == (bulk, sensitive)


_SPECS = ["raw", "bf16", "fp16", "int8", "int4", "zfp:accuracy=0.01", "sz3:rel=0.01", "blosc2"]


@st.composite
def policies(draw):
    cuts = sorted(set(draw(st.lists(st.floats(0.01, 0.99), max_size=4))))
    bounds = [*cuts, 1.0]
    stages = [PolicyStage(b, draw(st.sampled_from(_SPECS)), draw(st.sampled_from(_SPECS))) for b in bounds]
    return CompressionPolicy(stages)


@settings(max_examples=50, deadline=None)
@given(policies(), st.floats(0.0, 1.0))
def test_json_round_trip_keeps_every_decision(policy, fraction):
    again = CompressionPolicy.from_json(policy.to_json())
    assert again == policy
    assert again.codecs_for(fraction) == policy.codecs_for(fraction)


@settings(max_examples=50, deadline=None)
@given(policies(), st.floats(0.0, 1.0))
def test_the_chosen_stage_is_the_first_whose_bound_holds_the_fraction(policy, fraction):
    stage = policy.stage_for(fraction)
    assert fraction <= stage.up_to + 1e-12
    earlier = policy.stages[:policy.stages.index(stage)]
    assert all(fraction > s.up_to for s in earlier)


@pytest.mark.parametrize("config", [
    {"stages": []},
    {"stages": [{"up_to": 0.5, "bulk": "raw", "sensitive": "raw"}]},
    {"stages": [{"up_to": 0.6, "bulk": "raw", "sensitive": "raw"}, {"up_to": 0.6, "bulk": "raw", "sensitive": "raw"},
                {"up_to": 1.0, "bulk": "raw", "sensitive": "raw"}]},
    {"stages": [{"up_to": 1.0, "bulk": "nope", "sensitive": "raw"}]},
    {"stages": [{"up_to": 1.0, "bulk": "raw"}]},
    {"stages": [{"up_to": 1.0, "bulk": "raw", "sensitive": "raw", "extra": 1}]},
    {"stages": [{"up_to": 0.0, "bulk": "raw", "sensitive": "raw"}, {"up_to": 1.0, "bulk": "raw", "sensitive": "raw"}]},
    {"levels": []},
    {"stages": None}, {"stages": 5}, {"stages": "raw"},
    {"stages": [{"up_to": True, "bulk": "raw", "sensitive": "raw"}]},
    {"stages": [{"up_to": 1.0, "bulk": "raw", "sensitive": "raw"}], "extra": 1},
], ids=["empty", "not-to-1", "not-increasing", "bad-codec", "missing-key", "unknown-key", "zero-bound", "no-stages",
        "stages-null", "stages-int", "stages-str", "bool-bound", "unknown-top-key"])
def test_bad_configs_are_typed_errors(config):
    with pytest.raises(PolicyError):
        CompressionPolicy.from_config(config)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(PolicyError):
        CompressionPolicy.default().codecs_for(fraction)


def test_bad_json_is_a_typed_error():
    with pytest.raises(PolicyError, match="parse"):
        CompressionPolicy.from_json("{not json")


def test_plan_puts_the_top_rho_channels_in_the_sensitive_tier():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.0, 0.3, 0.05, 0.7])
    plan = CompressionPolicy.default().plan_for(0.5, scores, 0.25)
    assert plan.tier("sensitive").channels == (1, 3)
    assert plan.tier("bulk").channels == (0, 2, 4, 5, 6, 7)
    assert plan.tier("sensitive").codec.spec == INT8
    assert plan.tier("bulk").codec.spec == INT4


@pytest.mark.parametrize(("boundary", "fraction"), [
    ("stem", 1 / 6), ("layer1", 2 / 6), ("layer2", 3 / 6), ("layer3", 4 / 6), ("layer4", 5 / 6),
    ("pool", 5 / 6), ("fc", 1.0)])
def test_frozen_fraction_counts_children_with_parameters(boundary, fraction):
    assert frozen_fraction(cifar_resnet18(in_channels=1, width=2), boundary) == pytest.approx(fraction)


def test_frozen_fraction_of_an_unknown_boundary_is_refused():
    with pytest.raises(PolicyError, match="layer9"):
        frozen_fraction(cifar_resnet18(in_channels=1, width=2), "layer9")


def test_a_policy_files_errors_name_the_file(tmp_path):
    """``--policy FILE``'s errors named the stage but not the file (a helper's sweep)."""
    bad_spec = tmp_path / "bad_spec.json"
    bad_spec.write_text('{"stages": [{"up_to": 1.0, "bulk": "grid:rel=1.5", "sensitive": "int8"}]}')
    with pytest.raises(PolicyError, match=f"^{bad_spec}: stage up to 1.0: bad bulk codec 'grid:rel=1.5'"):
        CompressionPolicy.from_file(bad_spec)
    broken = tmp_path / "broken.json"
    broken.write_text('{"stages": [')
    with pytest.raises(PolicyError, match=f"^{broken}: policy JSON does not parse"):
        CompressionPolicy.from_file(broken)
    good = tmp_path / "good.json"
    good.write_text(CompressionPolicy.default().to_json())
    assert CompressionPolicy.from_file(good) == CompressionPolicy.default()
