"""SACA calibration: measure per-channel augmentation sensitivity at a freeze boundary.

Measuring is kept apart from deciding (:func:`fmcache.sensitivity.select_sensitive`):

* :func:`calibration_draws` — which augmentations each calibration sample gets: one
  horizontal flip, ``shifts_per_sample`` shifts (a random crop with zero padding) and one
  photometric draw (brightness/contrast), all from ``(seed, sample)``;
* :class:`PixelSpace` — how to move between the data set's (normalised) tensors and raw
  pixels, because crops pad with black and jitter scales around black in *raw* space;
* :func:`augment_inputs` — ``a(x)`` on a batch of normalised inputs;
* :func:`measure_sensitivity` — feeds pairs ``(P(a(x)), T_a(P(x)))`` to a
  :class:`~fmcache.sensitivity.SensitivityAccumulator`, per augmentation kind and overall.

Everything takes a ``prefix`` callable (a batch of inputs -> a batch of maps), so any
model works; :func:`calibrate` wires it to a named boundary of an ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .augment import AugDraw, AugFamily, apply_feature, apply_input, draw_for, infer_stride
from .augment.errors import SensitivityError, StrideError
from .capture import Capture, eval_mode, plain_module
from .sensitivity import SensitivityAccumulator, score_summary, select_sensitive

#: Draw-stream tag of calibration (kept apart from training draws of the same seed).
_CALIB_EPOCH = 1_000_003
KINDS = ("flip", "shift", "photometric")


@dataclass(frozen=True)
class PixelSpace:
    """``normalised = (raw - mean) / std``; raw pixels lie in ``value_range``.

    ``mean`` and ``std`` are one number, or one per input channel (ImageNet's
    ``(0.485, 0.456, 0.406)``, ``(0.229, 0.224, 0.225)``). The default (mean 0, std 1, no
    clamp) treats the inputs as raw already; integer inputs (uint8 images) are raw pixels.
    """

    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        means, stds = _values(self.mean), _values(self.std)
        if not (means and stds and all(math.isfinite(m) for m in means)
                and all(math.isfinite(v) and v > 0 for v in stds)):
            raise SensitivityError(f"PixelSpace needs finite means and stds > 0, got {self.mean}, {self.std}",
                                   hint="--pixels MEAN,STD[,LO,HI]: the inputs' normalisation, STD > 0; per "
                                        "channel as M1/M2/M3,S1/S2/S3")
        if len(means) > 1 and len(stds) > 1 and len(means) != len(stds):
            raise SensitivityError(f"PixelSpace has {len(means)} means and {len(stds)} stds",
                                   hint="give one mean and std per input channel, or one for all")
        if self.value_range is not None and not (len(self.value_range) == 2
                                                 and self.value_range[0] <= self.value_range[1]):
            raise SensitivityError(f"PixelSpace value_range must be (low, high) with low <= high, "
                                   f"got {self.value_range}")

    @property
    def is_identity(self) -> bool:
        return set(_values(self.mean)) == {0.0} and set(_values(self.std)) == {1.0}

    def tensors(self, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(mean, std)`` to broadcast against ``x`` (``(N, C, H, W)`` or ``(C, H, W)``)."""
        out: list[torch.Tensor | float] = []
        for name, value in (("means", self.mean), ("stds", self.std)):
            values = _values(value)
            if len(values) == 1:
                out.append(values[0])
                continue
            if x.ndim < 3 or x.shape[-3] != len(values):
                raise SensitivityError(f"PixelSpace has {len(values)} {name}, the inputs {tuple(x.shape)} have "
                                       f"{x.shape[-3] if x.ndim >= 3 else 'no'} channels",
                                       hint="give one mean and std per input channel (--pixels M1/M2/M3,S1/S2/S3), "
                                            "or one for all (--pixels MEAN,STD)")
            out.append(torch.tensor(values, dtype=x.dtype, device=x.device).view(-1, 1, 1))
        return out[0], out[1]

    def get_config(self) -> dict[str, Any]:
        return {"mean": _plain(self.mean), "std": _plain(self.std),
                "value_range": list(self.value_range) if self.value_range else None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PixelSpace:
        vr = config.get("value_range")
        return cls(_number(config.get("mean", 0.0)), _number(config.get("std", 1.0)), tuple(vr) if vr else None)


def _values(value: Any) -> tuple[float, ...]:
    """One float per channel (one for all); () for what is not numbers."""
    try:
        return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
    except (TypeError, ValueError):
        return ()


def _plain(value: float | tuple[float, ...]) -> float | list[float]:
    values = _values(value)
    return list(values) if isinstance(value, (list, tuple)) else values[0]


def _number(value: Any) -> float | tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)


def augment_inputs(x: torch.Tensor, draws: AugDraw | Sequence[AugDraw], pixels: PixelSpace | None = None
                   ) -> torch.Tensor:
    """``a(x)`` for a batch of *normalised* inputs: to raw pixels, augment, normalise again.

    Integer inputs (uint8 images, which the model scales itself) are raw pixels: they are
    augmented in their own units, clamped to their dtype's range (and ``value_range``),
    rounded, and returned in their dtype, so the model sees the inputs it was built for.
    """
    pixels = pixels or PixelSpace()
    if not x.is_floating_point():
        if not pixels.is_identity:
            raise SensitivityError(f"the inputs are {x.dtype}: integer inputs are raw pixels, but PixelSpace "
                                   f"gives a normalisation (mean {pixels.mean}, std {pixels.std})",
                                   hint="for integer inputs give only the raw range: --pixels 0,1,LO,HI "
                                        "(PixelSpace(value_range=(LO, HI)))")
        info = torch.iinfo(x.dtype)
        lo, hi = float(info.min), float(info.max)
        if pixels.value_range is not None:
            lo, hi = max(lo, pixels.value_range[0]), min(hi, pixels.value_range[1])
        out = apply_input(x.float(), draws, value_range=(lo, hi))
        return out.round_().to(x.dtype)
    mean, std = pixels.tensors(x)
    raw = x * std + mean
    out = apply_input(raw, draws, value_range=pixels.value_range)
    return (out - mean) / std


def input_transform(draw: AugDraw, pixels: PixelSpace | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch transform applying one fixed draw (what the builder runs for a variant)."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        return augment_inputs(x, draw, pixels)

    return transform


def calibration_draws(family: AugFamily, sample: int, *, seed: int = 0,
                      shifts_per_sample: int = 2) -> list[tuple[str, AugDraw]]:
    """The ``(kind, draw)`` pairs one calibration sample is measured with.

    A pure flip (when the family flips), ``shifts_per_sample`` non-zero shifts drawn
    uniformly from the family's range (no flip), and one photometric draw (when the family
    has one). Depends only on ``(family, seed, sample)``.
    """
    rng = draw_for(seed, _CALIB_EPOCH, sample)
    out: list[tuple[str, AugDraw]] = []
    if family.flip:
        out.append(("flip", AugDraw(True, 0, 0)))
    m = family.max_shift
    if m > 0:
        for _ in range(shifts_per_sample):
            while True:
                dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))
                if dy or dx:
                    break
            out.append(("shift", AugDraw(False, dy, dx)))
    if family.photometric:
        b = 1.0 + family.brightness * float(rng.uniform(-1, 1))
        c = 1.0 + family.contrast * float(rng.uniform(-1, 1))
        out.append(("photometric", AugDraw(False, 0, 0, brightness=b, contrast=c)))
    if not out:
        raise SensitivityError("the augmentation family draws nothing (no flip, shift or photometric)",
                               hint="SACA measures how channels react to the training augmentation: give the "
                                    "family a flip, a max_shift > 0 or photometric jitter")
    return out


@dataclass
class Calibration:
    """Result of :func:`measure_sensitivity`: scores overall and per augmentation kind."""

    scores: np.ndarray
    per_kind: dict[str, np.ndarray] = field(default_factory=dict)
    n_samples: int = 0
    n_pairs: int = 0
    stride: int = 1
    kind_pairs: dict[str, int] = field(default_factory=dict)

    def layer_extra(self, rho: float, selection: np.ndarray | None = None) -> dict[str, Any]:
        """The manifest entries of a layer: scores, selection, rho and summary.

        ``selection`` (default: the overall scores) are the scores the channels are chosen by.
        """
        chosen = select_sensitive(self.scores if selection is None else selection, rho)
        return {"sensitivity": [round(float(s), 6) for s in self.scores],
                "sensitivity_per_kind": {k: [round(float(s), 6) for s in v] for k, v in self.per_kind.items()},
                "sensitive_channels": [int(c) for c in chosen], "rho": float(rho),
                "sensitivity_summary": score_summary(self.scores),
                "calibration": {"samples": self.n_samples, "pairs": self.n_pairs, "stride": self.stride}}


def measure_sensitivity(prefix: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                        family: AugFamily, *, sample_ids: Sequence[int] | None = None, seed: int = 0,
                        shifts_per_sample: int = 2, pixels: PixelSpace | None = None,
                        stride: int | None = None, batch_size: int = 64) -> Calibration:
    """Per-channel sensitivity ``1 - mean cos(P(a(x))_c, T_a(P(x))_c)`` of ``prefix``.

    Parameters
    ----------
    prefix
        Batch of inputs ``(N, C, H, W)`` -> batch of maps ``(N, C', H', W')``, or of token
        maps ``(N, T, D)`` / vectors ``(N, D)`` (channels ``D``; ``T_a`` is the identity).
    inputs
        Normalised calibration inputs.
    family
        Which augmentations exist (:func:`calibration_draws`).
    sample_ids
        Data set index of each input (seeds its draws); default ``0..N-1``.
    stride
        Input pixels per map pixel; default inferred from the shapes.
    """
    if inputs.ndim != 4 or len(inputs) == 0:
        raise SensitivityError(f"SACA and tier calibration measure how channels react to flips and shifts of "
                               f"image inputs, a non-empty (N, C, H, W) batch; these inputs are "
                               f"{tuple(inputs.shape)}",
                               hint="for inputs that are not images, build a plain cache (one codec: no --saca; "
                                    "CacheRecipe(kind='plain'))")
    ids = list(range(len(inputs))) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != len(inputs):
        raise SensitivityError(f"{len(ids)} sample ids for {len(inputs)} inputs")
    total: SensitivityAccumulator | None = None
    kinds: dict[str, SensitivityAccumulator] = {}
    with torch.inference_mode():
        for lo in range(0, len(inputs), batch_size):
            x = inputs[lo:lo + batch_size]
            base = prefix(x.clone()).float()  # a forward may change its input in place
            if base.ndim <= 2:
                raise SensitivityError(
                    f"SACA and tier calibration measure how each channel's map reacts to flips and shifts; "
                    f"this layer gives one vector per sample {tuple(base.shape[1:])}, where a channel is a single "
                    f"number (every score would come out 0 or 2, and the sensitive channels an arbitrary pick)",
                    hint="build a plain cache of this layer (one codec: no --saca; CacheRecipe(kind='plain')), or "
                         "calibrate at a layer with spatial maps or tokens")
            # token maps (N, T, D): no spatial axes, T_a is the identity, channels on the
            # last axis (the codecs' convention)
            tokens = base.ndim == 3
            if stride is None and not tokens:
                try:
                    stride = infer_stride((int(x.shape[-2]), int(x.shape[-1])),
                                          (int(base.shape[-2]), int(base.shape[-1])))
                except StrideError as exc:
                    raise StrideError(f"SACA calibration: {exc.message}",
                                      hint="choose a layer after padded convolutions (or pad them), or build "
                                           "without --saca (a plain cache: no flips or shifts)") from None
            base_np = base.cpu().numpy()
            per_sample = [calibration_draws(family, ids[lo + i], seed=seed, shifts_per_sample=shifts_per_sample)
                          for i in range(len(x))]
            for j in range(len(per_sample[0])):
                draws = [d[j][1] for d in per_sample]
                kind = per_sample[0][j][0]
                aug = prefix(augment_inputs(x, draws, pixels)).float().cpu().numpy().reshape(base_np.shape)
                target = base_np if tokens else np.stack([apply_feature(base_np[i], draws[i], stride or 1)
                                                          for i in range(len(x))])
                channels = base_np.shape[-1] if tokens else base_np.shape[1]
                if total is None:
                    total = SensitivityAccumulator(channels, tokens=tokens)
                total.update(aug, target)
                kinds.setdefault(kind, SensitivityAccumulator(channels, tokens=tokens)).update(aug, target)
    assert total is not None
    return Calibration(total.scores(), {k: acc.scores() for k, acc in kinds.items()},
                       n_samples=len(inputs), n_pairs=total.n_pairs, stride=int(stride or 1),
                       kind_pairs={k: acc.n_pairs for k, acc in kinds.items()})


def calibration_batch(dataset: Dataset, n_samples: int = 512, *, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``n_samples`` inputs drawn without replacement (seeded) from ``dataset``, and their indices."""
    n = len(dataset)  # type: ignore[arg-type]
    if n_samples < 1:
        raise SensitivityError(f"n_samples must be >= 1, got {n_samples}")
    ids = sorted(np.random.default_rng([seed, 0xCA1]).choice(n, size=min(n, n_samples), replace=False).tolist())
    x, _ = next(iter(DataLoader(Subset(dataset, ids), batch_size=len(ids))))
    return x, ids


def calibrate(model: nn.Module, layer: str, dataset: Dataset, family: AugFamily, *, n_samples: int = 512,
              seed: int = 0, shifts_per_sample: int = 2, pixels: PixelSpace | None = None,
              batch_size: int = 64) -> Calibration:
    """:func:`measure_sensitivity` of ``model`` up to the module ``layer`` (eval mode, no grad)."""
    model = plain_module(model)
    capture = Capture(model, [layer])
    with eval_mode(model):  # afterwards every submodule's own mode, a frozen BatchNorm's included
        x, ids = calibration_batch(dataset, n_samples, seed=seed)
        return measure_sensitivity(lambda b: capture(b)[layer], x, family, sample_ids=ids, seed=seed,
                                   shifts_per_sample=shifts_per_sample, pixels=pixels, batch_size=batch_size)


__all__ = ["KINDS", "Calibration", "PixelSpace", "augment_inputs", "calibrate", "calibration_batch",
           "calibration_draws", "input_transform", "measure_sensitivity"]
