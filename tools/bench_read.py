"""Read path: per-sample read + decode speed of fmcache caches, beside the bare codec and memcpy.

The maps are real post-ReLU feature maps: :func:`fmcache.zoo.pretrained_resnet` (a
CIFAR-style ResNet-18 of ``--width``, briefly trained on Fashion-MNIST, cached under
``~/.cache/fmcache/zoo``) at ``--layers`` for the first ``--samples`` Fashion-MNIST
training images.

For every backend (LMDB, HDF5) x codec (the default tier: bf16/fp16/int8 + LZ4 or zstd;
the compact tier: ``grid``, ZFP, SZ3), it builds a cache with :func:`fmcache.create_cache` and
measures, in float32 MB (10^6 bytes) per second:

* ``write``          building the cache (encode + store + commit), wall clock;
* ``read``           ``cache.read(layer, i)`` per sample, a new array per call (CPU time
                     of this thread: MB/s per core);
* ``read_out``       the same into a reused ``out=`` buffer;
* ``read_cold``      ``cache.read(layer, i)`` per sample from a copy of the cache opened
                     afresh for the pass (a copy, as HDF5 shares a dataset's chunk cache
                     among the handles one process opens on a file): every read decodes.
                     Neither its opening nor its first read is timed (since session 17):
                     the first read opens the layer's datasets and, on HDF5, checks their
                     headers and chunk index, once per handle and process (given apart
                     as ``first_read_ms``: timed, a cost per epoch and worker would spread
                     over the pass's few hundred samples as a cost per sample). In the passes
                     above, HDF5's chunk cache (64 MiB of decoded chunks per dataset) and
                     row cache hold a small layer whole after the first pass, so its
                     reads there skip the filters' decoding; a layer larger than those
                     caches (a real data set) reads like this column every epoch, which
                     runs with the row LRU at ``--cold-row-cache-mib`` (4 MiB, below every
                     layer's stored rows here; since session 17) so that it reads as such
                     a layer does (in order, rows of 16 KiB or more a sample at a time,
                     smaller ones a chunk at a time through the LRU). LMDB
                     has no such cache (its records stay in the OS page cache, as here);
* ``read_shuffled``  the same pass in a shuffled order (what per-sample reads under a
                     shuffling sampler do): HDF5 reads a sample out of order without
                     decoding its whole chunk (``fmcache.backends.hdf5_rows``);
* ``read_batch``     ``cache.read_batch(layer, rows)`` for batches of 128 consecutive samples
                     (what the Dataset does per batch), per-sample rate, CPU time;
* ``loader_w0/1/2``  ``FeatureMapDataset`` + ``DataLoader(batch_size=128, num_workers=0/1/2)``
                     with its chunk-aware sampler, wall clock for one epoch (the machine has
                     two cores: with workers the main process and the workers share them);
                     ``loader_w0_cpu`` the same without workers in CPU time (per core);
* ``codec``          the bare codec: ``codec.decode(bytes)`` per sample, new array per call;
* ``codec_out``      the same into a reused ``out=`` buffer;
* ``memcpy``         ``np.copyto`` per sample into a reused buffer (the ceiling).

and beside each: compression ratio (float32 bytes / stored bytes), relative L2 error and
max abs error of the stored maps. All in-process timings are interleaved: every repeat
runs each measurement once in turn, so a neighbour's load hits them alike; the tables
give the median and the spread (min-max) over ``--repeats``.

Run from the repository root::

    python tools/bench_read.py            # width 32, 1024 samples, layers layer1-3, 5 repeats
    python tools/bench_read.py --quick    # width 16, 256 samples, layer2, 3 repeats; docs untouched

It prints JSON on stdout and (unless ``--quick``) writes ``docs/bench.json`` (key
``read``), ``docs/bench_read.png`` and the table between ``<!-- bench_read:start -->``
and ``<!-- bench_read:end -->`` in ``docs/benchmarks.md``. ``--render JSON [--region NAME]
[--figure PNG]`` prints (and writes) the tables of a saved run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing fmcache

from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache import FeatureMapDataset, create_cache, open_cache
from fmcache.backends import hdf5_backend
from fmcache.codecs import codec_from_spec
from fmcache.dataset import collate
from fmcache.zoo import FashionMNIST, pretrained_resnet

DEFAULT_CODECS = (
    "bf16",  # the builder's default: bf16 + blosc2 LZ4-5, byte shuffle
    "bf16:cname=zstd,clevel=1,shuffle=byte",
    "fp16",
    "int8",
    "grid:abs=0.02",  # fmcache's own compact codec (session 22), at SZ3's bound
    "zfp:accuracy=0.05",
    "sz3:abs=0.02",
)
DEFAULT_CODEC = "bf16"
COMPACT_CODEC = "grid:abs=0.02"
BACKENDS = ("lmdb", "hdf5")
MB = 1e6
MARK_BEGIN = "<!-- bench_read:start -->"
MARK_END = "<!-- bench_read:end -->"


# ---- inputs --------------------------------------------------------------------------------------

@torch.no_grad()
def capture_maps(width: int, steps: int, layers: Sequence[str], samples: int) -> dict[str, np.ndarray]:
    """Post-ReLU maps (N, C, H, W) float32 at ``layers`` for the first ``samples`` training images."""
    model = pretrained_resnet(width=width, steps=steps).eval()
    data = FashionMNIST("train", augment=False)
    captured: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, output, name=name: captured[name].append(output.numpy().copy())) for name in layers]
    try:
        for start in range(0, samples, 128):
            model(torch.stack([data[i][0] for i in range(start, min(start + 128, samples))]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: np.ascontiguousarray(np.concatenate(parts)) for name, parts in captured.items()}


# ---- measuring -----------------------------------------------------------------------------------

def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(runs: dict[str, tuple[Callable[[], Any], str]], repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each run, ``repeats`` rounds, each round running all of them in turn.

    Each run is ``(callable, clock)``, clock ``"cpu"`` (this thread's CPU time: per core)
    or ``"wall"``. One warm-up pass each first. A callable may return seconds (on its
    clock) of set-up to leave out of its time.
    """
    for run, _ in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, clock) in runs.items():
            timer = time.thread_time if clock == "cpu" else time.perf_counter
            t0 = timer()
            excluded = run()
            seconds[name].append(max(timer() - t0 - (excluded if isinstance(excluded, float) else 0.0), 1e-9))
    return seconds


def error_metrics(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    diff = decoded.astype(np.float64) - original
    norm = float(np.linalg.norm(original))
    return {"rel_l2_error": float(np.linalg.norm(diff)) / norm if norm else 0.0,
            "max_abs_error": float(np.max(np.abs(diff)))}


def build(path: Path, backend: str, layer: str, maps: np.ndarray, codec: str) -> float:
    """Write ``maps`` as a cache; returns wall seconds (encode, store, commit)."""
    labels = np.zeros(len(maps), dtype=np.int64)
    t0 = time.perf_counter()
    with create_cache(path, backend=backend, overwrite=True) as writer:
        writer.add_layer(layer, maps.shape[1:], codec=codec)
        for start in range(0, len(maps), 256):
            writer.append({layer: maps[start:start + 256]}, labels[start:start + 256])
        writer.commit()
    return time.perf_counter() - t0


def bench_layer(layer: str, maps: np.ndarray, codecs: Sequence[str], repeats: int, workdir: Path,
                loader_workers: Sequence[int], cold_lru: int | None = None,
                backends: Sequence[str] = BACKENDS) -> dict[str, Any]:
    n = len(maps)
    megabytes = maps.nbytes / MB
    sample_shape = maps.shape[1:]
    out = np.empty(sample_shape, dtype=np.float32)
    results: dict[str, Any] = {"shape": list(sample_shape), "samples": n, "megabytes": megabytes, "codecs": {}}
    shuffled = np.random.default_rng(0).permutation(n)

    def per_sample(fn: Callable[[int], Any]) -> Callable[[], None]:
        def run() -> None:
            for i in range(n):
                fn(i)
        return run

    def batched(fn: Callable[[range], Any], batch: int = 128) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, n, batch):
                fn(range(start, min(start + batch, n)))
        return run

    runs: dict[str, tuple[Callable[[], Any], str]] = {
        "memcpy": (per_sample(lambda i: np.copyto(out, maps[i])), "cpu")}
    meta: dict[str, dict[str, Any]] = {}
    caches = []
    for spec in codecs:
        codec = codec_from_spec(spec)
        encoded = [codec.encode(maps[i]) for i in range(n)]
        runs[f"{spec}|codec"] = (per_sample(lambda i, c=codec, e=encoded: c.decode(e[i])), "cpu")
        runs[f"{spec}|codec_out"] = (per_sample(lambda i, c=codec, e=encoded: c.decode(e[i], out=out)), "cpu")
        meta[spec] = {"codec": {"ratio": maps.nbytes / sum(map(len, encoded))}, "backends": {}}
        for backend in backends:
            path = workdir / f"{layer}-{backend}-{len(caches)}{'.h5' if backend == 'hdf5' else '.lmdb'}"
            write_s = build(path, backend, layer, maps, spec)
            cache = open_cache(path)
            caches.append(cache)
            stored = sum(cache.layer(layer).stored_bytes.values())
            decoded = cache.read_batch(layer, range(n))
            meta[spec]["backends"][backend] = {
                "write_mb_s": megabytes / write_s, "ratio": maps.nbytes / stored, "stored_bytes": stored,
                **error_metrics(maps, decoded)}
            runs[f"{spec}|{backend}|read"] = (per_sample(lambda i, c=cache: c.read(layer, i)), "cpu")
            runs[f"{spec}|{backend}|read_out"] = (per_sample(lambda i, c=cache: c.read(layer, i, out=out)), "cpu")
            # a copy of its own: HDF5 shares one chunk cache between the handles a process
            # opens on the same file, so a fresh handle on `path` would find the warm one's
            copy = path.with_name(f"cold-{path.name}")
            (shutil.copytree if path.is_dir() else shutil.copyfile)(path, copy)
            runs[f"{spec}|{backend}|read_cold"] = (ColdPass(copy, layer, n, row_cache_bytes=cold_lru), "cpu")
            # the same in a shuffled order (a shuffling sampler over per-sample reads)
            runs[f"{spec}|{backend}|read_shuffled"] = (ColdPass(copy, layer, n, shuffled, row_cache_bytes=cold_lru), "cpu")
            runs[f"{spec}|{backend}|read_batch"] = (batched(lambda rows, c=cache: c.read_batch(layer, rows)), "cpu")
            for workers in loader_workers:
                runs[f"{spec}|{backend}|loader_w{workers}"] = (loader_epoch(path, workers), "wall")
            if 0 in loader_workers:  # all of it runs in this thread: CPU time too, comparable with `read`
                runs[f"{spec}|{backend}|loader_w0_cpu"] = (loader_epoch(path, 0), "cpu")
    seconds = interleaved(runs, repeats)
    for name, (run, _) in runs.items():  # seconds per pass of all n samples
        fraction = getattr(run, "timed_fraction", 1.0)
        seconds[name] = [s / fraction for s in seconds[name]]
    for cache in caches:
        cache.close()
    rate = {name: summary([megabytes / s for s in values]) for name, values in seconds.items()}
    results["memcpy"] = rate["memcpy"]
    for spec in codecs:
        entry = results["codecs"][spec] = meta[spec]
        entry["codec"].update(codec=rate[f"{spec}|codec"], codec_out=rate[f"{spec}|codec_out"])
        for backend in backends:
            b = entry["backends"][backend]
            for key in ("read", "read_out", "read_cold", "read_shuffled", "read_batch", *(f"loader_w{w}" for w in loader_workers),
                        *(["loader_w0_cpu"] if 0 in loader_workers else [])):
                b[key] = rate[f"{spec}|{backend}|{key}"]
            # the first read of read_cold's timed passes (the warm-up pass's left out)
            b["first_read_ms"] = summary([1e3 * s for s in runs[f"{spec}|{backend}|read_cold"][0].first_reads[1:]])
            # read / bare decode, both new arrays per call, measured in the same rounds
            b["read_vs_codec"] = statistics.median(
                s_codec / s_read for s_codec, s_read in zip(seconds[f"{spec}|codec"], seconds[f"{spec}|{backend}|read"]))
            b["read_cold_vs_codec"] = statistics.median(
                s_codec / s_read
                for s_codec, s_read in zip(seconds[f"{spec}|codec"], seconds[f"{spec}|{backend}|read_cold"]))
            b["read_shuffled_vs_codec"] = statistics.median(
                s_codec / s_read
                for s_codec, s_read in zip(seconds[f"{spec}|codec"], seconds[f"{spec}|{backend}|read_shuffled"]))
            b["read_batch_vs_codec"] = statistics.median(
                s_codec / s_read
                for s_codec, s_read in zip(seconds[f"{spec}|codec"], seconds[f"{spec}|{backend}|read_batch"]))
    return results


class ColdPass:
    """``read_cold`` (``read_shuffled`` with ``order``): a pass of per-sample reads, in
    order (or ``order``), from the cache at ``path`` opened afresh (no decoded chunk or row
    kept from an earlier pass). A call returns the CPU seconds of opening and closing it,
    which the timing leaves out, and with ``first_apart`` those of the pass's first read
    too: that read also opens the layer's datasets and checks their headers and chunk
    index (HDF5), once per handle and process, which a pass of a few hundred samples would
    spread over every sample. ``first_reads`` collects those seconds (``first_read_ms``);
    ``timed_fraction`` is the share of the pass's samples timed. ``row_cache_bytes``:
    HDF5's row LRU for the pass (default the backend's)."""

    def __init__(self, path: Path, layer: str, n: int, order: Sequence[int] | None = None,
                 first_apart: bool = True, row_cache_bytes: int | None = None) -> None:
        self.samples = list(range(n)) if order is None else [int(i) for i in order]
        self.layer, self.first_apart, self.row_cache_bytes = layer, first_apart, row_cache_bytes
        self.timed_fraction = (n - 1) / n if first_apart else 1.0
        self.first_reads: list[float] = []
        self.run = fresh_pass(open_cache, path, self.body)

    def body(self, cache: Any) -> float:
        t0 = time.thread_time()
        cache.read(self.layer, self.samples[0])
        first = time.thread_time() - t0
        self.first_reads.append(first)
        for i in self.samples[1:]:
            cache.read(self.layer, i)
        return first if self.first_apart else 0.0

    def __call__(self) -> float:
        if self.row_cache_bytes is None:
            return self.run()
        default = hdf5_backend.ROW_CACHE_BYTES  # read when a handle first reads a part
        hdf5_backend.ROW_CACHE_BYTES = self.row_cache_bytes
        try:
            return self.run()
        finally:
            hdf5_backend.ROW_CACHE_BYTES = default


def fresh_pass(opener: Callable[[Path], Any], path: Path, body: Callable[[Any], float | None]) -> Callable[[], float]:
    """A run of ``body(cache)`` on the cache at ``path`` opened afresh by ``opener``; it
    returns the CPU seconds of opening and closing, and any ``body`` returns, which
    :func:`interleaved` leaves out."""
    def run() -> float:
        t0 = time.thread_time()
        cache = opener(path)
        left_out = time.thread_time() - t0
        try:
            left_out += body(cache) or 0.0
        finally:
            t1 = time.thread_time()
            cache.close()
            left_out += time.thread_time() - t1
        return left_out
    return run


def loader_epoch(path: Path, workers: int) -> Callable[[], None]:
    dataset = FeatureMapDataset(path)
    sampler = dataset.sampler()
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                         collate_fn=collate)

    def run() -> None:
        for _features, _labels in loader:
            pass
    return run


# ---- reporting -----------------------------------------------------------------------------------

def _f(stat: dict[str, float]) -> str:
    return f"{stat['median']:,.0f} ({stat['min']:,.0f}–{stat['max']:,.0f})"


def markdown_table(results: dict[str, Any]) -> str:
    lines = []
    settings = results["settings"]
    lines.append(f"Settings: ResNet-18 width {settings['width']}, {settings['samples']} samples, "
                 f"{settings['repeats']} repeats, torch/blosc2 one thread; {settings['cpu']}. "
                 "MB/s of float32 per second, median (min–max). `read`, `codec`, `memcpy`, `loader w0 (CPU)`: "
                 "CPU time of the reading thread (per core); `loader wN`: wall clock, DataLoader batch 128. "
                 "`read cold`: a pass from a freshly opened cache, every read decoding (`read` passes after the "
                 "first can find a small layer in HDF5's chunk and row caches); `shuffled`: the same in a "
                 "shuffled order (a shuffling sampler's per-sample reads)"
                 + ("; neither times the pass's first read, which opens and checks the layer's datasets "
                    "(`first read`, ms, once per handle and process)" if settings.get("first_apart") else "")
                 + (f"; both with HDF5's row LRU at {settings['cold_row_cache_bytes'] / 2**20:g} MiB (a real "
                    "data set's layers exceed the default 32 MiB)"
                    if settings.get("cold_row_cache_bytes") else "")
                 + ".\n")
    workers = settings["loader_workers"]
    for layer, res in results["layers"].items():
        lines.append(f"**{layer}** {tuple(res['shape'])}, {res['megabytes']:.0f} MB float32; "
                     f"memcpy {_f(res['memcpy'])} MB/s\n")
        first = next(iter(next(iter(res["codecs"].values()))["backends"].values()))
        cold, shuffled = "read_cold" in first, "read_shuffled" in first  # older runs' JSON lacks them
        first_ms = "first_read_ms" in first
        head = ["codec", "backend", "ratio", "rel L2", "write", "read", "read out=", "read/codec",
                *(["read cold", "cold/codec"] if cold else []), *(["first read"] if first_ms else []),
                *(["shuffled", "shuffled/codec"] if shuffled else []), "read_batch", "read_batch/codec",
                *(["loader w0 (CPU)"] if 0 in workers else []), *(f"loader w{w}" for w in workers),
                "bare codec", "codec out="]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for spec, entry in res["codecs"].items():
            for backend, b in entry["backends"].items():
                row = [f"`{spec}`", backend, f"{b['ratio']:.2f}", f"{b['rel_l2_error']:.1e}",
                       f"{b['write_mb_s']:,.0f}", _f(b["read"]), _f(b["read_out"]), f"{b['read_vs_codec']:.2f}",
                       *([_f(b["read_cold"]), f"{b['read_cold_vs_codec']:.2f}"] if cold else []),
                       *([f"{b['first_read_ms']['median']:.2f}"] if first_ms else []),
                       *([_f(b["read_shuffled"]), f"{b['read_shuffled_vs_codec']:.2f}"] if shuffled else []),
                       _f(b["read_batch"]), f"{b['read_batch_vs_codec']:.2f}",
                       *([_f(b["loader_w0_cpu"])] if 0 in workers else []),
                       *(_f(b[f"loader_w{w}"]) for w in workers), _f(entry["codec"]["codec"]),
                       _f(entry["codec"]["codec_out"])]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    layers = list(results["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        res = results["layers"][layer]
        specs = list(res["codecs"])
        x = np.arange(len(specs))
        present = set.intersection(*(set(res["codecs"][s]["backends"]) for s in specs))  # --backends
        series = [("bare codec", lambda e: e["codec"]["codec"])]
        if "lmdb" in present:
            series.append(("LMDB read", lambda e: e["backends"]["lmdb"]["read"]))
        if "hdf5" in present:
            series.append(("HDF5 read", lambda e: e["backends"]["hdf5"]["read"]))
            if "read_cold" in res["codecs"][specs[0]]["backends"]["hdf5"]:
                series.append(("HDF5 read cold", lambda e: e["backends"]["hdf5"]["read_cold"]))
        if "lmdb" in present:
            series.append(("LMDB loader w0", lambda e: e["backends"]["lmdb"]["loader_w0"]))
        width = 0.8 / len(series)
        for k, (label, get) in enumerate(series):
            med = [get(res["codecs"][s])["median"] for s in specs]
            lo = [m - get(res["codecs"][s])["min"] for s, m in zip(specs, med)]
            hi = [get(res["codecs"][s])["max"] - m for s, m in zip(specs, med)]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, med, width, yerr=[lo, hi], label=label, capsize=2)
        ax.set_xticks(x, [s.split(":")[0] + ("\n" + s.split(":")[1] if ":" in s else "") for s in specs],
                      fontsize=7)
        ax.set_ylabel("MB/s float32 (per core; loader: wall)")
        ax.set_title(f"{layer} {tuple(res['shape'])}")
        ax.axhline(2000, color="grey", ls="--", lw=0.8)
        ax.axhline(500, color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_region(path: Path, begin: str, end: str, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = f"{head}{begin}\n{text}\n{end}{tail}"
    else:
        doc = f"{doc.rstrip()}\n\n{begin}\n{text}\n{end}\n"
    path.write_text(doc)


def update_json(path: Path, key: str, value: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small run; leaves docs/ alone")
    parser.add_argument("--width", type=int, default=None, help="ResNet width (default 32; quick 16)")
    parser.add_argument("--steps", type=int, default=50, help="pre-training steps of the model")
    parser.add_argument("--samples", type=int, default=None, help="samples (default 1024; quick 256)")
    parser.add_argument("--layers", nargs="+", default=None, help="default layer1 layer2 layer3; quick layer2")
    parser.add_argument("--codecs", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="default 5; quick 3")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="default both (an LMDB-only codec such as sz3 algo=nopred: --backends lmdb)")
    parser.add_argument("--cold-row-cache-mib", type=float, default=4,
                        help="HDF5's row LRU in MiB for the cold passes (default 4, below every layer's stored rows "
                             "at the default sizes, as a real data set's exceed the backend's 32; 0: the backend's)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder for bench.json etc ('' skips)")
    return parser.parse_args(argv)


def render_command(argv: Sequence[str], prog: str, markdown: Callable[[dict[str, Any]], str],
                   plot: Callable[[dict[str, Any], Path], None]) -> int:
    """``TOOL --render JSON [--region NAME] [--figure PNG]`` (``argv`` after ``--render``),
    shared by the benchmark tools: the tables (``markdown``) of a saved run (its JSON, e.g.
    ``--docs ''``'s stdout) on stdout, written between ``<!-- NAME:start -->`` and
    ``<!-- NAME:end -->`` of docs/benchmarks.md with ``--region``; ``--figure`` saves its
    ``plot``."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("json", type=Path)
    parser.add_argument("--region", default="")
    parser.add_argument("--figure", default="")
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    table = markdown(results)
    print(table)
    if args.region:
        write_region(REPO / "docs" / "benchmarks.md", f"<!-- {args.region}:start -->",
                     f"<!-- {args.region}:end -->", table)
    if args.figure:
        plot(results, Path(args.figure))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--render":
        return render_command(argv[1:], "bench_read.py --render", markdown_table, plot)
    args = parse_args(argv)
    quick = args.quick
    width = args.width or (16 if quick else 32)
    samples = args.samples or (256 if quick else 1024)
    layers = args.layers or (["layer2"] if quick else ["layer1", "layer2", "layer3"])
    repeats = args.repeats or (3 if quick else 5)
    codecs = args.codecs or (["bf16", "sz3:abs=0.02"] if quick else list(DEFAULT_CODECS))
    torch.set_num_threads(1)
    import blosc2

    blosc2.set_nthreads(1)
    maps = capture_maps(width, args.steps, layers, samples)
    workdir = Path(tempfile.mkdtemp(prefix="bench_read-"))
    try:
        cold_lru = int(args.cold_row_cache_mib * 2**20) or None
        per_layer = {layer: bench_layer(layer, maps[layer], codecs, repeats, workdir, args.workers, cold_lru,
                                        args.backends) for layer in layers}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "settings": {"width": width, "steps": args.steps, "samples": samples, "repeats": repeats,
                     "codecs": codecs, "default_codec": DEFAULT_CODEC, "compact_codec": COMPACT_CODEC,
                     "loader_workers": args.workers, "first_apart": True, "backends": args.backends,
                     "cold_row_cache_bytes": int(args.cold_row_cache_mib * 2**20) or None, "cpu": cpu_name(), "cores": os.cpu_count(),
                     "torch": torch.__version__, "blosc2": blosc2.__version__,
                     "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "command": " ".join(["python", "tools/bench_read.py", *(argv or sys.argv[1:])])},
        "layers": per_layer,
    }
    print(json.dumps(results, indent=1))
    print(markdown_table(results), file=sys.stderr)
    if not quick and args.docs:
        docs = Path(args.docs)
        update_json(docs / "bench.json", "read", results)
        plot(results, docs / "bench_read.png")
        write_region(docs / "benchmarks.md", MARK_BEGIN, MARK_END, markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
