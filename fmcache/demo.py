"""``fmcache demo``: the main job on the embedded default.

1. A CIFAR-style ResNet-18 (width 8) briefly trained on Fashion-MNIST stands in for a
   network whose first blocks have converged; it is frozen up to ``layer``.
2. The frozen prefix runs once over the training subset into a cache (``inspect`` shown).
3. The trainable suffix (re-initialised, same seed) is trained twice for the same epochs:
   with the prefix recomputed on augmented inputs every step (classic freezing), and from
   the cache with the matching feature-space augmentation.
4. Accuracy on the test set, wall time and bytes are printed for both.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .builder import build_cache
from .dataset import FeatureMapDataset, collate
from .report import inspect_cache, render_table
from .train import StepCounter, evaluate, sgd, train_epoch
from .zoo import FashionMNIST, default_cache_dir, pretrained_resnet, split_at


def _reset(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not module:
            reset()
    return module


def train_epochs(suffix: nn.Module, loader_for_epoch: Callable[[int], DataLoader], epochs: int,
                 prefix: nn.Module | None = None, lr: float = 0.05, seed: int = 0) -> float:
    """Train ``suffix`` (on ``prefix(x)`` when a prefix is given) with the recipe of
    :mod:`fmcache.train`; returns wall seconds."""
    torch.manual_seed(seed)
    opt = sgd(suffix.parameters(), lr=lr)
    steps = StepCounter(epochs * len(loader_for_epoch(0)), peak_lr=lr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        train_epoch(suffix, loader_for_epoch(epoch), opt, steps, prefix=prefix)
    return time.perf_counter() - t0


DEMO_WIDTH = 8
DEMO_PRETRAIN_STEPS = 50


def run_demo(out_dir: Path, *, samples: int = 4000, epochs: int = 2, layer: str = "layer2",
             width: int = DEMO_WIDTH, codec: str = "bf16", pretrain_steps: int = DEMO_PRETRAIN_STEPS,
             data_dir: str | None = None, batch_size: int = 128,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    echo(f"[1/4] frozen prefix: CIFAR ResNet-18 (width {width}) pre-trained briefly on Fashion-MNIST, "
         f"frozen up to {layer!r}")
    t0 = time.perf_counter()
    model = pretrained_resnet(width=width, steps=pretrain_steps, data_dir=data_dir)
    echo(f"  ready in {time.perf_counter() - t0:.1f} s (trained once, then loaded from {default_cache_dir()})")
    prefix, suffix0 = split_at(model, layer)
    for p in prefix.parameters():
        p.requires_grad_(False)
    train_plain = FashionMNIST("train", data_dir=data_dir, limit=samples)
    train_aug = FashionMNIST("train", data_dir=data_dir, limit=samples, augment=True, seed=0)
    test = FashionMNIST("test", data_dir=data_dir, limit=2000)

    cache_path = out_dir / f"fmnist-{layer}.lmdb"
    echo(f"[2/4] building the cache {cache_path} ({samples} samples, codec {codec})")
    t0 = time.perf_counter()
    build_cache(model, train_plain, [layer], cache_path, codec=codec, batch_size=256, overwrite=True,
                build_info={"model": f"zoo.pretrained_resnet(width={width})", "data": "fashion-mnist train"})
    build_s = time.perf_counter() - t0
    summary = inspect_cache(cache_path)
    echo(render_table(summary))

    echo(f"[3/4] training the suffix for {epochs} epochs, twice")
    results: dict[str, Any] = {}
    suffix_a = _reset(copy.deepcopy(suffix0), 1)

    def raw_loader(epoch: int) -> DataLoader:
        train_aug.set_epoch(epoch)
        return DataLoader(train_aug, batch_size=batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(epoch))

    wall = train_epochs(suffix_a, raw_loader, epochs, prefix=prefix.eval())
    results["recompute_prefix"] = {"acc": evaluate(nn.Sequential(prefix, suffix_a), test), "train_s": wall,
                                   "bytes": samples * 32 * 32}
    echo(f"  classic freezing (prefix recomputed): {wall:.1f} s")

    suffix_b = _reset(copy.deepcopy(suffix0), 1)
    fmaps = FeatureMapDataset(cache_path, layer, augment="feature", seed=0)

    sampler = fmaps.sampler()

    def cache_loader(epoch: int) -> DataLoader:
        fmaps.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return DataLoader(fmaps, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate)

    wall = train_epochs(suffix_b, cache_loader, epochs)
    results["fmcache"] = {"acc": evaluate(nn.Sequential(prefix, suffix_b), test), "train_s": wall,
                          "bytes": summary["stored_bytes"], "build_s": build_s}
    echo(f"  fmcache (from the cache):             {wall:.1f} s (+ {build_s:.1f} s build)")

    echo("[4/4] results (test accuracy on 2000 Fashion-MNIST test images)")
    echo(f"  {'arm':<22} {'acc':>6} {'train s':>8} {'bytes':>12}")
    for name, r in results.items():
        echo(f"  {name:<22} {r['acc']:>6.3f} {r['train_s']:>8.1f} {r['bytes']:>12,}")
    (out_dir / "demo.json").write_text(json.dumps(results, indent=1))
    return results
