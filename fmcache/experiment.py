"""One training run of the built-in setting (Fashion-MNIST, CIFAR-style ResNet-18) under a
named arm: what ``fmcache train`` and ``tools/reproduce.py`` run.

Arms (docs/results.md)::

    full                no freezing
    classic_freeze      the schedule; the frozen prefix recomputed on augmented inputs every step
    cache_fp32_noaug    the schedule; train from a float32 cache, no augmentation
    cache_fp32_feature  ... float32 cache, T_a on every channel
    fmcache_no_saca     ... calibrated tiers + progressive compression, T_a on every channel
    fmcache             ... SACA (tiers + cached variants) + progressive compression
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .augment import AugFamily
from .builder import SacaConfig
from .calibrate import PixelSpace
from .errors import FmcacheError, TrainingError
from .freezing import AdaptiveFreezer, CacheRecipe, FreezeSchedule, FreezingTrainer, check_schedule_epochs
from .policy import CompressionPolicy
from .zoo import FashionMNIST, pretrained_resnet
from .zoo.fashion_mnist import CROP_PADDING, MEAN, STD

ARMS = ("full", "classic_freeze", "cache_fp32_noaug", "cache_fp32_feature", "fmcache_no_saca", "fmcache")
#: The training augmentation of FashionMNIST(augment=True): crop with padding 4 and flip.
FAMILY = AugFamily(flip=True, max_shift=CROP_PADDING, photometric=False)
PIXELS = PixelSpace(MEAN, STD, (0.0, 1.0))


def recipe_for(arm: str, *, rho: float = 0.25, variants: tuple[str, ...] | None = None,
               max_variants: int | None = None, calib_samples: int = 512,
               policy: CompressionPolicy | None = None) -> CacheRecipe | None:
    """The :class:`CacheRecipe` of ``arm`` (None for ``full``)."""
    saca = SacaConfig(family=FAMILY, rho=rho, variants=variants, max_variants=max_variants, n_samples=calib_samples)
    common: dict[str, Any] = {"saca": saca, "pixels": PIXELS, "policy": policy or CompressionPolicy.default()}
    recipes: dict[str, CacheRecipe | None] = {
        "full": None,
        "classic_freeze": CacheRecipe(kind="classic", augment="none", **common),
        "cache_fp32_noaug": CacheRecipe(kind="plain", codec="raw", augment="none", **common),
        "cache_fp32_feature": CacheRecipe(kind="plain", codec="raw", augment="feature", **common),
        "fmcache_no_saca": CacheRecipe(kind="tiers", augment="feature", **common),
        "fmcache": CacheRecipe(kind="saca", augment="saca", **common),
    }
    if arm not in recipes:
        raise FmcacheError(f"unknown arm {arm!r}", hint=f"choose one of {', '.join(ARMS)}")
    return recipes[arm]


def run_arm(arm: str, *, seed: int = 0, width: int = 8, pretrain_steps: int = 50, train_samples: int = 3000,
            test_samples: int = 10000, epochs: int = 6, schedule: str | None = "1:layer2,3:layer3",
            adaptive: bool = False, batch_size: int = 128, lr: float = 0.05, num_workers: int = 0,
            read_ahead: int = 0,
            work_dir: str | Path = "runs/train",
            log: Callable[[str], None] | None = None, **recipe_kwargs: Any) -> dict[str, Any]:
    """Train one arm from the briefly pre-trained ResNet-18; returns accuracy, wall time
    (training including cache builds), build seconds, cache bytes and the per-epoch history.

    ``adaptive`` replaces the schedule with :class:`AdaptiveFreezer` over stem..layer3.
    """
    if epochs < 1:
        raise TrainingError(f"epochs={epochs}: train at least one epoch")
    if train_samples < batch_size:  # batches drop the last partial one: nothing would train
        raise TrainingError(f"{train_samples} training samples are fewer than one batch of {batch_size}",
                            hint=f"use at least {batch_size} samples (--samples)")
    recipe = recipe_for(arm, **recipe_kwargs)
    freeze = recipe is not None
    parsed = FreezeSchedule.parse(schedule) if freeze and schedule and not adaptive else None
    check_schedule_epochs(parsed, epochs)  # before the model is pre-trained
    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained_resnet(width=width, steps=pretrain_steps)).train()
    train = FashionMNIST("train", limit=train_samples, augment=True, seed=seed)
    if len(train) < train_samples and log is not None:
        log(f"note: Fashion-MNIST has {len(train)} training images; training on those, not {train_samples}")
    plain = FashionMNIST("train", limit=train_samples)
    test = FashionMNIST("test", limit=test_samples)
    trainer = FreezingTrainer(
        model, train, plain, epochs=epochs, work_dir=work_dir,
        recipe=recipe or CacheRecipe(kind="classic", augment="none"),
        schedule=parsed,
        freezer=AdaptiveFreezer(["stem", "layer1", "layer2", "layer3"]) if freeze and adaptive else None,
        batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers, read_ahead=read_ahead, log=log)
    try:
        fit = trainer.fit()
    finally:
        trainer.close()
    t0 = time.perf_counter()
    acc = trainer.evaluate(test)
    return {"arm": arm, "seed": seed, "acc": acc, "wall_s": fit["wall_s"], "cpu_s": fit["cpu_s"],
            "build_s": sum(fit["build_s"]),
            "eval_s": time.perf_counter() - t0,
            "cache_bytes": sum(b["stored_bytes"] for b in fit["builds"]),
            "cache_bytes_peak": _peak_bytes([b["stored_bytes"] for b in fit["builds"]]),
            "builds": fit["builds"], "history": fit["history"]}


def _peak_bytes(sizes: list[int]) -> int:
    """Most cache bytes on disk at once: each freeze builds the next cache before the
    previous one is removed, so a swap holds both (not just the largest cache)."""
    return max([*sizes[:1], *(a + b for a, b in itertools.pairwise(sizes))] or [0])


__all__ = ["ARMS", "FAMILY", "PIXELS", "recipe_for", "run_arm"]
