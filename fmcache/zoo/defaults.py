"""The embedded default as CLI references (``--model``/``--data``): no arguments needed.

``fmcache build --model fmcache.zoo.defaults:resnet18_fmnist --data fmcache.zoo.defaults:fmnist_train``
"""

from __future__ import annotations

from torch import nn

from .fashion_mnist import FashionMNIST
from .pretrain import pretrained_resnet


def resnet18_fmnist() -> nn.Module:
    """The demo's CIFAR-style ResNet-18 (1 input channel, width 8), briefly trained on
    Fashion-MNIST; trained on first use and cached under ``~/.cache/fmcache/zoo``."""
    from ..demo import DEMO_PRETRAIN_STEPS, DEMO_WIDTH

    return pretrained_resnet(width=DEMO_WIDTH, steps=DEMO_PRETRAIN_STEPS)


def fmnist_train(data_dir: str | None = None) -> FashionMNIST:
    """Fashion-MNIST training split, 1x32x32, normalised, no augmentation."""
    return FashionMNIST("train", data_dir=data_dir)


def fmnist_test(data_dir: str | None = None) -> FashionMNIST:
    return FashionMNIST("test", data_dir=data_dir)
