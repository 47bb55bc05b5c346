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
