"""The freezing trainer: when to freeze (a schedule or an adaptive criterion), and what to
train from afterwards (the raw data through a recomputed prefix, or a cache of its maps).

* :class:`FreezeSchedule` — ``epoch -> boundary``: at the start of that epoch everything up
  to and including the named top-level child is frozen.
* :class:`AdaptiveFreezer` — freezes the next block once its parameters' relative change per
  epoch has flattened (AutoFreeze-style) or its gradient norm has (Egeria-style); it never
  skips a block and never unfreezes.
* :class:`CacheRecipe` — how to build the cache at a freeze point (codecs or a policy,
  SACA or not) and how to read it (augmentation mode).
* :class:`FreezingTrainer` — the loop: at each freeze point it freezes the prefix, builds
  the cache for the new boundary from the raw inputs, switches the training data to it, and
  deletes the previous cache. Usable from your own loop via :meth:`FreezingTrainer.on_epoch_start`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .augment import infer_stride
from .backends import BACKENDS
from .builder import SacaConfig, build_cache, build_saca_cache
from .calibrate import PixelSpace
from .capture import Capture, eval_mode
from .codecs import codec_from_spec
from .dataset import FeatureMapDataset
from .errors import CodecSpecError, FreezeError, StrideError
from .loader import EpochLoader
from .policy import CompressionPolicy, frozen_fraction
from .readahead import check_read_ahead
from .train import StepCounter, evaluate, sgd, train_epoch
from .zoo import split_at

# ---- when to freeze -----------------------------------------------------------------------

class FreezeSchedule:
    """``{epoch: boundary}``; boundaries must move deeper as epochs grow.

    ``FreezeSchedule.parse("2:layer2,4:layer3")`` reads the CLI form.
    """

    def __init__(self, points: Mapping[int, str]) -> None:
        self.points = dict(sorted((int(e), str(b)) for e, b in points.items()))
        if any(e < 0 for e in self.points):
            raise FreezeError(f"freeze epochs must be >= 0, got {sorted(self.points)}")

    @classmethod
    def parse(cls, text: str) -> FreezeSchedule:
        points: dict[int, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            epoch, sep, boundary = item.partition(":")
            if not sep or not epoch.strip().isdigit() or not boundary.strip():
                raise FreezeError(f"bad schedule item {item!r}", hint="write EPOCH:BOUNDARY[,EPOCH:BOUNDARY...]")
            if int(epoch) in points:  # a dict would keep the last one silently
                raise FreezeError(f"epoch {int(epoch)} appears twice in the schedule {text!r}",
                                  hint="give each epoch one boundary; freeze deeper at a later epoch")
            points[int(epoch)] = boundary.strip()
        return cls(points)

    def validate(self, order: Sequence[str]) -> None:
        """Check the boundaries exist in ``order`` (top-level children) and move deeper."""
        last = -1
        for epoch, boundary in self.points.items():
            if boundary not in order:
                raise FreezeError(f"schedule epoch {epoch}: {boundary!r} is not a top-level child",
                                  hint=f"choose from {', '.join(order)}")
            if order.index(boundary) <= last:
                raise FreezeError(f"schedule epoch {epoch}: {boundary!r} is not deeper than the previous boundary")
            last = order.index(boundary)

    def boundary_at(self, epoch: int) -> str | None:
        """The boundary in force during ``epoch`` (None: nothing frozen)."""
        current = None
        for e, b in self.points.items():
            if e <= epoch:
                current = b
        return current

    def to_text(self) -> str:
        return ",".join(f"{e}:{b}" for e, b in self.points.items())


def check_schedule_epochs(schedule: FreezeSchedule | None, epochs: int) -> None:
    """A schedule point at or past the last of ``epochs`` never freezes: FreezeError."""
    late = [e for e in (schedule.points if schedule is not None else {}) if e >= epochs]
    if late:
        raise FreezeError(f"schedule epoch {late[0]} is past the last epoch ({epochs - 1}): it would never freeze",
                          hint=f"freeze at an epoch below {epochs}, or train more epochs (epochs= / --epochs)")


def relative_change(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """``||after - before|| / ||before||`` over all tensors (0 when ``before`` is all zero)."""
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(after, before))
    den = sum(float(b.float().pow(2).sum()) for b in before)
    return float(np.sqrt(num / den)) if den > 0 else 0.0


@dataclass
class AdaptiveFreezer:
    """Freeze the next block when its per-epoch signal has flattened.

    The signal of a block after epoch ``e`` is ``metric``: ``"param_change"`` (relative change
    of its parameters over the epoch, AutoFreeze) or ``"grad_norm"`` (the mean gradient norm
    recorded through :meth:`record_grad`, Egeria uses a similar plasticity signal). A block is
    *flat* when the signal fell below ``threshold`` × its first recorded value, or changed by
    less than ``flat_tol`` (relative) since the previous epoch. Only the next block in order
    can freeze, at most one per epoch, and never before ``min_epoch``; the last candidate
    ``max_boundary`` (if given) is as deep as it goes.
    """

    blocks: Sequence[str]
    metric: str = "param_change"
    threshold: float = 0.3
    flat_tol: float = 0.1
    min_epoch: int = 1
    max_boundary: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in ("param_change", "grad_norm"):
            raise FreezeError(f"metric must be 'param_change' or 'grad_norm', got {self.metric!r}")
        self.blocks = list(self.blocks)
        if self.max_boundary is not None and self.max_boundary not in self.blocks:
            raise FreezeError(f"max_boundary {self.max_boundary!r} is not one of the blocks {self.blocks}")
        self.frozen_upto = -1
        self._snap: dict[str, list[torch.Tensor]] = {}
        self._grad_sum: dict[str, float] = {}
        self._grad_n = 0

    def start_epoch(self, model: nn.Module) -> None:
        """Snapshot parameters (call at the start of each epoch)."""
        mods = dict(model.named_children())
        self._snap = {b: [p.detach().clone() for p in mods[b].parameters()] for b in self.blocks}
        self._grad_sum = {b: 0.0 for b in self.blocks}
        self._grad_n = 0

    def record_grad(self, model: nn.Module) -> None:
        """Add each block's gradient norm (call after ``backward``, before ``step``)."""
        mods = dict(model.named_children())
        for b in self.blocks:
            sq = sum(float(p.grad.float().pow(2).sum()) for p in mods[b].parameters() if p.grad is not None)
            self._grad_sum[b] = self._grad_sum.get(b, 0.0) + sq ** 0.5
        self._grad_n += 1

    def end_epoch(self, model: nn.Module, epoch: int) -> str | None:
        """Record this epoch's signals; return the new boundary to freeze at, or None."""
        mods = dict(model.named_children())
        for b in self.blocks:
            if self.metric == "param_change":
                value = relative_change(self._snap.get(b, []), [p.detach() for p in mods[b].parameters()])
            else:
                value = self._grad_sum.get(b, 0.0) / max(self._grad_n, 1)
            self.history.setdefault(b, []).append(value)
        nxt = self.frozen_upto + 1
        limit = self.blocks.index(self.max_boundary) if self.max_boundary else len(self.blocks) - 1
        while nxt <= limit and next(mods[self.blocks[nxt]].parameters(), None) is None:
            nxt += 1  # a block without parameters (pooling, a reshape) has nothing to converge: it goes
            # with the next one (its signal stayed 0, and freezing stopped at it for good)
        if epoch + 1 < self.min_epoch or nxt > limit:
            return None
        if self.is_flat(self.history[self.blocks[nxt]]):
            self.frozen_upto = nxt
            return self.blocks[nxt]
        return None

    def is_flat(self, signal: Sequence[float]) -> bool:
        if len(signal) < 2:
            return False
        first, prev, last = signal[0], signal[-2], signal[-1]
        if first > 0 and last < self.threshold * first:
            return True
        return prev > 0 and abs(prev - last) / prev < self.flat_tol


# ---- what to train from -------------------------------------------------------------------

@dataclass
class CacheRecipe:
    """How a freeze point's cache is built and read.

    ``kind``: ``"classic"`` (no cache: the prefix is recomputed on augmented inputs every
    step), ``"plain"`` (one codec for all channels), ``"tiers"`` (calibrated two-tier plan
    from ``policy``, no variants) or ``"saca"`` (tiers plus cached variants).
    ``augment``: the Dataset mode (``none``/``feature``/``saca``).
    """

    kind: str = "saca"
    augment: str = "saca"
    codec: str = "raw"
    policy: CompressionPolicy = field(default_factory=CompressionPolicy.default)
    saca: SacaConfig = field(default_factory=SacaConfig)
    pixels: PixelSpace = field(default_factory=PixelSpace)
    backend: str = "lmdb"
    build_batch_size: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in ("classic", "plain", "tiers", "saca"):
            raise FreezeError(f"recipe kind {self.kind!r} is not classic, plain, tiers or saca")
        if self.backend not in BACKENDS:  # else an unknown backend failed at the first freeze point
            raise FreezeError(f"recipe backend {self.backend!r} is not one of {', '.join(sorted(BACKENDS))}",
                              hint="CacheRecipe(backend='lmdb') or CacheRecipe(backend='hdf5')")
        mismatch = (self.kind == "saca") != (self.augment == "saca")
        if mismatch and self.kind != "classic":
            raise FreezeError(f"augment={self.augment!r} does not fit kind={self.kind!r}",
                                  hint="augment='saca' needs kind='saca' (and the reverse)")

    def build(self, model: nn.Module, plain_data: Dataset, boundary: str, path: Path,
              fraction: float) -> dict[str, Any]:
        """Build the cache of ``boundary``; returns ``{"path", "build_s", "stored_bytes", "raw_bytes"}``."""
        t0 = time.perf_counter()
        common: dict[str, Any] = {"overwrite": True, "progress": False, "batch_size": self.build_batch_size,
                                  "backend": self.backend}
        info = {"augment_family": self.saca.family.get_config(), "recipe": self.kind}
        if self.kind == "plain":
            manifest = build_cache(model, plain_data, [boundary], path, codec=self.codec, build_info=info, **common)
        else:
            saca = self.saca
            if self.kind == "tiers":
                saca = SacaConfig(**{**saca.__dict__, "variants": ()})
            manifest = build_saca_cache(model, plain_data, boundary, path, saca=saca, policy=self.policy,
                                        frozen=fraction, pixels=self.pixels, build_info=info, **common)
        layer = manifest.layers[boundary]
        return {"path": str(path), "build_s": time.perf_counter() - t0,
                "stored_bytes": int(sum(layer.stored_bytes.values())),
                "raw_bytes": int(sum(layer.raw_bytes.values())), "boundary": boundary,
                "frozen_fraction": fraction,
                "codecs": {t.name: t.codec.spec for t in layer.plan.tiers}}

    def dataset(self, path: Path, seed: int) -> FeatureMapDataset:
        return FeatureMapDataset(path, augment=self.augment, seed=seed, dtype=self.dtype)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (DataLoader
    workers end, and are reaped, with each epoch's iterator)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _remove(path: str | Path) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


class FreezingTrainer:
    """Train ``model`` for ``epochs``, freezing progressively and training from caches.

    Parameters
    ----------
    model
        An ``nn.Sequential``-like model whose top-level children run in order.
    train_data, plain_data
        The augmented training set (for unfrozen training and classic freezing) and the same
        samples without augmentation (what caches are built from), in the same order.
    schedule, freezer
        A :class:`FreezeSchedule`, or an :class:`AdaptiveFreezer`, or neither (no freezing).
    recipe
        :class:`CacheRecipe`; ``kind="classic"`` recomputes the prefix instead of caching.
    work_dir
        Where caches are written (one at a time: the previous one is deleted).
    num_workers, read_ahead
        DataLoader workers; or, without workers, the batches a thread of this process
        reads ahead of the steps (:class:`fmcache.readahead.ReadAhead`; 0: none).
    """

    def __init__(self, model: nn.Module, train_data: Dataset, plain_data: Dataset, *, epochs: int,
                 work_dir: str | Path, recipe: CacheRecipe | None = None,
                 schedule: FreezeSchedule | None = None, freezer: AdaptiveFreezer | None = None,
                 batch_size: int = 128, lr: float = 0.05, seed: int = 0, bf16: bool | None = None,
                 num_workers: int = 0, read_ahead: int = 0, log: Callable[[str], None] | None = None) -> None:
        if schedule is not None and freezer is not None:
            raise FreezeError("give a schedule or an adaptive freezer, not both")
        self.read_ahead = check_read_ahead(read_ahead, int(num_workers))
        self.model = model
        self.order = [n for n, _ in model.named_children()]
        if schedule is not None:
            schedule.validate(self.order)
            check_schedule_epochs(schedule, int(epochs))
        self._check_plan(model, schedule, freezer, recipe or CacheRecipe(), plain_data)
        self.train_data, self.plain_data = train_data, plain_data
        self.epochs, self.batch_size, self.seed, self.bf16 = int(epochs), int(batch_size), int(seed), bf16
        self.num_workers = int(num_workers)
        self.recipe = recipe or CacheRecipe()
        self.schedule, self.freezer = schedule, freezer
        self.work_dir = Path(work_dir)
        self.log = log or (lambda _msg: None)
        self.opt = sgd(model.parameters(), lr=lr)
        steps_per_epoch = len(train_data) // batch_size  # type: ignore[arg-type]
        self.steps = StepCounter(self.epochs * steps_per_epoch, lr)
        self.boundary: str | None = None
        self.prefix: nn.Module | None = None
        self.suffix: nn.Module = model
        self.cache: dict[str, Any] | None = None
        self.cache_data: FeatureMapDataset | None = None
        self.builds: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._loader: EpochLoader | None = None

    # ---- freeze points ----------------------------------------------------------------------
    def freeze_to(self, boundary: str) -> None:
        """Freeze everything up to ``boundary``; build its cache, switch to it, drop the old one."""
        if boundary not in self.order:
            raise FreezeError(f"{boundary!r} is not a top-level child", hint=f"choose from {', '.join(self.order)}")
        if self.boundary is not None and self.order.index(boundary) <= self.order.index(self.boundary):
            return
        self.prefix, self.suffix = split_at(self.model, boundary)
        if self.boundary is None:
            self._check_splits(self.prefix, self.suffix, boundary)
        self.prefix.eval()
        for p in self.prefix.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.boundary = boundary
        if self.recipe.kind == "classic":
            self.log(f"froze up to {boundary} (prefix recomputed each step)")
            return
        fraction = frozen_fraction(self.model, boundary)
        path = self.work_dir / f"cache-{boundary}.{'h5' if self.recipe.backend == 'hdf5' else 'lmdb'}"
        built = self.recipe.build(self.model, self.plain_data, boundary, path, fraction)
        self.builds.append(built)
        old, old_data = self.cache, self.cache_data
        self.cache = built
        self.cache_data = self.recipe.dataset(path, self.seed)
        if old is not None and old["path"] != built["path"]:
            self._close_loader()  # its workers hold the old cache open
            if old_data is not None:
                old_data.close()  # and so does this process: a deleted cache kept its disk space
            _remove(old["path"])
        self.log(f"froze up to {boundary}: cache {path.name} {built['stored_bytes']:,} B "
                 f"in {built['build_s']:.1f} s ({built['codecs']})")

    def _check_plan(self, model: nn.Module, schedule: FreezeSchedule | None, freezer: AdaptiveFreezer | None,
                    recipe: CacheRecipe, plain_data: Dataset) -> None:
        """What would fail only at a freeze point, after epochs of training, refused now:
        a freezer's unknown block (a KeyError at epoch 0), a boundary that leaves no
        parameter to train (torch's "does not require grad"), mask labels with a
        spatially augmenting recipe (refused by the Dataset after the cache was built)."""
        children = dict(model.named_children())
        if freezer is not None:
            unknown = [b for b in freezer.blocks if b not in children]
            if unknown:
                raise FreezeError(f"the freezer's blocks {unknown} are not top-level children of the model",
                                  hint=f"choose from {', '.join(self.order)}")
        last = (list(schedule.points.values()) if schedule is not None else []) + \
               ([freezer.max_boundary or freezer.blocks[-1]] if freezer is not None and freezer.blocks else [])
        for boundary in last:
            after = self.order[self.order.index(boundary) + 1:]
            if not any(next(children[name].parameters(), None) is not None for name in after):
                raise FreezeError(f"freezing up to {boundary!r} leaves no parameter to train",
                                  hint="freeze at an earlier block (a schedule point, or the freezer's "
                                       "max_boundary) so that the head stays trainable")
        first = plain_data[0] if recipe.kind != "classic" else None  # type: ignore[index]
        if recipe.kind in ("tiers", "saca") and first is not None and np.ndim(first[0]) != 3:
            raise FreezeError(f"recipe kind {recipe.kind!r} calibrates on image inputs (C, H, W); these are "
                              f"{tuple(np.shape(first[0]))}", hint="use CacheRecipe(kind='plain')")
        label = first[1] if first is not None and recipe.augment != "none" else None
        if label is not None and np.ndim(label) >= 2:
            raise FreezeError(f"the labels have shape {tuple(np.shape(label))} per sample (masks?); augment="
                              f"{recipe.augment!r} flips and shifts the cached maps but not the labels",
                              hint="use a recipe with augment='none'")
        labels = torch.as_tensor(plain_data[0][1]).numpy()  # type: ignore[index]
        if labels.dtype.kind not in "iub":
            raise FreezeError(f"the labels are {labels.dtype} (regression targets?); FreezingTrainer trains "
                              "with cross-entropy over integer classes",
                              hint="give class indices as int labels, or train the suffix with your own loop "
                                   "over a FeatureMapDataset")
        reach = (freezer.blocks[:freezer.blocks.index(freezer.max_boundary) + 1] if freezer.max_boundary
                 else freezer.blocks) if freezer is not None else []  # as deep as the freezer may go
        self._check_codecs(model, recipe, [*last, *reach])
        calibrates = recipe.kind in ("tiers", "saca")
        if first is not None and (recipe.augment != "none" or calibrates) and np.ndim(first[0]) == 3:
            self._check_maps(model, [b for b in self.order[:-1] if b in last or freezer is not None],
                             torch.as_tensor(first[0]), recipe.augment, calibrates)

    @staticmethod
    def _check_codecs(model: nn.Module, recipe: CacheRecipe, boundaries: Sequence[str]) -> None:
        """Every codec the recipe would store at these freeze points, in its backend: an HDF5
        recipe whose policy names ``sz3:...,algo=nopred`` failed at the freeze point."""
        if recipe.kind == "classic":
            return
        specs = {recipe.codec} if recipe.kind == "plain" else {
            spec for b in dict.fromkeys(boundaries) for spec in recipe.policy.codecs_for(frozen_fraction(model, b))}
        storage = BACKENDS[recipe.backend]
        for spec in sorted(specs):
            try:
                storage.check_codec(codec_from_spec(spec), (1, 1))
            except CodecSpecError as exc:
                raise FreezeError(f"the recipe would store {spec!r} in {recipe.backend}: {exc.message}",
                                  hint=f"name another codec in the policy or recipe for {recipe.backend}, or use "
                                       f"CacheRecipe(backend='lmdb')") from None

    @staticmethod
    def _check_maps(model: nn.Module, boundaries: Sequence[str], x: torch.Tensor, augment: str,
                    calibrates: bool) -> None:
        """A spatially augmenting recipe needs each boundary's map to be the input scaled by
        a whole stride (StrideError at the freeze point, after epochs of training), and a
        calibrating one (tiers, SACA) a map per channel, not one vector per sample (a
        SensitivityError there)."""
        if not boundaries:
            return
        try:  # one forward for every boundary, as the builds will capture them (two samples: no squeeze)
            with torch.no_grad(), eval_mode(model):
                maps = Capture(model, boundaries)(x[None].repeat(2, *([1] * x.ndim)))
        except Exception:  # noqa: BLE001 - a forward that fails here fails the build, which names it
            return
        for boundary, out in maps.items():
            if calibrates and out.ndim <= 2:
                raise FreezeError(f"freezing up to {boundary!r}: its output is one vector per sample "
                                  f"{tuple(out.shape[1:])}, and the recipe's calibration measures how each "
                                  "channel's map reacts to augmentation (a channel here is a single number)",
                                  hint="use CacheRecipe(kind='plain') for this boundary, or freeze at a block "
                                       "with spatial maps or tokens")
            if out.ndim == 4 and augment != "none":
                try:
                    infer_stride((x.shape[-2], x.shape[-1]), (out.shape[-2], out.shape[-1]))
                except StrideError as exc:
                    raise FreezeError(f"freezing up to {boundary!r}: {exc.message}; the recipe's augment="
                                      f"{augment!r} shifts maps by whole strides",
                                      hint="use inputs whose size the boundary divides evenly, or "
                                           "augment='none'") from None

    def _check_splits(self, prefix: nn.Module, suffix: nn.Module, boundary: str) -> None:
        """The trainer splits the model at top-level children, which is only the model when
        its forward applies them one after another (split_at): with a reshape or a skip
        between them the split trains another network (or fails mid-training). One small
        batch through both, before anything is built; a difference is a FreezeError."""
        x = torch.stack([torch.as_tensor(self.plain_data[i][0]) for i in range(min(4, len(self.plain_data)))])  # type: ignore[arg-type]
        with torch.no_grad(), eval_mode(self.model):
            try:
                whole, split = self.model(x), suffix(prefix(x))
                same = whole.shape == split.shape and bool(torch.allclose(whole, split, rtol=1e-4, atol=1e-5))
            except RuntimeError:
                same = False
        if not same:
            raise FreezeError(f"{type(self.model).__name__}'s forward is not its top-level children applied in order "
                              f"(split at {boundary!r}, the halves compute something else than the model)",
                              hint="freezing splits a model at its top-level children: make it an nn.Sequential of "
                                   "its blocks, with reshapes as modules (nn.Flatten()) and skips inside blocks")

    def on_epoch_start(self, epoch: int) -> None:
        """Apply the schedule for ``epoch`` (for users driving their own loop)."""
        if self.schedule is not None:
            boundary = self.schedule.boundary_at(epoch)
            if boundary is not None and boundary != self.boundary:
                self.freeze_to(boundary)

    def loader(self, epoch: int) -> Iterable[Any]:
        """This epoch's training batches: cached maps after a cached freeze, else raw inputs."""
        data = self.cache_data if self.cache_data is not None else self.train_data
        if self._loader is None or self._loader.dataset is not data:
            self._close_loader()
            self._loader = EpochLoader(data, self.batch_size, seed=self.seed, num_workers=self.num_workers,
                                       read_ahead=self.read_ahead)
        return self._loader(epoch)

    def _close_loader(self) -> None:
        """Stop the persistent workers (they are reaped, so ``cpu_s`` counts them)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Run all epochs; returns ``{"wall_s", "cpu_s", "build_s", "builds", "history"}``.

        ``cpu_s`` is the CPU time of this process (all threads) and of its finished
        DataLoader workers: less sensitive than wall time to other processes sharing the
        cores, and it counts the reading that workers do beside the training step."""
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for epoch in range(self.epochs):
            self.on_epoch_start(epoch)
            if self.freezer is not None:
                self.freezer.start_epoch(self.model)
            prefix = self.prefix if (self.recipe.kind == "classic" and self.prefix is not None) else None
            hook = None
            if self.freezer is not None and self.freezer.metric == "grad_norm":
                def hook() -> None:
                    assert self.freezer is not None
                    self.freezer.record_grad(self.model)
            stats: dict[str, Any] = train_epoch(self.suffix, self.loader(epoch), self.opt, self.steps, prefix=prefix, bf16=self.bf16,
                                on_backward=hook)
            stats.update(epoch=epoch, boundary=self.boundary)
            self.history.append(stats)
            self.log(f"epoch {epoch}: loss {stats['loss']:.4f} ({stats['samples']} samples, "
                     f"{stats['seconds']:.1f} s, " + (f"frozen to {self.boundary})" if self.boundary else "nothing frozen yet)"))
            if self.freezer is not None and epoch + 1 < self.epochs:
                new = self.freezer.end_epoch(self.model, epoch)
                if new is not None:
                    self.freeze_to(new)
        self._close_loader()
        return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0, "build_s": [b["build_s"] for b in self.builds],
                "builds": self.builds, "history": self.history}

    def evaluate(self, test_data: Dataset) -> float:
        return evaluate(self.model, test_data, bf16=self.bf16)

    def close(self) -> None:
        """Delete the current cache."""
        self._close_loader()
        if self.cache is not None:
            if self.cache_data is not None:
                self.cache_data.close()
            self.cache_data = None
            _remove(self.cache["path"])
            self.cache = None


__all__ = ["AdaptiveFreezer", "CacheRecipe", "FreezeError", "FreezeSchedule", "FreezingTrainer",
           "relative_change"]
