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
                "none-label": lambda: (x, None), "string-label": lambda: (x, "shirt")}[self.shape]()


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
