"""``fmcache compact``: re-encode, convert LMDB <-> HDF5, drop layers, reclaim space.

The destination is written as a new cache (``DST.partial`` until committed), so the
source stays intact whatever happens. Maps are decoded from the source and re-encoded
with the destination's codecs: with a lossy codec on both sides the errors add up
(bounded by the sum of the two contracts); without ``codec`` the tier plans are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cache import open_cache
from .codecs import Codec, codec_from_spec
from .errors import CacheError, CacheExistsError, DiskFullError
from .manifest import WHOLE_PART, Manifest, part_name
from .paths import partial_path, remove_path
from .tiers import Tier, TierPlan
from .writer import create_cache


def compact_cache(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, codec: Codec | str | None = None,
                  backend: str | None = None, drop_layers: Sequence[str] = (), overwrite: bool = False,
                  batch_size: int = 256, progress: Callable[[int], None] | None = None) -> Manifest:
    """Write ``src``'s layers (minus ``drop_layers``) to a new cache at ``dst``."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CacheError(f"compact writes a new cache: {dst} is the source", hint="choose another DST")
    new_codec = codec_from_spec(codec) if codec is not None else None
    cache = open_cache(src)
    with cache:
        for name in drop_layers:
            cache.layer(name)
        keep = [name for name in cache.layers if name not in drop_layers]
        if not keep:
            raise CacheError("compact would drop every layer", hint="keep at least one layer")
        m = cache.manifest
        build = {**m.build, "compacted_from": str(src)}
        if not overwrite and (dst.exists() or partial_path(dst).exists()):
            what = f"{dst} already exists" if dst.exists() else f"{partial_path(dst)} holds an unfinished cache"
            raise CacheExistsError(what, hint="compact cannot resume: start over with --overwrite (overwrite=True), "
                                              "or choose another DST")
        # a cache built with allow_nonfinite holds NaN/Inf on purpose: its copy takes them too
        writer = create_cache(dst, backend=backend, overwrite=overwrite, fingerprints=m.fingerprints, build=build,
                              allow_nonfinite=bool(m.build.get("allow_nonfinite", False)))
        try:
            return _copy(cache, writer, keep, new_codec, batch_size, progress)
        except BaseException as exc:
            # compact cannot resume: its unfinished DST is only in the way (and, on a full
            # disk, holds the space the next try needs)
            remove_path(partial_path(dst))
            if isinstance(exc, DiskFullError):
                raise DiskFullError(exc.message, hint=f"free space (or choose another DST) and compact again: the "
                                                      f"unfinished DST was removed, {src} is untouched") from None
            raise


def _copy(cache: Any, writer: Any, keep: Sequence[str], new_codec: Any, batch_size: int,
          progress: Callable[[int], None] | None) -> Manifest:
    """Every sample of the ``keep`` layers of ``cache`` into ``writer``, committed."""
    m = cache.manifest
    with writer:
        for name in keep:
            layer = m.layers[name]
            plan = layer.plan if new_codec is None else TierPlan(
                layer.plan.num_channels, [Tier(t.name, t.channels, new_codec) for t in layer.plan.tiers])
            writer.add_layer(name, layer.shape, plan=plan, variants=layer.variants,
                             variant_tiers=layer.variant_tiers or None, samples_per_chunk=layer.samples_per_chunk,
                             extra=layer.extra)
        labels = cache.labels
        n = len(cache)
        for start in range(0, n, batch_size):
            samples = np.arange(start, min(start + batch_size, n))
            maps: dict[str, np.ndarray] = {}
            variants: dict[str, dict[str, np.ndarray]] = {}
            for name in keep:
                layer = m.layers[name]
                parts = cache.read_parts(name, samples)
                maps[name] = parts[WHOLE_PART] if layer.packed else layer.plan.merge(
                    {t: parts[t] for t in layer.plan.names}, batched=True)
                for variant in layer.variants:
                    # Variant tiers only: the other channels of a variant are never read.
                    full = maps[name].copy()
                    for tier in layer.variant_tiers:
                        idx = list(layer.plan.tier(tier).channels)
                        axis = 1 if len(layer.shape) >= 3 else len(layer.shape)
                        np.moveaxis(full, axis, 0)[idx] = np.moveaxis(parts[part_name(tier, variant)], axis, 0)
                    variants.setdefault(name, {})[variant] = full
            writer.append(maps, labels[samples] if labels is not None else np.zeros(len(samples), np.int64),
                          variants=variants or None)
            if progress is not None:
                progress(len(samples))
        return writer.commit()
