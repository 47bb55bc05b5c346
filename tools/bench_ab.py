"""Before/after in one process: a baseline commit's fmcache and the working tree's, call by call.

``bench_fastpath.py`` alternates whole child processes, one per tree. On this machine that
could not resolve 20 % effects: in session 6 its rows for unchanged code moved 0.62-1.41x
between two trees, because the machine's speed drifts over seconds. Here the baseline
commit is checked out into a temporary git worktree and imported beside the working tree
under another package name (``fmcache_baseline``: fmcache's own imports are all
relative); both build the same caches from the same maps, and every measurement
alternates the two implementations sample by sample (each in turn first), summing
``perf_counter_ns`` per side, so a drift hits both alike. Each round is one pass over the
samples; the table gives the median per-call time of each side and the median (min-max)
over rounds of baseline time / new time (above 1: the working tree is faster).

The maps are real post-ReLU maps, as in ``bench_read.py`` (the zoo's CIFAR ResNet-18 of
width 32 on Fashion-MNIST, layers 1-3). Measured per layer: ``codec.decode`` and
``cache.read`` on LMDB and HDF5 (a fresh array unless it says ``out=``) for ``bf16``,
``int8`` and ``raw``, and Dataset items (:func:`bench_items`: consecutive batches and the
chunk-aware sampler's, and batches of an ``EpochLoader``; ``--items-only`` for just these). ``--baseline HEAD``
compares the code with itself: the tool's own noise, to read the other runs against.

    python tools/bench_ab.py --baseline 2e065c3
    python tools/bench_ab.py --baseline HEAD                  # the A/A noise check
    python tools/bench_ab.py --baseline 2e065c3 --layers layer3 --rounds 20 --json docs/bench_ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from baseline_tree import baseline_tree
from bench_read import capture_maps

import fmcache  # the working tree's

CODECS = ("bf16", "int8", "raw")
BACKENDS = ("lmdb", "hdf5")


def load_baseline(tree: Path) -> ModuleType:
    """The ``fmcache`` package of ``tree``, imported as ``fmcache_baseline``."""
    spec = importlib.util.spec_from_file_location("fmcache_baseline", tree / "fmcache" / "__init__.py",
                                                  submodule_search_locations=[str(tree / "fmcache")])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmcache_baseline"] = module
    spec.loader.exec_module(module)
    return module


def build(package: ModuleType, path: Path, backend: str, layer: str, maps: np.ndarray, codec: str) -> None:
    with package.create_cache(path, backend=backend, overwrite=True) as writer:
        writer.add_layer(layer, maps.shape[1:], codec=codec)
        for start in range(0, len(maps), 256):
            writer.append({layer: maps[start:start + 256]}, np.zeros(len(maps[start:start + 256]), np.int64))
        writer.commit()


def interleaved(old: Callable[[int], Any], new: Callable[[int], Any], samples: int,
                rounds: int) -> tuple[list[float], list[float]]:
    """Per round: (baseline, new) mean ns per call, the two called alternately per sample."""
    clock = time.perf_counter_ns
    old(0), new(0)  # first-call set-up (layouts, handles) outside the timing
    per_round: tuple[list[float], list[float]] = ([], [])
    sides = ((0, old), (1, new))
    for r in range(rounds):
        spent = [0, 0]
        for i in range(samples):
            for side, fn in sides if (i + r) % 2 else sides[::-1]:
                t0 = clock()
                fn(i)
                spent[side] += clock() - t0
        per_round[0].append(spent[0] / samples)
        per_round[1].append(spent[1] / samples)
    return per_round


def summary(old: list[float], new: list[float], per: int = 1) -> dict[str, Any]:
    """Median µs per call (per item: ``per`` items a call) of each side, and the median and
    range over rounds of baseline time / new time."""
    ratios = [o / w for o, w in zip(old, new)]
    return {"baseline_us": statistics.median(old) / 1e3 / per, "now_us": statistics.median(new) / 1e3 / per,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "rounds_baseline_ns": old, "rounds_now_ns": new}


def bench_layer(base: ModuleType, layer: str, maps: np.ndarray, rounds: int, workdir: Path) -> dict[str, Any]:
    n = len(maps)
    shape = maps.shape[1:]
    rows: dict[str, Any] = {}
    sides = {"baseline": base, "now": fmcache}
    for spec in CODECS:
        codecs = {side: package.codecs.codec_from_spec(spec) for side, package in sides.items()}
        encoded = [codecs["now"].encode(m) for m in maps]
        pairs: dict[str, dict[str, Callable[[int], Any]]] = {
            f"{spec} codec.decode": {side: (lambda i, c=c, e=encoded: c.decode(e[i])) for side, c in codecs.items()}}
        caches = {}
        for backend in BACKENDS:
            for side, package in sides.items():
                path = workdir / f"{side}-{spec}-{layer}-{backend}{'.h5' if backend == 'hdf5' else '.lmdb'}"
                build(package, path, backend, layer, maps, spec)
                caches[side, backend] = package.open_cache(path)
            outs = {side: np.empty(shape, np.float32) for side in sides}
            pairs[f"{spec} {backend} cache.read"] = {
                side: (lambda i, c=caches[side, backend]: c.read(layer, i)) for side in sides}
            pairs[f"{spec} {backend} cache.read out="] = {
                side: (lambda i, c=caches[side, backend], o=outs[side]: c.read(layer, i, out=o)) for side in sides}
        for name, fns in pairs.items():
            rows[name] = summary(*interleaved(fns["baseline"], fns["now"], n, rounds))
        for cache in caches.values():
            cache.close()
    return rows


def bench_items(base: ModuleType, layer: str, maps: np.ndarray, rounds: int, workdir: Path,
                batch: int = 64) -> dict[str, Any]:
    """Dataset items: ``FeatureMapDataset.__getitems__`` of consecutive batches from a SACA
    cache (a ``sensitive`` tier of every fourth channel and a ``bulk`` tier of the rest,
    both ``bf16``, the five default variants; the variants are the maps rolled by one
    pixel, stand-ins with the right shape), ``augment`` = ``none`` and ``saca``, each batch
    alternating between the two trees. µs per item."""
    n, shape = len(maps), maps.shape[1:]
    sides = {"baseline": base, "now": fmcache}
    names = sorted(fmcache.augment.variant_name(d) for d in fmcache.augment.default_variants(4, 2))
    variants = {v: np.roll(maps, k + 1, axis=-1) for k, v in enumerate(names)}
    batches = [list(range(s, s + batch)) for s in range(0, n - batch + 1, batch)]
    rows: dict[str, Any] = {}
    for backend in BACKENDS:
        datasets: dict[str, dict[str, Any]] = {"none": {}, "saca": {}}
        for side, package in sides.items():
            plan = package.TierPlan.two_tier(shape[0], list(range(0, shape[0], 4)), "bf16", "bf16")
            path = workdir / f"{side}-items-{layer}-{backend}{'.h5' if backend == 'hdf5' else '.lmdb'}"
            build_info = {"input_shape": [1, 4 * shape[-2], 4 * shape[-1]],
                          "augment_family": package.augment.AugFamily().get_config()}
            with package.create_cache(path, backend=backend, overwrite=True, build=build_info) as writer:
                writer.add_layer(layer, shape, plan=plan, variants=names)
                for start in range(0, n, 256):
                    sl = slice(start, start + 256)
                    writer.append({layer: maps[sl]}, np.arange(start, min(start + 256, n)) % 10,
                                  variants={layer: {v: x[sl] for v, x in variants.items()}})
                writer.commit()
            for mode, by_side in datasets.items():
                by_side[side] = package.FeatureMapDataset(path, augment=mode, seed=1)
        # the batches training reads: the chunk-aware sampler's order (scattered over the
        # chunks it has open), beside consecutive ones
        order = list(datasets["saca"]["now"].sampler())
        orders = {"": batches, " sampler": [order[s:s + batch] for s in range(0, n - batch + 1, batch)]}
        for mode, by_side in datasets.items():
            for label, these in orders.items():
                old, new = interleaved(*(lambda i, d=by_side[side], b=these: d.__getitems__(b[i % len(b)])
                                         for side in sides), len(these), rounds)
                rows[f"{mode} items {backend}{label} (µs/item)"] = summary(old, new, per=batch)
            # what a training loop gets: batches of each side's EpochLoader (sampler, keys,
            # collate and all), one batch per call, a new epoch when one runs out
            feeds = [_loader_feed(importlib.import_module(f"{sides[side].__name__}.loader").EpochLoader(by_side[side], batch))
                     for side in sides]
            old, new = interleaved(*(lambda _i, f=feed: next(f) for feed in feeds), n // batch, rounds)
            rows[f"{mode} EpochLoader {backend} (µs/item)"] = summary(old, new, per=batch)
    return rows


def _loader_feed(loader: Any) -> Any:
    """Batches of ``loader`` epoch after epoch, forever."""
    epoch = 0
    while True:
        yield from loader(epoch)
        epoch += 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--items-only", action="store_true", help="only the Dataset items rows")
    parser.add_argument("--json", default="", help="also write the rows (every round's numbers) here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with baseline_tree(args.baseline) as tree, tempfile.TemporaryDirectory(prefix="bench_ab-") as tmp:
        base = load_baseline(tree)
        maps = capture_maps(32, 50, args.layers, args.samples)
        work = Path(tmp)
        results = {layer: {**({} if args.items_only else bench_layer(base, layer, maps[layer], args.rounds, work)),
                           **bench_items(base, layer, maps[layer], args.rounds, work)} for layer in args.layers}
    print(f"baseline {args.baseline} vs the working tree, one process, alternating per sample; "
          f"{args.samples} samples x {args.rounds} rounds; µs per call (median over rounds)")
    print("| layer | measurement | baseline µs | now µs | baseline / now (min-max) |")
    print("|---|---|---|---|---|")
    for layer, rows in results.items():
        for name, row in rows.items():
            print(f"| {layer} | {name} | {row['baseline_us']:.1f} | {row['now_us']:.1f} | "
                  f"{row['speedup']:.2f} ({row['speedup_min']:.2f}–{row['speedup_max']:.2f}) |")
    if args.json:
        settings = {"baseline": args.baseline, "samples": args.samples, "rounds": args.rounds,
                    "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).write_text(json.dumps({"settings": settings, "layers": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
