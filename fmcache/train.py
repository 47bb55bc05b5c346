"""Training-loop helpers shared by the demo, the freezing trainer and tools/reproduce.py.

Plain SGD loops over ``nn.Module`` and ``DataLoader``; nothing here knows about caches.
On CPUs without native bfloat16 (:func:`fmcache.zoo.native_bf16`) autocast is emulated and
about 15x slower, so ``bf16=None`` turns it on only where it is native. Channels-last is
always used for 4-D inputs (15-30 % faster on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .capture import eval_mode
from .loader import EpochLoader
from .readahead import ReadAhead
from .zoo import native_bf16


def sgd(params: Iterable[nn.Parameter], lr: float = 0.05, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The SGD recipe every arm uses."""
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine_lr(step: int, total_steps: int, peak: float, warmup_fraction: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of steps, then cosine decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(bf16: bool | None) -> contextlib.AbstractContextManager[Any]:
    on = native_bf16() if bf16 is None else bf16
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class StepCounter:
    """Global optimiser step, for the learning-rate schedule across epochs and stages."""

    def __init__(self, total_steps: int, peak_lr: float) -> None:
        self.step = 0
        self.total_steps = max(1, int(total_steps))
        self.peak_lr = peak_lr

    def lr(self) -> float:
        return cosine_lr(self.step, self.total_steps, self.peak_lr)


def train_epoch(model: nn.Module, loader: Iterable[Any], opt: torch.optim.Optimizer, steps: StepCounter, *,
                prefix: nn.Module | None = None, bf16: bool | None = None,
                on_backward: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass of ``loader``: ``model`` trains on ``x`` (on ``prefix(x)`` when a frozen
    ``prefix`` is given, run in eval mode without grad every step: classic freezing).

    Returns ``{"loss": mean loss, "samples": n, "seconds": wall}``.
    """
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    if prefix is not None:
        prefix.eval()
    total_loss, n, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():  # trains even under no_grad
        for x, y in loader:
            x = _cl(x.float())
            if prefix is not None:
                with torch.no_grad(), _autocast(bf16):
                    x = _cl(prefix(x).float())
            for group in opt.param_groups:
                group["lr"] = steps.lr()
            with _autocast(bf16):
                loss = loss_fn(model(x).float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {steps.step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if on_backward is not None:  # e.g. AdaptiveFreezer.record_grad
                on_backward()
            opt.step()
            steps.step += 1
            total_loss += float(loss.detach()) * len(y)
            n += len(y)
    return {"loss": total_loss / max(n, 1), "samples": n, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 500, bf16: bool | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode)."""
    correct = total = 0
    with eval_mode(model):  # afterwards each module's own mode: a frozen prefix stays in eval
        for x, y in DataLoader(dataset, batch_size=batch_size):
            with _autocast(bf16):
                correct += int((model(_cl(x.float())).float().argmax(1) == y).sum())
            total += y.numel()  # per pixel for masks (it was per sample: "accuracies" of 500)
    return correct / max(total, 1)


def epoch_loader(dataset: Dataset, batch_size: int, epoch: int, seed: int | None = None,
                 num_workers: int = 0, read_ahead: int = 0) -> DataLoader | ReadAhead[Any]:
    """A shuffled, ``drop_last`` loader whose order depends on (seed, epoch), for one epoch.

    ``num_workers`` > 0 reads, decodes and augments in worker processes, overlapping the
    training step (on a 2-core machine with one torch thread: the second core). For many
    epochs, keep one :class:`fmcache.loader.EpochLoader` instead: its workers persist and
    it yields the same batches. ``read_ahead`` > 0 (without workers) has a thread of this
    process read that many batches ahead (:class:`fmcache.readahead.ReadAhead`)."""
    return EpochLoader(dataset, batch_size, seed=seed, num_workers=num_workers, persistent=False,
                       read_ahead=read_ahead)(epoch)


def frozen(module: nn.Module) -> Iterator[nn.Parameter]:
    """Freeze ``module`` in place (no grad, eval mode) and yield its parameters."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
        yield p


__all__ = ["StepCounter", "cosine_lr", "epoch_loader", "evaluate", "frozen", "sgd", "train_epoch"]
