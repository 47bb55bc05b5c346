"""Tests of fmcache.calibrate and the SACA build path (builder.build_saca_cache)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fmcache.augment import AugDraw, AugFamily, apply_input, default_variants, variant_name
from fmcache.augment.errors import SensitivityError
from fmcache.builder import SacaConfig, build_saca_cache, selection_scores
from fmcache.cache import open_cache
from fmcache.calibrate import (
    PixelSpace,
    augment_inputs,
    calibration_draws,
    measure_sensitivity,
)
from fmcache.codecs import codec_from_spec
from fmcache.dataset import FeatureMapDataset
from fmcache.policy import CompressionPolicy
from fmcache.report import inspect_cache
from fmcache.zoo import FashionMNIST, small_cnn
from fmcache.zoo.fashion_mnist import MEAN, STD

FMNIST = PixelSpace(MEAN, STD, (0.0, 1.0))


# ---- draws ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 10**6), st.integers(0, 6), st.integers(1, 3))
def test_calibration_draws_cover_each_kind_and_stay_in_the_family(seed, sample, max_shift, shifts):
    family = AugFamily(max_shift=max_shift, brightness=0.3, contrast=0.1)
    draws = calibration_draws(family, sample, seed=seed, shifts_per_sample=shifts)
    assert draws == calibration_draws(family, sample, seed=seed, shifts_per_sample=shifts)
    kinds = [k for k, _ in draws]
    assert kinds == ["flip"] + ["shift"] * (shifts if max_shift else 0) + ["photometric"]
    for kind, d in draws:
        if kind == "flip":
            assert d == AugDraw(True, 0, 0)
        elif kind == "shift":
            assert not d.flip and (d.dy, d.dx) != (0, 0) and max(abs(d.dy), abs(d.dx)) <= max_shift
        else:
            assert (d.flip, d.dy, d.dx) == (False, 0, 0)
            assert 0.7 <= d.brightness <= 1.3 and 0.9 <= d.contrast <= 1.1


def test_a_family_without_photometric_draws_none():
    kinds = {k for k, _ in calibration_draws(AugFamily(photometric=False), 3)}
    assert kinds == {"flip", "shift"}


def test_a_family_that_draws_nothing_is_refused():
    with pytest.raises(SensitivityError):
        calibration_draws(AugFamily(flip=False, max_shift=0, photometric=False), 0)


# ---- input space -------------------------------------------------------------------------------

def test_augment_inputs_pads_with_raw_black_not_with_the_normalised_zero():
    raw = torch.rand(2, 1, 8, 8)
    x = (raw - MEAN) / STD
    out = augment_inputs(x, AugDraw(False, 2, 0), FMNIST)
    assert torch.allclose(out[:, :, :2], torch.full_like(out[:, :, :2], -MEAN / STD))
    assert torch.allclose(out[:, :, 2:], x[:, :, :-2], atol=1e-6)


def test_augment_inputs_equals_apply_input_on_raw_pixels():
    raw = torch.rand(3, 1, 8, 8)
    draws = [AugDraw(True, 1, -2, 1.2, 0.9), AugDraw(False, 0, 3), AugDraw(True, 0, 0)]
    expected = (apply_input(raw, draws, value_range=(0.0, 1.0)) - MEAN) / STD
    assert torch.allclose(augment_inputs((raw - MEAN) / STD, draws, FMNIST), expected, atol=1e-5)


# ---- measuring ---------------------------------------------------------------------------------

def _edge_prefix(x: torch.Tensor) -> torch.Tensor:
    """Channel 0: the image (flip- and shift-equivariant); channel 1: a horizontal difference
    (anti-symmetric kernel: a flip negates it); channel 2: all zero."""
    diff = F.conv2d(x, torch.tensor([[[[-1.0, 0.0, 1.0]]]]), padding=(0, 1))
    return torch.cat([x, diff, torch.zeros_like(x)], dim=1)


def test_identity_prefix_has_zero_geometric_sensitivity():
    x = torch.rand(16, 2, 12, 12) + 0.1
    cal = measure_sensitivity(lambda b: b, x, AugFamily(photometric=False), stride=1)
    np.testing.assert_allclose(cal.scores, 0.0, atol=1e-9)
    assert cal.n_pairs == 16 * 3 and cal.kind_pairs == {"flip": 16, "shift": 32}


def test_a_flip_antisymmetric_channel_is_the_sensitive_one():
    x = torch.rand(8, 1, 16, 16)
    cal = measure_sensitivity(_edge_prefix, x, AugFamily(max_shift=2, photometric=False))
    flip = cal.per_kind["flip"]
    assert flip[0] == pytest.approx(0.0, abs=1e-9)
    assert flip[1] > 1.5  # cosine near -1: the flip negates a horizontal difference
    assert flip[2] == 0.0  # a dead channel is never sensitive
    assert cal.scores.argmax() == 1


def test_selection_scores_weigh_kinds_by_pairs_and_skip_photometric_unless_trained():
    x = torch.rand(8, 1, 16, 16)
    cal = measure_sensitivity(_edge_prefix, x, AugFamily(max_shift=2))
    geo = AugFamily(max_shift=2, photometric=False)
    expected = (cal.per_kind["flip"] * 8 + cal.per_kind["shift"] * 16) / 24
    np.testing.assert_allclose(selection_scores(cal, geo), expected)
    np.testing.assert_allclose(selection_scores(cal, AugFamily(max_shift=2)), cal.scores, atol=1e-12)


def test_measuring_is_deterministic_and_independent_of_the_batch_size():
    x = torch.rand(10, 1, 8, 8)
    a = measure_sensitivity(_edge_prefix, x, AugFamily(max_shift=2), seed=3, batch_size=3).scores
    b = measure_sensitivity(_edge_prefix, x, AugFamily(max_shift=2), seed=3, batch_size=10).scores
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_bad_calibration_inputs_are_typed_errors():
    with pytest.raises(SensitivityError):
        measure_sensitivity(lambda b: b, torch.rand(0, 1, 4, 4), AugFamily())
    with pytest.raises(SensitivityError):
        measure_sensitivity(lambda b: b, torch.rand(2, 1, 4, 4), AugFamily(), sample_ids=[0])


# ---- the SACA build ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saca_cache(tmp_path_factory):
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, width=4).eval()
    data = FashionMNIST("train", limit=48)
    out = tmp_path_factory.mktemp("saca") / "c.lmdb"
    family = AugFamily(photometric=False)
    build_saca_cache(model, data, "block2", out, saca=SacaConfig(family=family, rho=0.25, n_samples=16),
                     policy=CompressionPolicy.constant("raw"), pixels=FMNIST, progress=False, batch_size=16)
    return model, data, out, family


def test_the_manifest_holds_scores_selection_and_family(saca_cache):
    _, _, out, family = saca_cache
    with open_cache(out) as cache:
        layer = cache.layer("block2")
        build = cache.manifest.build
    extra = layer.extra
    assert len(extra["sensitivity"]) == 8 and extra["rho"] == 0.25
    assert len(extra["sensitive_channels"]) == math.ceil(0.25 * 8)
    assert list(layer.plan.tier("sensitive").channels) == extra["sensitive_channels"]
    assert AugFamily.from_config(build["augment_family"]) == family
    assert list(layer.variants) == sorted(variant_name(d) for d in default_variants(4, 2))
    assert inspect_cache(out)["layers"]["block2"]["sensitivity"]["n_channels"] == 8


def test_stored_variants_are_the_true_augmented_maps(saca_cache):
    model, data, out, _ = saca_cache
    x = torch.stack([data[i][0] for i in range(4)])
    with open_cache(out) as cache:
        sens = list(cache.layer("block2").plan.tier("sensitive").channels)
        for name in cache.layer("block2").variants:
            stored = cache.read_parts("block2", range(4), [f"sensitive@{name}"])[f"sensitive@{name}"]
            from fmcache.augment import parse_variant

            with torch.inference_mode():
                truth = model[:2](augment_inputs(x, parse_variant(name), FMNIST))[:, sens].numpy()
            np.testing.assert_allclose(stored, truth, rtol=1e-5, atol=1e-5)


def test_saca_items_are_deterministic_and_differ_from_feature_only_on_sensitive_channels(saca_cache):
    _, _, out, _ = saca_cache
    saca = FeatureMapDataset(out, augment="saca", seed=1)
    feature = FeatureMapDataset(out, augment="feature", seed=1)
    sens = set(saca.sensitive.tolist())
    bulk = [c for c in range(8) if c not in sens]
    for epoch in (0, 1):
        saca.set_epoch(epoch)
        feature.set_epoch(epoch)
        for i in range(6):
            a, b = saca[i][0], feature[i][0]
            assert torch.equal(a, saca[i][0])
            assert torch.equal(a[bulk], b[bulk])


# ---- CLI ----------------------------------------------------------------------------------------

def _saca_build_args(out, *extra: str) -> list[str]:
    """`fmcache build --saca` of the test CNN's block2 (rho 0.5, 16 calibration samples)."""
    return ["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "block2",
            "--out", str(out), "--saca", "--rho", "0.5", "--calib-samples", "16", *extra,
            "--pixels", f"{MEAN},{STD},0,1", "--no-progress"]


def test_cli_build_saca_says_when_it_calibrates_on_fewer_items_than_asked(tmp_path):
    from click.testing import CliRunner

    import fmcache
    from fmcache.cli import main

    out = tmp_path / "s.lmdb"
    result = CliRunner().invoke(main, _saca_build_args(out, "--calib-samples", "100000"))
    assert result.exit_code == 0, result.output
    n = len(fmcache.open_cache(out))
    assert f"note: SACA calibrates on all {n} items of the data set (--calib-samples 100000)" in result.stderr
    again = CliRunner().invoke(main, _saca_build_args(tmp_path / "t.lmdb"))  # 16 of them: no note
    assert again.exit_code == 0 and "note: SACA calibrates" not in again.stderr


def test_cli_build_saca_writes_scores_tiers_and_variants(tmp_path):
    from click.testing import CliRunner

    from fmcache.cli import main

    out = tmp_path / "s.lmdb"
    result = CliRunner().invoke(main, _saca_build_args(out, "--max-variants", "1"))
    assert result.exit_code == 0, result.output
    assert "sensitivity" in result.output
    with open_cache(out) as cache:
        layer = cache.layer("block2")
    assert layer.variants == ("flip",) and len(layer.plan.tier("sensitive").channels) == 4
    assert layer.extra["rho"] == 0.5


def test_cli_build_saca_needs_one_layer(tmp_path):
    from click.testing import CliRunner

    from fmcache.cli import main

    args = ["build", "--model", "fmnist_small:tiny_model", "--data", "fmnist_small:train_subset", "--layer", "block1",
            "--layer", "block2", "--out", str(tmp_path / "x.lmdb"), "--saca", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "one --layer" in result.output


def test_a_saca_build_with_rho_0_is_feature_mode(tmp_path):
    """rho = 0 selects no channel: the build refused it ("no tier named 'sensitive'").
    It now stores no variants, and augment="saca" serves feature mode, as SACA with no
    sensitive channel is defined."""
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, width=4).eval()
    out = tmp_path / "c.lmdb"
    build_saca_cache(model, FashionMNIST("train", limit=32), "block2", out,
                     saca=SacaConfig(family=AugFamily(photometric=False), rho=0.0, n_samples=8),
                     policy=CompressionPolicy.constant("raw"), pixels=FMNIST, progress=False, batch_size=16)
    with open_cache(out) as cache:
        layer = cache.layer("block2")
        assert layer.plan.names == ("bulk",) and layer.variants == ()
    saca, feature = FeatureMapDataset(out, augment="saca", seed=3), FeatureMapDataset(out, augment="feature", seed=3)
    for ds in (saca, feature):
        ds.set_epoch(2)
    rows = list(range(0, 32, 3))
    assert torch.equal(saca.get_batch(rows)[0], feature.get_batch(rows)[0])
    assert not torch.equal(saca.get_batch(rows)[0], FeatureMapDataset(out).get_batch(rows)[0])


def test_a_nested_saca_layer_takes_the_freeze_depth_of_its_block(tmp_path):
    """A SACA build at a nested name ("block2.2", the ReLU inside block2) took the policy's
    deepest stage (frozen fraction 1.0: its most lossy codecs) instead of block2's."""
    from fmcache.policy import frozen_fraction
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, width=4).eval()
    out = tmp_path / "c.lmdb"
    build_saca_cache(model, FashionMNIST("train", limit=32), "block2.2", out,
                     saca=SacaConfig(family=AugFamily(photometric=False), rho=0.25, n_samples=8, max_variants=1),
                     pixels=FMNIST, progress=False, batch_size=16)
    depth = frozen_fraction(model, "block2")
    assert 0 < depth < 1 and frozen_fraction(model, "block2.2") == depth
    with open_cache(out) as cache:
        assert cache.manifest.build["frozen_fraction"] == depth
        bulk, _ = CompressionPolicy.default().codecs_for(depth)
        assert cache.layer("block2.2").plan.tier("bulk").codec.spec == codec_from_spec(bulk).spec


def test_cli_variants_take_shifts_with_their_comma(tmp_path):
    """`--variants flip,shift(0,+2)` was split inside shift(0,+2): no shift variant could
    be given (the error's own example was refused)."""
    from click.testing import CliRunner

    from fmcache.cli import _variant_list, main

    assert _variant_list("flip, shift(0,+2),flip+shift(-2,0)") == ("flip", "shift(0,+2)", "flip+shift(-2,0)")
    out = tmp_path / "s.lmdb"
    result = CliRunner().invoke(main, _saca_build_args(out, "--variants", "flip,shift(0,+2)"))
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        assert set(cache.layer("block2").variants) == {"flip", "shift(0,+2)"}


def test_per_channel_pixels_for_another_channel_count_say_how_to_give_them():
    """The second sweep: the hint was about maps and rho (SensitivityError's default)."""
    from fmcache.calibrate import PixelSpace
    from fmcache.errors import SensitivityError

    with pytest.raises(SensitivityError, match=r"PixelSpace has 2 means, the inputs \(2, 3, 4, 4\) have 3") as info:
        PixelSpace((0.5, 0.5), (0.25, 0.25)).tensors(torch.zeros(2, 3, 4, 4))
    assert "--pixels M1/M2/M3,S1/S2/S3" in info.value.hint


def test_a_layer_whose_maps_are_no_whole_stride_of_the_input_is_named_as_such(tmp_path):
    """The second sweep: an unpadded convolution (40x24 -> 38x22) gave the bare stride
    message, without the layer, the cache, or what to do."""
    from torch import nn
    from torch.utils.data import TensorDataset

    import fmcache
    from fmcache.builder import SacaConfig, build_cache, build_saca_cache
    from fmcache.errors import StrideError

    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()).eval()  # no padding
    data = TensorDataset(torch.rand(8, 3, 40, 24), torch.zeros(8, dtype=torch.long))
    with pytest.raises(StrideError, match=r"SACA calibration: input 40x24 is not a whole multiple of map 38x22") as info:
        build_saca_cache(model, data, "1", tmp_path / "s.lmdb", saca=SacaConfig(n_samples=4), progress=False)
    assert "padded" in info.value.hint and "without --saca" in info.value.hint
    build_cache(model, data, ["1"], tmp_path / "p.lmdb", progress=False)  # a plain cache is fine
    with pytest.raises(StrideError, match=r"p\.lmdb: augment='feature' on layer '1': input 40x24") as info:
        fmcache.FeatureMapDataset(tmp_path / "p.lmdb", "1", augment="feature")
    assert "augment='none'" in info.value.hint
    assert len(fmcache.FeatureMapDataset(tmp_path / "p.lmdb", "1", augment="none")) == 8


def test_saca_at_a_layer_of_one_vector_per_sample_is_refused_before_anything_is_written(tmp_path):
    """Logits or a pooled vector: each channel is one number, whose cosine score against
    its augmented self is 0 or 2, so the sensitive tier was an arbitrary pick and the
    cache 0.1x its raw size on LMDB, built without a word (a helper's sweep). A plain
    build of the same layer stays what to use."""
    from fmcache.builder import build_cache, build_saca_cache
    from fmcache.zoo import FashionMNIST, small_cnn

    model = small_cnn(in_channels=1, width=2).eval()
    data = FashionMNIST("train", limit=32)
    out = tmp_path / "c.lmdb"
    with pytest.raises(SensitivityError, match=r"one vector per sample \(8,\)"):
        build_saca_cache(model, data, "flatten", out, progress=False)
    assert not list(tmp_path.iterdir())
    assert build_cache(model, data, ["flatten"], tmp_path / "p.lmdb", progress=False).layers["flatten"].shape == (8,)
