"""Training from cached maps: epoch time of the trainable suffix, against what users would do instead.

Model: :func:`fmcache.zoo.pretrained_resnet` (CIFAR-style ResNet-18 of ``--width``, briefly
trained on Fashion-MNIST, 1x32x32 inputs). Data: the first ``--samples`` Fashion-MNIST
training images. For each freeze boundary (``layer1``, ``layer2``, ``layer3``) the suffix
(every child after the boundary) trains with SGD, batch ``--batch`` (drop_last), starting
from the same weights for every approach; an epoch is one pass over the samples:

``classic``     the frozen prefix recomputed every step (eval mode, no grad) on
                input-augmented images (random crop + flip), i.e. classic layer freezing;
``memory``      the maps held in memory as one float32 tensor, batches by indexing (no
                augmentation): the limit of any cache;
``fmcache-<backend>-<tier>``  a SACA cache (:func:`fmcache.builder.build_saca_cache`,
                ``--saca-samples`` calibration samples) read through ``FeatureMapDataset(
                augment="saca")`` + its chunk-aware sampler + ``DataLoader``; tier
                ``default`` = the builder's default codec, ``bf16``, on both tiers;
                ``policy`` = :meth:`CompressionPolicy.default` (progressive compression:
                the codecs for the boundary's depth, int8/int4 + zstd, SZ3 when deep);
                ``compact`` = SZ3 bulk (``sz3:rel=0.02``) + int8 sensitive;
``torchsave``   one ``torch.save`` file per sample, ``torch.load`` per item;
``memmap``      one uncompressed float32 ``np.memmap`` file, one row per item;
``h5py``        one uncompressed (contiguous) float32 h5py dataset, one row per item;
``<name>+ahead`` (``--read-ahead N``, without workers) the same on-disk store read by a
                thread of the training process N batches ahead of the steps
                (:class:`fmcache.readahead.ReadAhead`, ``EpochLoader(read_ahead=N)``).

The ``torchsave``/``memmap``/``h5py`` readers are what a user would write by hand
(``__getitem__`` per sample, default collate), without augmentation: that only makes them
faster, so fmcache being ahead is a conservative claim. Every loader runs with
``--workers`` DataLoader workers (default 0: reading costs training time one for one;
1: reading overlaps training on the second core) and torch uses one thread: on this
shared two-core machine two torch threads ran 3-5x *slower* than one (OpenMP spinning
against other jobs).
The steps compute in float32 unless ``--precision bf16``: bf16 autocast with
channels-last tensors, for every approach alike (classic freezing's prefix included), the
setting of the issue's reference speeds. ``--width 64`` is the standard ResNet-18 (the
issue's); the default width 16 makes the steps ~10x cheaper, so reading weighs more.

Each repeat runs one epoch of every approach in turn, every other repeat in reverse order (side by side, so a neighbour's
load hits them alike); the tables give the median and min-max of the epoch seconds and
the median of the per-repeat ratios (> 1: faster than the reference). It also times the build: one inference-mode forward pass
of the prefix over the data, against ``build_cache`` with the default codec (bf16) and
with SZ3, and the SACA build, and reports bytes on disk of every approach.

The process first fixes glibc's malloc thresholds (:func:`fmcache.tune_allocator`, as the
``fmcache`` command does), so that freed batches stay mapped instead of faulting back in
page by page (a forward pass 0.7 s or 1.7 s by the process's earlier frees:
benchmarks_history.md, "What session 20 changed"); ``--default-allocator`` leaves them as they are, as every run
before session 20 did.

Run from the repository root::

    python tools/bench_train.py            # width 16, 1024 samples, batch 64, 5 repeats, 1 thread
    python tools/bench_train.py --quick    # 256 samples, layer3 only, 1 repeat; docs untouched
    python tools/bench_train.py --render docs/bench_train_lockstep.json --region bench_train_lockstep \
        --figure docs/bench_train_lockstep.png   # the tables (and plot) of a saved run

It prints JSON on stdout and (unless ``--quick``) writes ``docs/bench.json`` (key
``train``), ``docs/bench_train.png`` and the tables between ``<!-- bench_train:start -->``
and ``<!-- bench_train:end -->`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing fmcache
sys.path.insert(0, str(REPO / "tools"))

from bench_read import cpu_name, render_command, update_json, write_region
from plotting import pyplot  # tools/ is on sys.path when a tool runs as a script

from fmcache import FeatureMapDataset
from fmcache.builder import SacaConfig, build_cache, build_saca_cache
from fmcache.loader import EpochLoader
from fmcache.memory import tune_allocator
from fmcache.policy import CompressionPolicy
from fmcache.zoo import FashionMNIST, pretrained_resnet, split_at

BOUNDARIES = ("layer1", "layer2", "layer3")
DEFAULT_POLICY = CompressionPolicy.constant("bf16")
COMPACT_POLICY = CompressionPolicy.constant("sz3:rel=0.02", "int8:cname=zstd,clevel=1,shuffle=bit")
MARK_BEGIN = "<!-- bench_train:start -->"
MARK_END = "<!-- bench_train:end -->"


# ---- the hand-written alternatives ------------------------------------------------------------

class TorchSaveDataset(Dataset):
    """(d) one ``torch.save`` file per sample."""

    def __init__(self, folder: Path, labels: np.ndarray) -> None:
        self.folder, self.labels = folder, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.load(self.folder / f"{i}.pt"), int(self.labels[i])


class MemmapDataset(Dataset):
    """(e) an uncompressed float32 ``np.memmap``."""

    def __init__(self, path: Path, shape: tuple[int, ...], labels: np.ndarray) -> None:
        self.path, self.shape, self.labels = path, shape, labels
        self.maps: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.maps is None:
            self.maps = np.memmap(self.path, dtype=np.float32, mode="r", shape=(len(self.labels), *self.shape))
        return torch.from_numpy(np.array(self.maps[i])), int(self.labels[i])


class H5pyDataset(Dataset):
    """(f) an uncompressed h5py dataset (contiguous layout, h5py's default)."""

    def __init__(self, path: Path, labels: np.ndarray) -> None:
        self.path, self.labels = path, labels
        self.ds: h5py.Dataset | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.ds is None:
            self.ds = h5py.File(self.path, "r")["maps"]
        return torch.from_numpy(self.ds[i]), int(self.labels[i])


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- training ------------------------------------------------------------------------------------

#: ``--precision``: how every approach's steps compute (the same for all of them)
PRECISIONS = ("fp32", "bf16")


class Precision:
    """The arithmetic of every training step, the same for every approach: ``fp32``, or
    ``bf16`` = bf16 autocast with channels-last tensors, the setting the issue's reference
    speeds were taken with (../shared/measurements.md: 2.5x fp32 on this CPU). Classic
    freezing's prefix runs under it too; the cached maps are float32 either way (the
    builders' forward pass is fp32)."""

    def __init__(self, name: str = "fp32") -> None:
        if name not in PRECISIONS:
            raise ValueError(f"precision {name!r}: one of {PRECISIONS}")
        self.name = name
        self.bf16 = name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def module(self, module: nn.Module) -> nn.Module:
        """``module`` (in place) in the memory format of the steps."""
        return module.to(memory_format=torch.channels_last) if self.bf16 else module

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the steps take it: float32, channels-last for ``bf16`` (4-D maps)."""
        x = x.float()
        if self.bf16 and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


FP32 = Precision()


def train_epoch(suffix: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                opt: torch.optim.Optimizer, prefix: nn.Module | None = None,
                precision: Precision = FP32) -> tuple[float, float]:
    """One epoch; returns wall seconds and this process's CPU seconds. Without workers the
    CPU time is all the epoch's work (one torch thread), and CPU time stolen by the VM's
    other tenants does not count in it; with workers it leaves the workers' reading out."""
    loss_fn = nn.CrossEntropyLoss()
    suffix.train()
    c0 = time.process_time()
    t0 = time.perf_counter()
    for x, y in batches:
        x = precision.batch(x)
        with precision.autocast():
            if prefix is not None:
                with torch.no_grad():
                    x = prefix(x)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(suffix(x), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def train_lockstep(suffixes: dict[str, nn.Module], loaders: dict[str, Iterable[Any]],
                   opts: dict[str, torch.optim.Optimizer], prefix: nn.Module,
                   precision: Precision = FP32) -> dict[str, tuple[float, float, float]]:
    """One epoch of every approach at once, step by step (``--interleave``): step *k* fetches
    a batch and trains one step for each approach in turn, the first approach rotating
    with *k*, and each approach's epoch time is the sum of its own steps (wall and CPU).
    A drift of the machine's speed (the ±15-40 % between whole epochs here) then hits every
    approach within the same few hundred milliseconds, as ``bench_ab`` does for reads.
    With ``--workers``, each approach's worker makes its next batch while the training
    process steps the other approaches (its queue is full by the time its turn comes
    again, unless reading is slower than a round of steps), so what is timed is what a
    worker-fed epoch costs the training process: the hand-over of each batch and the
    step itself, slowed alike for every approach by whichever worker is reading beside it.
    Returns approach -> (wall seconds, CPU seconds, wall seconds of fetching the batches
    alone)."""
    loss_fn = nn.CrossEntropyLoss()
    names = list(loaders)
    iters = {name: iter(batches) for name, batches in loaders.items()}
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    fetch = dict.fromkeys(names, 0.0)
    live = set(names)
    for suffix in suffixes.values():
        suffix.train()
    step = 0
    while live:
        k = step % len(names)
        for name in names[k:] + names[:k]:
            if name not in live:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            batch = next(iters[name], None)
            if batch is None:
                live.discard(name)
                continue
            fetch[name] += time.perf_counter() - t0
            x, y = batch
            x = precision.batch(x)
            with precision.autocast():
                if name == "classic":
                    with torch.no_grad():
                        x = prefix(x)
                opts[name].zero_grad(set_to_none=True)
                loss = loss_fn(suffixes[name](x), y)
            loss.backward()
            opts[name].step()
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
        step += 1
    return {name: (wall[name], cpu[name], fetch[name]) for name in names}


def _first(batches: Iterable[Any]) -> list[Any]:
    for batch in batches:
        return [batch]
    return []


def memory_batches(maps: torch.Tensor, labels: torch.Tensor, batch: int, epoch: int) -> Iterable[Any]:
    order = torch.randperm(len(maps), generator=torch.Generator().manual_seed(epoch))
    for start in range(0, len(order) - batch + 1, batch):
        idx = order[start:start + batch]
        yield maps[idx], labels[idx]


@torch.inference_mode()
def forward_maps(prefix: nn.Module, data: Dataset, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Maps of the whole data set through ``prefix`` (eval, inference mode: the cheapest
    forward pass torch offers, as the builder's own), labels, and seconds."""
    prefix.eval()
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    maps, labels = [], []
    t0 = time.perf_counter()
    for x, y in loader:
        maps.append(prefix(x).numpy())
        labels.append(y.numpy())
    seconds = time.perf_counter() - t0
    return np.concatenate(maps), np.concatenate(labels), seconds


# ---- one boundary ------------------------------------------------------------------------------

#: persistent loaders, closed (their workers stopped) when the run ends
OPENED: list[EpochLoader] = []


def prepare(boundary: str, model: nn.Module, data: Dataset, aug_data: FashionMNIST, args: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    """Build every store for ``boundary``; returns loaders (epoch -> batches) and facts."""
    prefix, suffix = split_at(copy.deepcopy(model), boundary)
    prefix.eval()
    maps, labels, forward_s = forward_maps(prefix, data, args.batch)
    shape = tuple(maps.shape[1:])
    info: dict[str, Any] = {"shape": list(shape), "forward_s": forward_s, "build_s": {}, "bytes": {},
                            "raw_bytes": int(maps.nbytes)}
    loaders: dict[str, Callable[[int], Iterable[Any]]] = {}

    def loader_of(dataset: Dataset, read_ahead: int = 0) -> Callable[[int], Iterable[Any]]:
        # One loader per approach for all epochs (fmcache.loader.EpochLoader): workers
        # persist, each sample key carries its epoch; a FeatureMapDataset gets its
        # chunk-aware sampler and fmcache's collate (the batch tensor, no re-stack).
        if args.fresh_loaders:
            return lambda epoch: EpochLoader(dataset, args.batch, num_workers=args.workers, persistent=False,
                                             read_ahead=read_ahead)(epoch)
        loader = EpochLoader(dataset, args.batch, num_workers=args.workers, read_ahead=read_ahead)
        OPENED.append(loader)
        return loader

    def on_disk(name: str, make: Callable[[], Dataset]) -> None:
        """An on-disk approach's loader; with ``--read-ahead`` also ``<name>+ahead``, the
        same store read by a thread of the training process ahead of the steps."""
        loaders[name] = loader_of(make())
        if args.read_ahead:
            loaders[f"{name}+ahead"] = loader_of(make(), args.read_ahead)

    # (a) classic freezing: the prefix runs every step on augmented inputs
    loaders["classic"] = loader_of(aug_data)
    # (b) in memory
    maps_t, labels_t = torch.from_numpy(maps), torch.from_numpy(labels).long()
    loaders["memory"] = lambda epoch: memory_batches(maps_t, labels_t, args.batch, epoch)
    if args.interleave:  # the same loader twice: the A/A row, what the method itself cannot resolve
        loaders["memory-again"] = lambda epoch: memory_batches(maps_t, labels_t, args.batch, epoch)
    info["bytes"]["memory"] = int(maps.nbytes)
    # build time with plain build_cache: default codec and SZ3, against one forward pass
    for name, codec in (("bf16", "bf16"), ("sz3", "sz3:rel=0.02")):
        out = workdir / f"{boundary}-plain-{name}.lmdb"
        t0 = time.perf_counter()
        build_cache(copy.deepcopy(model), data, [boundary], out, codec=codec, batch_size=args.batch,
                    progress=False)
        info["build_s"][f"plain-{name}-lmdb"] = time.perf_counter() - t0
        info["bytes"][f"plain-{name}-lmdb"] = folder_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
    # (c) fmcache SACA caches
    saca = SacaConfig(n_samples=args.saca_samples)
    for backend in args.backends:
        for tier, policy in (("default", DEFAULT_POLICY), ("policy", CompressionPolicy.default()),
                             ("compact", COMPACT_POLICY)):
            if tier not in args.tiers:
                continue
            name = f"fmcache-{backend}-{tier}"
            out = workdir / f"{boundary}-{name}{'.h5' if backend == 'hdf5' else '.lmdb'}"
            t0 = time.perf_counter()
            manifest = build_saca_cache(copy.deepcopy(model), data, boundary, out, saca=saca, policy=policy,
                                        backend=backend, batch_size=args.batch, progress=False)
            info["build_s"][name] = time.perf_counter() - t0
            info["bytes"][name] = folder_bytes(out)
            layer = manifest.layers[boundary]
            info.setdefault("codecs", {})[name] = {t.name: t.codec.spec for t in layer.plan.tiers}
            info.setdefault("variants", list(layer.variants))
            on_disk(name, functools.partial(FeatureMapDataset, out, augment="saca", seed=0))
    # (d) torch.save per sample
    folder = workdir / f"{boundary}-torchsave"
    folder.mkdir()
    t0 = time.perf_counter()
    for i in range(len(maps)):
        torch.save(torch.from_numpy(maps[i]), folder / f"{i}.pt")
    info["build_s"]["torchsave-write"] = time.perf_counter() - t0
    info["bytes"]["torchsave"] = folder_bytes(folder)
    on_disk("torchsave", functools.partial(TorchSaveDataset, folder, labels))
    # (e) np.memmap
    path = workdir / f"{boundary}.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=maps.shape)
    mm[:] = maps
    mm.flush()
    del mm
    info["bytes"]["memmap"] = folder_bytes(path)
    on_disk("memmap", functools.partial(MemmapDataset, path, shape, labels))
    # (f) h5py, uncompressed
    path = workdir / f"{boundary}-plain.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("maps", data=maps)
    info["bytes"]["h5py"] = folder_bytes(path)
    on_disk("h5py", functools.partial(H5pyDataset, path, labels))
    return {"prefix": prefix, "suffix": suffix, "loaders": loaders, "info": info}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = pretrained_resnet(width=args.width, steps=args.steps).eval()
    data = Subset(FashionMNIST("train", augment=False), range(args.samples))
    aug_data = FashionMNIST("train", augment=True, seed=0, limit=args.samples)
    workdir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        torch.set_num_threads(args.threads)
        setups = {b: prepare(b, model, data, aug_data, args, workdir) for b in args.boundaries}
        precision = Precision(args.precision)
        for setup in setups.values():  # classic freezing's prefix computes as the steps do
            precision.module(setup["prefix"])
        seconds: dict[str, dict[str, list[float]]] = {b: {k: [] for k in s["loaders"]} for b, s in setups.items()}
        cpu: dict[str, dict[str, list[float]]] = {b: {k: [] for k in s["loaders"]} for b, s in setups.items()}
        fetched: dict[str, dict[str, list[float]]] = {b: {k: [] for k in s["loaders"]} for b, s in setups.items()}
        # warm-up, untimed: one training step per approach (lazy opens, allocator, page cache)
        for setup in setups.values():
            for name, batches in setup["loaders"].items():
                suffix = precision.module(copy.deepcopy(setup["suffix"]))
                opt = torch.optim.SGD(suffix.parameters(), lr=0.01, momentum=0.9)
                train_epoch(suffix, _first(batches(0)), opt, setup["prefix"] if name == "classic" else None,
                            precision)
        for rep in range(1, args.repeats + 1):
            for boundary, setup in setups.items():
                if args.interleave:
                    suffixes = {name: precision.module(copy.deepcopy(setup["suffix"])) for name in setup["loaders"]}
                    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                            for name, m in suffixes.items()}
                    loaders = {name: batches(rep) for name, batches in setup["loaders"].items()}
                    for name, (s, cpu_s, fetch_s) in train_lockstep(suffixes, loaders, opts, setup["prefix"],
                                                                     precision).items():
                        seconds[boundary][name].append(s)
                        cpu[boundary][name].append(cpu_s)
                        fetched[boundary][name].append(fetch_s)
                    print(f"rep {rep} {boundary}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in
                                                             seconds[boundary].items()), file=sys.stderr, flush=True)
                    continue
                order = list(setup["loaders"].items())
                # every other repeat in reverse: no approach always runs right after the same
                # neighbour (classic freezing, the heaviest, ran just before in-memory maps)
                for name, batches in order if rep % 2 else order[::-1]:
                    suffix = precision.module(copy.deepcopy(setup["suffix"]))
                    opt = torch.optim.SGD(suffix.parameters(), lr=0.01, momentum=0.9)
                    prefix = setup["prefix"] if name == "classic" else None
                    s, cpu_s = train_epoch(suffix, batches(rep), opt, prefix, precision)
                    seconds[boundary][name].append(s)
                    cpu[boundary][name].append(cpu_s)
                    print(f"rep {rep} {boundary} {name}: {s:.2f} s", file=sys.stderr, flush=True)
    finally:
        for loader in OPENED:
            loader.close()
        shutil.rmtree(workdir, ignore_errors=True)
    steps = args.samples // args.batch
    result: dict[str, Any] = {}
    for boundary, setup in setups.items():
        per = seconds[boundary]
        entry = {"info": setup["info"], "epoch_s": {}, "img_s": {}, "vs_memory": {}, "vs_classic": {},
                 "epoch_cpu_s": {}, "vs_memory_cpu": {}}
        for name, values in per.items():
            used = cpu[boundary][name]
            entry["epoch_cpu_s"][name] = {"median": statistics.median(used), "min": min(used), "max": max(used)}
            entry["vs_memory_cpu"][name] = statistics.median(m / v for m, v in zip(cpu[boundary]["memory"], used))
            entry["epoch_s"][name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            if fetched[boundary][name]:  # --interleave: the part of the epoch spent fetching batches
                entry.setdefault("fetch_s", {})[name] = statistics.median(fetched[boundary][name])
            entry["img_s"][name] = steps * args.batch / statistics.median(values)
            # ratios per repeat (side by side), then the median: > 1 means faster than the reference
            entry["vs_memory"][name] = statistics.median(m / v for m, v in zip(per["memory"], values))
            entry["vs_classic"][name] = statistics.median(c / v for c, v in zip(per["classic"], values))
        result[boundary] = entry
    return result


# ---- reporting -----------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    ahead_note = f" (+ahead rows: a thread reads {s['read_ahead']} batches ahead)" if s.get("read_ahead") else ""
    lines = [(f"Settings: ResNet-18 width {s['width']} ({s['steps']} pre-training steps), {s['samples']} samples, "
             f"batch {s['batch']}, {s['threads']} torch threads, "
             f"{'bf16 autocast + channels-last' if s.get('precision') == 'bf16' else 'fp32'}, "
             f"{s.get('workers', 0)} DataLoader workers"
             f"{ahead_note}"
             f"{' (persistent: one loader per approach)' if s.get('persistent_loaders') else ' (a new loader every epoch)'}; "
             f"{s['repeats']} repeats after a one-step warm-up"
             f"{'; approaches in lockstep, one step each in turn (epoch = the sum of its steps; memory-again: the A/A row)' if s.get('interleave') else ''}"
             f"; SACA calibrated on {s['saca_samples']} samples; "
             f"{'malloc: ' + s['allocator'] + '; ' if s.get('allocator', 'default') != 'default' else ''}"
             f"{s['cpu']}. Epoch seconds: median (min–max); ratios: median of per-repeat ratios "
             "(> 1 = faster than the reference).\n")]
    for boundary, entry in results["boundaries"].items():
        info = entry["info"]
        lines.append(f"**{boundary}** maps {tuple(info['shape'])}, raw {info['raw_bytes'] / 1e6:.1f} MB; "
                     f"SACA variants {', '.join(info.get('variants', [])) or 'none'}\n")
        fetch = entry.get("fetch_s")  # --interleave runs: the seconds of the epoch spent fetching
        lines.append("| approach | epoch s | img/s | vs memory | vs classic | bytes on disk |"
                     + (" of the epoch: fetching s |" if fetch else ""))
        lines.append("|---|---|---|---|---|---|" + ("---|" if fetch else ""))
        for name, stat in entry["epoch_s"].items():
            nbytes = info["bytes"].get(name.removesuffix("+ahead"))  # +ahead: the same store
            lines.append(f"| {name} | {stat['median']:.2f} ({stat['min']:.2f}–{stat['max']:.2f}) | "
                         f"{entry['img_s'][name]:.0f} | {entry['vs_memory'][name]:.2f} | "
                         f"{entry['vs_classic'][name]:.2f} | "
                         f"{'' if nbytes is None else f'{nbytes / 1e6:.1f} MB'} |"
                         + (f" {fetch[name]:.2f} |" if fetch else ""))
        codecs = info.get("codecs", {})
        if codecs:
            lines.append("\nCodecs: " + "; ".join(f"{k}: " + ", ".join(f"{t} `{c}`" for t, c in v.items())
                                                  for k, v in codecs.items()))
        builds = ", ".join(f"{k} {v:.1f} s ({v / info['forward_s']:.2f}×)" for k, v in info["build_s"].items())
        lines.append(f"\nBuild: one forward pass of the prefix {info['forward_s']:.1f} s; {builds}.\n")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    boundaries = list(results["boundaries"])
    names = list(results["boundaries"][boundaries[0]]["epoch_s"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    x = np.arange(len(boundaries))
    # one colour per approach (tab20: more than ten approaches stay apart); its +ahead row
    # (--read-ahead) in the same colour, hatched
    bases = list(dict.fromkeys(name.removesuffix("+ahead") for name in names))
    colours = plt.get_cmap("tab20" if len(bases) > 10 else "tab10")
    for k, name in enumerate(names):
        stats = [results["boundaries"][b]["epoch_s"][name] for b in boundaries]
        med = [st["median"] for st in stats]
        err = [[m - st["min"] for m, st in zip(med, stats)], [st["max"] - m for m, st in zip(med, stats)]]
        ahead = name.endswith("+ahead")
        ax.bar(x + (k - (len(names) - 1) / 2) * width, med, width, yerr=err, capsize=2, label=name,
               color=colours(bases.index(name.removesuffix("+ahead"))), hatch="//" if ahead else None,
               edgecolor="white" if ahead else None)
    ax.set_xticks(x, [f"frozen to {b}" for b in boundaries])
    ax.set_ylabel(f"epoch seconds ({results['settings']['samples']} samples)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small run; leaves docs/ alone")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="pre-training steps of the model")
    parser.add_argument("--samples", type=int, default=None, help="default 1024; quick 256")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="default 5; quick 1")
    parser.add_argument("--boundaries", nargs="+", default=None)
    parser.add_argument("--backends", nargs="+", default=["lmdb", "hdf5"])
    parser.add_argument("--saca-samples", type=int, default=64)
    parser.add_argument("--tiers", nargs="+", default=["default", "policy", "compact"],
                        help="which fmcache codec sets to build and train from (default: all three)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for every on-disk approach and classic freezing (default 0)")
    parser.add_argument("--read-ahead", type=int, default=0,
                        help="without workers: also train every on-disk approach read by a thread of the training "
                             "process this many batches ahead ('+ahead' rows, fmcache.readahead.ReadAhead; "
                             "default 0: none)")
    parser.add_argument("--fresh-loaders", action="store_true",
                        help="a new DataLoader (and new workers) every epoch, as before session 3; "
                             "default: one persistent loader per approach")
    parser.add_argument("--interleave", action="store_true",
                        help="train every approach in lockstep, one step each in turn (see train_lockstep); "
                             "adds a second in-memory loader as the A/A row")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the steps' arithmetic: fp32, or bf16 autocast + channels-last (the issue's reference "
                             "setting; see Precision)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads ran 3-5x slower)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds as they are (every run before session 20)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder for bench.json etc ('' skips)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (256 if args.quick else 1024)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.boundaries = args.boundaries or (["layer3"] if args.quick else list(BOUNDARIES))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--render":
        return render_command(argv[1:], "bench_train.py --render", markdown, plot)
    args = parse_args(argv)
    import blosc2

    blosc2.set_nthreads(1)
    allocator = None if args.default_allocator else tune_allocator()
    boundaries = run(args)
    results = {"settings": {"width": args.width, "steps": args.steps, "samples": args.samples, "batch": args.batch,
                            "repeats": args.repeats, "threads": args.threads,
                            "precision": args.precision, "saca_samples": args.saca_samples,
                            "workers": args.workers, "read_ahead": args.read_ahead, "interleave": args.interleave, "persistent_loaders": not args.fresh_loaders, "tiers": args.tiers,
                            "backends": args.backends,
                            "allocator": str(allocator or "default"),
                            "cpu": cpu_name(), "cores": os.cpu_count(),
                            "torch": torch.__version__,
                            "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                            "command": " ".join(["python", "tools/bench_train.py", *(argv or sys.argv[1:])])},
               "boundaries": boundaries}
    print(json.dumps(results, indent=1))
    print(markdown(results), file=sys.stderr)
    if not args.quick and args.docs:
        docs = Path(args.docs)
        update_json(docs / "bench.json", "train", results)
        plot(results, docs / "bench_train.png")
        write_region(docs / "benchmarks.md", MARK_BEGIN, MARK_END, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
