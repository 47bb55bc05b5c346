"""HDF5 SACA batches: a picked variant's rows from whole cached chunks, or one h5py read per row?

``Hdf5Backend.read_picked`` reads the rows of each picked variant (about one row in six
picks a given one) either through the per-process LRU of whole chunks (each chunk read
once per pass, then rows gathered in numpy) or through HDF5's own reads, one slice per
row (its chunk cache keeps the decoded chunk; each call costs tens of µs). Which is
cheaper depends on how many rows a whole chunk serves per pass, i.e. on the samples per
chunk; ``PICKED_CHUNK_ROWS`` is the threshold. This script measures both on real maps:
a SACA cache per (width, layer) (the zoo's ResNet-18 on Fashion-MNIST, ``bf16`` sensitive
tier of every fourth channel and bulk tier, the five default variants as rolled maps),
two ``FeatureMapDataset`` on two copies of it, each batch of the chunk-aware sampler's order read by
both in turn (the first alternating), the threshold set per call so that one always
reads rows and the other always whole chunks. µs per item, median over epochs, and the
median per-epoch ratio rows / chunks (above 1: whole chunks faster).

    python tools/bench_picked_rows.py --json docs/bench_picked_rows.json --docs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from bench_read import capture_maps, write_region

import fmcache
from fmcache.backends import hdf5_backend

MARK_BEGIN, MARK_END = "<!-- bench_picked_rows:start -->", "<!-- bench_picked_rows:end -->"


def saca_cache(path: Path, layer: str, maps: np.ndarray) -> None:
    shape = maps.shape[1:]
    names = sorted(fmcache.augment.variant_name(d) for d in fmcache.augment.default_variants(4, 2))
    variants = {v: np.roll(maps, k + 1, axis=-1) for k, v in enumerate(names)}
    plan = fmcache.TierPlan.two_tier(shape[0], list(range(0, shape[0], 4)), "bf16", "bf16")
    build = {"input_shape": [1, 4 * shape[-2], 4 * shape[-1]],
             "augment_family": fmcache.augment.AugFamily().get_config()}
    with fmcache.create_cache(path, backend="hdf5", overwrite=True, build=build) as writer:
        writer.add_layer(layer, shape, plan=plan, variants=names)
        for start in range(0, len(maps), 256):
            sl = slice(start, start + 256)
            writer.append({layer: maps[sl]}, np.arange(start, min(start + 256, len(maps))) % 10,
                          variants={layer: {v: x[sl] for v, x in variants.items()}})
        writer.commit()


def measure(path: Path, epochs: int, batch: int = 64) -> dict[str, Any]:
    sides = {"rows": 1 << 30, "chunks": 0}  # PICKED_CHUNK_ROWS per side: never / always whole chunks
    # a copy of the file per side: HDF5 shares one chunk cache between opens of a dataset
    copies = {side: path.with_name(f"{path.stem}-{side}.h5") for side in sides}
    for copy in copies.values():
        shutil.copyfile(path, copy)
    data = {side: fmcache.FeatureMapDataset(copies[side], augment="saca", seed=1) for side in sides}
    n = len(data["rows"])
    per: dict[str, list[float]] = {side: [] for side in sides}
    for epoch in range(epochs + 1):  # epoch 0 warms both up (opens, first chunk reads)
        sampler = data["rows"].sampler()
        sampler.set_epoch(epoch)
        order = list(sampler)
        spent = dict.fromkeys(sides, 0.0)
        for k, start in enumerate(range(0, n - batch + 1, batch)):
            keys = order[start:start + batch]
            for side in (("rows", "chunks") if k % 2 else ("chunks", "rows")):
                data[side].set_epoch(epoch)
                hdf5_backend.PICKED_CHUNK_ROWS = sides[side]
                t0 = time.perf_counter()
                data[side].get_batch(keys)
                spent[side] += time.perf_counter() - t0
        if epoch:
            for side in sides:
                per[side].append(spent[side] / (n // batch * batch) * 1e6)
    info = data["rows"].cache.layer(data["rows"].layer)
    return {"samples_per_chunk": info.samples_per_chunk, "shape": list(info.shape),
            **{f"{side}_us_per_item": statistics.median(v) for side, v in per.items()},
            "rows_over_chunks": statistics.median(r / c for r, c in zip(per["rows"], per["chunks"]))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["16:layer1", "16:layer2", "16:layer3", "32:layer2", "32:layer3"],
                        help="width:layer pairs")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", default="")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks_history.md")
    args = parser.parse_args(argv)
    saved = hdf5_backend.PICKED_CHUNK_ROWS
    rows: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_picked_rows-") as tmp:
            for case in args.cases:
                width, layer = case.split(":")
                maps = capture_maps(int(width), 50, [layer], args.samples)[layer]
                path = Path(tmp) / f"w{width}-{layer}.h5"
                saca_cache(path, layer, maps)
                rows[f"width {width} {layer}"] = measure(path, args.epochs)
    finally:
        hdf5_backend.PICKED_CHUNK_ROWS = saved
    lines = ["| maps | samples per chunk | one read per row µs/item | whole chunks µs/item | rows / chunks |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} {tuple(r['shape'])} | {r['samples_per_chunk']} | {r['rows_us_per_item']:.1f} | "
                     f"{r['chunks_us_per_item']:.1f} | {r['rows_over_chunks']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.docs:
        write_region(REPO / "docs" / "benchmarks_history.md", MARK_BEGIN, MARK_END, table)
    if args.json:
        settings = {"samples": args.samples, "epochs": args.epochs, "threshold": saved,
                    "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).write_text(json.dumps({"settings": settings, "cases": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
