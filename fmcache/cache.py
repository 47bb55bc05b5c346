"""Open and read committed caches: manifest + backend + tier plans.

Writing lives in :mod:`fmcache.writer` (re-exported here): a cache at ``path`` is always
complete, and a reader that finds only ``<path>.partial`` gets
:class:`IncompleteCacheError`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import backend_class, detect_backend
from .codecs import channel_axis
from .errors import (
    CacheError,
    CorruptionError,
    IncompleteCacheError,
    LayerNotFoundError,
    NotACacheError,
    ShapeMismatchError,
)
from .indices import checked_indices
from .manifest import WHOLE_PART, LayerInfo, Manifest, check_fingerprints
from .paths import interrupted_merge, partial_path, writer_pid
from .writer import CacheWriter, _part_specs, create_cache, default_samples_per_chunk

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

class Cache:
    """A committed cache, open for reading. Use :func:`open_cache`.

    Holds a path and opens its backend lazily in each process; pickling carries no handle,
    so a Cache can go to DataLoader workers under fork, spawn or forkserver.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(path))  # a worker that reopens it may run in another directory
        backend_id = detect_backend(self.path)
        if backend_id is None:
            if interrupted_merge(partial_path(self.path)) is not None:
                raise IncompleteCacheError(f"{self.path} was never committed: {partial_path(self.path)} holds the "
                                           "shards of an interrupted merge",
                                           hint="run the same `fmcache merge` again: it moves them back, then merges")
            if partial_path(self.path).exists():
                pid = writer_pid(self.path)
                raise IncompleteCacheError(
                    f"{self.path} was never committed; {partial_path(self.path)} holds "
                    + (f"a cache process {pid} is writing now" if pid is not None else "an interrupted build or compact"),
                    hint="open it when that is done" if pid is not None else
                    "finish a build with `fmcache build ... --resume`; run an interrupted compact again with "
                    "--overwrite (compact cannot resume)")
            if not self.path.exists():
                raise NotACacheError(f"{self.path} does not exist")
            raise NotACacheError(f"{self.path} is not an fmcache cache (neither an LMDB directory nor an HDF5 file)")
        self.backend = backend_class(backend_id)(self.path, writable=False)
        try:
            raw = self.backend.get_meta("manifest")
            if raw is None:
                raise IncompleteCacheError(f"{self.path} has no committed manifest")
            self.manifest = Manifest.from_json(raw, f"{self.path}: manifest")
            if not self.manifest.complete:
                raise IncompleteCacheError(f"{self.path}: the manifest is not marked complete")
            self.backend.manifest_crc = zlib.crc32(raw)  # a handle opened anew checks it
        except BaseException:
            self.backend.close()  # no handle (or shared LMDB environment) left behind
            raise
        for index, layer in enumerate(self.manifest.layers.values()):
            self.backend.declare_layer(index, layer.name, _part_specs(layer), layer.samples_per_chunk)
        self._labels: np.ndarray | None = None
        self._whole_tier: dict[str, str] = {}
        #: layer -> (samples, map shape, whole tier): Cache.read's per-call lookups
        self._read_fast: dict[str, tuple[int, tuple[int, ...], str]] = {}

    @property
    def layers(self) -> dict[str, LayerInfo]:
        return self.manifest.layers

    @property
    def identity(self) -> int:
        """CRC-32 of the committed manifest: which cache this is, whatever its path."""
        assert self.backend.manifest_crc is not None
        return self.backend.manifest_crc

    @property
    def backend_id(self) -> str:
        return self.backend.backend_id

    def __len__(self) -> int:
        return self.manifest.samples

    @property
    def labels(self) -> np.ndarray | None:
        """Labels of all samples (loaded once per process), or None if built without."""
        if self._labels is None:
            labels = self.backend.read_labels(len(self))
            recorded = self.manifest.labels  # dtype and per-sample shape, from the first batch
            if recorded is not None and len(self):
                found = None if labels is None else {"dtype": labels.dtype.str, "shape": list(labels.shape[1:])}
                if found != recorded:  # a damaged key hid the label blocks: never serve none (or others)
                    raise CorruptionError(f"{self.path}: the labels are {'missing' if found is None else found}, "
                                          f"the manifest records {recorded}")
            self._labels = labels
        return self._labels

    def layer(self, name: str) -> LayerInfo:
        try:
            return self.manifest.layers[name]
        except KeyError:
            raise LayerNotFoundError(f"{self.path} has no layer {name!r} (layers: {', '.join(self.layers)})",
                                     hint="run `fmcache inspect PATH` to list layers") from None

    def _samples(self, samples: Iterable[int] | int) -> np.ndarray:
        return checked_indices(samples, len(self), f"{self.path}", "sample", "the cache")

    def read_parts(self, layer: str, samples: Iterable[int], parts: Sequence[str] | None = None
                   ) -> dict[str, np.ndarray]:
        """Decoded stored parts (tiers and ``tier@variant``) for a batch of samples. A
        packed layer stores its tiers in one part (:data:`~fmcache.manifest.WHOLE_PART`),
        which is what ``parts=None`` gives; a tier named in ``parts`` comes from it."""
        info = self.layer(layer)
        idx = self._samples(samples)
        tiers = [p for p in parts or () if info.packed and p in info.plan.names]
        if not tiers:
            return self.backend.read(layer, idx, parts)
        assert parts is not None
        stored = self.backend.read(layer, idx, list(dict.fromkeys(
            [*(p for p in parts if p not in tiers), WHOLE_PART])))
        whole = stored[WHOLE_PART]
        return {p: np.ascontiguousarray(info.plan.select(whole, p, batched=True)) if p in tiers else stored[p]
                for p in parts}

    def read_batch(self, layer: str, samples: Iterable[int], out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``(len(samples), *shape)``: the base maps, tiers merged (into ``out`` if given)."""
        info = self.layer(layer)
        return self._read_base(layer, info, self._samples(samples), out)

    def read_batch_picked(self, layer: str, samples: Iterable[int], picks: Sequence[str | None], *,
                          merged: bool = True, replace: str | None = None) -> tuple[Any, np.ndarray]:
        """:meth:`read_batch`, plus one stored part per row: ``picks[r]`` names the part of
        sample ``samples[r]`` to decode (a variant such as ``sensitive@flip``), None none.

        Returns ``(base, picked)``: ``picked[r]`` holds the part where ``picks[r]`` names one
        and is undefined elsewhere; all picked parts must share one shape (``picked`` is
        ``(n, 0)`` when nothing is picked). With ``merged=False`` ``base`` is the dict of
        tier name -> that tier's batch (what :meth:`read_parts` returns) instead of the
        merged maps. On LMDB each sample's record is fetched and checked once for both.

        ``replace`` names a tier (of the picked parts' shape) whose rows take the picked
        part instead: a row that picks ``sensitive@flip`` gets it in place of its own
        ``sensitive`` tier (merged or not), that tier is not decoded for it, and ``picked``
        is ``(n, 0)``. What ``FeatureMapDataset(augment="saca")`` reads per batch, with
        ``replace="sensitive"``."""
        info = self.layer(layer)
        idx = self._samples(samples)
        if len(picks) != len(idx):
            raise ValueError(f"{len(picks)} picks for {len(idx)} samples")
        specs = {spec.name: spec for spec in self.backend.part_specs(layer)}
        shapes = set()
        for name in {p for p in picks if p is not None}:
            spec = specs.get(name)
            if spec is None:
                raise CacheError(f"{self.path}: layer {layer!r} has no stored part {name!r}",
                                 hint=f"parts: {', '.join(specs)}")
            shapes.add(spec.shape)
        if len(shapes) > 1:
            raise ShapeMismatchError(f"{self.path}: layer {layer!r}: the picked parts have shapes {sorted(shapes)}")
        if replace is not None:
            if replace not in info.plan.names:
                raise CacheError(f"{self.path}: layer {layer!r} has no tier {replace!r} to replace",
                                 hint=f"tiers: {', '.join(info.plan.names)}")
            tier_shape = info.part_shape(replace)
            if shapes and shapes != {tier_shape}:
                raise ShapeMismatchError(f"{self.path}: layer {layer!r}: the picked parts have shape "
                                         f"{shapes.pop()}, tier {replace!r} has {tier_shape}")
            if info.packed:  # the tier shares its part with the others: decode the picks apart
                shapes = {tier_shape}
            else:
                shapes = set()
        picked = np.empty((len(idx), *(shapes.pop() if shapes else (0,))), dtype=np.float32)
        target = None if replace is not None and not info.packed else picked
        whole = self._whole_tier_of(layer, info)
        if whole and (merged or info.packed):
            base = np.empty((len(idx), *info.shape), dtype=np.float32)
            self.backend.read_picked(layer, idx, (whole,), {whole: base}, picks, target, None if info.packed
                                     else replace)
            if replace is not None and info.packed:
                rows = np.flatnonzero([p is not None for p in picks])
                if len(rows):  # the picked rows' channels of that tier, in place
                    axis = channel_axis(len(info.shape)) + 1
                    channels = np.asarray(info.plan.tier(replace).channels, dtype=np.intp)
                    np.moveaxis(base, axis, 1)[np.ix_(rows, channels)] = np.moveaxis(picked[rows], axis, 1)
                picked = np.empty((len(idx), 0), dtype=np.float32)
            return (base if merged else info.plan.split(base, batched=True)), picked
        parts = self.backend.read_picked(layer, idx, info.plan.names, None, picks, target, replace)
        return (info.plan.merge(parts, batched=True) if merged else parts), picked

    def read(self, layer: str, sample: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 map of one sample, shape ``layer.shape`` (into ``out`` if given)."""
        fast = self._read_fast.get(layer)
        if fast is None:  # per layer, once: (samples, map shape, the whole tier or "")
            info = self.layer(layer)
            fast = self._read_fast[layer] = (len(self), info.shape, self._whole_tier_of(layer, info))
        n, shape, whole = fast
        if type(sample) is int and out is None and whole and 0 <= sample < n:  # the commonest case first
            return self.backend.read_one(layer, sample, whole, np.empty(shape, np.float32))
        if isinstance(sample, (int, np.integer)) and -n <= sample < n and not isinstance(sample, bool):
            # the per-sample fast path
            index = int(sample) + n if sample < 0 else int(sample)
            if whole and (out is None or (out.flags.c_contiguous and out.shape == shape
                                          and out.dtype == np.float32)):
                dst = np.empty(shape, dtype=np.float32) if out is None else out
                return self.backend.read_one(layer, index, whole, dst)
            idx = np.array([index], dtype=np.int64)
        else:
            idx = self._samples([sample])
        return self._read_base(layer, self.layer(layer), idx, None if out is None else out[None])[0]

    def _whole_tier_of(self, layer: str, info: LayerInfo) -> str:
        """The name of the layer's one base part when it holds every channel in order (a
        packed layer's, or the only tier's), else ""."""
        whole = self._whole_tier.get(layer)
        if whole is None:
            base, first = info.base_parts, info.plan.tiers[0]
            in_order = info.packed or first.channels == tuple(range(info.plan.num_channels))
            whole = base[0] if len(base) == 1 and in_order else ""
            self._whole_tier[layer] = whole
        return whole

    def _read_base(self, layer: str, info: LayerInfo, idx: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        shape = (len(idx), *info.shape)
        if out is not None and (out.shape != shape or out.dtype != np.float32):
            raise ShapeMismatchError(f"out has shape {out.shape} {out.dtype}, expected {shape} float32")
        whole = self._whole_tier_of(layer, info)
        if whole:
            # Decode straight into the result: no per-part batch, no merge copy.
            dst = out if out is not None and out.flags.c_contiguous else np.empty(shape, dtype=np.float32)
            self.backend.read(layer, idx, (whole,), out={whole: dst})
            if out is not None and dst is not out:
                out[...] = dst
                return out
            return dst
        parts = self.backend.read(layer, idx, info.plan.names)
        return info.plan.merge(parts, batched=True, out=out)

    def check_fingerprints(self, *, weights: str | None = None, data: str | None = None,
                           allow_stale: bool = False) -> None:
        """StaleCacheError unless the given fingerprints match the recorded ones."""
        check_fingerprints(self.manifest.fingerprints, {"weights": weights, "data": data},
                            f"opening {self.path}", allow_stale)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fmcache.Cache {self.path} {self.backend_id} {len(self)} samples, layers {list(self.layers)}>"


def open_cache(path: str | os.PathLike[str], *, weights_fingerprint: str | None = None,
               data_fingerprint: str | None = None, allow_stale: bool = False) -> Cache:
    """Open a committed cache (or a merged sharded one) read-only; with fingerprints
    given, refuse a stale one."""
    cache: Cache = ShardedCache(path) if is_sharded(Path(path)) else Cache(path)  # type: ignore[assignment]
    if weights_fingerprint is not None or data_fingerprint is not None:
        cache.check_fingerprints(weights=weights_fingerprint, data=data_fingerprint, allow_stale=allow_stale)
    return cache


__all__ = ["Cache", "CacheWriter", "create_cache", "default_samples_per_chunk", "open_cache", "partial_path"]

# Imported with this module, not on open_cache's first call: a fork while another thread
# ran that first import left the child waiting forever on the module's import lock, held
# by a thread the child does not have (tests/test_close_while_reading.py). Last, because
# shards imports this module.
from .shards import ShardedCache, is_sharded
