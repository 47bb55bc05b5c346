"""What ``fmcache inspect`` shows: a JSON-able summary and a readable table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .backends import backend_class, detect_backend
from .cache import open_cache, partial_path
from .errors import CacheError, IncompleteCacheError, NotACacheError
from .manifest import Manifest
from .paths import PARTIAL_SUFFIX, writer_pid


def _layer_summary(manifest: Manifest) -> dict[str, Any]:
    layers = {}
    for name, layer in manifest.layers.items():
        base_parts = set(layer.base_parts)
        entry: dict[str, Any] = {
            "shape": list(layer.shape),
            "dtype": layer.dtype,
            "samples_per_chunk": layer.samples_per_chunk,
            "raw_bytes": sum(v for k, v in layer.raw_bytes.items() if k in base_parts),
            "stored_bytes": sum(v for k, v in layer.stored_bytes.items() if k in base_parts),
            # a packed layer stores its tiers in one part: bytes per tier are not known
            "tiers": [{"name": t.name, "channels": len(t.channels), "codec": t.codec.spec,
                       **({} if layer.packed else {"raw_bytes": layer.raw_bytes.get(t.name, 0),
                                                   "stored_bytes": layer.stored_bytes.get(t.name, 0)})}
                      for t in layer.plan.tiers],
            "packed": layer.packed,
            "variants": list(layer.variants),
        }
        if layer.variants:
            entry["variant_stored_bytes"] = sum(v for k, v in layer.stored_bytes.items() if k not in base_parts)
            entry["variant_raw_bytes"] = sum(v for k, v in layer.raw_bytes.items() if k not in base_parts)
        sens = layer.extra.get("sensitivity_summary")
        if sens:
            entry["sensitivity"] = sens
        layers[name] = entry
    return layers


def inspect_cache(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a cache; an interrupted build is reported with ``complete: false`` (its
    bytes per layer are counted at commit: ``None`` until then), named by the cache's
    path or by its ``PATH.partial``."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX) and path.exists() and not path.with_name(path.name + PARTIAL_SUFFIX).exists():
        path = path.with_name(path.name[:-len(PARTIAL_SUFFIX)])
    try:
        cache = open_cache(path)
    except IncompleteCacheError:
        partial = partial_path(path)
        backend_id = detect_backend(partial)
        if backend_id is None:
            raise
        pid = writer_pid(path)
        try:
            backend = backend_class(backend_id)(partial, writable=False)
            try:
                draft = Manifest.from_json(backend.get_meta("draft") or b"{}", f"{partial}: draft")
                progress = json.loads(backend.get_meta("progress") or b'{"samples": 0}')
            finally:
                backend.close()
        except CacheError:
            if pid is None:
                raise
            # HDF5 locks a file it writes: nothing to read until the writer is done
            return {"path": str(path), "complete": False, "samples": None, "backend": backend_id,
                    "format_version": None, "layers": {}, "fingerprints": {},
                    "hint": f"being written now (process {pid}): inspect it when that is done"}
        layers = _layer_summary(draft)
        for entry in layers.values():  # counted at commit
            entry["raw_bytes"] = entry["stored_bytes"] = None
            for tier in entry["tiers"]:
                tier.pop("raw_bytes", None)
                tier.pop("stored_bytes", None)
        return {"path": str(path), "complete": False, "samples": int(progress["samples"]),
                "backend": backend_id, "format_version": draft.format_version,
                "layers": layers, "fingerprints": draft.fingerprints,
                "hint": f"being written now (process {pid})" if pid is not None else
                "an interrupted compact (compact cannot resume): run `fmcache compact SRC DST --overwrite` again"
                if "compacted_from" in draft.build else "an interrupted build: finish it with `fmcache build ... --resume`"}
    with cache:
        m = cache.manifest
        total_raw = sum(sum(layer.raw_bytes.values()) for layer in m.layers.values())
        total_stored = sum(sum(layer.stored_bytes.values()) for layer in m.layers.values())
        return {"path": str(path), "complete": m.complete, "samples": len(cache), "backend": cache.backend_id,
                "format_version": m.format_version, "fmcache_version": m.fmcache_version,
                "labels": m.labels, "layers": _layer_summary(m), "raw_bytes": total_raw,
                "stored_bytes": total_stored, "fingerprints": m.fingerprints, "build": m.build,
                "created_utc": m.created_utc, "committed_utc": m.committed_utc}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render_table(summary: dict[str, Any]) -> str:
    """The human form of :func:`inspect_cache`."""
    version, samples = summary["format_version"], summary["samples"]
    lines = [(f"{summary['path']}  ({summary['backend']}, format v{'?' if version is None else version}, "
              f"{'?' if samples is None else samples} samples, {'complete' if summary['complete'] else 'INCOMPLETE'})")]
    if not summary["complete"]:
        lines.append(f"  {summary['hint']}")
    # columns as wide as their longest entry (long layer names, full codec specs such as
    # ``grid:rel=0.05,cname=zstd,clevel=1,shuffle=byte``), at least the usual widths
    tiers = [t for layer in summary["layers"].values() for t in layer["tiers"]]
    lw = max([16, *(len(name) for name in summary["layers"])])
    tw = max([10, *(len(t["name"]) for t in tiers)])
    cw = max([34, *(len(t["codec"]) for t in tiers)])
    header = f"  {'layer':<{lw}} {'shape':<14} {'tier':<{tw}} {'ch':>4}  {'codec':<{cw}} {'raw':>10} {'stored':>10} {'ratio':>6}"
    lines.append(header)
    for name, layer in summary["layers"].items():
        shape = "x".join(map(str, layer["shape"]))
        rows = [(t["name"], t["channels"], t["codec"], t.get("raw_bytes"), t.get("stored_bytes"))
                for t in layer["tiers"]]
        if layer.get("packed"):  # the tiers share one stored part: its bytes on a row of their own
            rows.append(("(packed)", sum(r[1] for r in rows), rows[0][2], layer["raw_bytes"], layer["stored_bytes"]))
        for i, (tier, channels, codec, raw, stored) in enumerate(rows):
            sizes = f"{'':>10} {'':>10} {'':>6}" if raw is None else (
                f"{_size(raw):>10} {_size(stored):>10} {raw / stored if stored else 0.0:>5.1f}x")
            lines.append(f"  {name if i == 0 else '':<{lw}} {shape if i == 0 else '':<14} {tier:<{tw}} "
                         f"{channels:>4}  {codec:<{cw}} {sizes}")
        if layer["variants"]:
            lines.append(f"  {'':<{lw}} {'':<14} variants: {', '.join(layer['variants'])}  "
                         f"stored {_size(layer.get('variant_stored_bytes', 0))}")
        sens = layer.get("sensitivity")
        if sens:
            counts = sens.get("histogram", [])
            counts = counts.get("counts", []) if isinstance(counts, dict) else counts  # score_summary's form
            hist = " ".join(str(c) for c in counts)
            lines.append(f"  {'':<{lw}} {'':<14} sensitivity p10/p50/p90 {sens.get('p10', 0):.3f}/"
                         f"{sens.get('p50', 0):.3f}/{sens.get('p90', 0):.3f}  hist[0..1] {hist}")
    if summary["complete"]:
        ratio = summary["raw_bytes"] / summary["stored_bytes"] if summary["stored_bytes"] else 0.0
        lines.append(f"  total: raw {_size(summary['raw_bytes'])}, stored {_size(summary['stored_bytes'])} "
                     f"({ratio:.1f}x)")
    return "\n".join(lines)


def require_cache(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists() and not partial_path(path).exists():
        raise NotACacheError(f"{path} does not exist")
    return path
