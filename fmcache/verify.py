"""``fmcache verify``: check every checksum and decode every record."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import open_cache
from .errors import CorruptionError


@dataclass
class VerifyReport:
    path: str
    samples: int
    layers: dict[str, int] = field(default_factory=dict)  # layer -> records decoded
    labels_ok: bool = True


def verify_cache(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Decode every part of every sample of every layer (and the labels).

    Raises
    ------
    CorruptionError
        Naming the first bad layer and sample.
    """
    try:
        return _verify(path, progress)
    except CorruptionError as exc:
        if exc.hint == CorruptionError.default_hint:  # "run `fmcache verify`": what is running
            exc.hint = REBUILD_HINT
        raise


#: what to do about damage that verify found
REBUILD_HINT = "rebuild the cache (or the damaged layer) from the source data"


def _verify(path: str | os.PathLike[str], progress: Callable[[int], None] | None) -> VerifyReport:
    cache = open_cache(Path(path))
    with cache:
        report = VerifyReport(str(path), len(cache))
        cache.labels  # noqa: B018 - reading them checks their checksums
        # a cache built with allow_nonfinite stores NaN/Inf on purpose; elsewhere a decoded
        # NaN/Inf means damage that the checksums missed
        nonfinite_ok = bool(cache.manifest.build.get("allow_nonfinite"))
        for name, layer in cache.layers.items():
            step = max(1, layer.samples_per_chunk)
            for start in range(0, len(cache), step):
                samples = np.arange(start, min(start + step, len(cache)))
                try:
                    parts = cache.read_parts(name, samples)
                except CorruptionError:
                    for s in samples:  # narrow it down to the first bad sample
                        try:
                            cache.read_parts(name, [int(s)])
                        except CorruptionError as exc:
                            raise CorruptionError(f"layer {name!r} sample {int(s)}: {exc.message}") from exc
                    raise
                for part, values in parts.items():
                    if not nonfinite_ok and not np.isfinite(values).all():
                        bad = int(samples[np.argmin(np.isfinite(values.reshape(len(samples), -1)).all(1))])
                        raise CorruptionError(f"layer {name!r} sample {bad} part {part!r}: decoded NaN/Inf, which "
                                              "the cache was not built to hold (allow_nonfinite)",
                                              hint="the stored bytes pass their checksums but decode to NaN/Inf: "
                                                   + REBUILD_HINT)
                report.layers[name] = report.layers.get(name, 0) + len(samples)
                if progress is not None:
                    progress(len(samples))
        return report
