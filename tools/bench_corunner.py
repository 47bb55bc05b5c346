"""How much a process on the other core slows the training step (2-core machines).

``bench_train.py`` puts reading in a DataLoader worker on the second core, yet even a
trivial reader (``memmap``) stays ~5-15 % behind in-memory maps at the layer3 boundary.
This script measures why: the training step of the ResNet-18 suffix after ``--boundary``
(one torch thread, batch 64, random post-ReLU maps) alone, and beside a second process
running

* ``python-spin``   a pure Python loop (the interpreter, little memory traffic);
* ``memcpy-64MB``   numpy copying 64 MB arrays in a loop (memory bandwidth);
* ``fmcache-read``  ``FeatureMapDataset(augment="saca").__getitems__`` in a loop over a
  bf16 SACA cache of the same boundary (what a DataLoader worker does);

in turn, ``--repeats`` rounds. Step milliseconds, medians; a slowdown well above 1 for the
co-runners that use memory, and not for the spin loop, says the cores share memory
bandwidth / cache rather than execution units. Prints JSON; unless ``--quick`` writes
``docs/bench_corunner.json`` and the table between ``<!-- bench_corunner:start -->`` and
``<!-- bench_corunner:end -->`` in ``docs/benchmarks.md``::

    python tools/bench_corunner.py     # ~2 min
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_read import cpu_name, update_json, write_region

from fmcache.builder import SacaConfig, build_saca_cache
from fmcache.policy import CompressionPolicy
from fmcache.zoo import FashionMNIST, pretrained_resnet, split_at

MARK_BEGIN, MARK_END = "<!-- bench_corunner:start -->", "<!-- bench_corunner:end -->"

READER = """
import sys, torch
torch.set_num_threads(1)
from fmcache import FeatureMapDataset
ds = FeatureMapDataset(sys.argv[1], augment="saca")
n = len(ds)
epoch = 0
while True:
    epoch += 1
    for start in range(0, n - 63, 64):
        ds.__getitems__([(epoch, i) for i in range(start, start + 64)])
"""
CORUNNERS = {
    "alone": None,
    "python-spin": "while True: pass",
    "memcpy-64MB": "import numpy as np\na = np.ones(16 << 20, np.float32); b = np.empty_like(a)\nwhile True: np.copyto(b, a)",
    "fmcache-read": READER,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--boundary", default="layer3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = pretrained_resnet(width=16, steps=50).eval()
    prefix, suffix = split_at(copy.deepcopy(model), args.boundary)
    with torch.no_grad():
        x = prefix(torch.randn(64, 1, 32, 32)).relu()
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(suffix.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()

    def step_ms() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            loss(suffix(x), y).backward()
            opt.step()
        return (time.perf_counter() - t0) / args.steps * 1e3

    step_ms()
    ms: dict[str, list[float]] = {name: [] for name in CORUNNERS}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "c.lmdb"
        data = Subset(FashionMNIST("train", augment=False), range(512))
        build_saca_cache(copy.deepcopy(model), data, args.boundary, cache, saca=SacaConfig(n_samples=64),
                         policy=CompressionPolicy.constant("bf16"), batch_size=64, progress=False)
        for _ in range(1 if args.quick else args.repeats):
            for name, code in CORUNNERS.items():
                proc = subprocess.Popen([sys.executable, "-c", code, str(cache)]) if code else None
                try:
                    time.sleep(1.0 if name == "fmcache-read" else 0.3)  # the reader imports torch first
                    ms[name].append(step_ms())
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
    alone = statistics.median(ms["alone"])
    results: dict[str, Any] = {
        "settings": {"boundary": args.boundary, "repeats": 1 if args.quick else args.repeats, "steps": args.steps, "cpu": cpu_name(),
                     "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")},
        "step_ms": {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in ms.items()},
        "slowdown": {name: statistics.median(v) / alone for name, v in ms.items()},
    }
    print(json.dumps(results, indent=1))
    if not args.quick:
        update_json(REPO / "docs" / "bench_corunner.json", "corunner", results)
        lines = [(f"Training step of the suffix after {args.boundary} (batch 64, one torch thread), "
                  f"{1 if args.quick else args.repeats} rounds of {args.steps} steps; {results['settings']['cpu']}.\n"),
                 "| beside it on the other core | step ms, median (min–max) | slowdown |", "|---|---|---:|"]
        for name, s in results["step_ms"].items():
            lines.append(f"| {name} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | {results['slowdown'][name]:.2f} |")
        write_region(REPO / "docs" / "benchmarks.md", MARK_BEGIN, MARK_END, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
