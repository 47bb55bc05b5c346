"""The built-in zoo: model boundaries and split_at, the IDX reader, Fashion-MNIST, pre-training."""

from __future__ import annotations

import gzip
import importlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fmcache.errors import FmcacheError
from fmcache.zoo import (
    BoundaryError,
    DataError,
    DataFileNotFoundError,
    FashionMNIST,
    ModelConfigError,
    TrainingError,
    channels_last_is_safe,
    cifar_resnet18,
    fashion_mnist,
    pretrain,
    pretrained_resnet,
    read_idx,
    small_cnn,
    split_at,
)

# ``fmcache.zoo.pretrain`` the attribute is the function; the module is in sys.modules.
pretrain_module = importlib.import_module("fmcache.zoo.pretrain")

HAVE_FMNIST = all((fashion_mnist.DEFAULT_DATA_DIR / name).exists() for pair in fashion_mnist._FILES.values()
                  for name in pair)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None, cut: int = 0) -> Path:
    """A gzip IDX file of ``array`` (uint8); ``magic`` overrides the first 4 bytes, ``cut`` drops trailing bytes."""
    header = (magic if magic is not None else bytes([0, 0, 8, array.ndim]))
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[:len(raw) - cut]))
    return path


def boundary_shapes(model: torch.nn.Module, in_channels: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [child.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
             for name, child in model.named_children()]
    with torch.no_grad():
        model.eval()(torch.zeros(2, in_channels, 32, 32))
    for hook in hooks:
        hook.remove()
    return shapes


# ---- models ----------------------------------------------------------------------------

RESNET_W16 = {"stem": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8),
              "layer4": (128, 4, 4), "pool": (128, 1, 1), "flatten": (128,), "fc": (10,)}
SMALL_W16 = {"block1": (16, 32, 32), "block2": (32, 16, 16), "block3": (64, 8, 8), "pool": (64, 1, 1),
             "flatten": (64,), "fc": (10,)}


@pytest.mark.parametrize(("make", "in_channels", "expected"), [
    (lambda: cifar_resnet18(width=16), 3, RESNET_W16),
    (lambda: cifar_resnet18(in_channels=1, width=16), 1, RESNET_W16),
    (lambda: small_cnn(width=16), 1, SMALL_W16),
], ids=["resnet18-w16-rgb", "resnet18-w16-grey", "small_cnn-w16"])
def test_boundary_shapes_in_order(make, in_channels, expected):
    shapes = boundary_shapes(make(), in_channels)
    assert list(shapes) == list(expected)  # children are named and run in this order
    assert shapes == expected


def test_resnet18_width64_has_the_standard_layout():
    model = cifar_resnet18()
    assert boundary_shapes(model, 3)["layer3"] == (256, 8, 8)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18 count


@pytest.mark.parametrize("width", [0, -1, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_width_is_a_typed_error(width):
    with pytest.raises(ModelConfigError, match="width"):
        cifar_resnet18(width=width)


@pytest.mark.parametrize(("make", "in_channels", "boundary"), [
    *[(lambda: cifar_resnet18(in_channels=1, width=4), 1, name)
      for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")],
    *[(lambda: small_cnn(width=4), 1, name) for name in ("block1", "block2", "block3")],
], ids=lambda value: value if isinstance(value, str) else "")
def test_split_prefix_then_suffix_equals_model(make, in_channels, boundary):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, in_channels, 32, 32)
    prefix, suffix = split_at(model, boundary)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))
    assert list(prefix.named_children())[-1][0] == boundary


def test_split_shares_modules_with_the_model():
    model = small_cnn(width=4)
    prefix, suffix = split_at(model, "block2")
    assert prefix.block1 is model.block1 and suffix.fc is model.fc
    assert [name for name, _ in suffix.named_children()] == ["block3", "pool", "flatten", "fc"]


@pytest.mark.parametrize(("boundary", "in_hint"), [
    ("layer9", "stem, layer1"), ("layer1.0", "nested"), ("", "choose one of"),
], ids=["unknown", "nested", "empty"])
def test_split_at_unknown_boundary(boundary, in_hint):
    with pytest.raises(BoundaryError) as info:
        split_at(cifar_resnet18(width=4), boundary)
    assert isinstance(info.value, KeyError) and isinstance(info.value, FmcacheError)
    assert repr(boundary) in str(info.value) and in_hint in info.value.hint


# ---- IDX reader -----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(arrays(np.uint8, st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)))
def test_idx_round_trip(tmp_path_factory, array):
    path = write_idx(tmp_path_factory.mktemp("idx") / "a-idx-ubyte.gz", array)
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"magic": bytes([1, 0, 8, 3])}, "bad IDX magic"),
    ({"magic": bytes([0, 0, 0x0D, 3])}, "dtype code 0x0d"),
    ({"magic": bytes([0, 0, 8, 0])}, "0 dimensions"),
    ({"cut": 1}, "truncated"),
    ({"cut": 2 * 4 * 4 + 10}, "truncated IDX header"),
], ids=["magic", "dtype", "ndim", "truncated-data", "truncated-header"])
def test_idx_format_errors_name_the_file(tmp_path, kwargs, message):
    path = write_idx(tmp_path / "bad-idx3-ubyte.gz", np.zeros((2, 4, 4), np.uint8), **kwargs)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_idx_trailing_bytes_are_an_error(tmp_path):
    path = tmp_path / "long-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\x01\x02\x03"))
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize("damage", ["cut-gzip", "not-gzip"])
def test_damaged_gzip_is_a_typed_error(tmp_path, damage):
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", np.arange(64, dtype=np.uint8).reshape(1, 8, 8))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "cut-gzip" else b"plain bytes, not gzip at all")
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        read_idx(tmp_path / "absent.gz")
    assert isinstance(info.value, FileNotFoundError)


# ---- Fashion-MNIST from a small fake folder ------------------------------------------------------

def fake_split(folder: Path, split: str = "train", n: int = 6, n_labels: int | None = None) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images_name, labels_name = fashion_mnist._FILES[split]
    write_idx(folder / images_name, images)
    write_idx(folder / labels_name, (np.arange(n if n_labels is None else n_labels) % 10).astype(np.uint8))
    return images


def test_missing_data_dir_hints_at_the_package(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        FashionMNIST("test", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_image_and_label_counts_must_match(tmp_path):
    fake_split(tmp_path, n=4, n_labels=5)
    with pytest.raises(DataError, match="4 images .* 5 labels"):
        FashionMNIST(data_dir=tmp_path)


def test_unnormalised_sample_is_the_centred_image(tmp_path):
    images = fake_split(tmp_path)
    dataset = FashionMNIST(data_dir=tmp_path, normalize=False, channels=3)
    x, label = dataset[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == 4 and isinstance(label, int)
    np.testing.assert_allclose(x[1, 2:30, 2:30].numpy(), images[4] / 255, rtol=1e-6)
    assert x[:, :2].abs().sum() == 0 and torch.equal(x[0], x[2])


def test_normalised_sample_uses_mean_and_std(tmp_path):
    fake_split(tmp_path)
    plain, _ = FashionMNIST(data_dir=tmp_path, normalize=False)[1]
    normed, _ = FashionMNIST(data_dir=tmp_path)[1]
    torch.testing.assert_close(normed, (plain - 0.2860) / 0.3530)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "val"}, "split"), ({"pad_to": 20}, "pad_to"), ({"channels": 2}, "channels"),
    ({"limit": -1}, "limit"), ({"seed": -3}, "seed"),
], ids=["split", "pad_to", "channels", "limit", "seed"])
def test_bad_parameters_are_typed_errors(tmp_path, kwargs, message):
    fake_split(tmp_path)
    with pytest.raises(DataError, match=message):
        FashionMNIST(data_dir=tmp_path, **kwargs)


def test_augmentation_is_a_crop_shift_and_maybe_a_flip(tmp_path):
    fake_split(tmp_path)
    plain = FashionMNIST(data_dir=tmp_path, normalize=False)
    augmented = FashionMNIST(data_dir=tmp_path, normalize=False, augment=True, seed=1)
    padded = torch.nn.functional.pad(plain[2][0], (4, 4, 4, 4))
    candidates = [padded[:, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    for epoch in range(4):
        augmented.set_epoch(epoch)
        x, _ = augmented[2]
        assert any(torch.equal(x, c) for c in candidates)


def test_seeded_augmentation_depends_on_seed_epoch_and_sample_only(tmp_path):
    fake_split(tmp_path)
    make = lambda seed: FashionMNIST(data_dir=tmp_path, augment=True, seed=seed)
    first, again, copy = make(7), make(7), pickle.loads(pickle.dumps(make(7)))
    torch.manual_seed(123)  # the global RNG must not matter
    draws = [first[i][0] for i in range(6)]
    assert all(torch.equal(draws[i], again[i][0]) and torch.equal(draws[i], copy[i][0]) for i in range(6))
    first.set_epoch(1)
    assert not all(torch.equal(draws[i], first[i][0]) for i in range(6))
    assert not all(torch.equal(draws[i], make(8)[i][0]) for i in range(6))


def test_unseeded_augmentation_follows_torch_global_rng(tmp_path):
    fake_split(tmp_path)
    dataset = FashionMNIST(data_dir=tmp_path, augment=True)
    torch.manual_seed(5)
    first = [dataset[i][0] for i in range(6)]
    torch.manual_seed(5)
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))


def test_dataset_pickles_without_handles(tmp_path):
    fake_split(tmp_path)
    dataset = FashionMNIST(data_dir=tmp_path, limit=4)
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy) == 4 and all(torch.equal(dataset[i][0], copy[i][0]) for i in range(4))
    assert set(vars(copy)) == {"split", "pad_to", "channels", "augment", "normalize", "seed", "epoch",
                               "images", "labels"}


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_seeded_augmentation_is_the_same_in_worker_processes(tmp_path):
    fake_split(tmp_path)
    dataset = FashionMNIST(data_dir=tmp_path, augment=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    from_workers = torch.cat([x for x, _ in loader])
    assert torch.equal(from_workers, torch.stack([dataset[i][0] for i in range(len(dataset))]))


def test_index_out_of_range(tmp_path):
    fake_split(tmp_path)
    dataset = FashionMNIST(data_dir=tmp_path)
    assert torch.equal(dataset[-1][0], dataset[5][0])
    with pytest.raises(IndexError):
        dataset[6]


# ---- the real data set -----------------------------------------------------------------------

@needs_fmnist
@pytest.mark.parametrize(("factory", "length", "first_labels"), [
    (fashion_mnist.train, 60000, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9, 5, 5, 7, 9, 1, 0, 6, 4]),
    (fashion_mnist.test, 10000, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0]),
], ids=["train", "test"])
def test_real_fashion_mnist(factory, length, first_labels):
    dataset = factory()
    assert len(dataset) == length
    assert [dataset[i][1] for i in range(20)] == first_labels
    assert np.bincount(dataset.labels, minlength=10).tolist() == [length // 10] * 10


@needs_fmnist
def test_real_training_pixels_have_the_documented_statistics():
    images, _ = fashion_mnist.load_split("train")
    pixels = images.astype(np.float32) / 255
    assert abs(float(pixels.mean()) - fashion_mnist.MEAN) < 1e-3
    assert abs(float(pixels.std()) - fashion_mnist.STD) < 1e-3
    assert not images.flags.writeable  # shared between data sets of the process


@needs_fmnist
def test_real_limit_and_channels():
    dataset = FashionMNIST("test", limit=10, channels=3)
    x, _ = dataset[9]
    assert len(dataset) == 10 and x.shape == (3, 32, 32)


# ---- pre-training -------------------------------------------------------------------------------

@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_pretrain_trains_inside_a_no_grad_context(tmp_path, context):
    """A capture helper decorated with ``@torch.no_grad()`` that calls ``pretrained_resnet``
    for a model not cached yet failed in ``backward`` ("does not require grad"): pretraining
    now turns grad on itself and trains the same weights as outside the context."""
    fake_split(tmp_path, n=40)
    data = FashionMNIST(data_dir=tmp_path, augment=True, seed=0)

    def run(inside):
        torch.manual_seed(0)
        model = small_cnn(width=4)
        if not inside:
            return pretrain(model, data, steps=3, batch_size=16, seed=0, num_threads=1).state_dict()
        with context():
            return pretrain(model, data, steps=3, batch_size=16, seed=0, num_threads=1).state_dict()

    torch.manual_seed(0)
    initial = small_cnn(width=4).state_dict()
    outside, inside = run(False), run(True)
    assert all(torch.equal(outside[k], inside[k]) for k in outside)
    assert not all(torch.equal(initial[k], inside[k]) for k in initial)


def test_pretrain_is_deterministic_given_the_seed(tmp_path):
    fake_split(tmp_path, n=40)
    data = FashionMNIST(data_dir=tmp_path, augment=True, seed=0)

    def run(seed):
        torch.manual_seed(0)
        model = pretrain(small_cnn(width=4), data, steps=3, batch_size=16, seed=seed, num_threads=1)
        assert not model.training
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(("make", "safe"), [
    (lambda: cifar_resnet18(width=4), False), (lambda: cifar_resnet18(width=8), False),
    (lambda: cifar_resnet18(width=16), True), (lambda: small_cnn(width=4), True),
], ids=["resnet-w4", "resnet-w8", "resnet-w16", "small_cnn-w4"])
def test_channels_last_avoids_the_onednn_1x1_bug(make, safe):
    # narrow strided 1x1 convs hang or mistrain in channels-last (uxlfoundation/oneDNN#6035)
    assert channels_last_is_safe(make()) is safe


def test_pretrain_refuses_a_data_set_smaller_than_a_batch(tmp_path):
    fake_split(tmp_path, n=6)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        pretrain(small_cnn(width=4), FashionMNIST(data_dir=tmp_path), steps=1, batch_size=8)


def test_thread_count_from_environment_must_be_an_integer(tmp_path, monkeypatch):
    fake_split(tmp_path, n=8)
    monkeypatch.setenv(pretrain_module.THREADS_ENV, "many")
    with pytest.raises(TrainingError, match="FMCACHE_NUM_THREADS"):
        pretrain(small_cnn(width=4), FashionMNIST(data_dir=tmp_path), steps=1, batch_size=8)


def test_pretrained_resnet_is_cached_by_recipe(tmp_path, monkeypatch):
    fake_split(tmp_path / "data", n=130)
    model = pretrained_resnet(width=8, steps=1, cache_dir=tmp_path / "zoo", data_dir=tmp_path / "data")
    files = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert files == ["cifar_resnet18-fmnist-w8-s1-seed0-r1.pt"] and not model.training

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must be loaded, not trained")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    again = pretrained_resnet(width=8, steps=1, cache_dir=tmp_path / "zoo", data_dir=tmp_path / "data")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_unreadable_cached_model_is_trained_again(tmp_path):
    fake_split(tmp_path / "data", n=130)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "cifar_resnet18-fmnist-w8-s1-seed0-r1.pt").write_bytes(b"not a state dict")
    with pytest.warns(UserWarning, match="could not be loaded"):
        model = pretrained_resnet(width=8, steps=1, cache_dir=tmp_path / "zoo", data_dir=tmp_path / "data")
    loaded = torch.load(tmp_path / "zoo" / "cifar_resnet18-fmnist-w8-s1-seed0-r1.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_weights_that_cannot_be_kept_still_serve_the_run(tmp_path, caplog):
    """A read-only cache folder threw the trained model away after minutes of training
    (an OSError with no hint); the first use said nothing while it trained."""
    import logging

    fake_split(tmp_path / "data", n=130)
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="could not be kept .*XDG_CACHE_HOME"):
        model = pretrained_resnet(width=8, steps=1, cache_dir=tmp_path / "file" / "zoo", data_dir=tmp_path / "data")
    assert not model.training and "first use: training" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]
