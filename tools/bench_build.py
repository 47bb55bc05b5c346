"""Build time against one forward pass of the frozen prefix, repeated and side by side.

The same model and data as ``tools/bench_train.py`` (CIFAR ResNet-18 of ``--width`` from
:func:`fmcache.zoo.pretrained_resnet`, the first ``--samples`` Fashion-MNIST training
images, batch ``--batch``, one torch thread). For each boundary, every repeat runs in
turn: one inference-mode forward pass of the prefix over the data (what classic freezing pays
per epoch, and the least any cache build can cost), and :func:`fmcache.build_cache` of that
boundary with the default codec (``bf16``) on LMDB and on HDF5, and with SZ3
(``sz3:rel=0.02``) on LMDB, with SZ3's default predictor and without prediction
(``sz3nopred-lmdb``, ``algo=nopred``, since session 20), and with ``grid:abs=0.02``, the
compact codec of ``bench_read``, on both backends (``grid-lmdb``, ``grid-hdf5``, since
session 22). Wall seconds; the ratios are medians of per-repeat ratios
(build / forward pass of the same repeat), so a neighbour's load hits both alike.
``bench_train`` times each build once inside a 25-minute run; this is the repeated
measurement that ``tools/bench_targets.py`` checks the build target against.

    python tools/bench_build.py            # width 16, 2048 samples, layer1-3, 5 repeats (~8 min)
    python tools/bench_build.py --quick    # 256 samples, layer3, 2 repeats; docs untouched

``--sz3-ablation`` adds ``sz3abs-lmdb`` (``sz3:abs=0.02``, ``bench_read``'s compact codec)
and takes session 21's two build changes for SZ3 apart in the same run:
``sz3abs-lmdb-thread`` compresses on the builder's thread (``FMCACHE_SZ3_PROCESS=0``)
instead of in its SZ3 process (:mod:`fmcache.codecs.sz3_process`), and
``sz3abs-lmdb-thread-slow-switches`` does that under Python's own GIL switch interval
(5 ms) instead of the builder's 0.1 ms (:mod:`fmcache.gil`): the builder of session 20;
``bf16-lmdb-slow-switches`` is ``bf16-lmdb`` under 5 ms. ``sz3_ablation`` holds the ratios
per repeat (> 1: the change paid): ``thread_vs_process`` and ``slow_vs_short_switches``.

``--gil-held`` adds a fourth build, ``bf16-lmdb-gil-held``: the same as ``bf16-lmdb`` but with
blosc2 keeping the GIL while it compresses (python-blosc2's default, which the builder
overrides since session 5), to show in one run what that override is worth.

The process first fixes glibc's malloc thresholds (:func:`fmcache.tune_allocator`, as the
``fmcache`` command does): with glibc's run-time thresholds the same forward pass took
0.7 s or 1.7 s depending on the process's earlier frees (page faults, not convolutions),
which made every ratio here a draw. ``--default-allocator`` leaves them as they are (then
``--json`` defaults to ``docs/bench_build_default_malloc.json``). Since session 20 the
forward pass discards each batch's maps, as classic freezing does; before, it kept them
all and joined them at the end (the arm of ``bench_train``, which needs them).

It prints JSON and (unless ``--quick``) writes ``docs/bench_build.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_read import cpu_name

import fmcache.builder
from fmcache.builder import build_cache
from fmcache.codecs.sz3_process import ENV
from fmcache.memory import tune_allocator
from fmcache.zoo import FashionMNIST, pretrained_resnet, split_at

BUILDS = {"bf16-lmdb": ("bf16", ".lmdb"), "bf16-hdf5": ("bf16", ".h5"), "sz3-lmdb": ("sz3:rel=0.02", ".lmdb"),
          "sz3nopred-lmdb": ("sz3:rel=0.02,algo=nopred", ".lmdb"), "grid-lmdb": ("grid:abs=0.02", ".lmdb"),
          "grid-hdf5": ("grid:abs=0.02", ".h5")}
GIL_HELD = "bf16-lmdb-gil-held"
#: ``--sz3-ablation``: SZ3 with bench_read's compact bound (an absolute one: slower to
#: encode than ``rel=0.02`` on these maps), then builds without session 21's changes
SZ3_ABS = {"sz3abs-lmdb": ("sz3:abs=0.02", ".lmdb")}
IN_THREAD = {"sz3abs-lmdb-thread": "sz3abs-lmdb", "sz3abs-lmdb-thread-slow-switches": "sz3abs-lmdb"}
SLOW_SWITCHES = {"bf16-lmdb-slow-switches": "bf16-lmdb", "sz3abs-lmdb-thread-slow-switches": "sz3abs-lmdb-thread"}


@contextlib.contextmanager
def without(name: str, active: bool):  # type: ignore[no-untyped-def]
    """The builder without its ``name`` context (``blosc2_releasing_gil``: python-blosc2's
    default of keeping the GIL; ``frequent_switches``: Python's own 5 ms switch interval)
    while ``active``."""
    kept = getattr(fmcache.builder, name)
    if active:
        setattr(fmcache.builder, name, contextlib.nullcontext)
    try:
        yield
    finally:
        setattr(fmcache.builder, name, kept)


def forward_pass(prefix: torch.nn.Module, data: Subset, batch: int) -> float:
    """Seconds of one inference-mode forward pass of ``prefix`` over ``data``, each batch's
    maps dropped (what classic freezing pays for the prefix per epoch)."""
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            prefix(x)
    return time.perf_counter() - t0


@contextlib.contextmanager
def in_thread(yes: bool):  # type: ignore[no-untyped-def]
    """SZ3 compressed on the builder's thread, not in its own process, while ``yes``."""
    before = os.environ.get(ENV)
    if yes:
        os.environ[ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _ratio(per: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(per[a], per[b]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--boundaries", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gil-held", action="store_true", help=f"also time {GIL_HELD} (see above)")
    parser.add_argument("--sz3-ablation", action="store_true",
                        help=f"also time {', '.join([*SZ3_ABS, *IN_THREAD, *SLOW_SWITCHES])} (see above)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds as they are (see above)")
    parser.add_argument("--json", default=str(REPO / "docs" / "bench_build.json"))
    args = parser.parse_args(argv)
    if args.default_allocator and args.json == parser.get_default("json"):
        args.json = str(REPO / "docs" / "bench_build_default_malloc.json")
    allocator = None if args.default_allocator else tune_allocator()
    builds = dict(BUILDS, **({GIL_HELD: BUILDS["bf16-lmdb"]} if args.gil_held else {}))
    if args.sz3_ablation:
        builds.update(SZ3_ABS)
        builds.update({name: builds[plain] for name, plain in IN_THREAD.items()})
        builds["bf16-lmdb-slow-switches"] = builds["bf16-lmdb"]
    if args.quick:
        args.samples, args.boundaries, args.repeats = 256, ["layer3"], 2
        if args.json == parser.get_default("json"):
            args.json = ""  # docs untouched; a --json given is written
    torch.set_num_threads(1)
    model = pretrained_resnet(width=args.width, steps=args.steps).eval()
    data = Subset(FashionMNIST("train", augment=False), range(args.samples))
    seconds: dict[str, dict[str, list[float]]] = {b: {k: [] for k in ("forward", *builds)} for b in args.boundaries}
    workdir = Path(tempfile.mkdtemp(prefix="fmcache-bench-build-"))
    try:
        for boundary in args.boundaries:  # warm-up, untimed: page cache, allocator, lazy imports
            forward_pass(split_at(copy.deepcopy(model), boundary)[0].eval(), Subset(data, range(64)), args.batch)
        for repeat in range(args.repeats):
            for boundary in args.boundaries:
                prefix = split_at(copy.deepcopy(model), boundary)[0].eval()
                seconds[boundary]["forward"].append(forward_pass(prefix, data, args.batch))
                for name, (codec, suffix) in builds.items():
                    out = workdir / f"{boundary}-{name}{suffix}"
                    fresh = copy.deepcopy(model)  # outside the timing: a user's build copies nothing
                    with without("blosc2_releasing_gil", name == GIL_HELD), \
                            without("frequent_switches", name in SLOW_SWITCHES), \
                            in_thread(name in IN_THREAD):
                        t0 = time.perf_counter()
                        build_cache(fresh, data, [boundary], out, codec=codec, batch_size=args.batch,
                                    progress=False)
                        seconds[boundary][name].append(time.perf_counter() - t0)
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
                print(f"repeat {repeat + 1} {boundary}: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in seconds[boundary].items()), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "settings": {"width": args.width, "steps": args.steps, "samples": args.samples, "batch": args.batch,
                     "repeats": args.repeats, "threads": 1, "gil_held_row": args.gil_held,
                     "sz3_ablation_rows": args.sz3_ablation,
                     "allocator": str(allocator or "default"),
                     "forward": "maps dropped per batch", "cpu": cpu_name(), "torch": torch.__version__,
                     "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
        "boundaries": {}}
    for boundary, per in seconds.items():
        entry: dict[str, Any] = {"seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                             for k, v in per.items()},
                                 "vs_forward": {k: statistics.median(b / f for b, f in zip(per[k], per["forward"]))
                                                for k in builds}}
        if GIL_HELD in per:  # > 1: the GIL release made the build faster
            entry["gil_held_vs_released"] = statistics.median(h / r for h, r in zip(per[GIL_HELD], per["bf16-lmdb"]))
        if args.sz3_ablation:  # > 1: the change made the build faster
            entry["sz3_ablation"] = {
                "thread_vs_process": _ratio(per, "sz3abs-lmdb-thread", "sz3abs-lmdb"),
                "slow_vs_short_switches": {plain: _ratio(per, name, plain) for name, plain in SLOW_SWITCHES.items()}}
        result["boundaries"][boundary] = entry
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
