"""What the training process pays to receive a worker's batch: torch's hand-over or the ring.

A DataLoader worker's tensors reach the training process as shared-memory storages whose
file descriptors are passed one by one over a socket (a batch of maps and labels: two);
``EpochLoader``'s default hand-over (``fmcache.handover``) leaves the maps in a ring of
shared batch buffers made once and sends a small ticket instead, and the training
process copies the batch out. This script times ``next()`` on two ``EpochLoader``s over
the same SACA cache with one worker each, ``handover="torch"`` and ``"ring"``,
alternating batch by batch (each first in turn), with a stand-in training step of
``--step-ms`` of torch compute after every batch so that the workers work ahead as they
do in training. A ``ring-again`` loader is the A/A row. Per layer: the median ms per
batch over every batch, and the median over epochs of each epoch's torch / ring ratio.

Maps: the zoo's CIFAR ResNet-18 of width 16 (as ``bench_train.py``) on Fashion-MNIST,
layers 2 and 3; a ``bf16`` SACA cache (every fourth channel sensitive, five variants,
rolled stand-ins). Prints JSON; ``--json`` keeps it, ``--docs`` writes the table between
``<!-- bench_handover:start -->`` and ``<!-- bench_handover:end -->`` in
``docs/benchmarks_history.md``::

    python tools/bench_handover.py --json docs/bench_handover.json --docs   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from bench_read import capture_maps, cpu_name, write_region

import fmcache
from fmcache.loader import EpochLoader

MARK_BEGIN, MARK_END = "<!-- bench_handover:start -->", "<!-- bench_handover:end -->"
MODES = {"torch": "torch", "ring": "ring", "ring-again": "ring"}


def build(path: Path, maps: np.ndarray) -> None:
    n, shape = len(maps), maps.shape[1:]
    names = sorted(fmcache.augment.variant_name(d) for d in fmcache.augment.default_variants(4, 2))
    plan = fmcache.TierPlan.two_tier(shape[0], list(range(0, shape[0], 4)), "bf16", "bf16")
    build_info = {"input_shape": [1, 4 * shape[-2], 4 * shape[-1]],
                  "augment_family": fmcache.augment.AugFamily().get_config()}
    with fmcache.create_cache(path, overwrite=True, build=build_info) as writer:
        writer.add_layer("l", shape, plan=plan, variants=names)
        for start in range(0, n, 256):
            sl = slice(start, start + 256)
            writer.append({"l": maps[sl]}, np.arange(start, min(start + 256, n)) % 10,
                          variants={"l": {v: np.roll(maps[sl], k + 1, axis=-1) for k, v in enumerate(names)}})
        writer.commit()


def step(seconds: float, work: torch.Tensor) -> None:
    """A stand-in training step: torch compute for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work = torch.tanh(work @ work)


def feed(loader: EpochLoader) -> Iterator[Any]:
    epoch = 0
    while True:
        yield from loader(epoch)
        epoch += 1


def bench_layer(path: Path, batch: int, epochs: int, step_ms: float) -> dict[str, Any]:
    loaders = {name: EpochLoader(fmcache.FeatureMapDataset(path, augment="saca", seed=1), batch, num_workers=1,
                                 handover=mode) for name, mode in MODES.items()}
    feeds = {name: feed(loader) for name, loader in loaders.items()}
    per_epoch = len(loaders["ring"].loader)  # type: ignore[arg-type]
    for f in feeds.values():  # workers started, first batches made
        next(f)
    times: dict[str, list[list[float]]] = {name: [] for name in feeds}
    work = torch.randn(128, 128) / 16
    names = list(feeds)
    for _ in range(epochs):
        for name in names:
            times[name].append([])
        for k in range(per_epoch):
            for j in range(len(names)):
                name = names[(k + j) % len(names)]
                t0 = time.perf_counter()
                next(feeds[name])
                times[name][-1].append(time.perf_counter() - t0)
                step(step_ms / 1e3, work)
    for loader in loaders.values():
        loader.close()
    row: dict[str, Any] = {"batches_per_epoch": per_epoch}
    for name, eps in times.items():
        row[f"{name}_ms"] = 1e3 * statistics.median([t for ep in eps for t in ep])
    for name in ("torch", "ring-again"):
        ratios = [sum(a) / sum(b) for a, b in zip(times[name], times["ring"])]
        row[f"{name}_over_ring"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    row["epochs_s"] = {name: [sum(ep) for ep in eps] for name, eps in times.items()}
    return row


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (f"One worker per loader, batch {s['batch']}, {s['samples']} samples, {s['epochs']} epochs after a "
            f"first batch, a {s['step_ms']:g} ms stand-in training step after every batch, the loaders in "
            f"turn batch by batch; {s['cpu']}. ms the training process waits per batch (median over every "
            "batch); torch / ring: median (min-max) over epochs of each epoch's total wait.")
    lines = [head, "",
             "| maps | torch ms | ring ms | ring-again ms | torch / ring | ring-again / ring |",
             "|---|---:|---:|---:|---|---|"]
    for layer, row in result["layers"].items():
        t, a = row["torch_over_ring"], row["ring-again_over_ring"]
        lines.append(f"| {layer} {tuple(row['shape'])} | {row['torch_ms']:.2f} | {row['ring_ms']:.2f} | "
                     f"{row['ring-again_ms']:.2f} | {t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | "
                     f"{a['median']:.2f} ({a['min']:.2f}–{a['max']:.2f}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--json", default="", help="also write the result here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks_history.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    maps = capture_maps(16, 50, args.layers, args.samples)
    result: dict[str, Any] = {"settings": {"batch": args.batch, "samples": args.samples, "epochs": args.epochs,
                                           "step_ms": args.step_ms, "cpu": cpu_name(), "width": 16},
                              "layers": {}}
    with tempfile.TemporaryDirectory(prefix="bench_handover-") as tmp:
        for layer in args.layers:
            path = Path(tmp) / f"{layer}.lmdb"
            build(path, maps[layer])
            row = bench_layer(path, args.batch, args.epochs, args.step_ms)
            row["shape"] = list(maps[layer].shape[1:])
            result["layers"][layer] = row
            print(f"{layer}: torch {row['torch_ms']:.2f} ms, ring {row['ring_ms']:.2f} ms a batch", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.docs:
        write_region(REPO / "docs" / "benchmarks_history.md", MARK_BEGIN, MARK_END, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
