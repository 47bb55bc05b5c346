"""Built-in models whose top-level children run in order, and :func:`split_at`.

Both models are :class:`torch.nn.Sequential` subclasses, so a freeze boundary is just
the name of a top-level child: the prefix is every child up to and including it, the
suffix the rest. Every child that ends a stage ends in a ReLU, so the maps captured at
a boundary are post-ReLU (about 40-50 % exact zeros, see measurements.md).

Boundary shapes per sample for a 32x32 input::

    cifar_resnet18(width=w)      stem w x32x32, layer1 w x32x32, layer2 2w x16x16,
                                 layer3 4w x8x8, layer4 8w x4x4
    small_cnn(width=w)           block1 w x32x32, block2 2w x16x16, block3 4w x8x8
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import BoundaryError, ModelConfigError

__all__ = [
    "BasicBlock", "BoundaryError", "CifarResNet", "ModelConfigError", "cifar_resnet18", "small_cnn", "split_at",
]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity (or 1x1 projection) shortcut.

    The ReLUs are not in-place: a forward hook on the block (or on the previous one) then
    sees a map that nothing downstream overwrites.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Sequential):
    """A ResNet whose top-level children (``stem``, ``layer1``..``layer4``, ``pool``,
    ``flatten``, ``fc``) run in order; build it with :func:`cifar_resnet18`."""


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """The CIFAR-style ResNet-18 (3x3 stem at stride 1, no max-pool).

    Parameters
    ----------
    num_classes : int
        Outputs of the final linear layer.
    in_channels : int
        Input channels (1 for Fashion-MNIST, 3 for RGB).
    width : int
        Channels of the stem and ``layer1``; ``layer2``..``layer4`` have 2, 4 and 8 times
        as many. 64 is the standard network; 16 trains about 16x faster.

    Returns
    -------
    CifarResNet
        An ``nn.Sequential`` with children ``stem`` (conv-bn-relu), ``layer1``..``layer4``
        (two :class:`BasicBlock` each, strides 1, 2, 2, 2), ``pool``
        (``AdaptiveAvgPool2d(1)``), ``flatten`` and ``fc``. Weights are drawn from
        torch's global RNG: seed it for a reproducible model.
    """
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    _check_positive("width", width)
    children: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn_relu(in_channels, width))
    channels = width
    for index, (multiplier, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
        out_channels = width * multiplier
        children[f"layer{index}"] = nn.Sequential(
            BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)
        )
        channels = out_channels
    children["pool"] = nn.AdaptiveAvgPool2d(1)
    children["flatten"] = nn.Flatten()
    children["fc"] = nn.Linear(channels, num_classes)
    model = CifarResNet(children)
    _init_weights(model)
    return model


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A tiny three-block CNN with named children, for fast tests.

    Children: ``block1`` (conv-bn-relu, stride 1), ``block2`` and ``block3`` (stride 2,
    doubling the channels each), ``pool``, ``flatten``, ``fc``. For a 32x32 input the
    blocks output ``width``x32x32, ``2*width``x16x16 and ``4*width``x8x8.
    """
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    _check_positive("width", width)
    model = nn.Sequential(OrderedDict(
        block1=_conv_bn_relu(in_channels, width),
        block2=_conv_bn_relu(width, 2 * width, stride=2),
        block3=_conv_bn_relu(2 * width, 4 * width, stride=2),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(4 * width, num_classes),
    ))
    _init_weights(model)
    return model


def split_at(model: nn.Module, boundary: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a model into the frozen prefix and the trainable suffix at a named child.

    Assumes the model's forward applies its top-level children one after another, in
    registration order, with nothing in between (true for any ``nn.Sequential`` and for
    the models of this module; false for, e.g., a model whose forward reshapes or
    branches between children). Under that assumption ``suffix(prefix(x)) == model(x)``.

    Parameters
    ----------
    model : nn.Module
        The model to split. It is not copied: the halves share its modules, so freezing
        or training either half acts on ``model``.
    boundary : str
        Name of the last top-level child that belongs to the prefix (e.g. ``"layer2"``).

    Returns
    -------
    prefix, suffix : nn.Sequential
        The children up to and including ``boundary``, and the rest (an empty
        ``nn.Sequential``, i.e. the identity, when ``boundary`` is the last child).

    Raises
    ------
    BoundaryError
        ``boundary`` is not the name of a top-level child; the hint lists those names.
    """
    children = list(model.named_children())
    names = [name for name, _ in children]
    if not isinstance(boundary, str) or boundary not in names:
        nested = isinstance(boundary, str) and "." in boundary
        raise BoundaryError(
            f"{boundary!r} is not a top-level child of {type(model).__name__}",
            hint=("split_at takes a top-level child, not a nested module; " if nested else "")
            + f"choose one of: {', '.join(names) or '(the model has no children)'}",
        )
    cut = names.index(boundary) + 1
    return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))
