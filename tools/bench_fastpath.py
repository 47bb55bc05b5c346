"""Before/after of the read fast path: the same measurements on two commits, side by side.

Checks out ``--baseline`` (default: 67d0fe4, the last commit before the fast path) into
a temporary git worktree, then alternates child processes (in turn first and second) running this file's
``--child`` mode against the baseline tree and the working tree, ``--repeats`` times
each, and prints the median and min-max of every measurement, in float32 MB/s per core
(CPU time of the measuring thread). The maps are synthetic post-ReLU maps (lognormal
with ~42 % zeros) of ``--shape``, so the baseline needs nothing but its own code.

    python tools/bench_fastpath.py                  # 128x16x16, 512 samples, 5 repeats
    python tools/bench_fastpath.py --shape 64 32 32
    python tools/bench_fastpath.py --baseline 66c3b21 --json docs/bench_fastpath_s5.json

It prints a markdown table; ``--json`` also keeps every run's numbers and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from baseline_tree import baseline_tree


def child(shape: tuple[int, ...], samples: int, workdir: Path) -> dict[str, float]:
    import blosc2
    import numpy as np
    import torch

    import fmcache
    from fmcache.codecs import codec_from_spec

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    rng = np.random.default_rng(0)
    maps = (rng.lognormal(-1.0, 1.0, (samples, *shape)) * (rng.random((samples, *shape)) > 0.42)).astype(np.float32)
    megabytes = maps.nbytes / 1e6
    results: dict[str, float] = {}

    def rate(run) -> float:  # type: ignore[no-untyped-def]
        run()
        best = []
        for _ in range(3):
            t0 = time.thread_time()
            run()
            best.append(time.thread_time() - t0)
        return megabytes / statistics.median(best)

    for spec in ("bf16", "int8", "raw"):
        codec = codec_from_spec(spec)
        encoded = [codec.encode(m) for m in maps]
        out = np.empty(shape, dtype=np.float32)
        results[f"{spec} codec.decode"] = rate(lambda c=codec, e=encoded: [c.decode(x) for x in e])
        results[f"{spec} codec.decode out="] = rate(lambda c=codec, e=encoded, o=out: [c.decode(x, out=o) for x in e])
        for backend in ("lmdb", "hdf5"):
            path = workdir / f"{spec}-{backend}{'.h5' if backend == 'hdf5' else '.lmdb'}"
            with fmcache.create_cache(path, backend=backend) as writer:
                writer.add_layer("l", shape, codec=spec)
                for start in range(0, samples, 128):
                    writer.append({"l": maps[start:start + 128]}, np.arange(start, min(start + 128, samples)))
                writer.commit()
            cache = fmcache.open_cache(path)

            def per_sample(c=cache) -> None:  # type: ignore[no-untyped-def]
                for i in range(samples):
                    c.read("l", i)

            order = np.random.default_rng(1).permutation(samples)
            batches = [np.sort(order[s:s + 128]) for s in range(0, samples, 128)]
            results[f"{spec} {backend} cache.read"] = rate(per_sample)
            results[f"{spec} {backend} read_batch shuffled 128"] = rate(
                lambda c=cache, b=batches: [c.read_batch("l", x) for x in b])
            cache.close()
    return results


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})" if values else "–"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", default="67d0fe4")
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 16, 16])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="", help="also write the runs and ratios here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(child(shape, args.samples, Path(args.child))))
        return 0
    runs: dict[str, dict[str, list[float]]] = {"baseline": {}, "now": {}}
    with baseline_tree(args.baseline) as old_tree, tempfile.TemporaryDirectory(prefix="bench_fastpath-") as tmp:
        for rep in range(args.repeats):
            trees = (("baseline", old_tree), ("now", REPO))
            for label, tree in trees if rep % 2 == 0 else trees[::-1]:  # neither side always runs second
                work = Path(tmp) / f"{label}-{rep}"
                work.mkdir()
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run([sys.executable, "-c",
                                      ("import sys, runpy; sys.argv = sys.argv[1:]; "
                                       "runpy.run_path(sys.argv[0], run_name='__main__')"),
                                      str(Path(__file__).resolve()), "--child", str(work), "--samples",
                                      str(args.samples), "--shape", *map(str, shape)],
                                     env=env, cwd=tree, check=True, capture_output=True, text=True)
                for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    runs[label].setdefault(key, []).append(value)
                shutil.rmtree(work, ignore_errors=True)
    print(f"shape {shape}, {args.samples} samples, {args.repeats} alternating runs each; "
          f"MB/s per core, median (min-max); baseline {args.baseline}")
    print("| measurement | baseline | now | now / baseline |")
    print("|---|---|---|---|")
    ratios: dict[str, float] = {}
    for key in runs["now"]:
        old, new = runs["baseline"].get(key, []), runs["now"][key]
        ratio = ratios[key] = statistics.median(n / o for n, o in zip(new, old)) if old else float("nan")
        print(f"| {key} | {_fmt(old)} | {_fmt(new)} | {ratio:.2f} |")
    if args.json:
        settings = {"baseline": args.baseline, "shape": list(shape), "samples": args.samples,
                    "repeats": args.repeats, "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).write_text(json.dumps({"settings": settings, "mb_s": runs, "now_vs_baseline": ratios},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
