"""Tests of fmcache.sensitivity: per-channel cosine, scores, accumulator, selection, summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fmcache.augment import AugDraw, AugFamily, SensitivityError, apply_feature, apply_input, draw_for
from fmcache.sensitivity import (
    SensitivityAccumulator,
    channel_cosine,
    n_sensitive,
    score_summary,
    select_sensitive,
    sensitivity_scores,
)

FAST = settings(max_examples=60, deadline=None)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- channel_cosine ----------------------------------------------------------------------

X = rand(1, 3, 4)
Y = rand(1, 3, 4, seed=1)
_ORTHO_A = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
_ORTHO_B = np.array([[[0.0, 1.0], [0.0, 0.0]]], np.float32)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (X, X, 1.0),
        (X, 3.5 * X, 1.0),
        (X, -X, -1.0),
        (_ORTHO_A, _ORTHO_B, 0.0),
        (np.zeros_like(X), np.zeros_like(X), 1.0),
        (np.zeros_like(X), X, 0.0),
        (X, np.zeros_like(X), 0.0),
        (np.full_like(X, 1e-9), np.full_like(X, -1e-9), 1.0),
        (np.full_like(X, 1e-9), X, 0.0),
    ],
    ids=[
        "identical",
        "scaled",
        "negated",
        "orthogonal",
        "both-zero",
        "first-zero",
        "second-zero",
        "both-below-eps",
        "one-below-eps",
    ],
)
def test_channel_cosine_values(a: np.ndarray, b: np.ndarray, expected: float) -> None:
    got = channel_cosine(a, b)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, abs=1e-6)


def test_channel_cosine_by_hand() -> None:
    a = np.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]], np.float32)
    b = np.array([[[4.0, 3.0], [2.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(channel_cosine(a, b), [20.0 / 30.0, 1.0 / np.sqrt(2.0)], rtol=1e-12)


def test_channel_cosine_is_batch_aware() -> None:
    a, b = rand(2, 3, 4, 5, 6), rand(2, 3, 4, 5, 6, seed=1)
    got = channel_cosine(a, b)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got[1, 2], channel_cosine(a[1, 2], b[1, 2]), rtol=1e-12)


def test_channel_cosine_token_maps_have_channels_last() -> None:
    a, b = rand(7, 3), rand(7, 3, seed=1)
    got = channel_cosine(a, b, tokens=True)
    expected = [
        np.dot(a[:, d], b[:, d]) / np.linalg.norm(a[:, d]) / np.linalg.norm(b[:, d]) for d in range(3)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_channel_cosine_accepts_torch_tensors() -> None:
    a, b = rand(2, 3, 4), rand(2, 3, 4, seed=1)
    np.testing.assert_array_equal(
        channel_cosine(torch.from_numpy(a), torch.from_numpy(b)), channel_cosine(a, b)
    )


@FAST
@given(
    arrays(np.float32, (2, 3, 3), elements=st.floats(-1e3, 1e3, width=32)),
    arrays(np.float32, (2, 3, 3), elements=st.floats(-1e3, 1e3, width=32)),
)
def test_channel_cosine_is_bounded_and_symmetric(a: np.ndarray, b: np.ndarray) -> None:
    ab, ba = channel_cosine(a, b), channel_cosine(b, a)
    assert np.all((ab >= -1.0) & (ab <= 1.0))
    np.testing.assert_array_equal(ab, ba)


@pytest.mark.parametrize(
    "a, b, kwargs",
    [
        (rand(2, 3, 4), rand(2, 3, 5), {}),
        (rand(3, 4), rand(3, 4), {}),
        (rand(3), rand(3), {"tokens": True}),
        (np.array([["a"]]), np.array([["a"]]), {"tokens": True}),
        (rand(2, 3, 4), rand(2, 3, 4), {"eps": -1.0}),
        (np.full((1, 2, 2), np.nan, np.float32), rand(1, 2, 2), {}),
    ],
    ids=["shape-mismatch", "2d-spatial", "1d-tokens", "strings", "negative-eps", "nan"],
)
def test_channel_cosine_rejects(a: np.ndarray, b: np.ndarray, kwargs: dict) -> None:
    with pytest.raises(SensitivityError):
        channel_cosine(a, b, **kwargs)


# ---- sensitivity of real prefixes --------------------------------------------------------


def pairs(prefix, draws: list[AugDraw], x: torch.Tensor, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(P(a(x)), T_a(P(x))) stacked over draws: shape (len(draws), N, C, H, W)."""
    with torch.no_grad():
        base = prefix(x).numpy()
        aug = np.stack([prefix(apply_input(x, d)).numpy() for d in draws])
    transformed = np.stack([apply_feature(base, d, stride) for d in draws])
    return aug, transformed


def family_draws(n: int, family: AugFamily) -> list[AugDraw]:
    return [family.draw(draw_for(0, 0, s)) for s in range(n)]


def test_pointwise_prefix_has_zero_sensitivity() -> None:
    # A bias-free 1x1 conv at stride 1 commutes with flips and zero-filled shifts exactly.
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 1, 1)
    x = torch.randn(4, 3, 8, 8)
    draws = family_draws(12, AugFamily(max_shift=3, photometric=False))
    aug, transformed = pairs(lambda t: F.conv2d(t, weight), draws, x)
    np.testing.assert_allclose(sensitivity_scores(aug, transformed), 0.0, atol=1e-6)


def test_asymmetric_kernel_is_flip_sensitive_and_symmetric_one_is_not() -> None:
    # channel 0: symmetric 1x3 kernel (flip-equivariant); channel 1: antisymmetric, so
    # conv(flip x) = -flip(conv x): cosine -1, sensitivity 2.
    weight = torch.tensor([[[[1.0, 2.0, 1.0]]], [[[1.0, 0.0, -1.0]]]])
    x = torch.randn(3, 1, 6, 9, generator=torch.Generator().manual_seed(1))
    aug, transformed = pairs(lambda t: F.conv2d(t, weight, padding=(0, 1)), [AugDraw(True, 0, 0)], x)
    scores = sensitivity_scores(aug, transformed)
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] == pytest.approx(2.0, abs=1e-6)
    np.testing.assert_array_equal(select_sensitive(scores, 0.5), [1])


def test_dead_channel_has_zero_sensitivity() -> None:
    weight = torch.zeros(2, 1, 3, 3)
    weight[0] = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    aug, transformed = pairs(lambda t: F.conv2d(t, weight, padding=1), [AugDraw(True, 1, -2)], x)
    scores = sensitivity_scores(aug, transformed)
    assert scores[1] == 0.0
    assert scores[0] > 0.0


def test_sensitivity_is_one_minus_the_mean_cosine() -> None:
    a = np.stack([np.eye(2, dtype=np.float32)[None], np.eye(2, dtype=np.float32)[None]])  # (2, 1, 2, 2)
    b = np.stack([np.eye(2, dtype=np.float32)[None], -np.eye(2, dtype=np.float32)[None]])
    # cosines 1 and -1 -> mean 0 -> sensitivity 1
    np.testing.assert_allclose(sensitivity_scores(a, b), [1.0])


# ---- accumulator -------------------------------------------------------------------------


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_accumulator_matches_one_shot_for_any_batching(batch_sizes: list[int]) -> None:
    n = sum(batch_sizes)
    a, b = rand(n, 4, 3, 3), rand(n, 4, 3, 3, seed=1)
    acc = SensitivityAccumulator(4)
    start = 0
    for size in batch_sizes:
        acc.update(a[start : start + size], b[start : start + size])
        start += size
    assert acc.n_pairs == n
    np.testing.assert_allclose(acc.scores(), sensitivity_scores(a, b), rtol=1e-12, atol=1e-12)


def test_accumulator_merge_equals_feeding_everything() -> None:
    a, b = rand(6, 4, 3, 3), rand(6, 4, 3, 3, seed=1)
    left, right = SensitivityAccumulator(4), SensitivityAccumulator(4)
    left.update(a[:2], b[:2])
    right.update(a[2:], b[2:])
    left.merge(right)
    assert left.n_pairs == 6
    np.testing.assert_allclose(left.scores(), sensitivity_scores(a, b), rtol=1e-12, atol=1e-12)


def test_accumulator_token_maps() -> None:
    a, b = rand(3, 5, 4), rand(3, 5, 4, seed=1)
    acc = SensitivityAccumulator(4, tokens=True)
    acc.update(a, b)
    np.testing.assert_allclose(acc.scores(), sensitivity_scores(a, b, tokens=True))


@pytest.mark.parametrize(
    "action",
    [
        lambda acc: acc.scores(),
        lambda acc: acc.update(rand(2, 3, 3, 3), rand(2, 3, 3, 3)),
        lambda acc: acc.merge(SensitivityAccumulator(5)),
    ],
    ids=["scores-before-update", "channel-mismatch", "merge-mismatch"],
)
def test_accumulator_rejects(action) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SensitivityError):
        action(SensitivityAccumulator(4))


@pytest.mark.parametrize("n", [0, -1, 2.0, True], ids=["zero", "negative", "float", "bool"])
def test_accumulator_rejects_bad_channel_count(n: object) -> None:
    with pytest.raises(SensitivityError):
        SensitivityAccumulator(n)  # type: ignore[arg-type]


# ---- selection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rho, n_channels, k",
    [
        (0.25, 64, 16),
        (0.1, 30, 3),
        (0.26, 10, 3),
        (0.01, 10, 1),
        (0.0, 10, 0),
        (1.0, 10, 10),
        (1, 7, 7),
        (0.5, 1, 1),
        (0.7, 10, 7),
    ],
    ids=["default", "float-noise", "ceil", "at-least-one", "none", "all", "int-rho", "one-channel", "0.7"],
)
def test_n_sensitive_is_the_ceiling(rho: float, n_channels: int, k: int) -> None:
    assert n_sensitive(rho, n_channels) == k


def test_select_sensitive_picks_the_top_scores() -> None:
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.0, 0.5, 0.2, 0.05])
    np.testing.assert_array_equal(select_sensitive(scores, 0.25), [1, 3])
    np.testing.assert_array_equal(select_sensitive(scores, 0.3), [1, 3, 5])


def test_select_sensitive_breaks_ties_by_lower_index() -> None:
    scores = np.array([0.2, 0.5, 0.1, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(select_sensitive(scores, 2 / 6), [1, 3])
    np.testing.assert_array_equal(select_sensitive(np.zeros(8), 0.25), [0, 1])


@FAST
@given(
    arrays(np.float64, st.integers(1, 40), elements=st.sampled_from([0.0, 0.1, 0.5, 0.5, 1.0, 1.7])),
    st.floats(0.0, 1.0),
)
def test_select_sensitive_properties(scores: np.ndarray, rho: float) -> None:
    chosen = select_sensitive(scores, rho)
    assert chosen.dtype == np.intp
    assert len(chosen) == n_sensitive(rho, len(scores))
    assert np.all(np.diff(chosen) > 0)
    rest = np.setdiff1d(np.arange(len(scores)), chosen)
    if len(chosen) and len(rest):
        assert scores[chosen].min() >= scores[rest].max()
        # among equal scores at the cut, the chosen have the lower indices
        cut = scores[chosen].min()
        assert chosen[scores[chosen] == cut].max() < rest[scores[rest] == cut].min(initial=len(scores))


@pytest.mark.parametrize(
    "scores, rho",
    [
        (np.ones(4), -0.1),
        (np.ones(4), 1.5),
        (np.ones(4), True),
        (np.array([0.1, np.nan]), 0.5),
        (np.ones((2, 2)), 0.5),
        (np.array([]), 0.5),
    ],
    ids=["rho-negative", "rho-above-1", "rho-bool", "nan", "2d", "empty"],
)
def test_select_sensitive_rejects(scores: np.ndarray, rho: float) -> None:
    with pytest.raises(SensitivityError):
        select_sensitive(scores, rho)


# ---- summary -----------------------------------------------------------------------------


def test_score_summary_values() -> None:
    scores = np.arange(11) / 10.0  # 0.0, 0.1, ..., 1.0
    summary = score_summary(scores)
    assert summary["n_channels"] == 11
    assert summary["min"] == 0.0 and summary["max"] == 1.0
    assert summary["p10"] == pytest.approx(0.1)
    assert summary["p50"] == pytest.approx(0.5)
    assert summary["p90"] == pytest.approx(0.9)
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["above_1"] == 0
    assert summary["histogram"]["edges"] == pytest.approx([i / 10 for i in range(11)])
    # bins are [i/10, (i+1)/10), the last closed: 0.9 and 1.0 share it; 0.3 is in bin 3
    assert summary["histogram"]["counts"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    json.dumps(summary)


def test_score_summary_counts_out_of_range_scores_in_end_bins() -> None:
    summary = score_summary(np.array([-1e-9, 0.05, 1.5, 2.0]))
    assert summary["histogram"]["counts"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert summary["above_1"] == 2
    assert summary["max"] == 2.0


@pytest.mark.parametrize(
    "scores", [np.array([]), np.array([np.inf]), np.zeros((2, 2))], ids=["empty", "inf", "2d"]
)
def test_score_summary_rejects(scores: np.ndarray) -> None:
    with pytest.raises(SensitivityError):
        score_summary(scores)
