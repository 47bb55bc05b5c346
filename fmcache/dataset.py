"""FeatureMapDataset: a cached layer as a ``torch.utils.data.Dataset``.

Each item is ``(features, label)``: float32 (or bf16 on request) ``(C, H, W)`` or
``(T, D)``, augmented in feature space by one of three modes:

``none``     the stored base map;
``feature``  ``T_a`` (flip of W, shift by offset/stride, photometric = identity) on all channels;
``saca``     bulk channels ``T_a(base)``, sensitive channels the cached variant nearest
             to ``a`` then the residual transform (:mod:`fmcache.augment`).

The draw ``a`` is a function of ``(seed, epoch, sample)`` only, so the data are the same in
any worker, process or order. The dataset holds a path; the cache opens lazily in each
process and is never pickled, so ``DataLoader(num_workers>0)`` works under fork, spawn and
forkserver. ``__getitems__`` reads a whole batch at once (DataLoader uses it), so a
chunk-aware sampler's batches are served with one read per stored run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .augment import AUGMENT_MODES, AugFamily, infer_stride
from .augment.batch import feature_batch, nearest_batch, saca_batch, saca_tiers
from .augment.draw import check_counter
from .cache import Cache, open_cache
from .errors import CacheError, CacheReplacedError, StrideError
from .indices import checked_indices
from .manifest import VARIANT_SEP
from .sampler import ChunkShuffleSampler, SampleKey

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def collate(items: Sequence[tuple[torch.Tensor, Any]]) -> Any:
    """``default_collate`` for :class:`FeatureMapDataset` batches, without its copy.

    ``__getitems__`` returns the rows of one contiguous batch tensor; stacking them again
    (what ``default_collate`` does) is a full extra pass over the batch. This returns
    that batch tensor itself (a view) and the labels collated as ``default_collate``
    would; any other list of items goes to ``default_collate`` unchanged. Pass it as
    ``DataLoader(..., collate_fn=fmcache.dataset.collate)``.
    """
    if not items or not isinstance(items[0], tuple) or not isinstance(items[0][0], torch.Tensor):
        return default_collate(list(items))
    first = items[0][0]
    ptr, numel, offset = first.untyped_storage().data_ptr(), first.numel(), first.storage_offset()
    if not first.is_contiguous() or any(
            not isinstance(m, torch.Tensor) or m.untyped_storage().data_ptr() != ptr or m.storage_offset() != offset + k * numel
            or m.shape != first.shape or m.dtype != first.dtype for k, (m, _) in enumerate(items)):
        return default_collate(list(items))
    maps = first.as_strided((len(items), *first.shape), (numel, *first.stride()), offset)
    return [maps, default_collate([label for _, label in items])]


class FeatureMapDataset(Dataset):
    """One layer of a cache, as ``(features, label)`` items.

    Parameters
    ----------
    path
        A committed cache (or a merged sharded one).
    layer
        The layer to serve; default: the only layer (error if several).
    augment
        ``"none"``, ``"feature"`` or ``"saca"`` (needs a cache built with a ``sensitive`` tier
        and variants).
    seed
        Seed of the augmentation draws.
    dtype
        ``"float32"`` or ``"bf16"`` (or the torch dtypes).
    family
        The augmentation family (:class:`fmcache.augment.AugFamily`); default: the one
        recorded by the build, else ``AugFamily()``.
    stride
        Input pixels per map pixel; default: inferred from the recorded input shape.
    weights_fingerprint, allow_stale
        Refuse a cache whose frozen weights differ from these (see :func:`open_cache`).
    labels_unaugmented
        Serve spatially augmented maps with labels that have a shape of their own (two or
        more axes per sample). Such labels look like masks, which the maps' flips and shifts
        would no longer line up with, so ``augment="feature"`` / ``"saca"`` refuses them
        unless this is True (for labels that are not spatial).
    """

    def __init__(self, path: str | os.PathLike[str], layer: str | None = None, *, augment: str = "none",
                 seed: int = 0, dtype: str | torch.dtype = "float32", family: AugFamily | None = None,
                 stride: int | None = None, weights_fingerprint: str | None = None,
                 allow_stale: bool = False, labels_unaugmented: bool = False) -> None:
        self.path = Path(os.path.abspath(path))  # a worker that reopens it may run in another directory
        if augment not in AUGMENT_MODES:
            raise CacheError(f"unknown augment mode {augment!r}", hint=f"use one of {', '.join(AUGMENT_MODES)}")
        self.augment = augment
        self.seed = check_counter(seed, "seed")
        self.epoch = 0
        chosen = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if chosen not in (torch.float32, torch.bfloat16):
            raise CacheError(f"dtype {dtype!r} is not supported", hint="use 'float32' or 'bf16'")
        self.dtype = cast(torch.dtype, chosen)
        cache = open_cache(self.path, weights_fingerprint=weights_fingerprint, allow_stale=allow_stale)
        self._cache: Cache | None = cache
        self._identity = cache.identity  # a process that opens the path again must find this cache
        if layer is None:
            if len(cache.layers) != 1:
                raise CacheError(f"{self.path} has layers {list(cache.layers)}: pass layer=",
                                 hint=f"e.g. FeatureMapDataset({str(self.path)!r}, {next(iter(cache.layers))!r}): "
                                      "the Dataset serves one layer")
            layer = next(iter(cache.layers))
        self.layer = layer
        info = cache.layer(layer)
        self.shape = info.shape
        self.samples_per_chunk = info.samples_per_chunk
        #: the sampler's chunk: the largest of the cache's layers, so that the Datasets of two
        #: layers of one cache with one seed visit the samples in one order (zipped loaders
        #: of a U-Net's skip layers paired different samples when each took its own)
        self.order_chunk = max(layer_info.samples_per_chunk for layer_info in cache.layers.values())
        self._len = len(cache)
        build = cache.manifest.build
        self.family = family or AugFamily.from_config(build.get("augment_family") or {})
        self.tokens = len(info.shape) <= 2
        if stride is None and not self.tokens and augment != "none":
            input_shape = build.get("input_shape")
            if not input_shape:
                raise CacheError(f"{self.path}: no recorded input shape to infer the stride from",
                                 hint="pass stride= (input pixels per map pixel)")
            if len(input_shape) != 3:  # a 1-D signal (C, L), tokens (T, D): not an image to flip or shift
                raise StrideError(f"{self.path}: augment={augment!r} flips and shifts layer {layer!r}'s maps "
                                  f"{tuple(info.shape)} as the image they came from, but the model's inputs are "
                                  f"{tuple(input_shape)}, not images (C, H, W)",
                                  hint="use augment='none' (or pass stride=, input pixels per map pixel, if the "
                                       "maps are an image's after all)")
            try:
                stride = infer_stride((int(input_shape[-2]), int(input_shape[-1])),
                                      (int(info.shape[-2]), int(info.shape[-1])))
            except StrideError as exc:
                raise StrideError(f"{self.path}: augment={augment!r} on layer {layer!r}: {exc.message}",
                                  hint="use augment='none', or pass stride= (input pixels per map pixel) if you "
                                       "know the shift a map pixel stands for") from None
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer))
                                   or stride < 1):
            raise StrideError(f"{self.path}: stride={stride!r}; the stride is a whole number of input pixels per "
                              "map pixel, at least 1", hint="pass a positive int, or leave stride out to infer it "
                                                             "from the input shape the build recorded")
        self.stride = int(stride or 1)
        self.sensitive: np.ndarray | None = None
        self.variant_parts: dict[str, str] = {}
        if augment == "saca" and "sensitive" not in info.plan.names and (build.get("saca") or {}).get("rho") == 0:
            self.augment = "feature"  # SACA with no sensitive channel (rho = 0) is feature mode
        if self.augment == "saca":
            if "sensitive" not in info.plan.names:
                raise CacheError(f"{self.path}: layer {layer!r} has no 'sensitive' tier; augment='saca' needs one",
                                 hint="build with SACA (fmcache build --saca) or use augment='feature'")
            self.sensitive = np.asarray(info.plan.tier("sensitive").channels, dtype=np.int64)
            self._plan = info.plan
            self._packed = info.packed
            self.variant_parts = {v: f"sensitive{VARIANT_SEP}{v}" for v in info.variants}
        labels = cache.labels
        if augment != "none" and not self.tokens and labels is not None and labels.ndim >= 3 \
                and not labels_unaugmented:
            raise CacheError(f"{self.path}: the labels have shape {tuple(labels.shape[1:])} per sample (a mask?); "
                             f"augment={augment!r} flips and shifts layer {layer!r}'s maps but not the labels",
                             hint="use augment='none' and augment maps and masks together in your own code, "
                                  "or pass labels_unaugmented=True if the labels are not spatial")
        self._labels = labels

    # ---- process safety -----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            cache = open_cache(self.path)
            if cache.identity != self._identity:  # replaced since this Dataset opened it
                cache.close()
                raise CacheReplacedError(f"{self.path} was replaced since this Dataset opened it: its workers would "
                                         "read another cache than its main process")
            self._cache = cache
        return self._cache

    def close(self) -> None:
        """Close this process's handles on the cache now (a later read opens them again).
        Dropping the Dataset releases them too; close() is for a cache about to be deleted."""
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (call before creating each epoch's iterator)."""
        self.epoch = check_counter(epoch, "epoch")

    def sampler(self, *, shuffle: str = "chunks", buffer_chunks: int = 8, rank: int | None = None,
                world_size: int | None = None, drop_last: bool = False) -> ChunkShuffleSampler:
        """A chunk-aware sampler matched to the cache's storage chunks (:attr:`order_chunk`:
        one order for every layer of the cache at one seed)."""
        return ChunkShuffleSampler(len(self), self.order_chunk, buffer_chunks=buffer_chunks, seed=self.seed,
                                   shuffle=shuffle, rank=rank, world_size=world_size,  # type: ignore[arg-type]
                                   drop_last=drop_last)

    # ---- items -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def _label(self, index: int) -> Any:
        if self._labels is None:
            return -1
        value = self._labels[index]
        return int(value) if np.ndim(value) == 0 and self._labels.dtype.kind in "iub" else torch.as_tensor(value)

    def _labels_of(self, idx: np.ndarray) -> list[Any]:
        """:meth:`_label` of every index: one indexing and one ``tolist`` for the usual
        integer class labels instead of a call per item."""
        labels = self._labels
        if labels is None:
            return [-1] * len(idx)
        if labels.ndim == 1 and labels.dtype.kind in "iu":
            return labels[idx].tolist()  # Python ints, as int() of each
        if labels.ndim == 1 and labels.dtype.kind == "b":
            return labels[idx].astype(np.int64).tolist()
        return [self._label(int(i)) for i in idx]

    def _read_augmented(self, cache: Cache, idx: np.ndarray, epoch: int) -> np.ndarray:
        """The batch's training maps (fmcache.augment.batch: the per-sample definition's
        numbers, computed for the whole batch at once). The draws depend on
        ``(seed, epoch, sample)`` only, so SACA knows each row's nearest variant before it
        reads: the base tiers and that one variant come from one read of each sample."""
        if self.augment == "none":
            return cache.read_batch(self.layer, idx)
        draws = self.family.draws(self.seed, epoch, idx)
        if self.augment == "feature":
            return feature_batch(cache.read_batch(self.layer, idx), draws, self.stride, tokens=self.tokens)
        chosen, rflip, rdy, rdx = nearest_batch(draws, self.variant_parts)
        # per row, the part its sensitive channels start from: the chosen cached variant,
        # or None (the base's own) where the nearest is ``identity`` (or not cached)
        picks = [self.variant_parts.get(name) for name in chosen]
        if self._packed:  # one part holds every channel: the whole map, and the picks apart
            assert self.sensitive is not None
            base, picked = cache.read_batch_picked(self.layer, idx, picks)
            own = [row for row, pick in enumerate(picks) if pick is None]
            if len(own) == len(picks):
                source = self._plan.select(base, "sensitive", batched=True)
            else:
                source = picked
                if own:
                    source[own] = self._plan.select(base[own], "sensitive", batched=True)
            return saca_batch(base, draws, self.stride, self.sensitive, source, (rflip, rdy, rdx), tokens=self.tokens)
        # the sensitive tier of each row comes from its chosen variant (or the base's own)
        parts, _ = cache.read_batch_picked(self.layer, idx, picks, merged=False, replace="sensitive")
        source = parts["sensitive"]
        # tier by tier, merged once: saca_batch's numbers without building the merged base
        return saca_tiers(parts, self._plan, draws, self.stride, source, (rflip, rdy, rdx), tokens=self.tokens)

    def __getitem__(self, index: int | SampleKey) -> tuple[torch.Tensor, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int | SampleKey]) -> list[tuple[torch.Tensor, Any]]:
        """Items of a batch; keys are sample indices (drawn for :meth:`set_epoch`'s epoch)
        or :class:`~fmcache.sampler.SampleKey` ``(epoch, sample)`` (drawn for their own)."""
        maps, idx = self._batch(indices)
        return list(zip(maps.unbind(0), self._labels_of(idx)))

    def get_batch(self, indices: Sequence[int | SampleKey]) -> list[Any]:
        """``collate(self.__getitems__(indices))`` -- ``[maps, labels]``, the batch tensor
        and the labels as ``default_collate`` makes them -- without making an item per
        sample first: what :class:`~fmcache.loader.EpochLoader` serves (one tensor view, a
        tuple and a collate check per item cost ~5 µs, a tenth of a small map's item)."""
        maps, idx = self._batch(indices)
        return [maps, self._collated_labels(idx)]

    def _collated_labels(self, idx: np.ndarray) -> Any:
        """``default_collate(self._labels_of(idx))``, in one step for integer class labels."""
        labels = self._labels
        if labels is not None and labels.ndim == 1 and (
                labels.dtype.kind == "b" or (labels.dtype.kind in "iu" and np.can_cast(labels.dtype, np.int64))):
            return torch.from_numpy(labels[idx].astype(np.int64))
        return default_collate(self._labels_of(idx))

    def _batch(self, indices: Sequence[int | SampleKey]) -> tuple[torch.Tensor, np.ndarray]:
        """The batch's maps (one tensor) and its sample indices."""
        epoch = self.epoch
        if len(indices) and isinstance(indices[0], tuple):  # len: numpy / torch index arrays too
            epochs = {int(k[0]) for k in indices}  # type: ignore[index]
            if len(epochs) > 1:  # one loader iteration is one epoch; keep any mix correct anyway
                rows_of = {e: [r for r, k in enumerate(indices) if int(k[0]) == e] for e in epochs}  # type: ignore[index]
                parts = {e: self._batch([indices[r] for r in rows]) for e, rows in rows_of.items()}
                first = next(iter(parts.values()))[0]
                maps = torch.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
                idx = np.empty(len(indices), dtype=np.int64)
                for e, rows in rows_of.items():
                    maps[rows], idx[rows] = parts[e]
                return maps, idx
            epoch = epochs.pop()
            indices = [int(k[1]) for k in indices]  # type: ignore[index]
        idx = checked_indices(indices, self._len, str(self.path), "item", "the data set")
        cache = self.cache
        maps = torch.from_numpy(self._read_augmented(cache, idx, epoch))
        if self.dtype != torch.float32:
            maps = maps.to(self.dtype)
        return maps, idx
