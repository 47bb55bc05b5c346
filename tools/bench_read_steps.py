"""Where the time of one per-sample LMDB read goes, step by step, beside the bare codec.

``Cache.read(layer, i)`` on LMDB is ``LmdbBackend.read_one``: pack the key and find the
process's environment, begin a read transaction, get the record, check it (the record's
CRC-32C and index, :class:`fmcache.record.PartPicker`), decode the payload into the
result (:meth:`fmcache.codecs.base.Codec.verified_decoder`) and end the transaction.
This script runs those steps one by one with the backend's own per-layer state and times
each, and beside them the bare codec (``codec.decode(bytes)``, the fresh-array decode
that ``bench_read`` compares reads with), the blosc2 call alone and a CRC-32C pass over
the record alone, alternating every measurement sample by sample over ``--rounds``
passes (a drift of the machine hits all of them alike). Real maps, as in
``bench_read.py``. µs per call, median over rounds.

    python tools/bench_read_steps.py
    python tools/bench_read_steps.py --json docs/bench_read_steps.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from bench_read import build, capture_maps
from crc32c import crc32c

from fmcache import open_cache
from fmcache.backends.lmdb_backend import _REC
from fmcache.codecs import codec_from_spec
from fmcache.codecs.lossless import blosc2_decompress_into

STEPS = ("key + environment", "begin transaction", "get", "record check (CRC, index)", "decode into the result",
         "end transaction")


def measure(layer: str, maps: np.ndarray, spec: str, rounds: int, workdir: Path) -> dict[str, float]:
    n, shape = len(maps), maps.shape[1:]
    path = workdir / f"{spec}-{layer}.lmdb"
    build(path, "lmdb", layer, maps, spec)
    cache = open_cache(path)
    backend = cache.backend
    part = cache._whole_tier_of(layer, cache.layer(layer))
    cache.read(layer, 0)  # makes read_one's per-layer state
    index, pick, decode, _ = backend._read_one_of[(layer, part)]
    codec = codec_from_spec(spec)
    encoded = [codec.encode(m) for m in maps]
    frame_at = 1 + 4 * len(shape) + 1 + 4  # bf16 stage 2: header, stage byte, CRC
    clock = time.perf_counter_ns
    spent: dict[str, list[float]] = {}

    def steps(i: int, acc: dict[str, int]) -> None:
        t0 = clock()
        key = _REC.pack(b"L", index, i)
        env = backend._env()
        t1 = clock()
        txn = env.begin(buffers=True)
        t2 = clock()
        value = txn.get(key)
        t3 = clock()
        payload, _own_key = pick(value, "")
        t4 = clock()
        decode(payload, np.empty(shape, np.float32))
        t5 = clock()
        txn.abort()
        t6 = clock()
        for name, took in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            acc[name] += took
        acc["read_one, sum of the steps"] += t6 - t0

    def timed(name: str, fn: Callable[[int], Any]) -> Callable[[int, dict[str, int]], None]:
        def run(i: int, acc: dict[str, int]) -> None:
            t0 = clock()
            fn(i)
            acc[name] += clock() - t0
        return run

    plan = [steps,
            timed("Cache.read (fresh array)", lambda i: cache.read(layer, i)),
            timed("bare codec.decode (fresh array)", lambda i: codec.decode(encoded[i])),
            timed("CRC-32C pass over the record alone", lambda i: crc32c(encoded[i]))]
    if spec == "bf16":
        plan.append(timed("blosc2 call alone (fresh array)", lambda i: blosc2_decompress_into(
            memoryview(encoded[i])[frame_at:], np.empty(shape, np.float32))))
    names = [*STEPS, "read_one, sum of the steps", "Cache.read (fresh array)", "bare codec.decode (fresh array)",
             "CRC-32C pass over the record alone"] + (["blosc2 call alone (fresh array)"] if spec == "bf16" else [])
    for r in range(rounds):
        acc = dict.fromkeys(names, 0)
        for i in range(n):
            for run in plan if (i + r) % 2 else plan[::-1]:
                run(i, acc)
        for name in names:
            spent.setdefault(name, []).append(acc[name] / n / 1e3)
    cache.close()
    return {name: statistics.median(values) for name, values in spent.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--codecs", nargs="+", default=["bf16", "raw"])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default="", help="also write the numbers here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    maps = capture_maps(32, 50, args.layers, args.samples)
    workdir = Path(tempfile.mkdtemp(prefix="bench_read_steps-"))
    try:
        results = {f"{spec} {layer}": measure(layer, maps[layer], spec, args.rounds, workdir)
                   for spec in args.codecs for layer in args.layers}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    columns = list(results)
    print(f"µs per call, median of {args.rounds} rounds over {args.samples} samples, all alternating per sample")
    print("| step | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in next(iter(results.values())):
        print(f"| {name} | " + " | ".join(f"{results[c][name]:.1f}" if name in results[c] else "–"
                                          for c in columns) + " |")
    if args.json:
        settings = {"samples": args.samples, "rounds": args.rounds, "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).write_text(json.dumps({"settings": settings, "us_per_call": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
