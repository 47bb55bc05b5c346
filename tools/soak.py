"""Soak test: read a cache for many epochs with DataLoader workers and record resident
memory per epoch, for the main process and every worker.

    .venv/bin/python tools/soak.py                      # both backends, 10 epochs, 2 workers
    .venv/bin/python tools/soak.py --samples 8192 --epochs 20 --out docs/reliability_soak

It builds a synthetic cache per backend (post-ReLU-like maps, bf16 for LMDB, ZFP for
HDF5) in a temporary directory, then iterates a ``FeatureMapDataset`` (feature-space
augmentation on, chunk-shuffling sampler, ``persistent_workers=True`` so the same worker
processes serve every epoch) and reads ``VmRSS`` and ``RssAnon`` from
``/proc/<pid>/status`` after each epoch. Writes ``<out>.json`` and ``<out>.png`` and
prints a Markdown table. Growth is measured from the end of the first epoch (which
warms page cache, chunk caches and allocator pools) to the end of the last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

import fmcache
from fmcache import FeatureMapDataset

CODECS = {"lmdb": "bf16", "hdf5": "zfp:accuracy=0.01"}
SHAPE = (16, 16, 16)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (KiB) of a process, from /proc (psutil is not installed)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    return out


class WithPid(Dataset):
    """Items of ``inner`` plus the pid of the process that produced them."""

    def __init__(self, inner: FeatureMapDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitems__(self, indices):
        return [(x, y, os.getpid()) for x, y in self.inner.__getitems__(indices)]


def build(path: Path, backend: str, samples: int) -> None:
    rng = np.random.default_rng(0)
    with fmcache.create_cache(path, backend=backend, overwrite=True) as writer:
        writer.add_layer("layer", SHAPE, codec=CODECS[backend])
        for start in range(0, samples, 256):
            n = min(256, samples - start)
            x = rng.lognormal(-1, 1, size=(n, *SHAPE)) * (rng.random((n, *SHAPE)) > 0.45)
            writer.append({"layer": x.astype(np.float32)}, rng.integers(0, 10, size=n))
        writer.commit()


def soak(path: Path, epochs: int, workers: int, batch_size: int) -> dict:
    ds = FeatureMapDataset(path, "layer", augment="feature", stride=2)
    sampler = ds.sampler()
    loader = DataLoader(WithPid(ds), batch_size=batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context=mp.get_context("fork"))
    main = os.getpid()
    rows = []
    worker_pids: set[int] = set()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        t0, seen, checksum = time.perf_counter(), 0, 0.0
        for x, _y, pids in loader:
            worker_pids.update(int(p) for p in pids)
            seen += len(x)
            checksum += float(x[:, 0, 0, 0].sum())
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "seconds": round(elapsed, 2), "samples": seen,
               "main": rss_kib(main), "workers": {str(p): rss_kib(p) for p in sorted(worker_pids)}}
        rows.append(row)
        total = row["main"]["VmRSS"] + sum(w["VmRSS"] for w in row["workers"].values())
        print(f"  epoch {epoch + 1:2d}: {seen} samples in {elapsed:.1f} s, main {row['main']['VmRSS'] / 1024:.1f} MiB, "
              f"all processes {total / 1024:.1f} MiB", flush=True)
    return {"rows": rows, "worker_pids": sorted(worker_pids)}


def growth(rows: list[dict], key: str, who: str) -> float:
    """Relative growth of ``key`` from epoch 1 to the last epoch (``who``: 'main', 'workers', 'all')."""
    def value(row: dict) -> int:
        main = row["main"][key]
        workers = sum(w[key] for w in row["workers"].values())
        return {"main": main, "workers": workers, "all": main + workers}[who]

    first, last = value(rows[0]), value(rows[-1])
    return (last - first) / first


def plot(results: dict, png: Path) -> None:
    plt = pyplot(png)
    if plt is None:
        return

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (backend, result) in zip(axes[0], results.items()):
        rows = result["rows"]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["main"]["VmRSS"] / 1024 for r in rows], "o-", label="main VmRSS")
        ax.plot(epochs, [r["main"]["RssAnon"] / 1024 for r in rows], "o--", label="main RssAnon")
        for i, pid in enumerate(result["worker_pids"]):
            ax.plot(epochs, [r["workers"][str(pid)]["VmRSS"] / 1024 for r in rows], "s-", label=f"worker {i} VmRSS")
            ax.plot(epochs, [r["workers"][str(pid)]["RssAnon"] / 1024 for r in rows], "s--",
                    label=f"worker {i} RssAnon")
        ax.set_title(f"{backend} ({CODECS[backend]}), {rows[0]['samples']} samples/epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel("resident memory (MiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(results: dict) -> str:
    lines = ["| backend | epoch | s | main VmRSS MiB | main RssAnon MiB | workers VmRSS MiB (each) | workers RssAnon MiB (each) |",
             "|---|---:|---:|---:|---:|---|---|"]
    for backend, result in results.items():
        for r in result["rows"]:
            wv = " / ".join(f"{w['VmRSS'] / 1024:.1f}" for w in r["workers"].values())
            wa = " / ".join(f"{w['RssAnon'] / 1024:.1f}" for w in r["workers"].values())
            lines.append(f"| {backend} | {r['epoch']} | {r['seconds']} | {r['main']['VmRSS'] / 1024:.1f} | "
                         f"{r['main']['RssAnon'] / 1024:.1f} | {wv} | {wa} |")
    lines.append("")
    lines.append("| backend | growth epoch 1 → last: main VmRSS | workers VmRSS | all VmRSS | all RssAnon |")
    lines.append("|---|---:|---:|---:|---:|")
    for backend, result in results.items():
        rows = result["rows"]
        lines.append(f"| {backend} | {growth(rows, 'VmRSS', 'main'):+.2%} | {growth(rows, 'VmRSS', 'workers'):+.2%} | "
                     f"{growth(rows, 'VmRSS', 'all'):+.2%} | {growth(rows, 'RssAnon', 'all'):+.2%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["lmdb", "hdf5", "both"], default="both")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-growth", type=float, default=0.05,
                        help="exit 1 if VmRSS of all processes grows more than this after epoch 1")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "reliability_soak")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backends = ["lmdb", "hdf5"] if args.backend == "both" else [args.backend]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            path = Path(tmp) / f"soak{'.h5' if backend == 'hdf5' else '.lmdb'}"
            print(f"{backend}: building {args.samples} samples of {SHAPE} ({CODECS[backend]})", flush=True)
            build(path, backend, args.samples)
            results[backend] = soak(path, args.epochs, args.workers, args.batch_size)
    meta = {"samples": args.samples, "epochs": args.epochs, "workers": args.workers, "batch_size": args.batch_size,
            "shape": SHAPE, "codecs": CODECS, "python": sys.version.split()[0], "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    worst = max(growth(r["rows"], "VmRSS", "all") for r in results.values())
    return 0 if worst <= args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
