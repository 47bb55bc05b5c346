"""Tests of fmcache.augment: draws, input ops, feature ops T_a, variants, SACA."""

from __future__ import annotations

import inspect
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fmcache.augment as aug
from fmcache.augment import (
    IDENTITY,
    AugDraw,
    AugFamily,
    AugmentationError,
    StrideError,
    VariantNameError,
    apply_feature,
    apply_input,
    augment_map,
    default_variants,
    draw_for,
    feature_offset,
    infer_stride,
    nearest_variant,
    parse_variant,
    residual_draw,
    saca_compose,
    variant_name,
)
from fmcache.errors import FmcacheError

FAST = settings(max_examples=60, deadline=None)

shifts = st.integers(-9, 9)
geometric_draws = st.builds(AugDraw, flip=st.booleans(), dy=shifts, dx=shifts)
draws = st.builds(
    AugDraw,
    flip=st.booleans(),
    dy=shifts,
    dx=shifts,
    brightness=st.floats(0.5, 1.5),
    contrast=st.floats(0.5, 1.5),
)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def shift_ref(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Reference zero-filled shift by the definition out[i, j] = x[i - dy, j - dx]."""
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = x[..., i - dy, j - dx]
    return out


# ---- public API ------------------------------------------------------------------------


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(aug) if not n.startswith("_") and not inspect.ismodule(getattr(aug, n))}
    assert len(aug.__all__) == len(set(aug.__all__))
    assert set(aug.__all__) == public


def test_errors_are_fmcache_value_errors() -> None:
    for cls in (AugmentationError, StrideError, VariantNameError, aug.SensitivityError):
        assert issubclass(cls, FmcacheError) and issubclass(cls, ValueError)


# ---- draws -------------------------------------------------------------------------------


@FAST
@given(draws)
def test_augdraw_dict_round_trip_through_json(draw: AugDraw) -> None:
    assert AugDraw.from_dict(json.loads(json.dumps(draw.to_dict()))) == draw


def test_augdraw_normalises_numpy_scalars() -> None:
    d = AugDraw(np.bool_(True), np.int64(2), np.int32(-1), np.float32(1.5))
    assert d == AugDraw(True, 2, -1, 1.5)
    assert hash(d) == hash(AugDraw(True, 2, -1, 1.5))
    assert type(d.flip) is bool and type(d.dy) is int and type(d.brightness) is float


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip": 1, "dy": 0, "dx": 0},
        {"flip": False, "dy": 1.0, "dx": 0},
        {"flip": False, "dy": 0, "dx": True},
        {"flip": False, "dy": 0, "dx": 0, "brightness": 0.0},
        {"flip": False, "dy": 0, "dx": 0, "contrast": -1.0},
        {"flip": False, "dy": 0, "dx": 0, "contrast": float("nan")},
    ],
    ids=["flip-int", "dy-float", "dx-bool", "brightness-zero", "contrast-negative", "contrast-nan"],
)
def test_augdraw_rejects_bad_fields(kwargs: dict) -> None:
    with pytest.raises(AugmentationError):
        AugDraw(**kwargs)


@pytest.mark.parametrize(
    "data",
    [{"flip": False, "dy": 0}, {"flip": False, "dy": 0, "dx": 0, "angle": 3}, [1, 2, 3]],
    ids=["missing-dx", "unknown-key", "not-a-mapping"],
)
def test_augdraw_from_dict_rejects_bad_dicts(data: object) -> None:
    with pytest.raises(AugmentationError):
        AugDraw.from_dict(data)  # type: ignore[arg-type]


def test_augdraw_geometric_drops_photometric() -> None:
    d = AugDraw(True, 1, -2, 1.3, 0.7)
    assert d.is_photometric and not d.geometric.is_photometric
    assert d.geometric == AugDraw(True, 1, -2)


families = st.builds(
    AugFamily,
    flip=st.booleans(),
    max_shift=st.integers(0, 32),
    photometric=st.booleans(),
    brightness=st.floats(0.0, 0.99),
    contrast=st.floats(0.0, 0.99),
)


@FAST
@given(families)
def test_augfamily_config_round_trips_through_json(family: AugFamily) -> None:
    assert AugFamily.from_config(json.loads(json.dumps(family.get_config()))) == family


def test_augfamily_defaults() -> None:
    assert AugFamily().get_config() == {
        "flip": True,
        "max_shift": 4,
        "photometric": True,
        "brightness": 0.2,
        "contrast": 0.2,
    }
    assert AugFamily.from_config({}) == AugFamily()


@pytest.mark.parametrize(
    "config",
    [
        {"max_shift": -1},
        {"max_shift": 2.5},
        {"brightness": 1.0},
        {"contrast": -0.1},
        {"flip": "yes"},
        {"hue": 0.1},
    ],
    ids=["negative-shift", "float-shift", "brightness-1", "negative-contrast", "flip-str", "unknown-key"],
)
def test_augfamily_rejects_bad_config(config: dict) -> None:
    with pytest.raises(AugmentationError):
        AugFamily.from_config(config)


def test_augfamily_draws_cover_the_declared_ranges() -> None:
    family = AugFamily(max_shift=2, brightness=0.3, contrast=0.1)
    rng = np.random.default_rng(0)
    got = [family.draw(rng) for _ in range(2000)]
    assert {d.dy for d in got} == {-2, -1, 0, 1, 2}
    assert {d.dx for d in got} == {-2, -1, 0, 1, 2}
    assert {d.flip for d in got} == {True, False}
    assert 0.4 < np.mean([d.flip for d in got]) < 0.6
    assert all(0.7 <= d.brightness < 1.3 and 0.9 <= d.contrast < 1.1 for d in got)


def test_augfamily_switched_off_parts_are_identity() -> None:
    family = AugFamily(flip=False, max_shift=0, photometric=False)
    rng = np.random.default_rng(1)
    assert all(family.draw(rng) == IDENTITY for _ in range(100))


def test_switching_photometric_off_keeps_the_geometric_draws() -> None:
    on, off = AugFamily(photometric=True), AugFamily(photometric=False)
    a = [on.draw(draw_for(3, 1, s)).geometric for s in range(50)]
    b = [off.draw(draw_for(3, 1, s)) for s in range(50)]
    assert a == b


def test_draw_for_is_a_function_of_seed_epoch_sample() -> None:
    family = AugFamily()
    first = {s: family.draw(draw_for(7, 2, s)) for s in range(20)}
    # another order, fresh generators: same draws
    again = {s: family.draw(draw_for(7, 2, s)) for s in reversed(range(20))}
    assert first == again


@pytest.mark.parametrize(
    "other",
    [(8, 2, 5), (7, 3, 5), (7, 2, 6), (2, 7, 5), (5, 2, 7)],
    ids=["seed", "epoch", "sample", "swap-se", "swap-ss"],
)
def test_draw_for_differs_when_any_part_differs(other: tuple[int, int, int]) -> None:
    base = draw_for(7, 2, 5).random(4)
    assert not np.array_equal(draw_for(*other).random(4), base)


@pytest.mark.parametrize(
    "args", [(-1, 0, 0), (0, 0, -3), (0, 1.5, 0)], ids=["neg-seed", "neg-sample", "float-epoch"]
)
def test_draw_for_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(AugmentationError):
        draw_for(*args)


# ---- input ops ---------------------------------------------------------------------------


@FAST
@given(dy=st.integers(-8, 8), dx=st.integers(-8, 8))
def test_input_shift_matches_definition(dy: int, dx: int) -> None:
    x = rand(2, 3, 5, 6)
    got = apply_input(torch.from_numpy(x), AugDraw(False, dy, dx)).numpy()
    np.testing.assert_array_equal(got, shift_ref(x, dy, dx))


@FAST
@given(dy=st.integers(-4, 4), dx=st.integers(-4, 4))
def test_input_shift_is_a_random_crop_with_zero_padding(dy: int, dx: int) -> None:
    pad = 4
    x = torch.from_numpy(rand(1, 2, 8, 8))
    padded = F.pad(x, (pad, pad, pad, pad))
    top, left = pad - dy, pad - dx
    crop = padded[..., top : top + 8, left : left + 8]
    torch.testing.assert_close(apply_input(x, AugDraw(False, dy, dx)), crop, rtol=0, atol=0)


def test_input_order_is_flip_then_shift() -> None:
    x = rand(1, 4, 5)
    got = apply_input(torch.from_numpy(x), AugDraw(True, 1, 2)).numpy()
    np.testing.assert_array_equal(got, shift_ref(x[..., ::-1], 1, 2))
    assert not np.array_equal(got, shift_ref(x, 1, 2)[..., ::-1])


def test_input_photometric_formula() -> None:
    x = torch.from_numpy(rand(2, 3, 4, 4) + 1.0)
    b, c = 1.2, 0.5
    got = apply_input(x, AugDraw(False, 0, 0, brightness=b, contrast=c))
    mean = (b * x).mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(got, c * (b * x - mean) + mean)
    # contrast keeps each image's mean, brightness scales it
    torch.testing.assert_close(got.mean(dim=(1, 2, 3)), b * x.mean(dim=(1, 2, 3)))


def test_input_photometric_comes_after_the_shift() -> None:
    x = torch.from_numpy(rand(1, 2, 6, 6))
    d = AugDraw(False, 2, 0, brightness=1.0, contrast=0.5)
    shifted = apply_input(x, d.geometric)
    mean = shifted.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_input(x, d), 0.5 * (shifted - mean) + mean)


def test_input_value_range_clamps() -> None:
    x = torch.full((1, 1, 2, 2), 0.8)
    got = apply_input(x, AugDraw(False, 0, 0, brightness=1.5), value_range=(0.0, 1.0))
    assert torch.equal(got, torch.ones_like(x))


def test_input_identity_returns_a_new_equal_tensor() -> None:
    x = torch.from_numpy(rand(3, 4, 4))
    got = apply_input(x, IDENTITY)
    assert torch.equal(got, x) and got.data_ptr() != x.data_ptr()


def test_input_per_sample_draws_equal_one_at_a_time() -> None:
    x = torch.from_numpy(rand(3, 2, 5, 5))
    ds = [AugDraw(True, 1, 0), IDENTITY, AugDraw(False, -2, 3, 1.1, 0.9)]
    got = apply_input(x, ds)
    for i, d in enumerate(ds):
        torch.testing.assert_close(got[i], apply_input(x[i], d), rtol=0, atol=0)


@pytest.mark.parametrize(
    "x, draw",
    [
        (torch.zeros(2, 3, 4, 4, dtype=torch.int64), IDENTITY),
        (torch.zeros(4, 4), IDENTITY),
        (np.zeros((1, 4, 4), np.float32), IDENTITY),
        (torch.zeros(2, 1, 4, 4), [IDENTITY]),
        (torch.zeros(1, 4, 4), [IDENTITY]),
    ],
    ids=["int-tensor", "2d", "numpy", "draw-count", "sequence-without-batch"],
)
def test_input_rejects_bad_arguments(x: object, draw: object) -> None:
    with pytest.raises(AugmentationError):
        apply_input(x, draw)  # type: ignore[arg-type]


# ---- feature ops -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_hw, map_hw, stride",
    [((224, 224), (56, 56), 4), ((32, 32), (32, 32), 1), ((64, 32), (8, 4), 8), ((7, 7), (1, 1), 7)],
    ids=["resnet-layer1", "same", "non-square", "global"],
)
def test_infer_stride(input_hw: tuple, map_hw: tuple, stride: int) -> None:
    assert infer_stride(input_hw, map_hw) == stride


@pytest.mark.parametrize(
    "input_hw, map_hw",
    [((224, 224), (50, 50)), ((64, 32), (16, 16)), ((32, 32), (0, 0)), ((32,), (8, 8)), ((8, 8), (16, 16))],
    ids=["fractional", "ratios-differ", "zero", "not-a-pair", "upsampled"],
)
def test_infer_stride_rejects(input_hw: tuple, map_hw: tuple) -> None:
    with pytest.raises(StrideError):
        infer_stride(input_hw, map_hw)


@pytest.mark.parametrize(
    "shift_px, stride, expected",
    [
        (0, 4, 0),
        (4, 4, 1),
        (-8, 4, -2),
        (1, 4, 0),
        (2, 4, 1),
        (-2, 4, -1),
        (3, 4, 1),
        (6, 4, 2),
        (5, 2, 3),
        (3, 1, 3),
    ],
    ids=[
        "zero",
        "one-cell",
        "minus-two-cells",
        "quarter",
        "half-up",
        "half-down",
        "three-quarters",
        "one-and-half",
        "two-and-half",
        "stride-1",
    ],
)
def test_feature_offset_rounds_half_away_from_zero(shift_px: int, stride: int, expected: int) -> None:
    assert feature_offset(shift_px, stride) == expected


@FAST
@given(d=st.integers(-100, 100), s=st.integers(1, 32))
def test_feature_offset_is_odd_and_nearest(d: int, s: int) -> None:
    assert feature_offset(-d, s) == -feature_offset(d, s)
    assert abs(feature_offset(d, s) * s - d) <= s / 2


@pytest.mark.parametrize("stride", [0, -2, 1.0, True], ids=["zero", "negative", "float", "bool"])
def test_apply_feature_rejects_bad_stride(stride: object) -> None:
    with pytest.raises(StrideError):
        apply_feature(rand(1, 2, 2), IDENTITY, stride)  # type: ignore[arg-type]


@FAST
@given(geometric_draws)
def test_feature_flip_of_a_flipped_map_is_the_original(draw: AugDraw) -> None:
    x = rand(3, 4, 5)
    flip = AugDraw(True, 0, 0)
    np.testing.assert_array_equal(apply_feature(apply_feature(x, flip, 2), flip, 2), x)


@FAST
@given(draws)
def test_feature_op_at_stride_1_equals_the_input_op_geometry(draw: AugDraw) -> None:
    x = rand(2, 3, 6, 7)
    expected = apply_input(torch.from_numpy(x), draw.geometric).numpy()
    # photometric factors are identity in feature space
    np.testing.assert_array_equal(apply_feature(x, draw, 1), expected)


@FAST
@given(draws, st.integers(1, 4))
def test_feature_op_numpy_and_torch_agree(draw: AugDraw, stride: int) -> None:
    x = rand(2, 3, 5, 6)
    got_t = apply_feature(torch.from_numpy(x), draw, stride)
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_array_equal(got_t.numpy(), apply_feature(x, draw, stride))


def test_feature_shift_uses_rounded_offset() -> None:
    x = rand(2, 6, 6)
    got = apply_feature(x, AugDraw(False, 6, -2), 4)  # 6/4 = 1.5 -> 2, -2/4 = -0.5 -> -1
    np.testing.assert_array_equal(got, shift_ref(x, 2, -1))


@FAST
@given(
    k_y=st.integers(-2, 2), k_x=st.integers(-2, 2), stride=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99)
)
def test_feature_shift_matches_the_map_of_the_shifted_input_away_from_borders(
    k_y: int, k_x: int, stride: int, seed: int
) -> None:
    # A stride-s 3x3 conv: shifting the input by whole strides shifts the map by whole
    # cells, so T_a is exact except where the zero fill or padding reaches.
    torch.manual_seed(seed)
    weight = torch.randn(4, 2, 3, 3)
    x = torch.randn(1, 2, 8 * stride, 8 * stride)
    draw = AugDraw(False, k_y * stride, k_x * stride)
    with torch.no_grad():
        true_map = F.conv2d(apply_input(x, draw), weight, stride=stride, padding=1)[0].numpy()
        base = F.conv2d(x, weight, stride=stride, padding=1)[0].numpy()
    approx = apply_feature(base, draw, stride)
    m = 2 + max(abs(k_y), abs(k_x))  # one cell of conv support + the shift's own border
    np.testing.assert_allclose(approx[:, m:-m, m:-m], true_map[:, m:-m, m:-m], rtol=1e-5, atol=1e-5)


def test_feature_batch_equals_per_sample() -> None:
    x = rand(3, 2, 5, 5)
    d = AugDraw(True, 3, -5)
    got = apply_feature(x, d, 2)
    for i in range(3):
        np.testing.assert_array_equal(got[i], apply_feature(x[i], d, 2))


@pytest.mark.parametrize(
    "draw",
    [IDENTITY, AugDraw(True, 0, 0), AugDraw(False, 2, -1), AugDraw(True, -9, 9)],
    ids=["identity", "flip", "shift", "shift-beyond-map"],
)
def test_feature_out_is_fully_overwritten_and_returned(draw: AugDraw) -> None:
    x = rand(2, 4, 5)
    out = np.full_like(x, np.nan)
    got = apply_feature(x, draw, 1, out=out)
    assert got is out
    np.testing.assert_array_equal(out, apply_feature(x, draw, 1))


def test_feature_shift_beyond_the_map_gives_zeros() -> None:
    assert not apply_feature(rand(2, 3, 3), AugDraw(True, 3, 0), 1).any()


@pytest.mark.parametrize(
    "make_out",
    [
        lambda x: x,
        lambda x: x[..., ::-1],
        lambda x: np.empty((1, 4, 5), np.float32),
        lambda x: np.empty_like(x, dtype=np.float64),
        lambda x: torch.empty(2, 4, 5),
    ],
    ids=["same-array", "overlapping-view", "wrong-shape", "wrong-dtype", "wrong-type"],
)
def test_feature_rejects_bad_out(make_out) -> None:  # type: ignore[no-untyped-def]
    x = rand(2, 4, 5)
    with pytest.raises(AugmentationError):
        apply_feature(x, AugDraw(True, 1, 0), 1, out=make_out(x))


@pytest.mark.parametrize(
    "shape, tokens",
    [((5, 8), False), ((8,), False), ((3, 5, 8), True)],
    ids=["tokens", "vector", "token-batch"],
)
def test_feature_op_on_token_maps_is_identity(shape: tuple, tokens: bool) -> None:
    x = rand(*shape)
    got = apply_feature(x, AugDraw(True, 4, -4), 2, tokens=tokens)
    np.testing.assert_array_equal(got, x)
    assert got is not x


# ---- variants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw, name",
    [
        (IDENTITY, "identity"),
        (AugDraw(True, 0, 0), "flip"),
        (AugDraw(False, 2, -2), "shift(+2,-2)"),
        (AugDraw(True, 0, 2), "flip+shift(0,+2)"),
        (AugDraw(False, -12, 0, 1.4, 0.6), "shift(-12,0)"),
    ],
    ids=["identity", "flip", "shift", "flip-shift", "photometric-ignored"],
)
def test_variant_name(draw: AugDraw, name: str) -> None:
    assert variant_name(draw) == name
    assert parse_variant(name) == draw.geometric


@FAST
@given(draws)
def test_variant_name_round_trip(draw: AugDraw) -> None:
    assert parse_variant(variant_name(draw)) == draw.geometric


@pytest.mark.parametrize(
    "name",
    [
        "shift(2,0)",
        "shift(0,0)",
        "flip+shift(0,0)",
        "shift(+02,0)",
        "shift(-0,+1)",
        "Flip",
        "shift(+1, 0)",
        "",
        "shift+flip(0,+1)",
        "identity ",
        "flip+identity",
    ],
)
def test_parse_variant_rejects_non_canonical_names(name: str) -> None:
    with pytest.raises(VariantNameError):
        parse_variant(name)


def test_parse_variant_rejects_non_strings() -> None:
    with pytest.raises(VariantNameError):
        parse_variant(["flip"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "max_shift, stride, flip, names",
    [
        (4, 1, True, ["flip", "shift(+3,0)", "shift(-3,0)", "shift(0,+3)", "shift(0,-3)"]),
        (4, 2, True, ["flip", "shift(+2,0)", "shift(-2,0)", "shift(0,+2)", "shift(0,-2)"]),
        (4, 4, True, ["flip", "shift(+4,0)", "shift(-4,0)", "shift(0,+4)", "shift(0,-4)"]),
        (4, 8, True, ["flip"]),
        (12, 4, True, ["flip", "shift(+8,0)", "shift(-8,0)", "shift(0,+8)", "shift(0,-8)"]),
        (0, 1, False, []),
        (3, 1, False, ["shift(+2,0)", "shift(-2,0)", "shift(0,+2)", "shift(0,-2)"]),
    ],
    ids=["m4-s1", "m4-s2", "m4-s4", "m4-s8-flip-only", "m12-s4", "nothing", "no-flip"],
)
def test_default_variants(max_shift: int, stride: int, flip: bool, names: list[str]) -> None:
    assert [variant_name(v) for v in default_variants(max_shift, stride, flip=flip)] == names


@pytest.mark.parametrize(
    "args, error",
    [((-1, 1), AugmentationError), ((4, 0), StrideError), ((4.0, 1), AugmentationError)],
    ids=["negative-shift", "zero-stride", "float-shift"],
)
def test_default_variants_rejects(args: tuple, error: type) -> None:
    with pytest.raises(error):
        default_variants(*args)


@FAST
@given(geometric_draws, geometric_draws)
def test_residual_after_variant_equals_the_draw(draw: AugDraw, variant: AugDraw) -> None:
    # Content well inside a zero frame: zero-filled shifts then compose exactly.
    x = np.zeros((2, 40, 40), np.float32)
    x[:, 18:22, 17:23] = rand(2, 4, 6)
    xt = torch.from_numpy(x)
    composed = apply_input(apply_input(xt, variant), residual_draw(draw, variant))
    torch.testing.assert_close(composed, apply_input(xt, draw), rtol=0, atol=0)


@pytest.mark.parametrize(
    "draw, names, expected_name, expected_residual",
    [
        (AugDraw(True, 0, 0), ["flip", "shift(+2,0)"], "flip", IDENTITY),
        (AugDraw(False, 2, 0), ["flip", "shift(+2,0)"], "shift(+2,0)", IDENTITY),
        (AugDraw(False, 3, -1), ["flip", "shift(+2,0)"], "shift(+2,0)", AugDraw(False, 1, -1)),
        (AugDraw(True, 3, 1), ["flip", "shift(+2,0)"], "flip", AugDraw(False, 3, 1)),
        (AugDraw(True, 1, 1), ["shift(+2,0)"], "identity", AugDraw(True, 1, 1)),
        (AugDraw(True, 2, 1), ["shift(+2,0)", "shift(0,+2)"], "shift(+2,0)", AugDraw(True, 0, 1)),
        (AugDraw(False, 1, 0), ["shift(+2,0)"], "identity", AugDraw(False, 1, 0)),
        (AugDraw(False, 1, 1), ["shift(0,+2)", "shift(+2,0)"], "identity", AugDraw(False, 1, 1)),
        (AugDraw(False, 2, 2), ["shift(0,+2)", "shift(+2,0)"], "shift(+2,0)", AugDraw(False, 0, 2)),
        (AugDraw(True, 0, 0, 1.5, 0.5), [], "identity", AugDraw(True, 0, 0)),
    ],
    ids=[
        "exact-flip",
        "exact-shift",
        "residual-shift",
        "flip-first",
        "residual-flip",
        "residual-flip-shift",
        "tie-prefers-identity",
        "three-way-tie",
        "tie-by-name",
        "photometric-ignored",
    ],
)
def test_nearest_variant(
    draw: AugDraw, names: list[str], expected_name: str, expected_residual: AugDraw
) -> None:
    assert nearest_variant(draw, names) == (expected_name, expected_residual)


@FAST
@given(geometric_draws, st.randoms())
def test_nearest_variant_ignores_name_order(draw: AugDraw, shuffler: random.Random) -> None:
    names = [variant_name(v) for v in default_variants(4, 1)] + ["flip+shift(0,+3)", "shift(+3,+3)"]
    shuffled = names[:]
    shuffler.shuffle(shuffled)
    assert nearest_variant(draw, names) == nearest_variant(draw, shuffled)


# ---- SACA --------------------------------------------------------------------------------

C, H, W = 6, 7, 8
SENSITIVE = np.array([1, 4])


def cached(stride: int = 1, names: tuple[str, ...] = ("flip", "shift(+2,0)")) -> dict[str, np.ndarray]:
    """Variant arrays unrelated to the base, so picking the wrong one shows."""
    return {n: rand(len(SENSITIVE), H, W, seed=10 + i) for i, n in enumerate(names)}


@pytest.mark.parametrize("name", ["flip", "shift(+2,0)"])
def test_saca_draw_equal_to_a_variant_uses_it_exactly(name: str) -> None:
    base, variants = rand(C, H, W), cached()
    draw = parse_variant(name)
    got = saca_compose(base, draw, 1, SENSITIVE, variants)
    np.testing.assert_array_equal(got[SENSITIVE], variants[name])
    bulk = np.setdiff1d(np.arange(C), SENSITIVE)
    np.testing.assert_array_equal(got[bulk], apply_feature(base, draw, 1)[bulk])


def test_saca_applies_the_residual_shift_to_the_variant() -> None:
    base, variants = rand(C, H, W), cached()
    got = saca_compose(base, AugDraw(False, 3, -1, 1.3, 0.8), 1, SENSITIVE, variants)
    np.testing.assert_array_equal(got[SENSITIVE], shift_ref(variants["shift(+2,0)"], 1, -1))


def test_saca_residual_shift_at_stride_2() -> None:
    base, variants = rand(C, H, W), cached(names=("shift(+2,0)",))
    got = saca_compose(base, AugDraw(False, 6, 0), 2, SENSITIVE, variants)  # residual 4 px = 2 cells
    np.testing.assert_array_equal(got[SENSITIVE], shift_ref(variants["shift(+2,0)"], 2, 0))


def test_saca_flip_without_flip_variant_is_a_residual_flip_of_the_base() -> None:
    base, variants = rand(C, H, W), cached(names=("shift(+2,0)",))
    draw = AugDraw(True, 0, 1)
    got = saca_compose(base, draw, 1, SENSITIVE, variants)
    np.testing.assert_array_equal(got, apply_feature(base, draw, 1))


def test_saca_flip_variant_then_residual_shift() -> None:
    base, variants = rand(C, H, W), cached()
    got = saca_compose(base, AugDraw(True, 0, 2), 1, SENSITIVE, variants)
    np.testing.assert_array_equal(got[SENSITIVE], shift_ref(variants["flip"], 0, 2))


@FAST
@given(draws, st.integers(1, 3))
def test_saca_without_variants_equals_feature_mode(draw: AugDraw, stride: int) -> None:
    base = rand(C, H, W)
    np.testing.assert_array_equal(
        augment_map("saca", base, draw, stride, SENSITIVE, None), augment_map("feature", base, draw, stride)
    )


def test_saca_with_no_sensitive_channels_equals_feature_mode() -> None:
    base, draw = rand(C, H, W), AugDraw(True, 2, 0)
    got = saca_compose(base, draw, 1, np.array([], dtype=np.int64), {"flip": np.empty((0, H, W), np.float32)})
    np.testing.assert_array_equal(got, apply_feature(base, draw, 1))


def test_saca_stored_identity_entry_is_used() -> None:
    base = rand(C, H, W)
    ident = rand(2, H, W, seed=5)
    got = saca_compose(base, AugDraw(False, 0, 1), 1, SENSITIVE, {"identity": ident})
    np.testing.assert_array_equal(got[SENSITIVE], shift_ref(ident, 0, 1))


def test_saca_out_path_writes_into_out() -> None:
    base, variants, draw = rand(C, H, W), cached(), AugDraw(False, 3, 0)
    out = np.full_like(base, np.nan)
    got = saca_compose(base, draw, 1, SENSITIVE, variants, out=out)
    assert got is out
    np.testing.assert_array_equal(out, saca_compose(base, draw, 1, SENSITIVE, variants))


def test_saca_leaves_its_inputs_untouched() -> None:
    base, variants = rand(C, H, W), cached()
    before = base.copy(), {k: v.copy() for k, v in variants.items()}
    saca_compose(base, AugDraw(True, 3, 1), 1, SENSITIVE, variants)
    np.testing.assert_array_equal(base, before[0])
    for k in variants:
        np.testing.assert_array_equal(variants[k], before[1][k])


def test_saca_on_token_maps_swaps_in_the_nearest_variant() -> None:
    base = rand(5, C)  # (T, D): channels last
    variants = {"flip": rand(5, 2, seed=3), "shift(+2,0)": rand(5, 2, seed=4)}
    got = saca_compose(base, AugDraw(True, 1, 0), 1, SENSITIVE, variants)
    np.testing.assert_array_equal(got[:, SENSITIVE], variants["flip"])
    bulk = np.setdiff1d(np.arange(C), SENSITIVE)
    np.testing.assert_array_equal(got[:, bulk], base[:, bulk])


def test_augment_mode_none_returns_an_equal_copy() -> None:
    base = rand(C, H, W)
    got = augment_map("none", base, None, 1)
    np.testing.assert_array_equal(got, base)
    assert got is not base
    out = np.empty_like(base)
    assert augment_map("none", base, AugDraw(True, 1, 1), 4, out=out) is out
    np.testing.assert_array_equal(out, base)


def test_augment_mode_feature_ignores_variants() -> None:
    base, draw = rand(C, H, W), AugDraw(False, 2, 0)
    got = augment_map("feature", base, draw, 1, SENSITIVE, cached())
    np.testing.assert_array_equal(got, apply_feature(base, draw, 1))


def test_augment_map_is_deterministic_per_seed_epoch_sample() -> None:
    base, variants, family = rand(C, H, W), cached(), AugFamily(max_shift=3)
    one = augment_map("saca", base, family.draw(draw_for(1, 4, 9)), 1, SENSITIVE, variants)
    two = augment_map("saca", base, family.draw(draw_for(1, 4, 9)), 1, SENSITIVE, variants)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"mode": "fancy"}, AugmentationError),
        ({"mode": "saca", "sensitive": None}, AugmentationError),
        ({"mode": "feature", "draw": None}, AugmentationError),
        ({"base": rand(2, C, H, W)}, AugmentationError),
        ({"sensitive": np.array([4, 1])}, AugmentationError),
        ({"sensitive": np.array([1, 1])}, AugmentationError),
        ({"sensitive": np.array([1, C])}, AugmentationError),
        ({"sensitive": np.array([-1, 1])}, AugmentationError),
        ({"sensitive": np.array([1.0, 4.0])}, AugmentationError),
        ({"variants": {"flip": rand(3, H, W)}}, AugmentationError),
        ({"variants": {"flip": rand(2, H, W - 1)}}, AugmentationError),
        ({"variants": {"shift(2,0)": rand(2, H, W)}}, VariantNameError),
        ({"variants": [rand(2, H, W)]}, AugmentationError),
        ({"stride": 0}, StrideError),
    ],
    ids=[
        "unknown-mode",
        "saca-without-sensitive",
        "feature-without-draw",
        "batch-base",
        "unsorted",
        "duplicate",
        "index-too-large",
        "negative-index",
        "float-indices",
        "variant-channels",
        "variant-width",
        "non-canonical-name",
        "variants-not-mapping",
        "zero-stride",
    ],
)
def test_augment_map_rejects_bad_input(kwargs: dict, error: type) -> None:
    args = {
        "mode": "saca",
        "base": rand(C, H, W),
        "draw": AugDraw(True, 1, 0),
        "stride": 1,
        "sensitive": SENSITIVE,
        "variants": cached(),
        **kwargs,
    }
    with pytest.raises(error):
        augment_map(**args)
