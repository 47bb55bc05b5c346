"""Before/after of the Dataset's batch path: the cost of a ``FeatureMapDataset`` item on two commits.

Checks out ``--baseline`` (default: 5cb468d, the end of session 3) into a temporary git
worktree, then alternates child processes running this file's ``--child`` mode against
the baseline tree and the working tree, ``--repeats`` times each. A child builds SACA
caches (LMDB and HDF5) of synthetic post-ReLU maps (lognormal, ~42 % zeros) of
``--shape``: a ``sensitive`` tier of every fourth channel and a ``bulk`` tier of the rest,
both ``bf16`` (the default codec) or ``int8`` / ``int4`` (the policy's kind), and the five
default variants of a stride-2 layer. It then times ``__getitems__`` over batches of 128
consecutive samples for ``augment`` = ``none``, ``feature`` and ``saca``: microseconds of
the process's CPU time per item, median of 3 passes. Both trees run the same script, so
the numbers differ only by the code under test.

    python tools/bench_saca_items.py                 # 64x16x16, 1024 samples, 5 repeats
    python tools/bench_saca_items.py --shape 128 8 8

It prints JSON and (unless ``--json ''``) writes it to ``docs/bench_saca_items.json`` and
its table between ``<!-- bench_saca_items:start -->`` and ``<!-- bench_saca_items:end -->``
in ``docs/benchmarks_history.md``; ``--table-only`` rewrites that table from the JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_tree import baseline_tree

MARK_BEGIN = "<!-- bench_saca_items:start -->"
MARK_END = "<!-- bench_saca_items:end -->"
PLANS = {"bf16": ("bf16", "bf16"), "int8/int4": ("int8", "int4")}
MODES = ("none", "feature", "saca")


def child(shape: tuple[int, ...], samples: int, workdir: Path) -> dict[str, float]:
    import numpy as np
    import torch

    import fmcache
    from fmcache import FeatureMapDataset, TierPlan
    from fmcache.augment import AugFamily, default_variants, variant_name

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    def post_relu(n: int) -> np.ndarray:
        return (rng.lognormal(-1.0, 1.0, (n, *shape)) * (rng.random((n, *shape)) > 0.42)).astype(np.float32)

    maps = post_relu(samples)
    names = sorted(variant_name(d) for d in default_variants(4, 2))
    variants = {v: post_relu(samples) for v in names}
    channels = shape[0]
    sensitive = list(range(0, channels, 4))
    results: dict[str, float] = {}
    for plan_name, (sens_codec, bulk_codec) in PLANS.items():
        plan = TierPlan.two_tier(channels, sensitive, sens_codec, bulk_codec)
        for backend in ("lmdb", "hdf5"):
            path = workdir / f"{plan_name.replace('/', '-')}.{'h5' if backend == 'hdf5' else 'lmdb'}"
            with fmcache.create_cache(path, backend=backend,
                                      build={"input_shape": [1, 2 * shape[-2], 2 * shape[-1]],
                                             "augment_family": AugFamily().get_config()}) as writer:
                writer.add_layer("l", shape, plan=plan, variants=names)
                for start in range(0, samples, 256):
                    sl = slice(start, start + 256)
                    writer.append({"l": maps[sl]}, np.arange(start, min(start + 256, samples)),
                                  variants={"l": {v: x[sl] for v, x in variants.items()}})
                writer.commit()
            batches = [list(range(s, min(s + 128, samples))) for s in range(0, samples, 128)]
            for mode in MODES:
                dataset = FeatureMapDataset(path, augment=mode, seed=1)
                times = []
                for epoch in range(4):  # the first pass warms up (opens, page cache)
                    dataset.set_epoch(epoch)
                    t0 = time.process_time()
                    for batch in batches:
                        dataset.__getitems__(batch)
                    times.append(time.process_time() - t0)
                results[f"{plan_name} {backend} {mode}"] = statistics.median(times[1:]) / samples * 1e6
    return results


def markdown(result: dict[str, Any]) -> str:
    lines = ["| tiers | backend | augment | before µs/item | now µs/item | speed-up |", "|---|---|---|---:|---:|---:|"]
    for key, row in result["items"].items():
        tiers, backend, mode = key.split(" ")
        lines.append(f"| {tiers} | {backend} | {mode} | {row['baseline_us']:.0f} | {row['current_us']:.0f} | "
                     f"{row['speedup']:.2f}× |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="5cb468d")
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 16, 16])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_saca_items.json"))
    parser.add_argument("--table-only", action="store_true", help="rewrite the docs table from --json and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.table_only:
        from bench_read import write_region
        write_region(REPO / "docs" / "benchmarks_history.md", MARK_BEGIN, MARK_END,
                     markdown(json.loads(Path(args.json).read_text())))
        return 0
    if args.child is not None:
        sys.path.insert(0, args.child)
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(shape, args.samples, Path(tmp))))
        return 0
    with baseline_tree(args.baseline) as worktree:
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for repeat in range(args.repeats):
            order = [("baseline", worktree), ("current", REPO)]
            for label, tree in order if repeat % 2 == 0 else order[::-1]:
                command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
                           "--shape", *map(str, shape), "--samples", str(args.samples)]
                out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tree).stdout
                runs[label].append(json.loads(out.strip().splitlines()[-1]))
                print(f"repeat {repeat + 1} {label} done", file=sys.stderr)
    keys = list(runs["current"][0])
    table = {}
    for key in keys:
        before = [r[key] for r in runs["baseline"]]
        after = [r[key] for r in runs["current"]]
        table[key] = {"baseline_us": statistics.median(before), "baseline_range": [min(before), max(before)],
                      "current_us": statistics.median(after), "current_range": [min(after), max(after)],
                      # per repeat (the two ran back to back), then the median
                      "speedup": statistics.median(b / a for b, a in zip(before, after))}
    result = {"settings": {"baseline": args.baseline, "shape": list(shape), "samples": args.samples,
                           "repeats": args.repeats, "batch": 128, "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                           "unit": "microseconds of CPU time per item (one process, one torch thread)"},
              "items": table}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        from bench_read import write_region
        Path(args.json).write_text(text + "\n")
        write_region(REPO / "docs" / "benchmarks_history.md", MARK_BEGIN, MARK_END, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
