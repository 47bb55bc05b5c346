"""Why the compact codecs decode below 0.5 GB/s here: the libraries, measured bare.

Issue #5 asks the compact codec (SZ3, ZFP) to decode at >= 0.5 GB/s per core. fmcache's
own overhead around them is small (``read / codec`` ~0.9-1.1 in ``bench_read``), so this
script measures the libraries with nothing of fmcache in between, on the same real maps
as ``tools/bench_read.py`` (CIFAR ResNet-18 width 32, Fashion-MNIST, ``--samples``):

* ``pysz`` (SZ3) decode of one stream per sample for each predictor
  (``INTERP_LORENZO``, the default; ``INTERP``; ``LORENZO_REG``) and bound
  (``abs=0.02``, ``rel=0.02``);
* ``pysz`` decode of one stream holding 1, 4, 16 or 64 samples: if the rate rose with
  the stream size, per-call overhead would be the limit (and batching the fix); it
  does not, the decoder's arithmetic is;
* ``zfpy`` decode per sample in fixed-accuracy, fixed-rate and fixed-precision modes;
* encode through hdf5plugin's SZ3 HDF5 filter against ``pysz`` encode of the same maps
  (the HDF5 write target).

Float32 MB (10^6 bytes) per second of this thread's CPU time, medians of ``--repeats``
passes. Prints JSON; unless ``--quick`` writes ``docs/bench_compact.json`` and the table
between ``<!-- bench_compact:start -->`` and ``<!-- bench_compact:end -->`` in
``docs/benchmarks.md``::

    python tools/bench_compact.py            # ~3 min here
    python tools/bench_compact.py --quick    # width 16, 64 samples; docs untouched
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pysz
import torch
import zfpy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_read import capture_maps, cpu_name, update_json, write_region

MARK_BEGIN, MARK_END = "<!-- bench_compact:start -->", "<!-- bench_compact:end -->"
hdf5plugin.register(force=True)


def _package_version(name: str) -> str:
    """A distribution's version from its metadata (pysz has no ``__version__``)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def rate(run: Callable[[], Any], nbytes: int, repeats: int) -> float:
    """Median float32 MB/s of ``run`` (one pass over ``nbytes``) in this thread's CPU time."""
    run()
    rates = []
    for _ in range(repeats):
        t0 = time.thread_time()
        run()
        rates.append(nbytes / (time.thread_time() - t0) / 1e6)
    return statistics.median(rates)


def sz_config(shape: tuple[int, ...], algo: str, mode: str, bound: float) -> Any:
    config = pysz.szConfig(shape)
    config.cmprAlgo = getattr(pysz.szAlgorithm, algo)
    config.errorBoundMode = getattr(pysz.szErrorBoundMode, mode.upper())
    setattr(config, f"{mode}ErrorBound", bound)
    return config


def sz_streams(views: Sequence[np.ndarray], algo: str, mode: str, bound: float) -> list[bytes]:
    return [pysz.sz.compress(v, sz_config(v.shape, algo, mode, bound))[0].tobytes() for v in views]


def measure(x: np.ndarray, repeats: int) -> dict[str, Any]:
    n = len(x)
    views = [np.ascontiguousarray(x[i].reshape(x.shape[1], -1)) for i in range(n)]
    out: dict[str, Any] = {"shape": list(x.shape[1:]), "sz3": {}, "sz3_batched": {}, "zfp": {}, "hdf5_filter": {}}
    for algo in ("INTERP_LORENZO", "INTERP", "LORENZO_REG"):
        for mode in ("abs", "rel"):
            streams = sz_streams(views, algo, mode, 0.02)

            def decode(streams: list[bytes] = streams) -> None:
                for v, s in zip(views, streams):
                    pysz.sz.decompress(np.frombuffer(s, np.uint8), np.float32, v.shape)
            out["sz3"][f"{algo} {mode}=0.02"] = {"decode_mb_s": rate(decode, x.nbytes, repeats),
                                                 "ratio": x.nbytes / sum(map(len, streams))}
    for per in (1, 4, 16, 64):
        if per > n:
            continue
        groups = [np.ascontiguousarray(x[i:i + per].reshape(per * x.shape[1], -1)) for i in range(0, n - per + 1, per)]
        streams = sz_streams(groups, "INTERP_LORENZO", "abs", 0.02)

        def decode_groups(streams: list[bytes] = streams, groups: list[np.ndarray] = groups) -> None:
            for g, s in zip(groups, streams):
                pysz.sz.decompress(np.frombuffer(s, np.uint8), np.float32, g.shape)
        out["sz3_batched"][str(per)] = rate(decode_groups, sum(g.nbytes for g in groups), repeats)
    for name, kwargs in (("accuracy=0.05", {"tolerance": 0.05}), ("rate=8", {"rate": 8}),
                         ("precision=12", {"precision": 12})):
        blobs = [zfpy.compress_numpy(np.ascontiguousarray(x[i]), **kwargs) for i in range(n)]

        def decode_zfp(blobs: list[bytes] = blobs) -> None:
            for b in blobs:
                zfpy.decompress_numpy(b)
        out["zfp"][name] = {"decode_mb_s": rate(decode_zfp, x.nbytes, repeats), "ratio": x.nbytes / sum(map(len, blobs))}
    # the HDF5 filter against pysz, encode, the same maps and bound, one chunk per sample
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.h5"
        data = np.stack(views)

        def write_filter() -> None:
            with h5py.File(path, "w") as fh:
                fh.create_dataset("v", data=data, chunks=(1, *data.shape[1:]), **hdf5plugin.SZ3(absolute=0.02))
        out["hdf5_filter"]["filter_encode_mb_s"] = rate(write_filter, x.nbytes, max(1, repeats // 2))
        out["hdf5_filter"]["pysz_encode_mb_s"] = rate(lambda: sz_streams(views, "INTERP_LORENZO", "abs", 0.02),
                                                      x.nbytes, max(1, repeats // 2))
    return out


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [(f"Settings: ResNet-18 width {s['width']}, {s['samples']} samples, {s['repeats']} repeats; {s['cpu']}. "
              "Float32 MB/s per core (median), compression ratio in brackets.\n")]
    layers = list(results["layers"])
    lines.append("| library, mode | " + " | ".join(f"{layer} {tuple(results['layers'][layer]['shape'])}" for layer in layers) + " |")
    lines.append("|---|" + "---:|" * len(layers))
    first = results["layers"][layers[0]]
    for key in first["sz3"]:
        lines.append(f"| pysz `{key}`, a stream per sample | " + " | ".join(
            f"{results['layers'][layer]['sz3'][key]['decode_mb_s']:,.0f} ({results['layers'][layer]['sz3'][key]['ratio']:.1f}×)"
            for layer in layers) + " |")
    for per in first["sz3_batched"]:
        lines.append(f"| pysz `INTERP_LORENZO abs=0.02`, {per} samples per stream | " + " | ".join(
            f"{results['layers'][layer]['sz3_batched'].get(per, float('nan')):,.0f}" for layer in layers) + " |")
    for key in first["zfp"]:
        lines.append(f"| zfpy `{key}` | " + " | ".join(
            f"{results['layers'][layer]['zfp'][key]['decode_mb_s']:,.0f} ({results['layers'][layer]['zfp'][key]['ratio']:.1f}×)"
            for layer in layers) + " |")
    for key, label in (("pysz_encode_mb_s", "encode: pysz (`INTERP_LORENZO abs=0.02`)"),
                       ("filter_encode_mb_s", "encode: hdf5plugin's SZ3 filter (`absolute=0.02`), HDF5 write")):
        lines.append(f"| {label} | " + " | ".join(
            f"{results['layers'][layer]['hdf5_filter'][key]:,.0f}" for layer in layers) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="default 256; quick 64")
    parser.add_argument("--repeats", type=int, default=None, help="default 5; quick 2")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    args = parser.parse_args(argv)
    width, samples = (16, args.samples or 64) if args.quick else (32, args.samples or 256)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(1)
    maps = capture_maps(width, 50, args.layers, samples)
    results: dict[str, Any] = {
        "settings": {"width": width, "samples": samples, "repeats": repeats, "cpu": cpu_name(),
                     "cores": os.cpu_count(), "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "pysz": _package_version("pysz"), "hdf5plugin": hdf5plugin.version},
        "layers": {layer: measure(maps[layer], repeats) for layer in args.layers},
    }
    print(json.dumps(results, indent=1))
    if not args.quick:
        update_json(REPO / "docs" / "bench_compact.json", "compact", results)
        write_region(REPO / "docs" / "benchmarks.md", MARK_BEGIN, MARK_END, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
