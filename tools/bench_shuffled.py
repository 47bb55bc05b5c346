"""Per-sample reads in a shuffled order, from caches larger than HDF5's row LRU: a baseline
commit against the working tree, in one process.

A training loop whose Dataset calls ``cache.read(layer, i)`` per item under a shuffling
sampler reads samples out of order. Before session 16, HDF5 decoded the sample's whole
chunk (8-32 samples) into its row LRU for such a read, and over a cache larger than the
LRU almost every read missed it; now such a read decodes only its sample
(``fmcache.backends.hdf5_rows``). This tool measures it on real post-ReLU maps (the
zoo's CIFAR ResNet-18 of ``--width`` on Fashion-MNIST, as ``bench_read.py``) at
``--samples`` samples a layer, enough that every layer's stored rows exceed the 32 MiB LRU:

* ``codec``: the bare codec's ``decode`` per sample (the reference rate);
* ``lmdb``: ``cache.read`` on LMDB;
* ``hdf5 baseline`` / ``hdf5 now``: ``cache.read`` on HDF5, each cache built by its own
  implementation (the baseline commit is checked out beside the working tree and imported
  as ``fmcache_baseline``, see ``bench_ab.py``);
* ``hdf5 baseline, in order`` / ``hdf5 now, in order``: the same caches read in order (the
  row LRU's way before session 17; since, rows of 32 KiB or more are decoded a sample at
  a time in order too, and since session 18 rows of 16 KiB or more);
* ``..., batches of 128``: ``cache.read_batch`` over the same shuffled order cut into
  batches (what a ``DataLoader(dataset, shuffle=True)`` over fmcache's Dataset asks for,
  rather than its chunk-aware sampler).

Every pass opens its cache afresh (opening and closing not timed) and reads every sample
in one shuffled order; the passes alternate within a round, rounds repeat ``--repeats``
times. Rates are float32 MB per CPU second of the reading thread (per core), median and
range over rounds; ``vs codec`` is the median per-round ratio to the bare codec's rate.

    python tools/bench_shuffled.py --baseline 38029f8 --docs  # ~4 min: docs/bench_shuffled.json, the table, .png
    python tools/bench_shuffled.py --render docs/bench_shuffled.json   # the table and figure of a saved run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from baseline_tree import baseline_tree
from bench_ab import build, load_baseline
from bench_read import capture_maps, cpu_name, fresh_pass, write_region
from plotting import pyplot

import fmcache  # the working tree's

MB = 1e6


def pass_of(package: Any, path: Path, layer: str, order: Sequence[int]) -> Callable[[], float]:
    """One pass of ``cache.read`` over ``order`` from the cache opened afresh (opening and
    closing left out of the time)."""
    def body(cache: Any) -> None:
        for i in order:
            cache.read(layer, i)
    return fresh_pass(package.open_cache, path, body)


def batches_of(package: Any, path: Path, layer: str, batches: Sequence[np.ndarray]) -> Callable[[], float]:
    """:func:`pass_of` with ``cache.read_batch`` over ``batches``."""
    def body(cache: Any) -> None:
        for batch in batches:
            cache.read_batch(layer, batch)
    return fresh_pass(package.open_cache, path, body)


def bench_layer(base: Any, layer: str, maps: np.ndarray, codec: str, repeats: int, work: Path,
                batch: int) -> dict[str, Any]:
    n = len(maps)
    order = [int(i) for i in np.random.default_rng(0).permutation(n)]
    batches = [np.asarray(order[lo:lo + batch], dtype=np.int64) for lo in range(0, n, batch)]
    for name, package, backend in (("now", fmcache, "hdf5"), ("baseline", base, "hdf5"), ("now", fmcache, "lmdb")):
        build(package, work / f"{layer}-{name}.{'h5' if backend == 'hdf5' else 'lmdb'}", backend, layer, maps, codec)
    bare = fmcache.codecs.codec_from_spec(codec)
    encoded = [bare.encode(m) for m in maps]

    def codec_pass() -> float:
        for i in order:
            bare.decode(encoded[i])
        return 0.0

    runs: dict[str, Callable[[], float]] = {
        "codec": codec_pass,
        "lmdb": pass_of(fmcache, work / f"{layer}-now.lmdb", layer, order),
        "hdf5 baseline": pass_of(base, work / f"{layer}-baseline.h5", layer, order),
        "hdf5 now": pass_of(fmcache, work / f"{layer}-now.h5", layer, order),
        "hdf5 baseline, in order": pass_of(base, work / f"{layer}-baseline.h5", layer, range(n)),
        "hdf5 now, in order": pass_of(fmcache, work / f"{layer}-now.h5", layer, range(n)),
        f"lmdb, batches of {batch}": batches_of(fmcache, work / f"{layer}-now.lmdb", layer, batches),
        f"hdf5 baseline, batches of {batch}": batches_of(base, work / f"{layer}-baseline.h5", layer, batches),
        f"hdf5 now, batches of {batch}": batches_of(fmcache, work / f"{layer}-now.h5", layer, batches),
    }
    for run in runs.values():  # warm-up: the OS page cache, first-call set-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        names = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in names:
            t0 = time.thread_time()
            left_out = runs[name]()
            seconds[name].append(max(time.thread_time() - t0 - left_out, 1e-9))
    megabytes = maps.nbytes / MB
    result: dict[str, Any] = {"shape": list(maps.shape[1:]), "samples": n, "megabytes": megabytes,
                              "stored_row_mb": n * (maps[0].size * 2) / MB, "rates": {}}
    for name, values in seconds.items():
        rates = [megabytes / s for s in values]
        result["rates"][name] = {
            "median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "vs_codec": statistics.median(c / s for c, s in zip(seconds["codec"], values))}
    result["now_vs_baseline"] = statistics.median(b / s for b, s in zip(seconds["hdf5 baseline"], seconds["hdf5 now"]))
    result["in_order_now_vs_baseline"] = statistics.median(
        b / s for b, s in zip(seconds["hdf5 baseline, in order"], seconds["hdf5 now, in order"]))
    result["batches_now_vs_baseline"] = statistics.median(
        b / s for b, s in zip(seconds[f"hdf5 baseline, batches of {batch}"], seconds[f"hdf5 now, batches of {batch}"]))
    return result


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lru = f", HDF5's row LRU {s['row_cache_bytes'] / 2**20:g} MiB" if "row_cache_bytes" in s else ""
    lines = [(f"Settings: ResNet-18 width {s['width']}, {s['samples']} samples a layer{lru}, codec `{s['codec']}`, "
             f"{s['repeats']} rounds, baseline `{s['baseline']}`; {s['cpu']}. Per-sample `cache.read` in one "
             "shuffled order (and `read_batch` over it in batches) from a freshly opened cache, float32 MB per CPU second (per core), median "
             "(min–max); `vs codec`: median per-round ratio to the bare codec's rate.\n"),
             "| layer | shape | stored rows MB | reads | MB/s | vs codec |", "|---|---|---:|---|---:|---:|"]
    for layer, res in results["layers"].items():
        for name, rate in res["rates"].items():
            lines.append(f"| {layer} | {tuple(res['shape'])} | {res['stored_row_mb']:.0f} | {name} | "
                         f"{rate['median']:,.0f} ({rate['min']:,.0f}–{rate['max']:,.0f}) | {rate['vs_codec']:.2f} |")
    lines.append("")
    speedup = "HDF5 now / baseline speed, shuffled: " + ", ".join(
        f"{layer} {res['now_vs_baseline']:.1f}×" for layer, res in results["layers"].items())
    if all("batches_now_vs_baseline" in res for res in results["layers"].values()):
        speedup += "; in batches: " + ", ".join(
            f"{layer} {res['batches_now_vs_baseline']:.1f}×" for layer, res in results["layers"].items())
    if all("in_order_now_vs_baseline" in res for res in results["layers"].values()):
        speedup += "; in order: " + ", ".join(
            f"{layer} {res['in_order_now_vs_baseline']:.2f}×" for layer, res in results["layers"].items())
    lines.append(speedup)
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    layers = list(results["layers"])
    names = list(next(iter(results["layers"].values()))["rates"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar([i + k * width for i in range(len(layers))],
               [results["layers"][layer]["rates"][name]["vs_codec"] for layer in layers], width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(layers))], layers)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("per-sample read speed / bare codec's")
    ax.set_title("cache.read per sample, shuffled order, caches larger than HDF5's row LRU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results: dict[str, Any], region: str = "bench_shuffled") -> None:
    """The table between ``<!-- REGION:start -->`` and ``<!-- REGION:end -->`` of
    docs/benchmarks.md, the figure as docs/REGION.png."""
    write_region(REPO / "docs" / "benchmarks.md", f"<!-- {region}:start -->", f"<!-- {region}:end -->",
                 markdown(results))
    plot(results, REPO / "docs" / f"{region}.png")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--render"] and len(argv) in (2, 4):  # --render JSON [--region NAME]
        results = json.loads(Path(argv[1]).read_text())
        print(markdown(results))
        write_docs(results, *argv[3:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--codec", default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="rows a read_batch call (a shuffling DataLoader's batch)")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_shuffled.json"), help="'' for stdout only")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md and the PNG")
    parser.add_argument("--region", default="bench_shuffled", help="the docs region (and PNG name) --docs writes")
    parser.add_argument("--row-cache-mib", type=float, default=None,
                        help="HDF5's row LRU in MiB, for both implementations (default theirs, 32): scales the "
                             "'larger than the LRU' regime down to fewer samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    maps = capture_maps(args.width, 50, args.layers, args.samples)
    results: dict[str, Any] = {"settings": {
        "width": args.width, "samples": args.samples, "codec": args.codec, "repeats": args.repeats, "batch": args.batch,
        "baseline": args.baseline, "cpu": cpu_name(), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": "python tools/bench_shuffled.py " + " ".join(argv)},
        "layers": {}}
    with baseline_tree(args.baseline) as tree, tempfile.TemporaryDirectory(prefix="bench_shuffled-") as tmp:
        base = load_baseline(tree)
        if args.row_cache_mib is not None:
            for package in (fmcache, base):
                package.backends.hdf5_backend.ROW_CACHE_BYTES = int(args.row_cache_mib * 2**20)
        results["settings"]["row_cache_bytes"] = fmcache.backends.hdf5_backend.ROW_CACHE_BYTES
        for layer in args.layers:
            results["layers"][layer] = bench_layer(base, layer, maps[layer], args.codec, args.repeats, Path(tmp),
                                                   args.batch)
            print(f"{layer}: done", file=sys.stderr)
    print(json.dumps(results, indent=1))
    print(markdown(results), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.docs:
        write_docs(results, args.region)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
