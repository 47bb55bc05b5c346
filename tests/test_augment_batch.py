"""The batched augmentation path (fmcache.augment.batch, what the Dataset runs) against
the per-sample definition (apply_feature, saca_compose, nearest_variant): bit-equal on
random maps, draws, strides and variant sets; and the vectorised draw stream."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache import TierPlan
from fmcache.augment import (
    AugDraw,
    AugFamily,
    AugmentationError,
    apply_feature,
    default_variants,
    draw_uniforms,
    nearest_variant,
    saca_compose,
    variant_name,
)
from fmcache.augment.batch import (
    feature_batch,
    feature_offsets,
    nearest_batch,
    saca_batch,
    saca_tiers,
    shift_flip_batch,
)
from fmcache.augment.feature_ops import feature_offset


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@given(st.integers(-40, 40), st.integers(1, 9))
def test_feature_offsets_match_the_scalar_definition(d: int, stride: int) -> None:
    assert int(feature_offsets(np.array([d]), stride)[0]) == feature_offset(d, stride)


maps = st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(maps, st.integers(0, 6), st.sampled_from([1, 2, 4]), st.integers(0, 1000))
def test_feature_batch_equals_per_sample_apply_feature(shape, max_shift, stride, epoch) -> None:
    b, c, h, w, seed = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    family = AugFamily(max_shift=max_shift)
    samples = rng.choice(10_000, size=b, replace=False)
    draws = family.draws(3, epoch, samples)
    got = feature_batch(x, draws, stride)
    for row in range(b):
        assert same_bits(got[row], apply_feature(x[row], draws.draw(row), stride))


def test_shifts_beyond_the_map_give_zeros_and_4d_maps_shift_their_last_axes() -> None:
    x = np.arange(2 * 3 * 2 * 4 * 5, dtype=np.float32).reshape(2, 3, 2, 4, 5) + 1
    out = shift_flip_batch(x, np.array([True, False]), np.array([9, 1]), np.array([0, -2]))
    assert not out[0].any()  # shifted by 9 > H=4: all zero fill
    expected = apply_feature(x[1], AugDraw(False, 1, -2), 1)
    assert same_bits(out[1], expected)


@settings(max_examples=40, deadline=None)
@given(maps, st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1), st.booleans())
def test_saca_batch_equals_per_sample_saca_compose(shape, stride, seed, all_defaults) -> None:
    b, c, h, w, _ = shape
    rng = np.random.default_rng(seed)
    family = AugFamily(max_shift=4)
    base = rng.standard_normal((b, c, h, w)).astype(np.float32)
    sensitive = np.sort(rng.choice(c, size=int(rng.integers(0, c + 1)), replace=False))
    candidates = [variant_name(v) for v in default_variants(4, stride)]
    names = candidates if all_defaults else candidates[: int(rng.integers(0, len(candidates) + 1))]
    stored = {n: rng.standard_normal((b, len(sensitive), h, w)).astype(np.float32) for n in names}
    draws = family.draws(seed % 1000, 2, np.arange(b))
    chosen, rflip, rdy, rdx = nearest_batch(draws, names)
    source = base[:, sensitive].copy()
    for row, name in enumerate(chosen):
        if name in stored:
            source[row] = stored[name][row]
    got = saca_batch(base, draws, stride, sensitive, source, (rflip, rdy, rdx))
    for row in range(b):
        draw = draws.draw(row)
        assert chosen[row] == nearest_variant(draw, names)[0]
        expected = saca_compose(base[row], draw, stride, sensitive, {n: v[row] for n, v in stored.items()})
        assert same_bits(got[row], expected)


@settings(max_examples=40, deadline=None)
@given(maps, st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1), st.booleans())
def test_saca_tiers_equals_saca_batch_of_the_merged_base(shape, stride, seed, tokens) -> None:
    """The Dataset's tier-by-tier SACA gives saca_batch's bits on the merged base, for any
    split of the channels into a sensitive tier and one or two others."""
    b, c, h, w, _ = shape
    rng = np.random.default_rng(seed)
    c = max(c, 2)
    order = rng.permutation(c)
    k = int(rng.integers(1, c))  # sensitive channels: 1 .. c-1, the rest in one or two tiers
    cut = int(rng.integers(k, c + 1)) if c - k > 1 else c
    tiers = [("sensitive", sorted(order[:k].tolist()), "raw"), ("bulk", sorted(order[k:cut].tolist()), "raw")]
    if cut < c:
        tiers.append(("rest", sorted(order[cut:].tolist()), "raw"))
    tiers = [t for t in tiers if t[1]]
    plan = TierPlan(c, tiers)
    base = (rng.standard_normal((b, h * w, c)) if tokens else rng.standard_normal((b, c, h, w))).astype(np.float32)
    parts = plan.split(base, batched=True)
    parts = {name: np.ascontiguousarray(p) for name, p in parts.items()}
    sensitive = np.asarray(plan.tier("sensitive").channels)
    draws = AugFamily(max_shift=4).draws(seed % 1000, 1, np.arange(b))
    names = [variant_name(v) for v in default_variants(4, stride)]
    chosen, rflip, rdy, rdx = nearest_batch(draws, names)
    source = parts["sensitive"].copy()
    for row, name in enumerate(chosen):
        if name != "identity":
            source[row] = rng.standard_normal(source.shape[1:]).astype(np.float32)
    expected = saca_batch(base, draws, stride, sensitive, source, (rflip, rdy, rdx), tokens=tokens)
    got = saca_tiers(parts, plan, draws, stride, source, (rflip, rdy, rdx), tokens=tokens)
    assert same_bits(got, expected)


def test_token_batches_keep_the_bulk_and_take_the_variant_channels() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5, 6)).astype(np.float32)  # (B, T, D)
    sensitive = np.array([1, 4])
    family = AugFamily()
    draws = family.draws(0, 0, np.arange(3))
    variant = {"flip": rng.standard_normal((3, 5, 2)).astype(np.float32)}
    chosen, rflip, rdy, rdx = nearest_batch(draws, variant)
    source = base[..., sensitive].copy()
    for row, name in enumerate(chosen):
        if name == "flip":
            source[row] = variant["flip"][row]
    assert same_bits(feature_batch(base, draws, 1, tokens=True), base)
    got = saca_batch(base, draws, 1, sensitive, source, (rflip, rdy, rdx), tokens=True)
    for row in range(3):
        expected = saca_compose(base[row], draws.draw(row), 1, sensitive, {"flip": variant["flip"][row]})
        assert same_bits(got[row], expected)


# ---- the draw stream ---------------------------------------------------------------------


def test_draws_are_a_function_of_seed_epoch_sample_only() -> None:
    family = AugFamily()
    samples = np.arange(500)
    whole = family.draws(7, 3, samples)
    order = np.random.default_rng(1).permutation(500)
    shuffled = family.draws(7, 3, order)
    for k, i in enumerate(order[:50]):
        assert shuffled.draw(k) == whole.draw(int(i)) == family.draws(7, 3, [int(i)]).draw(0)
    for other in ((8, 3), (7, 4)):
        moved = family.draws(*other, samples)
        assert (moved.dy != whole.dy).mean() > 0.7


def test_draws_cover_the_family_uniformly() -> None:
    family = AugFamily(max_shift=3, photometric=True, brightness=0.2, contrast=0.1)
    d = family.draws(0, 0, np.arange(70_000))
    assert abs(d.flip.mean() - 0.5) < 0.01
    counts = np.bincount(d.dy + 3, minlength=7)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000  # 7 values, ~10k each
    assert set(np.unique(d.dx)) == set(range(-3, 4))
    assert 0.8 <= d.brightness.min() and d.brightness.max() < 1.2
    assert 0.9 <= d.contrast.min() and d.contrast.max() < 1.1
    u = draw_uniforms(0, 0, np.arange(70_000))
    assert abs(np.corrcoef(u[:, 1], u[:, 2])[0, 1]) < 0.02  # dy and dx independent


def test_switched_off_parts_draw_identity_and_keep_the_other_parts() -> None:
    on, off = AugFamily(photometric=True), AugFamily(photometric=False)
    a, b = on.draws(1, 1, np.arange(100)), off.draws(1, 1, np.arange(100))
    assert np.array_equal(a.dy, b.dy) and np.array_equal(a.flip, b.flip)
    assert (b.brightness == 1).all() and (b.contrast == 1).all()
    none = AugFamily(flip=False, max_shift=0, photometric=False).draws(0, 0, np.arange(50))
    assert all(none.draw(i) == AugDraw(False, 0, 0) for i in range(50))


def test_family_draw_from_a_generator_uses_the_same_mapping() -> None:
    family = AugFamily()
    u = np.random.default_rng(5).random(5)
    assert family.draw(np.random.default_rng(5)) == family.from_uniforms(u[None]).draw(0)


@pytest.mark.parametrize("args", [(-1, 0, [0]), (0, -1, [0]), (0, 0, [-1]), (0, 0, [[1]]), (0, 0, [0.5])])
def test_draw_uniforms_rejects_bad_arguments(args) -> None:
    with pytest.raises(AugmentationError):
        draw_uniforms(*args)
