"""Built-in models and data: a CIFAR-style ResNet-18, a tiny CNN, Fashion-MNIST, pre-training.

Everything here works offline: the data come from the Debian package
``dataset-fashion-mnist`` and the weights from :func:`pretrained_resnet`, which trains
briefly and caches the result.
"""

from .fashion_mnist import DataError, DataFileNotFoundError, FashionMNIST, load_split, read_idx
from .pretrain import (
    TrainingError,
    accuracy,
    channels_last_is_safe,
    default_cache_dir,
    native_bf16,
    pretrain,
    pretrained_resnet,
)
from .resnet import BoundaryError, ModelConfigError, cifar_resnet18, small_cnn, split_at

__all__ = [
    "BoundaryError",
    "DataError",
    "DataFileNotFoundError",
    "FashionMNIST",
    "ModelConfigError",
    "TrainingError",
    "accuracy",
    "channels_last_is_safe",
    "cifar_resnet18",
    "default_cache_dir",
    "load_split",
    "native_bf16",
    "pretrain",
    "pretrained_resnet",
    "read_idx",
    "small_cnn",
    "split_at",
]
