"""Builds from data and models a new user brings (session 14's sweeps): forwards that
change their inputs in place, uint8 images, integer or float64 outputs float32 cannot
hold, inputs whose shape changes after the first batch, bad labels after the first item,
a ``__len__`` that lies, ``torch.compile`` wrappers, per-channel normalisation, and
FreezingTrainer plans that failed only after epochs of training. Each test fails on the
code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import fmcache
from fmcache.augment import AugDraw, AugFamily, apply_input
from fmcache.builder import SacaConfig, build_cache, build_saca_cache, prefix_fingerprint
from fmcache.calibrate import PixelSpace, augment_inputs, calibrate
from fmcache.cli import main
from fmcache.codecs import codec_from_spec
from fmcache.errors import DataError, EncodeError, FreezeError, SensitivityError
from fmcache.freezing import CacheRecipe, FreezeSchedule, FreezingTrainer
from fmcache.policy import CompressionPolicy

N = 12
FLIP_ONLY = SacaConfig(family=AugFamily(photometric=False, max_shift=0), rho=0.5, variants=["flip"], n_samples=8)


class InPlaceNormalising(nn.Module):
    """Normalises its input batch in place, as some preprocessing-in-the-model code does."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).div_(0.25)
        return self.d(self.c(x))


class ScalesUint8(nn.Module):
    """Scales uint8 inputs itself (torchvision's to_dtype(scale=True) inside the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.d(self.c(x))


def _variants_of(path, layer):
    """(sensitive channels, base maps, flip variant of the sensitive channels) of a SACA cache."""
    cache = fmcache.open_cache(path)
    sens = [c for t in cache.layers[layer].plan.tiers if t.name == "sensitive" for c in t.channels]
    parts = cache.read_parts(layer, list(range(len(cache))))
    return sens, cache.read_batch(layer, range(len(cache))), parts["sensitive@flip"]


def test_saca_variants_of_a_forward_that_changes_its_input_in_place_are_true_maps(tmp_path):
    """The variants were computed from the batch the base forward had already normalised."""
    torch.manual_seed(0)
    model = InPlaceNormalising().eval()
    x = torch.rand(N, 1, 8, 8)
    data = TensorDataset(x.clone(), torch.arange(N))
    build_saca_cache(model, data, "c", tmp_path / "s.lmdb", saca=FLIP_ONLY, progress=False, batch_size=4,
                     policy=CompressionPolicy.constant("raw"))
    sens, base, flipped = _variants_of(tmp_path / "s.lmdb", "c")
    with torch.no_grad():
        true_base = model.c((x - 0.5) / 0.25).numpy()
        true_flip = model.c((torch.flip(x, dims=[-1]) - 0.5) / 0.25).numpy()
    np.testing.assert_allclose(base, true_base, atol=1e-5)
    np.testing.assert_allclose(flipped, true_flip[:, sens], atol=1e-5)
    assert torch.equal(data.tensors[0], x)  # and the data set's own tensors are left alone


def test_calibration_of_an_in_place_forward_equals_that_of_the_same_forward_without(tmp_path):
    torch.manual_seed(0)
    model = InPlaceNormalising().eval()

    class OutOfPlace(nn.Module):
        def forward(self, x):
            return model.d(model.c((x - 0.5) / 0.25))

    plain = OutOfPlace()
    plain.c, plain.d = model.c, model.d
    data = TensorDataset(torch.rand(N, 1, 8, 8), torch.arange(N))
    family = AugFamily(photometric=False, max_shift=1)
    got = calibrate(model, "c", data, family, n_samples=N).scores
    want = calibrate(plain, "c", data, family, n_samples=N).scores
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_uint8_inputs_get_uint8_variants_the_model_scales_itself(tmp_path):
    """The variants reached the model as float32 0..255, which it did not scale (255x maps)."""
    torch.manual_seed(0)
    model = ScalesUint8().eval()
    x = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8)
    build_saca_cache(model, TensorDataset(x, torch.arange(N)), "c", tmp_path / "u.lmdb", saca=FLIP_ONLY,
                     progress=False, batch_size=4, policy=CompressionPolicy.constant("raw"))
    sens, _, flipped = _variants_of(tmp_path / "u.lmdb", "c")
    with torch.no_grad():
        true_flip = model.c(torch.flip(x, dims=[-1]).float() / 255).numpy()
    np.testing.assert_allclose(flipped, true_flip[:, sens], atol=1e-5)


def test_augment_inputs_keeps_an_integer_dtype_and_refuses_a_normalisation_for_it():
    x = torch.tensor([[[[10, 200, 250]]]], dtype=torch.uint8)
    out = augment_inputs(x, AugDraw(False, 0, 0, brightness=1.5, contrast=1.0))
    assert out.dtype == torch.uint8 and out.tolist() == [[[[15, 255, 255]]]]  # rounded, clamped to uint8
    flipped = augment_inputs(x, AugDraw(True, 0, 0), PixelSpace(value_range=(0, 255)))
    assert flipped.tolist() == [[[[250, 200, 10]]]]
    with pytest.raises(SensitivityError, match="integer inputs are raw pixels"):
        augment_inputs(x, AugDraw(True, 0, 0), PixelSpace(0.5, 0.25))


def test_per_channel_normalisation_pads_each_channel_with_its_own_black():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = torch.rand(2, 3, 6, 6)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    normalised = (raw - m) / s
    draw = AugDraw(True, 2, -1)
    got = augment_inputs(normalised, draw, PixelSpace(mean, std, (0, 1)))
    want = (apply_input(raw, draw, value_range=(0, 1)) - m) / s
    torch.testing.assert_close(got, want)
    assert torch.allclose(got[:, :, :2], (-m / s).expand(2, 3, 2, 6))  # the padded rows: black per channel
    assert PixelSpace.from_config(PixelSpace(mean, std).get_config()) == PixelSpace(mean, std)
    with pytest.raises(SensitivityError, match="3 means"):
        augment_inputs(torch.rand(1, 4, 6, 6), draw, PixelSpace(mean, std))
    from fmcache.cli import _pixel_space

    assert _pixel_space("0.485/0.456/0.406,0.229/0.224/0.225,0,1") == PixelSpace(mean, std, (0.0, 1.0))
    assert _pixel_space("0.5,0.25") == PixelSpace(0.5, 0.25)
    for bad in ("1/2,3/4/5", "0,0", "a,b", "0,1,0/1,2"):
        with pytest.raises(Exception, match="is not MEAN,STD"):
            _pixel_space(bad)


class IdsOut(nn.Module):
    """Outputs integer ids (VQ codes, hashed ids)."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.ids = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ids((x * 1000).long() + self.offset)


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_integer_outputs_are_stored_exactly_or_refused(tmp_path, suffix):
    """int64 ids above 2**24 became other ids in float32 (off by up to 65523), silently."""
    x = torch.rand(N, 2, 3)
    data = TensorDataset(x, torch.arange(N))
    build_cache(IdsOut(7), data, ["ids"], tmp_path / f"small{suffix}", codec="raw", progress=False)
    np.testing.assert_array_equal(fmcache.open_cache(tmp_path / f"small{suffix}").read_batch("ids", range(N)),
                                  ((x * 1000).long() + 7).numpy())
    with pytest.raises(EncodeError, match=r"layer 'ids'.*int64 values up to \d+ are not exact in float32"):
        build_cache(IdsOut(2**30), data, ["ids"], tmp_path / f"big{suffix}", codec="raw", progress=False)


def test_float64_beyond_float32_is_an_encode_error_not_inf():
    """1e39 (finite in float64) was stored as inf (or called NaN/Inf from the prefix)."""
    for spec in ("bf16", "fp16", "raw", "blosc2", "int8", "zfp:accuracy=0.01"):
        with pytest.raises(EncodeError, match="beyond float32's range"):
            codec_from_spec(spec).encode(np.array([[1e39, 1.0], [2.0, -5e38]]))


def test_a_torch_bf16_tensor_encodes_as_its_float32_values():
    t = torch.randn(2, 3, 4).to(torch.bfloat16)
    codec = codec_from_spec("bf16")
    np.testing.assert_array_equal(codec.decode(codec.encode(t)), t.float().numpy())


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
def test_writer_refuses_float64_overflow_by_layer_and_sample(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    with fmcache.create_cache(path, allow_nonfinite=True) as w:
        w.add_layer("l", (2, 2), codec="raw")
        w.append({"l": np.ones((4, 2, 2))}, np.arange(4))
        big = np.ones((4, 2, 2))
        big[1, 0, 0] = 1e300
        with pytest.raises(EncodeError, match=r"layer 'l', sample 5: finite float64 values"):
            w.append({"l": big}, np.arange(4))
    with fmcache.create_cache(tmp_path / f"ids{suffix}") as w:
        w.add_layer("l", (2, 2), codec="raw")
        ids = np.ones((4, 2, 2), np.int64)
        ids[3, 1, 1] = 2**25
        with pytest.raises(EncodeError, match=r"layer 'l', sample 3: int64 values up to 33554432 are not exact"):
            w.append({"l": ids}, np.arange(4))


@pytest.mark.parametrize("suffix", [".lmdb", ".h5"])
@pytest.mark.parametrize(("codec", "too_large"), [("fp16", 1e6), ("bf16", 3.4e38)])
def test_encode_errors_name_the_cache_layer_part_and_sample(tmp_path, suffix, codec, too_large):
    """An fp16 range error named no layer; HDF5's zfp refusal named the sample's place in
    its batch; the casts check a whole batch at once, and the sample is still found."""
    path = tmp_path / f"c{suffix}"
    with fmcache.create_cache(path) as w:
        w.add_layer("conv", (2, 2, 2), codec=codec)
        w.append({"conv": np.ones((4, 2, 2, 2), np.float32)}, np.arange(4))
        bad = np.ones((4, 2, 2, 2), np.float32)
        bad[1] = too_large
        with pytest.raises(EncodeError, match=rf"c{suffix}.partial: layer 'conv' part 'all', sample 5: "
                                              rf"codec '{codec}'"):
            w.append({"conv": bad}, np.arange(4))


def test_hdf5_zfp_refusal_names_the_cache_sample_not_its_place_in_the_batch(tmp_path):
    with fmcache.create_cache(tmp_path / "z.h5") as w:
        w.add_layer("conv", (2, 2, 2), codec="zfp:accuracy=1e-12")
        w.append({"conv": np.zeros((4, 2, 2, 2), np.float32)}, np.arange(4))
        bad = np.zeros((4, 2, 2, 2), np.float32)
        bad[2] = 3.0
        with pytest.raises(EncodeError, match=r"layer 'conv' part 'all', sample 6: .*too tight"):
            w.append({"conv": bad}, np.arange(4))


class Items(Dataset):
    def __init__(self, n=N, shape_after=None, label_at=None, bad_label=None, length=None) -> None:
        self.n, self.shape_after, self.label_at, self.bad_label, self.length = n, shape_after, label_at, bad_label, length

    def __len__(self) -> int:
        return self.length or self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(f"index {i} is out of bounds")
        g = torch.Generator().manual_seed(i)
        size = 16 if self.shape_after is not None and i >= self.shape_after else 8
        label = self.bad_label if i == self.label_at else i % 3
        return torch.rand(3, size, size, generator=g), label


def _pool_model():
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Conv2d(2, 2, 1)).eval()


def test_inputs_that_change_shape_after_the_first_batch_are_refused_by_item(tmp_path):
    """A pool made every map 4x4, so the build passed and feature augmentation used the
    first inputs' stride (2) for the 16x16 ones (stride 4)."""
    with pytest.raises(DataError, match=r"data set items 8-11: inputs of shape \(3, 16, 16\), the first "
                                        r"items' are \(3, 8, 8\)"):
        build_cache(_pool_model(), Items(shape_after=8), ["1"], tmp_path / "c.lmdb", codec="raw",
                    progress=False, batch_size=4)


@pytest.mark.parametrize("bad", [None, "cat", {"y": 1}])
def test_a_bad_label_after_the_first_item_is_a_data_error_naming_its_batch(tmp_path, bad):
    with pytest.raises(DataError, match=r"data set items 8-11: a label is .*labels must be numeric") as info:
        build_cache(_pool_model(), Items(label_at=9, bad_label=bad), ["1"], tmp_path / "c.lmdb", codec="raw",
                    progress=False, batch_size=4)
    assert "--resume" in info.value.hint
    cache = fmcache.create_cache(tmp_path / "c.lmdb", resume=True)  # the batches before it are kept
    assert cache.samples == 8
    cache.close()


def test_numpy_uint64_labels_are_stored(tmp_path):
    data = [(torch.rand(3, 8, 8), np.uint64(i % 5)) for i in range(N)]
    build_cache(_pool_model(), data, ["1"], tmp_path / "c.lmdb", codec="raw", progress=False, batch_size=4)
    np.testing.assert_array_equal(fmcache.open_cache(tmp_path / "c.lmdb").labels, np.arange(N) % 5)


def test_a_len_that_claims_more_items_than_exist_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"says it has 20 items \(len\(\)\), but item 1\d raises IndexError"):
        build_cache(_pool_model(), Items(length=20), ["1"], tmp_path / "c.lmdb", codec="raw", progress=False)
    assert not (tmp_path / "c.lmdb").exists()


def test_a_compiled_model_builds_under_the_eager_names_and_fingerprint(tmp_path):
    """Layers had to be named _orig_mod.*, and the eager model's fingerprint did not match."""
    torch.manual_seed(0)
    model = _pool_model()
    compiled = torch.compile(model, backend="eager")
    data = Items()
    build_cache(compiled, data, ["1"], tmp_path / "c.lmdb", codec="raw", progress=False)
    example = torch.stack([data[i][0] for i in range(2)])
    assert prefix_fingerprint(compiled, ["1"], example) == prefix_fingerprint(model, ["1"], example)
    fmcache.open_cache(tmp_path / "c.lmdb", weights_fingerprint=prefix_fingerprint(model, ["1"], example))


class Blocks(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 3))


def test_freezing_trainer_refuses_up_front_what_failed_after_epochs(tmp_path):
    """9x9 inputs and a 4x4 map: StrideError at the freeze point; float labels: torch's
    "expected target dtype Long" at the first step."""
    torch.manual_seed(0)
    odd = TensorDataset(torch.rand(16, 3, 9, 9), torch.arange(16) % 3)
    common = {"epochs": 3, "work_dir": tmp_path, "schedule": FreezeSchedule({1: "1"}), "batch_size": 8}
    with pytest.raises(FreezeError, match=r"freezing up to '1': .*9x9|freezing up to '1':"):
        FreezingTrainer(Blocks(), odd, odd, recipe=CacheRecipe(kind="plain", augment="feature"), **common)
    FreezingTrainer(Blocks(), odd, odd, recipe=CacheRecipe(kind="plain", augment="none"), **common)
    floats = TensorDataset(torch.rand(16, 3, 8, 8), torch.rand(16))
    with pytest.raises(FreezeError, match="cross-entropy over integer classes"):
        FreezingTrainer(Blocks(), floats, floats, recipe=CacheRecipe(kind="plain", augment="none"), **common)


def test_cli_takes_per_channel_pixels(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "x:y", "--data", "x:y", "--layer", "l", "--out",
                                       str(tmp_path / "c.lmdb"), "--saca", "--pixels", "1/2,3/4/5"])
    assert result.exit_code == 2 and "is not MEAN,STD" in result.output


def test_a_small_raw_hdf5_cache_is_not_a_whole_chunk_larger_than_its_maps(tmp_path):
    """50 samples of raw maps took 1 MiB: HDF5 allocates an unfiltered chunk (1,024
    samples of a small map) whole."""
    data = Items(n=50)
    build_cache(_pool_model(), data, ["1"], tmp_path / "c.h5", codec="raw", progress=False)
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        info = cache.layers["1"]
        assert info.samples_per_chunk == 50
        assert sum(info.stored_bytes.values()) <= 1.1 * sum(info.raw_bytes.values())


def test_a_resume_keeps_the_chunk_length_the_build_began_with(tmp_path, monkeypatch):
    """A partial begun with other chunk lengths (an older fmcache chose them otherwise)
    must resume, not fail on "another layout"."""
    import fmcache.builder as builder_mod

    model = _pool_model()
    with monkeypatch.context() as patch:
        patch.setattr(builder_mod, "default_samples_per_chunk", lambda shape: 4)
        with pytest.raises(DataError, match="data set items 8-11"):
            build_cache(model, Items(label_at=9, bad_label=None), ["1"], tmp_path / "c.h5", codec="raw",
                        progress=False, batch_size=4)
    build_cache(model, Items(), ["1"], tmp_path / "c.h5", codec="raw", progress=False, batch_size=4,
                resume=True, allow_stale=True)  # the data's fingerprint saw the label fixed
    with fmcache.open_cache(tmp_path / "c.h5") as cache:
        assert cache.layers["1"].samples_per_chunk == 4 and len(cache) == N
