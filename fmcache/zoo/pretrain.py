"""Brief, deterministic pre-training, so benchmarks and demos get realistic feature maps.

No ResNet weights can be had offline (measurements.md), and an untrained network's maps
are not what a frozen prefix produces: a few hundred SGD steps on Fashion-MNIST give
post-ReLU maps with the zero fraction and channel structure of a trained one.

:func:`pretrained_resnet` keeps the result on disk, keyed by its recipe::

    <cache_dir>/cifar_resnet18-fmnist-w{width}-s{steps}-seed{seed}-r{RECIPE_VERSION}.pt

(a plain ``state_dict``, written to a temp file and renamed into place).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Sized
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import TrainingError
from .fashion_mnist import FashionMNIST
from .resnet import cifar_resnet18

__all__ = [
    "THREADS_ENV", "TrainingError", "accuracy", "channels_last_is_safe", "default_cache_dir", "native_bf16",
    "pretrain", "pretrained_resnet",
]

logger = logging.getLogger(__name__)

#: environment variable read for the number of torch threads when none is passed
THREADS_ENV = "FMCACHE_NUM_THREADS"
#: bump when the recipe of :func:`pretrained_resnet` changes, so old files are not reused
RECIPE_VERSION = 1
_WARMUP_FRACTION = 0.05


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fmcache/zoo`` (``~/.cache/fmcache/zoo`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmcache" / "zoo"


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` (or $FMCACHE_NUM_THREADS) torch threads, then restore."""
    if num_threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if text:
            try:
                num_threads = int(text)
            except ValueError:
                raise TrainingError(f"${THREADS_ENV}={text!r} is not an integer") from None
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise TrainingError(f"num_threads={num_threads} must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent in some builds
        return False


#: oneDNN's 1x1 stride-2 backward-weights kernel on channels-last input with fewer input
#: channels than its block (8 on AVX2, 16 on AVX-512) hangs, crashes or computes wrong
#: gradients (uxlfoundation/oneDNN#6035; seen here as a hang at ResNet width 2 and 4).
_ONEDNN_1X1_MIN_CHANNELS = 16


def channels_last_is_safe(model: nn.Module) -> bool:
    """False when ``model`` has a strided 1x1 conv that oneDNN#6035 mistrains in channels-last."""
    return not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
        and m.in_channels // m.groups < _ONEDNN_1X1_MIN_CHANNELS
        for m in model.modules()
    )


def _batch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs], dtype=torch.long)


def _learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to zero."""
    warmup = max(1, int(steps * _WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model: nn.Module,
    dataset: Dataset,
    steps: int,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    bf16: bool | None = None,
    num_threads: int | None = None,
    log_every: int = 50,
) -> nn.Module:
    """Train ``model`` in place for ``steps`` SGD steps of cross-entropy.

    SGD with momentum and weight decay, linear warm-up then cosine decay of the learning
    rate, batches drawn without replacement from a seeded permutation (the last partial
    batch of a pass is dropped: a tiny batch makes train-mode BatchNorm noisy).

    Parameters
    ----------
    model : nn.Module
        Maps a batch of ``dataset`` inputs to class logits.
    dataset : Dataset
        Map-style, returning ``(tensor, int label)``, with ``len()``.
    steps : int
        Optimiser steps (``0`` returns the model untouched).
    batch_size, lr, momentum, weight_decay : number
        The SGD recipe; ``lr`` is the peak learning rate.
    seed : int
        Seeds the batch order and torch's global RNG for the duration (restored after),
        so augmentation drawn from it is reproducible too. A data set with a
        ``set_epoch(epoch)`` method (like :class:`FashionMNIST`) is told the pass number
        at the start of each pass, from 0.
    bf16 : bool, optional
        bfloat16 autocast. About 2.5x faster on CPUs with native BF16 (AVX512-BF16, AMX;
        measurements.md), but about 15x *slower* on AVX2-only CPUs, where oneDNN emulates
        it. ``None`` (default) turns it on only where :func:`native_bf16` says so.
        Training runs channels-last (15-30 % faster on CPU) unless
        :func:`channels_last_is_safe` says no (narrow strided 1x1 convs, a oneDNN bug).
    num_threads : int, optional
        torch threads while training; default ``$FMCACHE_NUM_THREADS`` or torch's own.
    log_every : int
        Log the running loss at INFO every that many steps (0: never).

    Returns
    -------
    nn.Module
        ``model``, trained, left in eval mode.

    Raises
    ------
    TrainingError
        Bad parameters, a data set smaller than one batch, or a non-finite loss.

    Notes
    -----
    Deterministic given ``seed`` on one machine with one thread count: parallel CPU
    kernels may sum in a different order with a different number of threads.
    """
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise TrainingError(f"need steps >= 0, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    if not isinstance(dataset, Sized):
        raise TrainingError("the data set must have a length (a map-style Dataset)")
    n = len(dataset)
    if n < batch_size:
        raise TrainingError(f"the data set has {n} samples, fewer than one batch of {batch_size}",
                            hint="pass a smaller batch_size or more data")
    per_pass = n // batch_size
    if bf16 is None:
        bf16 = native_bf16()
    memory_format = torch.channels_last if channels_last_is_safe(model) else torch.contiguous_format
    # grad on even when called under no_grad (a capture or benchmark helper that pre-trains
    # a model it has not cached yet)
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]), \
            torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        model.to(memory_format=memory_format)  # type: ignore[call-overload]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, nesterov=True)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        set_epoch = getattr(dataset, "set_epoch", None)
        running = 0.0
        for step in range(steps):
            position = step % per_pass
            if position == 0:
                permutation = torch.randperm(n, generator=order)
                if callable(set_epoch):  # a seeded augmenting data set draws new crops per pass
                    set_epoch(step // per_pass)
            inputs, targets = _batch(dataset, permutation[position * batch_size:(position + 1) * batch_size])
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            inputs = inputs.contiguous(memory_format=memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(inputs), targets)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at step {step}",
                                    hint="lower lr, or check the input normalisation")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            if log_every and (step + 1) % log_every == 0:
                logger.info("step %d/%d  loss %.4f", step + 1, steps, running / log_every)
                running = 0.0
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, limit: int | None = None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on the first ``limit`` samples of ``dataset``."""
    if not isinstance(dataset, Sized):
        raise TrainingError("the data set must have a length (a map-style Dataset)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise TrainingError("accuracy of an empty data set is undefined")
    model.eval()
    correct = 0
    for start in range(0, n, batch_size):
        inputs, targets = _batch(dataset, torch.arange(start, min(start + batch_size, n)))
        correct += int((model(inputs).argmax(dim=1) == targets).sum())
    return correct / n


def pretrained_resnet(
    width: int = 16,
    steps: int = 200,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """A CIFAR-style ResNet-18 briefly trained on Fashion-MNIST, cached on disk.

    Recipe: ``cifar_resnet18(in_channels=1, width=width)`` initialised under ``seed``,
    :func:`pretrain` with the default recipe (batch 128, peak lr 0.05) for
    ``steps`` steps on the augmented training split (random crop + flip, seeded).
    The state dict is saved under ``cache_dir`` keyed by (width, steps, seed, recipe
    version) and loaded on later calls instead of training again.

    Parameters
    ----------
    width : int
        Channels of the stem and ``layer1`` (64 is the standard ResNet-18).
    steps : int
        Training steps; 0 gives the seeded, untrained network.
    cache_dir : path-like, optional
        Default :func:`default_cache_dir`.
    seed : int
    num_threads : int, optional
        torch threads for training (see :func:`pretrain`).
    data_dir : path-like, optional
        Folder of the Fashion-MNIST files (see :class:`FashionMNIST`).

    Returns
    -------
    nn.Module
        The model in eval mode; inputs are ``FashionMNIST(channels=1, pad_to=32)`` tensors.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"cifar_resnet18-fmnist-w{width}-s{steps}-seed{seed}-r{RECIPE_VERSION}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cifar_resnet18(num_classes=10, in_channels=1, width=width)
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        # a damaged or foreign file is replaced, never half-used
        except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as exc:
            warnings.warn(f"{path} could not be loaded ({exc}); training again", stacklevel=2)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cifar_resnet18(num_classes=10, in_channels=1, width=width)
    data = FashionMNIST("train", data_dir=data_dir, augment=True, seed=seed)
    logger.warning("first use: training %s for %d steps (a few minutes on a CPU), kept at %s for the next runs",
                   path.name, steps, path)
    pretrain(model, data, steps, seed=seed, num_threads=num_threads)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), partial)
        os.replace(partial, path)
    except OSError as exc:  # a read-only or full cache folder: minutes of training are not thrown away
        if partial.parent.is_dir():
            partial.unlink(missing_ok=True)
        warnings.warn(f"the trained weights could not be kept at {path} ({exc}); they serve this run only and "
                      "the next run trains again: set XDG_CACHE_HOME to a writable folder to keep them",
                      stacklevel=2)
    return model.eval()
