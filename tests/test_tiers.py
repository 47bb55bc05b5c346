import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache import TierPlan
from fmcache.errors import TierPlanError


@st.composite
def plans(draw):
    c = draw(st.integers(1, 40))
    perm = draw(st.permutations(range(c)))
    cuts = sorted(draw(st.lists(st.integers(1, c - 1), max_size=3, unique=True))) if c > 1 else []
    bounds = [0, *cuts, c]
    tiers = [(f"t{i}", sorted(perm[a:b]), "raw") for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    return TierPlan(c, tiers)


@settings(max_examples=60, deadline=None)
@given(plan=plans(), spatial=st.sampled_from([(), (3,), (2, 5)]), batched=st.booleans())
def test_split_then_merge_is_identity(plan, spatial, batched):
    c = plan.num_channels
    shape = (c, *spatial) if len(spatial) >= 1 and len((c, *spatial)) >= 3 else (*spatial, c)
    if batched:
        shape = (3, *shape)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    parts = plan.split(x, batched=batched)
    assert sum(p.shape[-1 if len(shape) - batched <= 2 else batched] for p in parts.values()) == c
    np.testing.assert_array_equal(plan.merge(parts, batched=batched), x)


def test_split_puts_the_named_channels_in_each_tier():
    plan = TierPlan(5, [("sensitive", [4, 1], "raw"), ("bulk", [0, 2, 3], "fp16")])
    x = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    parts = plan.split(x)
    np.testing.assert_array_equal(parts["sensitive"], x[[4, 1]])
    np.testing.assert_array_equal(parts["bulk"], x[[0, 2, 3]])


def test_token_maps_split_on_last_axis():
    plan = TierPlan.two_tier(4, [3], "raw", "raw")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(plan.split(x)["sensitive"], x[:, [3]])


@pytest.mark.parametrize(
    "tiers, message",
    [
        ([("a", [0, 1], "raw"), ("b", [1, 2, 3], "raw")], "channel 1 is in tier 'a' and in tier 'b'"),
        ([("a", [0, 1], "raw"), ("b", [2], "raw")], "channels 3 belong to no tier"),
        ([("a", [0, 1, 2, 3, 4], "raw")], "outside 0..3"),
        ([("a", [-1, 0, 1, 2, 3], "raw")], "outside 0..3"),
        ([("a", [0, 1], "raw"), ("a", [2, 3], "raw")], "appears twice"),
        ([("a", [], "raw"), ("b", [0, 1, 2, 3], "raw")], "has no channels"),
        ([("bad name", [0, 1, 2, 3], "raw")], "tier name"),
        ([], "at least one tier"),
    ],
    ids=["overlap", "missing", "too-high", "negative", "dup-name", "empty", "bad-name", "no-tiers"],
)
def test_invalid_plans_are_rejected(tiers, message):
    with pytest.raises(TierPlanError, match=message):
        TierPlan(4, tiers)


def test_wrong_channel_count_is_rejected_on_split():
    with pytest.raises(TierPlanError, match="has 3 channels"):
        TierPlan.single(4, "raw").split(np.zeros((3, 2, 2), np.float32))


@settings(max_examples=40, deadline=None)
@given(plan=plans())
def test_dict_round_trip(plan):
    again = TierPlan.from_dict(plan.to_dict())
    assert again == plan
    assert [t.channels for t in again.tiers] == [t.channels for t in plan.tiers]


def test_contiguous_runs_are_stored_compactly():
    plan = TierPlan.two_tier(300, range(75), "raw", "raw")
    assert plan.to_dict()["tiers"][0]["channels"] == [[0, 75]]
