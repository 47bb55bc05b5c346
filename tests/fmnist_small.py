"""Small real-data fixtures for end-to-end tests: Fashion-MNIST subsets and a tiny CNN.

Importable by subprocesses and spawned workers (as ``fmnist_small:...`` with tests/ on
the path), so references such as ``--data fmnist_small:train_subset`` work.
"""

from __future__ import annotations

import torch

from fmcache.zoo import FashionMNIST, small_cnn

N_SAMPLES = 96


def train_subset() -> FashionMNIST:
    return FashionMNIST("train", limit=N_SAMPLES)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, width=4)
    # A few BN statistics that are not the identity, so maps look trained-ish.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _Reshaped(torch.utils.data.Dataset):
    """:func:`train_subset`'s items in another shape (a new user's data set)."""

    def __init__(self, shape: str) -> None:
        self.base, self.shape = train_subset(), shape

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> object:
        x, y = self.base[i]
        return {"dict": lambda: {"image": x, "label": y}, "triple": lambda: (x, y, i), "input-only": lambda: x,
                "none-label": lambda: (x, None), "string-label": lambda: (x, "shirt"),
                "ragged": lambda: (x[..., : 32 - i % 2], y)}[self.shape]()


def dict_items() -> torch.utils.data.Dataset:
    return _Reshaped("dict")


def triple_items() -> torch.utils.data.Dataset:
    return _Reshaped("triple")


def input_only() -> torch.utils.data.Dataset:
    return _Reshaped("input-only")


def none_labels() -> torch.utils.data.Dataset:
    return _Reshaped("none-label")


def string_labels() -> torch.utils.data.Dataset:
    return _Reshaped("string-label")


def ragged_inputs() -> torch.utils.data.Dataset:
    """Inputs of two widths: 32 for even items, 31 for odd ones."""
    return _Reshaped("ragged")


def empty_data() -> torch.utils.data.Dataset:
    return torch.utils.data.TensorDataset(torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(train_subset())


def streamed_data() -> torch.utils.data.IterableDataset:
    return _Stream()


def not_a_model() -> int:
    return 42


def nan_model() -> torch.nn.Module:
    """:func:`tiny_model` whose ``block1`` maps hold NaN and Inf (a diverged prefix)."""
    model = tiny_model()

    def poison(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output.view(len(output), -1)[:, 0] = float("nan")
        output.view(len(output), -1)[:, 1] = float("inf")
        return output

    model.get_submodule("block1").register_forward_hook(poison)
    return model
