"""Building from models a new user brings (session 13's sweep): modules that reuse their
output buffer, frozen submodules in eval mode, weights used without calling their module,
bf16 inputs, forwards that need autograd, scripted and traced models, outputs fmcache
cannot store. Each test fails on the code before its fix."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import fmcache
from fmcache.augment import AugFamily
from fmcache.builder import SacaConfig, build_cache, build_saca_cache, prefix_fingerprint
from fmcache.errors import BuildError, StaleCacheError
from fmcache.policy import CompressionPolicy

N = 24


def _data(shape=(3, 8, 8), dtype=torch.float32, n=N):
    torch.manual_seed(1)
    return TensorDataset(torch.randn(n, *shape).to(dtype), torch.arange(n))


def _truth(model, data, layer, batch=8):
    """The layer's output for every sample, in the build's batches (the same numerics),
    each batch's copied before the next runs (no buffer shared)."""
    outs = []
    for lo in range(0, len(data), batch):
        x = torch.stack([data[i][0] for i in range(lo, min(lo + batch, len(data)))])
        with torch.no_grad():
            outs.append(fmcache.capture.Capture(model, [layer])(x)[layer].float().numpy().copy())
    return np.concatenate(outs)


class StaticBuffer(nn.Module):
    """Writes its output into one buffer it keeps and returns that buffer (static output
    buffers, ``out=`` kernels): the next forward overwrites what it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.out is None or self.out.shape != y.shape:
            self.out = torch.empty_like(y)
        self.out.copy_(y)
        return self.out


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_a_module_returning_a_reused_buffer_is_cached_per_sample(tmp_path, suffix):
    torch.manual_seed(0)
    model = nn.Sequential(StaticBuffer(), nn.ReLU()).eval()
    data = _data()
    build_cache(model, data, ["0"], tmp_path / f"c{suffix}", codec="raw", batch_size=8, progress=False)
    model[0].out = None  # made under the build's inference mode
    np.testing.assert_array_equal(fmcache.open_cache(tmp_path / f"c{suffix}").read_batch("0", range(N)),
                                  _truth(model, data, "0"))


def test_a_saca_build_of_a_reused_buffer_keeps_the_base_maps(tmp_path):
    """The variants' forward overwrote the base batch's buffer: every base map was the flip."""
    torch.manual_seed(0)
    model = nn.Sequential(StaticBuffer(), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    data = _data()
    build_saca_cache(model, data, "0", tmp_path / "s.lmdb", policy=CompressionPolicy.constant("raw"),
                     progress=False, batch_size=8,
                     saca=SacaConfig(family=AugFamily(photometric=False), n_samples=8, variants=["flip"]))
    cache = fmcache.open_cache(tmp_path / "s.lmdb")
    model[0].out = None
    np.testing.assert_array_equal(cache.read_batch("0", range(N)), _truth(model, data, "0"))


def test_the_build_restores_each_submodules_own_mode_and_the_fingerprint_moves_no_statistics(tmp_path):
    """model.train(was_training) after the build switched a frozen BatchNorm back to training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 3))
    model.train()
    model[1].eval()
    build_cache(model, _data(), ["3"], tmp_path / "c.lmdb", codec="raw", progress=False)
    assert [m.training for m in model] == [True, False, True, True] and model.training
    build_saca_cache(model, _data(), "3", tmp_path / "s.lmdb", progress=False,  # its calibration too
                     saca=SacaConfig(family=AugFamily(photometric=False), n_samples=8, variants=["flip"]))
    assert [m.training for m in model] == [True, False, True, True] and model.training
    model.train()  # a BatchNorm in training mode: the probe must not update its statistics
    before = model[1].running_mean.clone()
    prefix_fingerprint(model, ["3"], _data()[:4][0])
    assert torch.equal(model[1].running_mean, before) and model[1].training


class TiedDecoder(nn.Module):
    """A prefix that takes a weight straight from a module it never calls (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Linear(6, 5)
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.embedding.weight)  # (N, 5), self.embedding itself never runs
        return self.proj(torch.cat([h, x[:, :1]], 1))


def test_weights_the_forward_uses_directly_are_in_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(TiedDecoder(), nn.Linear(6, 2)).eval()
    data = _data(shape=(6,))
    build_cache(model, data, ["0"], tmp_path / "c.lmdb", codec="raw", progress=False)
    example = data[:2][0]
    assert fmcache.open_cache(tmp_path / "c.lmdb").manifest.fingerprints["weights"] == \
        prefix_fingerprint(model, ["0"], example)
    with torch.no_grad():
        model[0].embedding.weight.add_(0.5)  # the maps change; the modules that ran do not
    with pytest.raises(StaleCacheError, match="weights changed"):
        fmcache.FeatureMapDataset(tmp_path / "c.lmdb", "0", weights_fingerprint=prefix_fingerprint(model, ["0"], example))
    with torch.no_grad():
        model[1].weight.add_(1.0)  # after the boundary: no part of the prefix
    fresh = nn.Sequential(TiedDecoder(), nn.Linear(6, 2)).eval()
    fresh.load_state_dict(model.state_dict())
    fresh[1].weight.data.zero_()
    assert prefix_fingerprint(fresh, ["0"], example) == prefix_fingerprint(model, ["0"], example)


def test_bf16_models_fed_bf16_inputs_build(tmp_path):
    """The data fingerprint called .numpy() on the inputs, which numpy has no dtype for."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).to(torch.bfloat16).eval()
    data = _data(dtype=torch.bfloat16)
    build_cache(model, data, ["1"], tmp_path / "c.lmdb", codec="raw", batch_size=8, progress=False)
    np.testing.assert_array_equal(fmcache.open_cache(tmp_path / "c.lmdb").read_batch("1", range(N)),
                                  _truth(model, data, "1"))


class Forces(nn.Module):
    """A prefix that computes a gradient inside its forward (forces of an energy model)."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return -torch.autograd.grad(self.energy(x).sum(), x)[0]


def test_a_forward_that_needs_autograd_builds_under_no_grad(tmp_path):
    """The build ran the prefix under torch.inference_mode, where no forward can take a gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(Forces(), nn.Linear(6, 2)).eval()
    data = _data(shape=(6,))
    build_cache(model, data, ["0"], tmp_path / "c.lmdb", codec="raw", batch_size=8, progress=False)
    np.testing.assert_allclose(fmcache.open_cache(tmp_path / "c.lmdb").read_batch("0", range(N)),
                               _truth(model, data, "0"), rtol=1e-6, atol=1e-7)


class Spectral(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(x)


class Score(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


@pytest.mark.parametrize("module,match", [(Spectral(), "complex values"), (Score(), "one value per sample")])
def test_outputs_fmcache_cannot_store_are_refused_before_anything_is_written(tmp_path, module, match):
    """A complex output was stored as its real part (a torch warning only); a scalar per
    sample failed with an IndexError."""
    model = nn.Sequential(nn.Conv2d(3, 2, 3), module)
    with pytest.raises(BuildError, match=match):
        build_cache(model, _data(), ["1"], tmp_path / "c.lmdb", codec="raw", progress=False)
    assert not (tmp_path / "c.lmdb").exists()


class SequenceFirst(nn.Module):
    """A transformer encoder layer fed (T, B, D): torch's default batch_first=False."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.flatten(2).transpose(0, 1))  # (B, 6, 8) -> (6, B, 8)


def test_an_output_whose_first_axis_is_not_the_batch_is_named_before_anything_is_written(tmp_path):
    """A sequence-first output (T, B, D) was reported as a batch of shape (6, 8, 8) against
    an 'expected' (8, 2, 8) from the two-sample probe, which said nothing of the axis."""
    with pytest.raises(BuildError, match=r"module 'enc' outputs shape \(6, 2, 8\) for a batch of 2 samples.*"
                                         r"first axis") as info:
        build_cache(SequenceFirst(), _data((6, 2, 4)), ["enc"], tmp_path / "c.lmdb", codec="raw", progress=False)
    assert "batch_first=True" in info.value.hint
    assert not (tmp_path / "c.lmdb").exists()


class Squeeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze()


def test_a_module_that_squeezes_a_batch_of_one_is_named_as_such(tmp_path):
    """25 samples in batches of 8: the last batch holds one sample, which squeeze() drops."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Squeeze())
    with pytest.raises(fmcache.errors.ShapeMismatchError,
                       match=r"batch of shape \(4, 8, 8\) at sample 24, expected \(1, 4, 8, 8\) \(its first "
                             r"axis holds 4, not the batch's 1 samples"):
        build_cache(model, _data(n=25), ["1"], tmp_path / "c.lmdb", codec="raw", batch_size=8, progress=False)


def test_a_model_that_fails_on_the_inputs_is_a_build_error_naming_both_dtypes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    with pytest.raises(BuildError, match=r"inputs \(2, 3, 8, 8\) torch.float64 .* parameters are torch.float32"):
        build_cache(model, _data(dtype=torch.float64), ["1"], tmp_path / "c.lmdb", progress=False)


@pytest.mark.parametrize("kind,match", [("script", "torch.jit.script"), ("trace", "traced model")])
def test_scripted_and_traced_models_are_named_as_such(tmp_path, kind, match):
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    model = torch.jit.script(eager) if kind == "script" else torch.jit.trace(eager, torch.randn(2, 3, 8, 8))
    with pytest.raises(BuildError, match=match):
        build_cache(model, _data(), ["0"], tmp_path / "c.lmdb", progress=False)


class Fallback(nn.Module):
    """A forward that catches Exception (a fallback path) around its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.a(x)
        except Exception:  # noqa: BLE001 - the model's own fallback
            h = torch.zeros(len(x), 4, *x.shape[2:])
        self.b_calls += 1
        return self.b(h)


def test_a_forward_that_catches_exception_still_stops_at_the_boundary(tmp_path):
    torch.manual_seed(0)
    model = Fallback().eval()
    data = _data()
    build_cache(model, data, ["a"], tmp_path / "c.lmdb", codec="raw", batch_size=8, progress=False)
    assert model.b_calls == 0  # nothing after the boundary ran
    with torch.no_grad():
        truth = model.a(torch.stack([data[i][0] for i in range(N)])).numpy()
    np.testing.assert_allclose(fmcache.open_cache(tmp_path / "c.lmdb").read_batch("a", range(N)), truth,
                               rtol=1e-6, atol=1e-6)


def test_h5dump_reads_a_cache_built_from_a_bf16_model(tmp_path):
    """The HDF5 face of such a cache: float32 values h5dump can print."""
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump is not installed (make setup installs hdf5-tools)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3)).to(torch.bfloat16).eval()
    build_cache(model, _data(dtype=torch.bfloat16, n=4), ["0"], tmp_path / "c.h5", codec="raw", progress=False)
    out = subprocess.run(["h5dump", "-m", "%.9g", "-y", "-d", "/layers/0/all/values", "-s", "0,0,0,0",
                          "-c", "1,1,1,1", str(tmp_path / "c.h5")], capture_output=True, text=True, check=True).stdout
    printed = float(out[out.index("DATA {") + len("DATA {"):].split("}")[0].strip())
    assert printed == float(fmcache.open_cache(tmp_path / "c.h5").read("0", 0)[0, 0, 0])


class Tokens(nn.Module):
    """An image model's token boundary ``(N, 16, 8)``: channels 0-3 are the image's mean on
    every token (a flip or a zero-filled shift leaves them a constant vector: sensitivity
    0), channels 4-7 a patch embedding (the tokens move with the image: sensitive)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 4, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, 4)
        mean = x.mean((1, 2, 3))[:, None, None].expand(-1, 16, 4)
        return torch.cat([mean + 1.0, patches], -1)


@pytest.mark.parametrize("n_samples", [16, 12])  # 16 = T: the batch was taken for the channel axis
def test_saca_calibrates_token_maps_over_their_channels(tmp_path, n_samples):
    """Calibration took a token map's T axis for channels (or failed on the stride)."""
    torch.manual_seed(0)
    model = nn.Sequential(Tokens(), nn.Flatten(), nn.Linear(128, 3)).eval()
    data = _data(shape=(1, 16, 16), n=32)
    build_saca_cache(model, data, "0", tmp_path / "t.lmdb", progress=False, policy=CompressionPolicy.constant("raw"),
                     saca=SacaConfig(family=AugFamily(photometric=False), n_samples=n_samples, rho=0.5, variants=["flip"]))
    cache = fmcache.open_cache(tmp_path / "t.lmdb")
    layer = cache.layer("0")
    assert layer.plan.tier("sensitive").channels == (4, 5, 6, 7)
    scores = cache.manifest.layers["0"].extra["sensitivity"]
    assert len(scores) == 8 and max(scores[:4]) < 1e-6 < min(scores[4:])
    ds = fmcache.FeatureMapDataset(tmp_path / "t.lmdb", "0", augment="saca", seed=0)
    maps = ds.get_batch(list(range(8)))[0]
    np.testing.assert_array_equal(maps[:, :, :4].numpy(), cache.read_batch("0", range(8))[:, :, :4])  # T_a = identity


def test_pooled_maps_are_not_shifted_out_of_existence(tmp_path):
    """A (C, 1, 1) boundary (global pooling) at stride 8: a shift of 4 input pixels rounded
    to one map pixel and zero-filled the whole map (a third of the served maps were 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 2)).eval()
    data = _data()
    build_cache(model, data, ["2"], tmp_path / "p.lmdb", codec="raw", progress=False)
    ds = fmcache.FeatureMapDataset(tmp_path / "p.lmdb", "2", augment="feature",
                                   family=AugFamily(max_shift=4, photometric=False), seed=0)
    assert ds.stride == 8
    stored = fmcache.open_cache(tmp_path / "p.lmdb").read_batch("2", range(N))
    np.testing.assert_array_equal(ds.get_batch(list(range(N)))[0].numpy(), stored)  # flip and shift: identity
    np.testing.assert_array_equal(np.stack([ds[i][0].numpy() for i in range(N)]), stored)


class Heads(nn.Module):
    """A token model's 3-axis boundary (heads, T, d): not an image's map."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x).reshape(len(x), 12, 2, 4).transpose(1, 2)  # (N, 2 heads, 12 tokens, 4)


def test_spatial_augmentation_of_maps_whose_inputs_are_not_images_is_refused(tmp_path):
    """Inputs (T, D) = (12, 8) were taken for a 12x8 image: the heads' maps were flipped along d."""
    torch.manual_seed(0)
    model = nn.Sequential(Heads(), nn.Flatten(), nn.Linear(96, 2)).eval()
    build_cache(model, _data(shape=(12, 8)), ["0"], tmp_path / "h.lmdb", codec="raw", progress=False)
    with pytest.raises(fmcache.errors.StrideError, match=r"inputs are \(12, 8\), not images"):
        fmcache.FeatureMapDataset(tmp_path / "h.lmdb", "0", augment="feature")
    assert len(fmcache.FeatureMapDataset(tmp_path / "h.lmdb", "0")) == N  # no augmentation: served


def test_saca_on_inputs_that_are_not_images_says_to_build_a_plain_cache(tmp_path):
    """1-D signals and tabular rows: "calibration inputs must be a non-empty (N, C, H, W)
    batch (hint: ... rho in [0, 1])" meant nothing to their users."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 2)).eval()
    with pytest.raises(fmcache.errors.SensitivityError, match=r"image inputs.*\(8, 2, 16\)") as info:
        build_saca_cache(model, _data(shape=(2, 16)), "1", tmp_path / "s.lmdb", progress=False,
                         saca=SacaConfig(n_samples=8))
    assert "plain cache" in info.value.hint


def test_a_flip_variant_for_a_family_without_flips_is_refused():
    """`--saca --no-flip --variants flip,...` stored a variant no draw would ever serve."""
    with pytest.raises(BuildError, match=r"variants \['flip'\] flip, but the augmentation family has no flip"):
        SacaConfig(family=AugFamily(flip=False), variants=["flip", "shift(0,+2)"])
    assert SacaConfig(family=AugFamily(flip=False), variants=["shift(0,+2)"]).variants == ["shift(0,+2)"]
