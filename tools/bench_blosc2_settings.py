"""Does any blosc2 setting decode ``bf16``'s frames faster? Decode speed and ratio per setting.

``bf16`` stores each map as one blosc2 frame of the float32 words its bfloat16 values
stand for (typesize 4, the low two bytes zero; docs/codecs.md). This script compresses
the same real maps (as in ``bench_read.py``: the zoo's CIFAR ResNet-18 of width 32,
layers 1-3) with each setting below and times ``blosc2.decompress`` into a fresh array,
every setting in turn per sample (alternating the order every sample, so a drift of the
machine hits all alike), over ``--rounds`` passes; µs per call, median over passes, and
the speed relative to fmcache's setting (LZ4 level 5, byte shuffle, automatic split and
block size).

    python tools/bench_blosc2_settings.py --json docs/bench_blosc2_settings.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from bench_read import capture_maps

_S, _B = blosc2.Filter.SHUFFLE, blosc2.Filter.BITSHUFFLE
_LZ4, _SPLIT = blosc2.Codec.LZ4, blosc2.SplitMode


def _setting(codec: Any = _LZ4, clevel: int = 5, shuffle: Any = _S, **extra: Any) -> dict[str, Any]:
    return {"codec": codec, "clevel": clevel, "filters": [shuffle], **extra}


SETTINGS: dict[str, dict[str, Any]] = {
    "fmcache: lz4-5, byte shuffle": _setting(),
    "lz4-5, never split": _setting(splitmode=_SPLIT.NEVER_SPLIT),
    "lz4-5, always split": _setting(splitmode=_SPLIT.ALWAYS_SPLIT),
    "lz4-1": _setting(clevel=1),
    "lz4-9": _setting(clevel=9),
    "lz4-5, bit shuffle": _setting(shuffle=_B),
    "lz4-5, 16 KiB blocks": _setting(blocksize=16384),
    "lz4-5, 8 KiB blocks": _setting(blocksize=8192),
    "blosclz-5, byte shuffle": _setting(codec=blosc2.Codec.BLOSCLZ),
}


def measure(maps: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    shape, n = maps.shape[1:], len(maps)
    wide = torch.from_numpy(maps).to(torch.bfloat16).float().numpy()  # what bf16 compresses
    frames = {name: [blosc2.compress2(wide[i], typesize=4, nthreads=1, filters_meta=[0], **kw) for i in range(n)]
              for name, kw in SETTINGS.items()}
    names = list(SETTINGS)
    clock = time.perf_counter_ns
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        spent = dict.fromkeys(names, 0)
        for i in range(n):
            for name in names if (i + r) % 2 else names[::-1]:
                dst = np.empty(shape, np.float32)
                t0 = clock()
                blosc2.decompress(frames[name][i], dst=dst)
                spent[name] += clock() - t0
        for name in names:
            per_round[name].append(spent[name] / n)
    base = per_round[names[0]]
    return {name: {"us": statistics.median(v) / 1e3,
                   "mb_s": maps[0].nbytes / statistics.median(v) * 1e3,
                   "speed_vs_fmcache": statistics.median(b / x for b, x in zip(base, v)),
                   "ratio": maps.nbytes / sum(map(len, frames[name]))}
            for name, v in per_round.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    maps = capture_maps(32, 50, args.layers, args.samples)
    results = {layer: measure(maps[layer], args.rounds) for layer in args.layers}
    print("| setting | " + " | ".join(f"{layer} µs | speed | ratio" for layer in results) + " |")
    print("|---|" + "---:|---:|---:|" * len(results))
    for name in SETTINGS:
        print(f"| {name} | " + " | ".join(
            f"{r[name]['us']:.1f} | {r[name]['speed_vs_fmcache']:.2f}× | {r[name]['ratio']:.2f}"
            for r in results.values()) + " |")
    if args.json:
        settings = {"samples": args.samples, "rounds": args.rounds, "blosc2": blosc2.__version__,
                    "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        Path(args.json).write_text(json.dumps({"settings": settings, "layers": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
